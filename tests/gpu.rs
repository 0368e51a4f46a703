//! The GPU backend against the CPU backend (op by op and whole models on odd shapes) and
//! against the transformers float32 reference of `tests/fixtures/tiny`. A missing adapter
//! fails these tests.
#![cfg(feature = "gpu")]

use std::path::{Path, PathBuf};

use bitnet_inference::arch::GatedAct;
use bitnet_inference::backend::HeadMode;
use bitnet_inference::backend::{Backend, KvDtype, Linear, LogitRows, NormSite};
use bitnet_inference::config::{ModelConfig, Preset};
use bitnet_inference::cpu::CpuBackend;
use bitnet_inference::engine::forward::{forward, forward_argmax, queue_greedy_step, top_k_last};
use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::engine::sampler::SamplingParams;
use bitnet_inference::format::{safetensors::load, synth, Weights};
use bitnet_inference::gpu::{self, Activation, GpuBackend, GpuOptions};
use bitnet_inference::reference as ops;
use bitnet_inference::reference::{argmax, top_candidates};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::{cpu, cpu_with, floats, ids, max_abs_diff, reference, DIR};

fn gpu(w: &Weights) -> GpuBackend {
    gpu_with(w, &GpuOptions::default())
}

fn gpu_with(w: &Weights, o: &GpuOptions) -> GpuBackend {
    let b = gpu::load(w, o).expect("a wgpu adapter is required for the GPU tests");
    eprintln!("{}", b.describe());
    b
}

/// A random model of `cfg` in a fresh temp dir (one per call: tests run in parallel, and
/// rewriting a checkpoint another test has memory-mapped ends that test with SIGBUS).
fn synth_model(cfg: &ModelConfig, seed: u64) -> (PathBuf, Weights) {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "bitnet-gpu-test-{}-{call}-{seed}-{}x{}x{}",
        std::process::id(),
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads
    ));
    synth::write_model(&dir, cfg, seed, |_, _| {}).unwrap();
    let w = load(&dir).unwrap();
    (dir, w)
}

/// A one-layer model with head_dim 4 (the scalar attention kernels) and `positions`.
fn head_dim_4_config(positions: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        hidden_size: 20,
        intermediate_size: 12,
        num_layers: 1,
        num_heads: 5,
        num_kv_heads: 5,
        head_dim: 4,
        max_position_embeddings: positions,
        ..Preset::Tiny.config()
    }
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

/// `bench --membw` on the GPU: the probes count every ternary byte of a step and leave the
/// backend's state (KV cache, step buffers) usable: generation afterwards is unchanged.
#[test]
fn bandwidth_probe_counts_every_matrix_and_keeps_generation_intact() {
    let r = reference();
    let w = load(Path::new(DIR)).unwrap();
    let c = w.config.clone();
    let mut g = Generator::new(gpu(&w)).unwrap();
    let p = &r["references"]["float32"]["prompts"][0];
    let opts = GenerateOptions {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let before = g
        .generate(&ids(&p["input_ids"]), &opts, None, |_, _| true)
        .unwrap();
    let bw = g.backend_mut().bandwidth(1);
    let (h, q, kv, i) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    // rows x padded columns / 4 codes per byte, per layer: q|k|v, o, gate|up, down.
    let layer = (q + 2 * kv) * pad64(h) + h * pad64(q) + 2 * i * pad64(h) + h * pad64(i);
    assert_eq!(bw.gemv_bytes, (c.num_layers * layer / 4) as u64);
    for (what, v) in [
        ("copy", bw.copy),
        ("read", bw.read),
        ("serial", bw.gemv_serial),
        ("independent", bw.gemv_independent),
    ] {
        assert!(v.is_finite() && v > 0.0, "{what}: {v}");
    }
    let after = g
        .generate(&ids(&p["input_ids"]), &opts, None, |_, _| true)
        .unwrap();
    assert_eq!(after.tokens, before.tokens);
}

fn pad64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

fn to_f32(w: &[u32]) -> Vec<f32> {
    w.iter().map(|&b| f32::from_bits(b)).collect()
}

fn from_f32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn unpack_i8(words: &[u32], t: usize, stride_words: usize, width: usize) -> Vec<i8> {
    let mut out = Vec::new();
    for ti in 0..t {
        for c in 0..width {
            let w = words[ti * stride_words + c / 4];
            out.push((w >> (8 * (c % 4))) as u8 as i8);
        }
    }
    out
}

fn pack_i8(q: &[i8], t: usize, width: usize) -> Vec<u32> {
    let sw = pad64(width) / 4;
    let mut out = vec![0u32; t * sw];
    for ti in 0..t {
        for c in 0..width {
            out[ti * sw + c / 4] |= (q[ti * width + c] as u8 as u32) << (8 * (c % 4));
        }
    }
    out
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// The GPU's norm + quant against `ops::rmsnorm_quant`: scales within float noise, int8 codes
/// equal except a rare ±1 where a value sits on a rounding boundary.
fn check_quant(g: &mut GpuBackend, x: &[f32], gamma: &[f32], t: usize, eps: f32) {
    let width = gamma.len();
    let words = g.read_activation(Activation::Quantized).unwrap();
    let q = unpack_i8(&words, t, pad64(width) / 4, width);
    let scales = to_f32(&g.read_activation(Activation::Scales).unwrap());
    let mut flips = 0;
    for ti in 0..t {
        let mut tmp = vec![0.0; width];
        let mut want = vec![0i8; pad64(width)];
        let absmax = ops::rmsnorm_quant(
            &x[ti * width..(ti + 1) * width],
            gamma,
            eps,
            &mut tmp,
            &mut want,
        );
        let s = absmax / 127.0;
        assert!(
            (scales[ti] - s).abs() <= 1e-6 * s,
            "token {ti}: scale {} vs {s}",
            scales[ti]
        );
        for c in 0..width {
            let d = (q[ti * width + c] as i32 - want[c] as i32).abs();
            assert!(
                d <= 1,
                "token {ti} col {c}: {} vs {}",
                q[ti * width + c],
                want[c]
            );
            flips += d;
        }
        // Padding words of the row are zero.
        let sw = pad64(width) / 4;
        for wi in width.div_ceil(4)..sw {
            assert_eq!(words[ti * sw + wi], 0);
        }
    }
    assert!(
        flips * 200 <= (t * width) as i32,
        "{flips} ±1 flips in {}",
        t * width
    );
}

#[test]
fn rmsnorm_quant_and_relu2_match_cpu_ops() {
    let cfg = odd_config();
    let (_dir, w) = synth_model(&cfg, 11);
    let mut g = gpu(&w);
    let mut rng = StdRng::seed_from_u64(1);
    let (h, i, q) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim());
    for t in [1usize, 7] {
        g.embed(&vec![3; t]).unwrap();
        let x = random(&mut rng, t * h, 3.0);
        g.write_activation(Activation::Residual, &from_f32(&x));
        g.rmsnorm_quant(1, NormSite::PostAttention);
        check_quant(
            &mut g,
            &x,
            &w.layers[1].post_attention_norm,
            t,
            cfg.rms_norm_eps,
        );

        let a = random(&mut rng, t * q, 2.0);
        g.write_activation(Activation::Attention, &from_f32(&a));
        g.attn_out_quant(0, true);
        check_quant(&mut g, &a, &w.layers[0].attn_sub_norm, t, cfg.rms_norm_eps);

        let gu = random(&mut rng, t * 2 * i, 2.0);
        g.write_activation(Activation::GateUp, &from_f32(&gu));
        g.gated_act_quant(0, GatedAct::Relu2, true);
        let mut m = vec![0.0; t * i];
        for ti in 0..t {
            let row = &gu[ti * 2 * i..(ti + 1) * 2 * i];
            ops::relu2_mul(&row[..i], &row[i..], &mut m[ti * i..(ti + 1) * i]);
        }
        check_quant(&mut g, &m, &w.layers[0].ffn_sub_norm, t, cfg.rms_norm_eps);
    }
}

/// Exact reference of a ternary matmul from the checkpoint codes.
fn matmul_ref(
    mats: &[&bitnet_inference::format::TernaryMatrix],
    q: &[i8],
    xs: &[f32],
    t: usize,
) -> Vec<f32> {
    let k = mats[0].cols;
    let rows: usize = mats.iter().map(|m| m.rows).sum();
    let mut out = vec![0.0; t * rows];
    let mut r0 = 0;
    let mut codes = vec![0u8; k];
    for m in mats {
        for r in 0..m.rows {
            m.row_codes(r, &mut codes).unwrap();
            for ti in 0..t {
                let sum: i32 = codes
                    .iter()
                    .zip(&q[ti * k..(ti + 1) * k])
                    .map(|(&c, &x)| (c as i32 - 1) * x as i32)
                    .sum();
                out[ti * rows + r0 + r] = sum as f32 * xs[ti] * m.scale;
            }
        }
        r0 += m.rows;
    }
    out
}

#[test]
fn ternary_matmul_is_exact_gemv_and_gemm() {
    // With tensor cores where the adapter has them (steps of more than 192 tokens; 256 where
    // its workgroup memory holds only the 64-token tile), and without;
    // the wide shape's K (17 and 13 steps of 64) is split over workgroups on small steps.
    let wide = ModelConfig {
        hidden_size: 1088,
        intermediate_size: 776,
        num_heads: 34,
        ..odd_config()
    };
    assert!(bitnet_inference::gpu::ops::matmul::k_splits(1152, 17, 17) > 1);
    assert!(bitnet_inference::gpu::ops::matmul::k_splits(1088, 13, 64) > 1);
    for cfg in [odd_config(), wide] {
        for tensor_cores in [true, false] {
            ternary_matmul_is_exact_with(&cfg, tensor_cores);
        }
    }
}

fn ternary_matmul_is_exact_with(cfg: &ModelConfig, tensor_cores: bool) {
    let (_dir, w) = synth_model(cfg, 12);
    let mut g = gpu_with(
        &w,
        &GpuOptions {
            tensor_cores,
            ..Default::default()
        },
    );
    let mut rng = StdRng::seed_from_u64(2);
    let (h, i, q) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim());
    let l = &w.layers[1];
    // GEMV (1), the 4-token GEMV (2..=16, partial groups of 4), the tiled GEMM (> 16, split over
    // K where it has few tiles) or the tensor-core GEMM (> 192, split over K where it has few
    // tiles), partial tiles of rows and tokens.
    for t in [1usize, 2, 8, 9, 17, 64, 65, 200, 257, 300] {
        g.embed(&vec![5; t]).unwrap();
        let rq = |rng: &mut StdRng, n: usize| -> Vec<i8> {
            (0..n)
                .map(|_| rng.random_range(-128i32..=127) as i8)
                .collect()
        };
        let xs: Vec<f32> = (0..t).map(|_| rng.random::<f32>() * 0.1 + 1e-3).collect();
        g.write_activation(Activation::Scales, &from_f32(&xs));

        // q|k|v and gate|up (stored), K = hidden.
        let xq = rq(&mut rng, t * h);
        g.write_activation(Activation::Quantized, &pack_i8(&xq, t, h));
        g.ternary_matmul(1, Linear::Qkv);
        let got = to_f32(&g.read_activation(Activation::Qkv).unwrap());
        let want = matmul_ref(&[&l.q, &l.k, &l.v], &xq, &xs, t);
        assert_eq!(&got[..want.len()], &want[..], "qkv t={t} {tensor_cores}");
        g.ternary_matmul(1, Linear::GateUp);
        let got = to_f32(&g.read_activation(Activation::GateUp).unwrap());
        let want = matmul_ref(&[&l.gate, &l.up], &xq, &xs, t);
        assert_eq!(
            &got[..want.len()],
            &want[..],
            "gate_up t={t} {tensor_cores}"
        );

        // o (K = q_dim) and down (K = intermediate) add into the residual.
        let x0 = random(&mut rng, t * h, 1.0);
        g.write_activation(Activation::Residual, &from_f32(&x0));
        let xq = rq(&mut rng, t * q);
        g.write_activation(Activation::Quantized, &pack_i8(&xq, t, q));
        g.ternary_matmul(1, Linear::O);
        let got = to_f32(&g.read_activation(Activation::Residual).unwrap());
        let o = matmul_ref(&[&l.o], &xq, &xs, t);
        let want: Vec<f32> = x0.iter().zip(&o).map(|(a, b)| a + b).collect();
        assert_eq!(&got[..want.len()], &want[..], "o t={t} {tensor_cores}");
        let xq = rq(&mut rng, t * i);
        g.write_activation(Activation::Quantized, &pack_i8(&xq, t, i));
        g.ternary_matmul(1, Linear::Down);
        let got2 = to_f32(&g.read_activation(Activation::Residual).unwrap());
        let d = matmul_ref(&[&l.down], &xq, &xs, t);
        let want: Vec<f32> = got[..t * h].iter().zip(&d).map(|(a, b)| a + b).collect();
        assert_eq!(&got2[..want.len()], &want[..], "down t={t} {tensor_cores}");
    }
}

/// The parts of fused linears (`use_rms_norm` models: q, k, v, gate and up each after their
/// own norm) compute exactly their rows of the fused output, on every matmul kernel.
#[test]
fn part_matmuls_write_exactly_their_rows() {
    let cfg = odd_config();
    let (_dir, mut w) = synth_model(&cfg, 13);
    w.config.family = bitnet_inference::config::Family::LlamaBitNet;
    w.config.linear_norm_eps = Some(1e-5);
    for l in &mut w.layers {
        l.linear_norms = vec![vec![1.0; cfg.hidden_size]; 5];
    }
    let mut g = gpu_with(&w, &GpuOptions::default());
    let mut rng = StdRng::seed_from_u64(3);
    let (h, i, q, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    let l = &w.layers[1];
    for t in [1usize, 2, 8, 9, 17, 64, 65, 130] {
        g.embed(&vec![5; t]).unwrap();
        let xq: Vec<i8> = (0..t * h)
            .map(|_| rng.random_range(-128i32..=127) as i8)
            .collect();
        let xs: Vec<f32> = (0..t).map(|_| rng.random::<f32>() * 0.1 + 1e-3).collect();
        g.write_activation(Activation::Scales, &from_f32(&xs));
        g.write_activation(Activation::Quantized, &pack_i8(&xq, t, h));
        let cases = [
            (Linear::Q, &l.q, Activation::Qkv, q + 2 * kv, 0),
            (Linear::K, &l.k, Activation::Qkv, q + 2 * kv, q),
            (Linear::V, &l.v, Activation::Qkv, q + 2 * kv, q + kv),
            (Linear::Gate, &l.gate, Activation::GateUp, 2 * i, 0),
            (Linear::Up, &l.up, Activation::GateUp, 2 * i, i),
        ];
        for (linear, m, act, ld, row0) in cases {
            let sentinel = vec![-7.5f32; t * ld];
            g.write_activation(act, &from_f32(&sentinel));
            g.ternary_matmul(1, linear);
            let got = to_f32(&g.read_activation(act).unwrap());
            let want = matmul_ref(&[m], &xq, &xs, t);
            for ti in 0..t {
                let row = &got[ti * ld..(ti + 1) * ld];
                let part = row0..row0 + m.rows;
                assert_eq!(
                    &row[part.clone()],
                    &want[ti * m.rows..(ti + 1) * m.rows],
                    "{linear:?} t={t} token {ti}"
                );
                let mut others = row.iter().enumerate().filter(|(j, _)| !part.contains(j));
                assert!(
                    others.all(|(_, v)| *v == -7.5),
                    "{linear:?} t={t}: rows outside the part written"
                );
            }
        }
    }
}

/// [`odd_config`] with the reference checkpoint's head shape (16 wide, two query heads a KV
/// head).
fn fixture_like_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        ..odd_config()
    }
}

#[test]
fn rope_kv_write_and_attention_match_cpu_ops() {
    // The 2B-4T head shape: 128-wide heads (every lane of the subgroup kernel holds four
    // column vectors), four query heads a KV head.
    let wide_heads = ModelConfig {
        hidden_size: 256,
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 128,
        ..odd_config()
    };
    for cfg in [odd_config(), fixture_like_config(), wide_heads] {
        for kv in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            rope_kv_write_and_attention_at(&cfg, kv, 160, &[70, 1, 1, 33, 1, 44, 1], 2, None);
            // Prefill rows within one split write the output themselves (no merge).
            rope_kv_write_and_attention_at(&cfg, kv, 160, &[20, 12, 1], 1, None);
        }
    }
}

/// The KV shift of attention sinks (`Backend::kv_shift`) on every cache type: positions
/// 40..105 moved to 6..71 after a 105-token prefill (keys rotated back by 34 positions and,
/// for int8, quantized again), then prefill and decode steps attend over the moved rows, all
/// against the host reference cache shifted by `ops::rope_back` as the CPU does it. (The whole
/// model's int8 logits are no test of the shift: CPU and GPU attention sums differ by ulps,
/// and V rows, integers times one scale, often sit exactly on an int8 rounding tie, so codes
/// flip; see tests/window.rs.)
#[test]
fn the_kv_shift_moves_and_rerotates_every_cache_type() {
    for cfg in [odd_config(), fixture_like_config()] {
        for kv in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            let shift = Some((2, 40, 6, 65));
            rope_kv_write_and_attention_at(&cfg, kv, 160, &[70, 35, 33, 1, 1], 1, shift);
        }
    }
}

#[test]
fn one_token_attention_after_a_long_prompt_spreads_over_many_splits() {
    // 4,196 cached positions: one-token steps split their rows into 66 blocks of 64 (the
    // partials' stride is the step's own split count), all merged by one `combine` workgroup.
    let mut steps = vec![512; 8];
    steps.extend([100, 1, 1]);
    let cfg = ModelConfig {
        max_position_embeddings: 4300,
        ..odd_config()
    };
    rope_kv_write_and_attention_at(&cfg, KvDtype::F16, 4300, &steps, 66, None);
}

/// [`rope_kv_write_and_attention_match_cpu_ops`] with a `kv` cache of `cap` positions (the
/// host reference stores keys and values as the cache does: f16-rounded, or int8 codes of
/// each row's absmax scale), steps of `steps` tokens, at least `min_splits` splits of a
/// one-token row, and `shift` (before step i, positions from..from+n moved to to..to+n and the
/// sequence cut to to+n) if given.
fn rope_kv_write_and_attention_at(
    cfg: &ModelConfig,
    kv_dtype: KvDtype,
    cap: usize,
    steps: &[usize],
    min_splits: usize,
    shift: Option<(usize, usize, usize, usize)>,
) {
    let (_dir, w) = synth_model(cfg, 13);
    let mut g = gpu_with(
        &w,
        &GpuOptions {
            kv: kv_dtype,
            ..Default::default()
        },
    );
    // A head's row as the cache holds it.
    let store = |x: &[f32]| -> Vec<f32> {
        match kv_dtype {
            KvDtype::F32 => x.to_vec(),
            KvDtype::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            KvDtype::Int8 => {
                let mut codes = vec![0i8; x.len()];
                let scale = bitnet_inference::quant::quantize_row_absmax(x, &mut codes);
                codes.iter().map(|&c| c as f32 * scale).collect()
            }
        }
    };
    let mut rng = StdRng::seed_from_u64(3);
    let (hd, q, kv) = (cfg.head_dim, cfg.q_dim(), cfg.kv_dim());
    let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
    let stride = q + 2 * kv;
    let mut cache = g.new_cache(cap).unwrap();
    let inv = ops::rope_inv_freq(cfg.rope_theta, hd);
    // Host reference cache for layer 1: [kv_head][pos][hd].
    let mut kc = vec![0.0f32; nkv * cap * hd];
    let mut vc = vec![0.0f32; nkv * cap * hd];
    let mut pos = 0;
    for (i, &t) in steps.iter().enumerate() {
        if let Some((_, from, to, n)) = shift.filter(|s| s.0 == i) {
            g.kv_shift(&mut cache, &[0], from, to, n).unwrap();
            for kh in 0..nkv {
                for p in 0..n {
                    let (src, dst) = ((kh * cap + from + p) * hd, (kh * cap + to + p) * hd);
                    let mut key = kc[src..src + hd].to_vec();
                    ops::rope_back(&mut key, from - to, &inv);
                    kc[dst..dst + hd].copy_from_slice(&store(&key));
                    vc.copy_within(src..src + hd, dst);
                }
            }
            pos = to + n;
        }
        g.embed(&vec![1; t]).unwrap();
        let qkv = random(&mut rng, t * stride, 2.0);
        g.write_activation(Activation::Qkv, &from_f32(&qkv));
        g.rope_kv_write(&mut cache, 1, pos);
        g.attention(&cache, 1, pos);
        let got_qkv = to_f32(&g.read_activation(Activation::Qkv).unwrap());
        let got = to_f32(&g.read_activation(Activation::Attention).unwrap());
        let mut want_qkv = qkv.clone();
        for ti in 0..t {
            let row = &mut want_qkv[ti * stride..(ti + 1) * stride];
            for head in row[..q + kv].chunks_mut(hd) {
                ops::rope(head, pos + ti, &inv);
            }
        }
        let d = max_abs_diff(&got_qkv[..t * stride], &want_qkv);
        assert!(d <= 1e-5, "rope t={t} pos={pos}: {d}");
        // The cache holds the GPU's own rotated rows (equal to the host's within float noise):
        // the int8 codes of those are exact.
        for ti in 0..t {
            let row = &got_qkv[ti * stride..(ti + 1) * stride];
            for kh in 0..nkv {
                let dst = (kh * cap + pos + ti) * hd;
                kc[dst..dst + hd].copy_from_slice(&store(&row[q + kh * hd..q + (kh + 1) * hd]));
                vc[dst..dst + hd]
                    .copy_from_slice(&store(&row[q + kv + kh * hd..q + kv + (kh + 1) * hd]));
            }
        }
        let mut scores = vec![0.0; cap];
        for ti in 0..t {
            for h in 0..nh {
                let len = pos + ti + 1;
                let kh = h / (nh / nkv);
                let base = kh * cap * hd;
                let mut out = vec![0.0; hd];
                ops::attend(
                    &want_qkv[ti * stride + h * hd..][..hd],
                    &kc[base..base + len * hd],
                    &vc[base..base + len * hd],
                    len,
                    &mut scores,
                    &mut out,
                );
                let gw = &got[ti * q + h * hd..][..hd];
                let d = max_abs_diff(gw, &out);
                assert!(
                    d <= 1e-5,
                    "{kv_dtype:?} attention t={t} pos={pos} token {ti} head {h}: {d}"
                );
            }
        }
        pos += t;
    }
    assert!(
        cache.max_splits() >= min_splits,
        "the test should exercise attention split {min_splits} ways"
    );
}

/// Position-wise comparison of two backends' logits. Both compute in f32 with different
/// summation orders (attention, norms), so activations differ by ulps; where such a value sits
/// on an int8 rounding boundary one backend's code moves by ±1 (docs/NUMERICS.md §10), which moves
/// that position's logits (and, through the KV cache, later ones) by ~1e-2 on these random
/// models. `whole_forward_quantization_equals_cpu_quantization_of_gpu_inputs` shows the GPU
/// quantizer itself agrees exactly. So: the first position must agree to float noise (`tol`),
/// and none may exceed the size of a one-code flip.
fn check_positions(a: &[f32], b: &[f32], vocab: usize, tol: f32, what: &str) {
    let per = per_position(a, b, vocab);
    let close = per.iter().filter(|&&d| d <= tol).count();
    let worst = per.iter().copied().fold(0.0, f32::max);
    eprintln!(
        "{what}: {close}/{} positions within {tol}, worst {worst}",
        per.len()
    );
    assert!(
        per[0] <= tol,
        "{what}: first position differs by {}: {per:?}",
        per[0]
    );
    assert!(
        worst <= 0.05,
        "{what}: {worst} exceeds a one-code flip: {per:?}"
    );
}

/// Prefill then decode on both backends, comparing the logits of every step.
fn compare_with_cpu(w: &Weights, g: GpuBackend, prompt_len: usize, decode: usize, tol: f32) {
    compare_backends(w, g, cpu(w), prompt_len, decode, tol);
}

/// [`compare_with_cpu`] against a given CPU backend (e.g. with an int8 head).
fn compare_backends(
    w: &Weights,
    g: GpuBackend,
    c: CpuBackend,
    prompt_len: usize,
    decode: usize,
    tol: f32,
) {
    let cfg = &w.config;
    let mut rng = StdRng::seed_from_u64(prompt_len as u64);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    let ctx = prompt_len + decode + 1;
    let mut gg = Generator::with_context(g, ctx).unwrap();
    let mut cg = Generator::with_context(c, ctx).unwrap();
    let a = gg.logits(&prompt, true).unwrap();
    let b = cg.logits(&prompt, true).unwrap();
    check_positions(&a, &b, cfg.vocab_size, tol, "prefill");
    let opts = GenerateOptions {
        max_tokens: decode,
        ignore_eos: true,
        ..Default::default()
    };
    let ga = gg.generate(&prompt, &opts, None, |_, _| true).unwrap();
    let gb = cg.generate(&prompt, &opts, None, |_, _| true).unwrap();
    assert_eq!(ga.tokens, gb.tokens, "greedy tokens");
    // Teacher-forced over prompt + generated tokens, every position.
    let mut seq = prompt.clone();
    seq.extend_from_slice(&ga.tokens);
    let a = gg.logits(&seq, true).unwrap();
    let b = cg.logits(&seq, true).unwrap();
    check_positions(&a, &b, cfg.vocab_size, tol, "teacher-forced");
}

#[test]
fn odd_shapes_match_cpu_backend() {
    let shapes = [
        odd_config(),
        ModelConfig {
            vocab_size: 77,
            hidden_size: 136,
            intermediate_size: 100,
            num_layers: 3,
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 68,
            max_position_embeddings: 64,
            ..Preset::Tiny.config()
        },
        head_dim_4_config(64),
    ];
    for (n, cfg) in shapes.iter().enumerate() {
        let (_dir, w) = synth_model(cfg, 20 + n as u64);
        compare_with_cpu(&w, gpu(&w), 13, 6, 1e-5);
    }
}

/// `--head int8` on the GPU: the same int8 rows and scales as the CPU's int8 head, exact i32
/// dot products, also when the head is split over several bindings.
#[test]
fn int8_head_matches_cpu_int8_head() {
    let (_dir, w) = synth_model(&odd_config(), 31);
    let g = gpu_with(
        &w,
        &GpuOptions {
            head: HeadMode::Int8,
            max_binding_bytes: Some(64 * 50),
            ..Default::default()
        },
    );
    assert!(g.head_shards() > 1, "{} head shards", g.head_shards());
    assert!(g.describe().contains("int8 head"));
    compare_backends(
        &w,
        g,
        cpu_with(&w, HeadMode::Int8, KvDtype::F32),
        13,
        6,
        1e-5,
    );
}

/// The int8 head's effect on the fixture's logits against the transformers float32 reference
/// (BENCHMARKS.md: max |Δ| 0.10-0.15 at logit std ≈ 5, as the CPU's int8 head): the GPU's
/// int8 logits equal the CPU int8 head's, and greedy decoding still gives the reference tokens.
#[test]
fn int8_head_effect_on_fixture_logits() {
    let r = reference();
    let w = load(Path::new(DIR)).unwrap();
    let int8 = GpuOptions {
        head: HeadMode::Int8,
        ..Default::default()
    };
    let mut gi = Generator::new(gpu_with(&w, &int8)).unwrap();
    let mut ci = Generator::new(cpu_with(&w, HeadMode::Int8, KvDtype::F32)).unwrap();
    let opts = GenerateOptions {
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    for p in r["references"]["float32"]["prompts"].as_array().unwrap() {
        let prompt = ids(&p["input_ids"]);
        let got = gi.logits(&prompt, false).unwrap();
        let effect = max_abs_diff(&got, &floats(&p["prefill_last_logits"]));
        let vs_cpu = max_abs_diff(&got, &ci.logits(&prompt, false).unwrap());
        eprintln!(
            "{}: int8 head vs reference {effect:.4}, vs CPU int8 {vs_cpu}",
            p["name"]
        );
        assert!(vs_cpu <= 1e-4, "{}: {vs_cpu}", p["name"]);
        assert!(effect > 1e-3 && effect < 0.2, "{}: {effect}", p["name"]);
        let a = gi.generate(&prompt, &opts, None, |_, _| true).unwrap();
        assert_eq!(a.tokens, ids(&p["greedy_tokens"]), "{}", p["name"]);
    }
}

/// Per-position max |Δ| of two backends' logits.
fn per_position(a: &[f32], b: &[f32], vocab: usize) -> Vec<f32> {
    a.chunks(vocab)
        .zip(b.chunks(vocab))
        .map(|(x, y)| max_abs_diff(x, y))
        .collect()
}

/// `--kv f16`: every attention path reads and writes the same f16 values (tiled prefill and
/// split attention, decode with the fused and the unfused KV writers, the scalar kernel of
/// head_dim 4 agree with each other as closely as with f32), and the result is the CPU
/// backend's with its cache rounded to f16.
#[test]
fn f16_kv_cache_paths_agree_and_stay_close_to_f32() {
    let shapes = [odd_config(), head_dim_4_config(160)];
    for (n, cfg) in shapes.iter().enumerate() {
        let (_dir, w) = synth_model(cfg, 40 + n as u64);
        let vocab = cfg.vocab_size;
        let mut rng = StdRng::seed_from_u64(7);
        let seq: Vec<u32> = (0..140)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        // Teacher-forced logits of every position: one prefill step, or (chunk 1) one decode
        // step per token.
        let run = |kv, fused, chunk: Option<usize>| {
            let opts = GpuOptions {
                kv,
                fused,
                ..Default::default()
            };
            let mut gen = Generator::with_context(gpu_with(&w, &opts), 141).unwrap();
            if let Some(c) = chunk {
                gen.set_prefill_chunk(c);
            }
            gen.logits(&seq, true).unwrap()
        };
        let f32_prefill = run(KvDtype::F32, true, None);
        let f32_decode = run(KvDtype::F32, true, Some(1));
        let f16_prefill = run(KvDtype::F16, true, None);
        let paths32 = per_position(&f32_prefill, &f32_decode, vocab);
        let worst32 = paths32.iter().copied().fold(0.0, f32::max);
        for (what, other) in [
            ("fused decode", run(KvDtype::F16, true, Some(1))),
            ("unfused decode", run(KvDtype::F16, false, Some(1))),
        ] {
            let d = per_position(&f16_prefill, &other, vocab);
            let worst = d.iter().copied().fold(0.0, f32::max);
            eprintln!("shape {n}: f16 prefill vs {what} {worst} (f32: {worst32})");
            assert!(worst <= worst32.max(1e-4) * 2.0, "shape {n} {what}: {d:?}");
        }
        let d = per_position(&f16_prefill, &f32_prefill, vocab);
        let worst = d.iter().copied().fold(0.0, f32::max);
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        eprintln!("shape {n}: f16 vs f32 KV worst {worst}, mean {mean}");
        // The CPU backend rounding its cache to f16 computes the same thing.
        let c = cpu_with(&w, HeadMode::Native, KvDtype::F16);
        let want = Generator::with_context(c, 141)
            .unwrap()
            .logits(&seq, true)
            .unwrap();
        check_positions(
            &f16_prefill,
            &want,
            vocab,
            1e-5,
            "f16 KV vs CPU f16 rounding",
        );
    }
}

/// The int8 KV cache on the GPU (whole rows written after RoPE, or after the fused q|k|v GEMV)
/// gives the CPU's int8 cache's logits at every position, as one prefill step and as one decode
/// step per token (fused and unfused).
#[test]
fn int8_kv_cache_paths_agree_with_the_cpu() {
    let shapes = [head_dim_4_config(160), odd_config()];
    for (n, cfg) in shapes.iter().enumerate() {
        let (_dir, w) = synth_model(cfg, 50 + n as u64);
        let vocab = cfg.vocab_size;
        let mut rng = StdRng::seed_from_u64(9);
        let seq: Vec<u32> = (0..140)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let c = cpu_with(&w, HeadMode::Native, KvDtype::Int8);
        let want = Generator::with_context(c, 141)
            .unwrap()
            .logits(&seq, true)
            .unwrap();
        for (chunk, fused) in [(None, true), (Some(1), true), (Some(1), false)] {
            let opts = GpuOptions {
                kv: KvDtype::Int8,
                fused,
                ..Default::default()
            };
            let mut gen = Generator::with_context(gpu_with(&w, &opts), 141).unwrap();
            if let Some(c) = chunk {
                gen.set_prefill_chunk(c);
            }
            let got = gen.logits(&seq, true).unwrap();
            check_positions(&got, &want, vocab, 1e-4, "int8 KV vs the CPU's");
        }
    }
}

/// The f16 KV cache on the fixture: its logits against the transformers float32 reference
/// (the effect BENCHMARKS.md reports) and the CPU backend's with an f16-rounded cache (equal),
/// with the same greedy tokens as that CPU run.
#[test]
fn f16_kv_cache_effect_on_fixture_logits() {
    let r = reference();
    let w = load(Path::new(DIR)).unwrap();
    let opts = GpuOptions {
        kv: KvDtype::F16,
        ..Default::default()
    };
    let mut g = Generator::new(gpu_with(&w, &opts)).unwrap();
    let mut c = Generator::new(cpu_with(&w, HeadMode::Native, KvDtype::F16)).unwrap();
    let gen = GenerateOptions {
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    for p in r["references"]["float32"]["prompts"].as_array().unwrap() {
        let prompt = ids(&p["input_ids"]);
        let got = g.logits(&prompt, false).unwrap();
        let want = floats(&p["prefill_last_logits"]);
        let effect = max_abs_diff(&got, &want);
        let mean = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / want.len() as f32;
        let vs_cpu = max_abs_diff(&got, &c.logits(&prompt, false).unwrap());
        let out = g.generate(&prompt, &gen, None, |_, _| true).unwrap();
        let same = out
            .tokens
            .iter()
            .zip(ids(&p["greedy_tokens"]))
            .take_while(|(a, b)| **a == *b)
            .count();
        eprintln!(
            "{}: f16 KV vs reference max {effect:.4} mean {mean:.4}, vs CPU f16 {vs_cpu}, \
             greedy prefix {same}/16",
            p["name"]
        );
        assert!(vs_cpu <= 1e-4, "{}: {vs_cpu}", p["name"]);
        let cpu_out = c.generate(&prompt, &gen, None, |_, _| true).unwrap();
        assert_eq!(out.tokens, cpu_out.tokens, "{}", p["name"]);
    }
}

#[test]
fn long_context_uses_split_attention() {
    let cfg = odd_config();
    let (_dir, w) = synth_model(&cfg, 30);
    compare_with_cpu(&w, gpu(&w), 131, 8, 1e-5);
}

/// The float head as tiles (`head_gemm`: steps of `GEMM_MIN_ROWS` rows and more) against the
/// one-row head on the same hidden states: the rows of 20- and 70-token prompts (two tiles of
/// 16 and of 64 step rows, the second partial) against the last row of each prefix, on
/// vocabularies and widths that leave partial tiles and chunks, with bf16 and with f16
/// (widened to f32) heads.
#[test]
fn tiled_head_matches_the_one_row_head() {
    let wide = ModelConfig {
        vocab_size: 77,
        hidden_size: 136,
        intermediate_size: 100,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 68,
        max_position_embeddings: 80,
        ..Preset::Tiny.config()
    };
    let mut models: Vec<(Option<PathBuf>, Weights)> = [odd_config(), wide]
        .iter()
        .enumerate()
        .map(|(n, cfg)| {
            let (dir, w) = synth_model(cfg, 40 + n as u64);
            (Some(dir), w)
        })
        .collect();
    models.push((
        None,
        load(Path::new("tests/fixtures/tiny-1bitllm")).unwrap(),
    ));
    for (_dir, w) in &models {
        let vocab = w.config.vocab_size;
        let mut rng = StdRng::seed_from_u64(7);
        let n = 70.min(w.config.max_position_embeddings - 1);
        let prompt: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let mut g = Generator::with_context(gpu(w), n + 1).unwrap();
        // 20 rows: tiles of 16 step rows; 70: of 64.
        for rows in [20, n] {
            let all = g.logits(&prompt[..rows], true).unwrap();
            assert_eq!(all.len(), rows * vocab);
            let scale = all.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for len in [1, 7, 8, 9, 16, 17, 20, 33, 64, 65, n] {
                if len > rows {
                    continue;
                }
                let last = g.logits(&prompt[..len], false).unwrap();
                let d = max_abs_diff(&last, &all[(len - 1) * vocab..len * vocab]);
                assert!(
                    d <= 1e-6 * scale.max(1.0),
                    "vocab {vocab}, {rows} rows, row {}: {d} (logits up to {scale})",
                    len - 1
                );
            }
        }
    }
}

#[test]
fn sharded_head_and_embedding_give_identical_logits() {
    let cfg = odd_config();
    let (_dir, w) = synth_model(&cfg, 31);
    let whole = gpu(&w);
    assert_eq!(whole.head_shards(), 1);
    // 96 bf16 per row = 192 bytes: 10 rows per shard, 21 shards.
    let sharded = gpu_with(
        &w,
        &GpuOptions {
            max_binding_bytes: Some(2000),
            ..Default::default()
        },
    );
    assert_eq!(sharded.head_shards(), 21);
    let prompt = [0u32, 9, 10, 11, 19, 20, 150, 202, 199];
    let a = Generator::with_context(whole, 32)
        .unwrap()
        .logits(&prompt, true)
        .unwrap();
    let b = Generator::with_context(sharded, 32)
        .unwrap()
        .logits(&prompt, true)
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn steps_larger_than_planned_are_rejected() {
    let w = load(Path::new(DIR)).unwrap();
    let mut g = gpu_with(
        &w,
        &GpuOptions {
            max_step: 4,
            ..Default::default()
        },
    );
    assert!(g.embed(&[1, 2, 3, 4, 5]).is_err());
    assert!(g.embed(&[1, 2, 3, 4]).is_ok());
    assert!(g.embed(&[100000]).is_err());
    // The generator's chunked prefill works with a small step plan.
    let mut gen = Generator::new(g).unwrap();
    gen.set_prefill_chunk(4);
    let r = reference();
    let p = &r["references"]["float32"]["prompts"][2];
    let got = gen.logits(&ids(&p["input_ids"]), false).unwrap();
    let d = max_abs_diff(&got, &floats(&p["prefill_last_logits"]));
    assert!(d <= 1e-3, "chunked prefill: {d}");
    let _ = LogitRows::Last;
}

/// Diagnoses whole-model differences: runs the GPU forward op by op and, at every norm+quant
/// site, requantizes the GPU's own input on the CPU. Returns the number of int8 codes that
/// differ (each must be ±1 at a rounding tie within float noise).
fn quant_flips(w: &Weights, tokens: &[u32]) -> usize {
    let cfg = &w.config;
    let mut g = gpu(w);
    let mut cache = g.new_cache(tokens.len()).unwrap();
    let t = tokens.len();
    let (h, q, i) = (cfg.hidden_size, cfg.q_dim(), cfg.intermediate_size);
    let mut flips = 0;
    let mut check = |g: &mut GpuBackend, x: &[f32], gamma: &[f32]| {
        let width = gamma.len();
        let words = g.read_activation(Activation::Quantized).unwrap();
        let got = unpack_i8(&words, t, pad64(width) / 4, width);
        for ti in 0..t {
            let mut tmp = vec![0.0; width];
            let mut want = vec![0i8; pad64(width)];
            let absmax = ops::rmsnorm_quant(
                &x[ti * width..(ti + 1) * width],
                gamma,
                cfg.rms_norm_eps,
                &mut tmp,
                &mut want,
            );
            for c in 0..width {
                let d = (got[ti * width + c] as i32 - want[c] as i32).abs();
                if d != 0 {
                    let v = tmp[c] * (127.0 / absmax);
                    let frac = (v - v.trunc()).abs();
                    assert!(
                        d == 1 && (frac - 0.5).abs() < 1e-4,
                        "non-tie difference {v}"
                    );
                    flips += 1;
                }
            }
        }
    };
    g.embed(tokens).unwrap();
    for l in 0..cfg.num_layers {
        let x = to_f32(&g.read_activation(Activation::Residual).unwrap())[..t * h].to_vec();
        g.rmsnorm_quant(l, NormSite::Input);
        check(&mut g, &x, &w.layers[l].input_norm);
        g.ternary_matmul(l, Linear::Qkv);
        g.rope_kv_write(&mut cache, l, 0);
        g.attention(&cache, l, 0);
        let a = to_f32(&g.read_activation(Activation::Attention).unwrap())[..t * q].to_vec();
        g.attn_out_quant(l, true);
        check(&mut g, &a, &w.layers[l].attn_sub_norm);
        g.ternary_matmul(l, Linear::O);
        let x = to_f32(&g.read_activation(Activation::Residual).unwrap())[..t * h].to_vec();
        g.rmsnorm_quant(l, NormSite::PostAttention);
        check(&mut g, &x, &w.layers[l].post_attention_norm);
        g.ternary_matmul(l, Linear::GateUp);
        let gu = to_f32(&g.read_activation(Activation::GateUp).unwrap());
        let mut m = vec![0.0; t * i];
        for ti in 0..t {
            let row = &gu[ti * 2 * i..(ti + 1) * 2 * i];
            ops::relu2_mul(&row[..i], &row[i..], &mut m[ti * i..(ti + 1) * i]);
        }
        g.gated_act_quant(l, GatedAct::Relu2, true);
        check(&mut g, &m, &w.layers[l].ffn_sub_norm);
        g.ternary_matmul(l, Linear::Down);
    }
    flips
}

#[test]
fn whole_forward_quantization_equals_cpu_quantization_of_gpu_inputs() {
    let cfg = ModelConfig {
        vocab_size: 77,
        hidden_size: 136,
        intermediate_size: 100,
        num_layers: 3,
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 68,
        max_position_embeddings: 64,
        ..Preset::Tiny.config()
    };
    let (_dir, w) = synth_model(&cfg, 21);
    let mut rng = StdRng::seed_from_u64(13);
    let prompt: Vec<u32> = (0..13)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    assert_eq!(quant_flips(&w, &prompt), 0);
    let cfg = odd_config();
    let (_dir, w) = synth_model(&cfg, 30);
    let mut rng = StdRng::seed_from_u64(131);
    let prompt: Vec<u32> = (0..131)
        .map(|_| rng.random_range(0..cfg.vocab_size as u32))
        .collect();
    assert_eq!(quant_flips(&w, &prompt), 0);
}

/// Logits of every position, fed one token per step (decode-shaped steps).
fn decode_logits<B: Backend>(b: &mut B, tokens: &[u32]) -> Vec<f32> {
    let mut cache = b.new_cache(tokens.len()).unwrap();
    let (mut all, mut out) = (Vec::new(), Vec::new());
    for (pos, &t) in tokens.iter().enumerate() {
        forward(b, &mut cache, &[t], pos, LogitRows::Last, &mut out, None).unwrap();
        all.extend_from_slice(&out);
    }
    all
}

#[test]
fn fused_decode_layers_match_unfused_and_cpu() {
    let shapes = [odd_config(), head_dim_4_config(64)];
    for (n, cfg) in shapes.iter().enumerate() {
        let (_dir, w) = synth_model(cfg, 40 + n as u64);
        let mut rng = StdRng::seed_from_u64(n as u64);
        let tokens: Vec<u32> = (0..70)
            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
            .collect();
        let fused = decode_logits(&mut gpu(&w), &tokens);
        let plain = GpuOptions {
            fused: false,
            ..Default::default()
        };
        let unfused = decode_logits(&mut gpu_with(&w, &plain), &tokens);
        let reference = decode_logits(&mut cpu(&w), &tokens);
        check_positions(&fused, &unfused, cfg.vocab_size, 1e-5, "fused vs unfused");
        check_positions(&fused, &reference, cfg.vocab_size, 1e-5, "fused vs cpu");
    }
}

/// GPU top-k against the CPU sampler's selection on the same logits: ties (few distinct
/// values), both zeros, negatives and temperatures; one pass (k of one chunk) up to three.
#[test]
fn top_k_selection_matches_cpu_candidates() {
    let cfg = ModelConfig {
        vocab_size: 9001,
        ..odd_config()
    };
    let (_dir, w) = synth_model(&cfg, 60);
    let mut g = gpu(&w);
    let mut rng = StdRng::seed_from_u64(61);
    let levels = [-3.5f32, -0.0, 0.0, 0.25, 1.0, 7.75, 7.7500005];
    let logits: Vec<f32> = (0..cfg.vocab_size)
        .map(|i| match i % 3 {
            0 => levels[rng.random_range(0..levels.len())],
            _ => rng.random_range(-8.0f32..8.0),
        })
        .collect();
    g.write_activation(Activation::Logits, &from_f32(&logits));
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for k in [1usize, 2, 40, 127, 128] {
        for inv_t in [1.0f32, 1.0 / 0.7, 1.0 / 1.3] {
            g.top_k_of_logits(k, inv_t, &mut got).unwrap();
            top_candidates(&logits, k, inv_t, &mut want);
            let bits =
                |v: &[(f32, u32)]| v.iter().map(|c| (c.0.to_bits(), c.1)).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "k {k}, 1/t {inv_t}");
        }
    }
    assert!(g.top_k_of_logits(129, 1.0, &mut got).is_err());
    assert!(g.top_k_of_logits(0, 1.0, &mut got).is_err());
}

/// Top-k sampling on the GPU (k within the device path and above it, with top-p and min-p)
/// draws the CPU backend's tokens from the same seed on the fixture, and each step's device
/// candidates are the CPU selection from that step's logits.
#[test]
fn sampled_decoding_with_gpu_top_k_matches_cpu() {
    let w = load(Path::new(DIR)).unwrap();
    let prompt = [297u32, 251, 21, 88, 201, 206, 250];
    for (top_k, top_p, min_p) in [(40, 1.0, 0.0), (5, 0.9, 0.05), (200, 0.95, 0.0)] {
        let opts = GenerateOptions {
            max_tokens: 24,
            ignore_eos: true,
            sampling: SamplingParams {
                temperature: 0.8,
                top_k,
                top_p,
                min_p,
                seed: Some(9),
                ..Default::default()
            },
            ..Default::default()
        };
        let gpu_tokens = Generator::new(gpu(&w))
            .unwrap()
            .generate(&prompt, &opts, None, |_, _| true)
            .unwrap()
            .tokens;
        let cpu_tokens = Generator::new(cpu(&w))
            .unwrap()
            .generate(&prompt, &opts, None, |_, _| true)
            .unwrap()
            .tokens;
        assert_eq!(
            gpu_tokens, cpu_tokens,
            "top_k {top_k}, top_p {top_p}, min_p {min_p}"
        );
    }
    // Step by step: the device's candidates are the CPU's selection of the device's logits.
    let mut g = gpu(&w);
    let mut cache = g.new_cache(16).unwrap();
    let (mut logits, mut got, mut want) = (Vec::new(), Vec::new(), Vec::new());
    for (pos, &t) in prompt.iter().enumerate() {
        forward(
            &mut g,
            &mut cache,
            &[t],
            pos,
            LogitRows::Last,
            &mut logits,
            None,
        )
        .unwrap();
        top_candidates(&logits, 40, 1.25, &mut want);
        forward(
            &mut g,
            &mut cache,
            &[t],
            pos,
            LogitRows::None,
            &mut logits,
            None,
        )
        .unwrap();
        let mut scratch = Vec::new();
        top_k_last(&mut g, (40, 1.25), &mut scratch, &mut got).unwrap();
        assert_eq!(got, want, "position {pos}");
    }
}

/// Greedy generation queues each step's successor on the device (fed by its argmax there):
/// the tokens are those of waiting on every step, when a run stops at max_tokens with a step
/// still queued and the generator is reused, when the callback stops it, and at the context's
/// end.
#[test]
fn queued_greedy_steps_match_step_by_step_argmax() {
    let cfg = odd_config();
    let (_dir, w) = synth_model(&cfg, 70);
    let prompt = [3u32, 17, 101, 5];
    let ctx = 64;
    let want = {
        let mut g = gpu(&w);
        let mut cache = g.new_cache(ctx).unwrap();
        let mut logits = Vec::new();
        forward(
            &mut g,
            &mut cache,
            &prompt,
            0,
            LogitRows::Last,
            &mut logits,
            None,
        )
        .unwrap();
        let mut tokens = vec![argmax(&logits)];
        for pos in prompt.len()..ctx - 1 {
            let last = tokens[tokens.len() - 1];
            tokens
                .push(forward_argmax(&mut g, &mut cache, &[last], pos, &mut logits, None).unwrap());
        }
        tokens
    };
    let opts = |max_tokens| GenerateOptions {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut gen = Generator::with_context(gpu(&w), ctx).unwrap();
    let run = |gen: &mut Generator<GpuBackend>, n, stop_after: usize| {
        let mut seen = 0;
        gen.generate(&prompt, &opts(n), None, |_, _| {
            seen += 1;
            seen < stop_after
        })
        .unwrap()
        .tokens
    };
    assert_eq!(run(&mut gen, 7, usize::MAX), want[..7]);
    assert_eq!(run(&mut gen, 5, 3), want[..3]);
    assert_eq!(run(&mut gen, 1000, usize::MAX), want);
}

/// Speculative decoding on the GPU: greedy tokens equal plain decoding's (prompt lookup and a
/// draft model, drafts verified every step; the verification rows' argmaxes are found on the
/// device); top-k sampling with drafts runs to its length.
#[test]
fn greedy_speculation_on_the_gpu_gives_plain_decodings_tokens() {
    use bitnet_inference::engine::speculative::{ModelDrafter, NgramDrafter, Speculation};
    let w = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes")).unwrap();
    let always = |d: Box<dyn bitnet_inference::engine::speculative::Drafter>, k| {
        let mut s = Speculation::new(d, k).unwrap();
        s.adaptive = false;
        s
    };
    // A prompt that repeats: prompt lookup drafts from it.
    let mut c = Generator::new(cpu(&w)).unwrap();
    let base = vec![4093, 1698, 548, 416, 284, 322, 301];
    let greedy = |n| GenerateOptions {
        max_tokens: n,
        ignore_eos: true,
        ..Default::default()
    };
    let cont = c
        .generate(&base, &greedy(20), None, |_, _| true)
        .unwrap()
        .tokens;
    let mut prompt = base.clone();
    prompt.extend_from_slice(&cont);
    prompt.extend_from_slice(&base);
    let mut g = Generator::new(gpu(&w)).unwrap();
    let want = g
        .generate(&prompt, &greedy(40), None, |_, _| true)
        .unwrap()
        .tokens;
    for k in [1, 4, 7] {
        g.set_speculation(Some(always(Box::<NgramDrafter>::default(), k)));
        let out = g.generate(&prompt, &greedy(40), None, |_, _| true).unwrap();
        let st = out.speculative.unwrap();
        assert_eq!(out.tokens, want, "ngram k {k}: {st:?}");
        assert!(st.drafted > 0, "{st:?}");
    }
    let draft = ModelDrafter::new(gpu(&w), w.config.vocab_size).unwrap();
    g.set_speculation(Some(always(Box::new(draft), 5)));
    let out = g.generate(&prompt, &greedy(40), None, |_, _| true).unwrap();
    let st = out.speculative.unwrap();
    assert_eq!(out.tokens, want, "self-draft: {st:?}");
    assert!(st.acceptance_rate() > 0.9, "{st:?}");
    g.set_speculation(Some(always(Box::<NgramDrafter>::default(), 4)));
    let o = GenerateOptions {
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 20,
            seed: Some(1),
            ..Default::default()
        },
        ..greedy(33)
    };
    let out = g.generate(&prompt, &o, None, |_, _| true).unwrap();
    assert_eq!(out.tokens.len(), 33);
}

/// A decode step of several tokens (a speculative verification) gives every row exactly the
/// logits of one-token steps over the same tokens, so verification picks plain decoding's
/// tokens even at near-ties; on the default model, with attention past one split, on an int8
/// cache, up to the longest verification.
#[test]
fn few_token_steps_equal_one_token_steps_bit_for_bit() {
    let w = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes")).unwrap();
    let mut rng = StdRng::seed_from_u64(18);
    for kv in [KvDtype::F32, KvDtype::Int8] {
        let o = GpuOptions {
            kv,
            ..Default::default()
        };
        let mut g = gpu_with(&w, &o);
        let mut cache = g.new_cache(256).unwrap();
        let vocab = w.config.vocab_size;
        let prompt: Vec<u32> = (0..70).map(|_| rng.random_range(0..vocab as u32)).collect();
        let mut logits = Vec::new();
        forward(
            &mut g,
            &mut cache,
            &prompt,
            0,
            LogitRows::None,
            &mut logits,
            None,
        )
        .unwrap();
        for t in [2usize, 5, 8, 33] {
            let pos = prompt.len();
            let step: Vec<u32> = (0..t).map(|_| rng.random_range(0..vocab as u32)).collect();
            let first = (Some(step[0]), &step[1..]);
            assert!(queue_greedy_step(&mut g, &mut cache, first, pos, None).unwrap());
            let mut picks = Vec::new();
            let d = g.device().unwrap();
            d.read_queued_argmax(&mut picks).unwrap();
            let words = g.read_activation(Activation::Logits).unwrap();
            let all: Vec<f32> = words[..t * vocab]
                .iter()
                .map(|&b| f32::from_bits(b))
                .collect();
            let (mut singles, mut one) = (Vec::new(), Vec::new());
            for (i, &tok) in step.iter().enumerate() {
                forward(
                    &mut g,
                    &mut cache,
                    &[tok],
                    pos + i,
                    LogitRows::Last,
                    &mut one,
                    None,
                )
                .unwrap();
                assert_eq!(picks[i], argmax(&one), "{kv:?} t {t} row {i}");
                singles.extend_from_slice(&one);
            }
            assert!(
                all == singles,
                "{kv:?} t {t}: {}",
                max_abs_diff(&all, &singles)
            );
        }
    }
}

/// Queued verification on the GPU (each step queued before the one ahead of it is read, as if
/// every draft held) gives plain decoding's tokens whatever the drafts: runs that hold,
/// rejections (the step queued behind moves back on the device, past 64 positions too, where
/// its attention splits change), wrong guesses of a running step's pick, drafts near the
/// token limit.
#[test]
fn queued_verification_gives_plain_decodings_tokens() {
    use bitnet_inference::engine::speculative::{Drafter, Speculation};
    /// Drafts the known greedy continuation, wrong at every `miss`-th generated position.
    struct Scripted {
        prompt: usize,
        want: Vec<u32>,
        miss: usize,
    }
    impl Drafter for Scripted {
        fn draft(
            &mut self,
            ctx: &[u32],
            k: usize,
            out: &mut Vec<u32>,
        ) -> bitnet_inference::Result<usize> {
            out.clear();
            let p = ctx.len() - self.prompt;
            for i in p..(p + k).min(self.want.len()) {
                let miss = (i + 1) % self.miss == 0;
                out.push(if miss { self.want[i] ^ 1 } else { self.want[i] });
            }
            Ok(0)
        }
        fn name(&self) -> &'static str {
            "scripted"
        }
    }
    let w = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes")).unwrap();
    let mut g = Generator::new(gpu(&w)).unwrap();
    let prompt = [4093, 1698, 548, 416];
    let o = GenerateOptions {
        max_tokens: 80,
        ignore_eos: true,
        ..Default::default()
    };
    let want = g.generate(&prompt, &o, None, |_, _| true).unwrap().tokens;
    for (k, miss) in [(1, 3), (3, 5), (4, 2), (6, 7), (8, 1000)] {
        let d = Scripted {
            prompt: prompt.len(),
            want: want.clone(),
            miss,
        };
        let mut spec = Speculation::new(Box::new(d), k).unwrap();
        spec.adaptive = false;
        g.set_speculation(Some(spec));
        let out = g.generate(&prompt, &o, None, |_, _| true).unwrap();
        let st = out.speculative.unwrap();
        assert_eq!(out.tokens, want, "k {k} miss {miss}: {st:?}");
        assert!(st.accepted > 0 && st.steps > 0, "{st:?}");
        assert!(st.accepted <= st.drafted - st.wasted, "{st:?}");
        if miss > 100 {
            assert_eq!(st.accepted, st.drafted, "{st:?}");
            assert_eq!(st.wasted, 0, "{st:?}");
        } else {
            assert!(st.accepted < st.drafted, "{st:?}");
        }
    }
    // Prompt lookup as users run it (its guesses of a running step's pick fail too, right
    // after plain steps): the prompt on which an unfinished build's tokens went wrong.
    let ngram = bitnet_inference::engine::speculative::NgramDrafter::default();
    let mut spec = Speculation::new(Box::new(ngram), 4).unwrap();
    spec.adaptive = false;
    g.set_speculation(Some(spec));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes");
    let tok = bitnet_inference::tokenizer::Tokenizer::from_dir(&dir)
        .unwrap()
        .unwrap();
    let thou = tok.encode("Thou shalt not", true).unwrap();
    let plain = {
        let mut p = Generator::new(gpu(&w)).unwrap();
        p.generate(&thou, &o, None, |_, _| true).unwrap().tokens
    };
    let out = g.generate(&thou, &o, None, |_, _| true).unwrap();
    let st = out.speculative.unwrap();
    assert_eq!(out.tokens, plain, "{st:?}");
    assert!(st.accepted > 0 && st.accepted < st.drafted, "{st:?}");
}

/// With the cost model on, drafting that never pays is probed now and then among the GPU's
/// queued steps (a probe is a queued verification step like any other), and a draft model
/// drafts only for steps that are queued.
#[test]
fn probes_of_failing_drafts_are_verified_behind_queued_steps() {
    use bitnet_inference::engine::speculative::{Drafter, Speculation};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    /// Drafts `k` copies of the vocabulary's last id (nearly never the model's pick), counting
    /// its drafts; as costly as a draft model when `model`.
    struct Wrong {
        id: u32,
        model: bool,
        calls: Arc<AtomicU64>,
    }
    impl Drafter for Wrong {
        fn draft(
            &mut self,
            _: &[u32],
            k: usize,
            out: &mut Vec<u32>,
        ) -> bitnet_inference::Result<usize> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            out.clear();
            out.resize(k, self.id);
            Ok(0)
        }
        fn name(&self) -> &'static str {
            "wrong"
        }
        fn runs_a_model(&self) -> bool {
            self.model
        }
    }
    let w = load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-fortunes")).unwrap();
    let mut g = Generator::new(gpu(&w)).unwrap();
    let o = GenerateOptions {
        max_tokens: 96,
        ignore_eos: true,
        ..Default::default()
    };
    for model in [false, true] {
        let calls = Arc::new(AtomicU64::new(0));
        let wrong = Wrong {
            id: w.config.vocab_size as u32 - 1,
            model,
            calls: calls.clone(),
        };
        let mut spec = Speculation::new(Box::new(wrong), 4).unwrap();
        // Probes at their intervals whatever they lose (the loss budget has its own test).
        spec.loss_budget = f64::INFINITY;
        g.set_speculation(Some(spec));
        let out = g
            .generate(&[4093, 1698, 548], &o, None, |_, _| true)
            .unwrap();
        let st = out.speculative.unwrap();
        // The first verification, then probes after 16 and 32 refused chances.
        assert!(st.steps >= 3, "{st:?}");
        assert!(st.acceptance_rate() < 0.5, "{st:?}");
        if model {
            // A model drafts only for steps that are queued, and each is verified (behind a
            // verification that rejected too: the device moves it back).
            assert!(calls.load(Ordering::Relaxed) <= 2 * st.steps, "{st:?}");
        }
    }
}

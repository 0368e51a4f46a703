//! The wgpu backend: the whole forward pass in WGSL kernels.
//!
//! Weights are repacked and uploaded at load; activation buffers are planned for a maximum
//! step size; every bind group is built at load (or when a cache is created). Ops record
//! compute passes into one encoder kept in the backend, and [`Backend::logits`] submits it:
//! a decode step is one command buffer and one submit, with the per-step values (token count,
//! position, attention split) in one small uniform written with `queue.write_buffer`.

#[cfg(not(target_arch = "wasm32"))]
pub mod bandwidth;
#[cfg(not(target_arch = "wasm32"))]
pub mod batch;
pub mod buffers;
#[cfg(all(test, not(target_arch = "wasm32")))]
mod common_tests;
pub mod context;
pub mod kernels;
pub mod pipelines;
#[cfg(all(target_arch = "wasm32", feature = "wasm"))]
pub mod web;

use std::sync::mpsc;

use buffers::{bind_group, pad64, pad8, storage, storage_init, uniform, PackedMatrix, Shard};
pub use context::{AdapterDesc, GpuContext};
use kernels::{NormKind, Recorder};
use pipelines::{Pipelines, FUSED_MAX_WIDTH};

use crate::config::ModelConfig;
use crate::cpu::head::HeadMode;
use crate::cpu::ops::rope_inv_freq;
use crate::engine::generate::PREFILL_CHUNK;
use crate::engine::model::{
    top_k_from_logits, Backend, KvCache, KvDtype, Linear, LogitRows, NormSite,
};
use crate::error::{Error, Result};
use crate::format::{FloatDtype, Weights};

/// The GPU backend's default step size, and so its prompt chunk: twice the CPU's, because a
/// 512-token step keeps more of the GPU busy in each GEMM than two of 256 (prefill of a
/// 512-token prompt 10.5k instead of 9.1k tok/s on an H200).
pub const PREFILL_CHUNK_GPU: usize = 2 * PREFILL_CHUNK;

/// Options of the GPU backend.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// Most tokens in one step (buffers are planned for it); the generator's prefill chunk
    /// (see [`Backend::prefill_chunk`]).
    pub max_step: usize,
    /// Use subgroup reductions when the adapter has them.
    pub subgroups: bool,
    /// Caps the bytes of one embedding/head shard below the device's binding limit (tests use
    /// it to force sharding).
    pub max_binding_bytes: Option<u64>,
    /// Decode steps fold each norm into the matmul that consumes it and RoPE + the KV write
    /// into the q|k|v matmul (5-6 dispatches a layer instead of 11); off runs one kernel per op.
    pub fused: bool,
    /// The head's storage: the checkpoint's dtype, or int8 rows with per-row scales (half the
    /// bytes of a bf16 head; logits as the CPU backend's int8 head).
    pub head: HeadMode,
    /// The KV cache's element type.
    pub kv: KvDtype,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            max_step: PREFILL_CHUNK_GPU,
            subgroups: true,
            max_binding_bytes: None,
            fused: true,
            head: HeadMode::Native,
            kv: KvDtype::F32,
        }
    }
}

/// The adapter the GPU backend would use, or None when wgpu finds none. Check
/// [`AdapterDesc::is_cpu`] to tell a real GPU from a software one (lavapipe, SwiftShader).
pub fn probe() -> Option<AdapterDesc> {
    context::probe()
}

/// Loads `weights` onto the best adapter (see [`probe`]).
pub fn load(weights: &Weights, opts: &GpuOptions) -> Result<GpuBackend> {
    GpuBackend::load(weights, opts)
}

/// A step activation buffer, for tests and debugging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Residual stream, `T × hidden` f32.
    Residual,
    /// Quantized activations, `T × pad64(width)/4` u32 (4 int8 each).
    Quantized,
    /// Per-token activation scale (absmax / 127), `T` f32.
    Scales,
    /// q|k|v, `T × (q + 2 kv)` f32.
    Qkv,
    /// Attention output, `T × q_dim` f32.
    Attention,
    /// gate|up, `T × 2 intermediate` f32.
    GateUp,
    /// Final-normed residual, `T × pad8(hidden)` f32.
    FinalNormed,
    /// Logits, rows × vocab f32 (row 0: the last position's after a decode step's head).
    Logits,
}

struct Mat {
    rows: usize,
    /// vec4<u32> of weights per row.
    kvec: usize,
    bytes: u64,
    w: wgpu::Buffer,
    rs: wgpu::Buffer,
    bg: wgpu::BindGroup,
}

/// A layer's fused decode bind groups (norm folded into the matmul that consumes it); the
/// q|k|v one depends on the KV cache and lives in [`GpuCache`].
struct FusedLayer {
    o: wgpu::BindGroup,
    gate_up: wgpu::BindGroup,
    down: wgpu::BindGroup,
}

struct GpuLayer {
    norm_input: wgpu::BindGroup,
    norm_post: wgpu::BindGroup,
    norm_attn: wgpu::BindGroup,
    norm_ffn: wgpu::BindGroup,
    input_gamma: wgpu::Buffer,
    qkv: Mat,
    o: Mat,
    gate_up: Mat,
    down: Mat,
    fused: Option<FusedLayer>,
}

struct Bufs {
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    x: wgpu::Buffer,
    xq: wgpu::Buffer,
    xs: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    gu: wgpu::Buffer,
    hn: wgpu::Buffer,
    logits: wgpu::Buffer,
    readback: wgpu::Buffer,
    rope_params: wgpu::Buffer,
    /// Argmax of logits row 0: (value, index) partials, the result word and its readback.
    argmax_part: wgpu::Buffer,
    argmax_result: wgpu::Buffer,
    argmax_readback: wgpu::Buffer,
    /// Readbacks of queued greedy steps' argmax (one per step in flight).
    argmax_ring: [wgpu::Buffer; 3],
    /// Top-k candidates: two buffers the passes alternate between, and the readback.
    topk: [wgpu::Buffer; 2],
    topk_readback: wgpu::Buffer,
}

/// The KV cache on the GPU: f32 keys and values per layer `[kv_head][position][head_dim]`,
/// the RoPE cos/sin table for its positions, attention partials, and the bind groups of the
/// kernels that use them.
pub struct GpuCache {
    capacity: usize,
    maxsplit: usize,
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    rope_bgs: Vec<wgpu::BindGroup>,
    attn_bgs: Vec<wgpu::BindGroup>,
    /// Fused norm + q|k|v GEMV + RoPE + KV write, per layer (when fusion is on).
    qkv_bgs: Vec<wgpu::BindGroup>,
}

impl KvCache for GpuCache {
    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl GpuCache {
    /// Attention partial slots per (token, head).
    pub fn max_splits(&self) -> usize {
        self.maxsplit
    }

    /// GPU bytes held by the keys and values.
    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|b| b.size()).sum()
    }
}

/// The little-endian u32 at the start of a readback (an argmax result).
fn first_word(data: &[u8]) -> u32 {
    u32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

/// A step is submitted in parts of this many layers (the first part after two), unless it is
/// queued behind other steps.
const SUBMIT_LAYERS: usize = 8;

/// The GPU backend.
pub struct GpuBackend {
    ctx: GpuContext,
    cfg: ModelConfig,
    pipes: Pipelines,
    bufs: Bufs,
    layers: Vec<GpuLayer>,
    final_norm_bg: wgpu::BindGroup,
    argmax_bg: wgpu::BindGroup,
    /// Per top-k pass: its parameters (n, k, 1 / temperature) and bind group (pass i reads
    /// buffer i % 2 (pass 0: the logits) and writes the other).
    topk_passes: Vec<(wgpu::Buffer, wgpu::BindGroup)>,
    embed_shards: Vec<(Shard, wgpu::BindGroup)>,
    head_shards: Vec<(Shard, wgpu::BindGroup)>,
    head_bytes: u64,
    /// With the int8 head: the final norm into int8 rows (xq, xs) it reads.
    final_norm_q_bg: Option<wgpu::BindGroup>,
    /// The KV cache's element type.
    kv: KvDtype,
    inv_freq: Vec<f32>,
    max_step: usize,
    max_binding: u64,
    logit_rows: usize,
    rec: Recorder,
    tokens: Vec<u32>,
    /// Queued greedy steps (`queue_greedy_step`): argmax readback and submission, oldest first.
    queued: std::collections::VecDeque<(wgpu::Buffer, Option<wgpu::SubmissionIndex>)>,
    /// Steps queued so far (picks the next readback of `argmax_ring`).
    queued_total: usize,
    /// Whether the step being recorded is submitted at once (the GPU has queued steps to run
    /// meanwhile) rather than in parts of a few layers.
    whole_step: bool,
    /// [t, pos, chunk, nsplit, cap, row0, nrows, 0]
    step: [u32; 8],
    /// Host-side timing of decode steps (`BITNET_GPU_TIMING=1`).
    timing: Option<HostTiming>,
    /// A batched step's invalid row slots, reported by its `logits_rows`.
    #[cfg(not(target_arch = "wasm32"))]
    batch_error: Option<Error>,
}

/// Where a step's wall time goes on the host: recording, submitting, waiting for the GPU.
#[derive(Default)]
struct HostTiming {
    started: Option<std::time::Instant>,
    steps: u64,
    record: f64,
    submit: f64,
    wait: f64,
}

fn mat(
    device: &wgpu::Device,
    p: &Pipelines,
    b: &Bufs,
    m: PackedMatrix,
    out: &wgpu::Buffer,
    name: &str,
) -> Mat {
    let w = storage_init(device, name, bytemuck::cast_slice(&m.words));
    let rs = storage_init(device, name, bytemuck::cast_slice(&m.row_scale));
    let params = uniform(
        device,
        name,
        &[m.rows as u32, m.kvec as u32, m.rows as u32, 0],
    );
    let bg = bind_group(
        device,
        name,
        &p.matmul_layout,
        &[&b.step, &params, &w, &rs, &b.xq, &b.xs, out],
    );
    Mat {
        rows: m.rows,
        kvec: m.kvec,
        bytes: (m.words.len() * 4) as u64,
        w,
        rs,
        bg,
    }
}

impl GpuBackend {
    /// Repacks and uploads `w`, compiles the kernels and builds every bind group.
    pub fn load(w: &Weights, opts: &GpuOptions) -> Result<Self> {
        Self::with_context(GpuContext::new(opts.subgroups)?, w, opts)
    }

    /// [`Self::load`] on a device already created (e.g. asynchronously, in a browser).
    pub fn with_context(ctx: GpuContext, w: &Weights, opts: &GpuOptions) -> Result<Self> {
        let cfg = w.config.clone();
        cfg.validate()?;
        if cfg.head_dim > 256 {
            return Err(Error::Backend(format!(
                "head_dim {} > 256 is not supported by the GPU attention kernel",
                cfg.head_dim
            )));
        }
        let max_step = opts.max_step.max(1);
        let device = &ctx.device;
        let max_binding = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        let shard_bytes = opts
            .max_binding_bytes
            .map_or(max_binding, |m| m.min(max_binding));
        let head_t = w.head();
        let f32_head = head_t.dtype != FloatDtype::BF16;
        if (w.embed.dtype != FloatDtype::BF16) != f32_head {
            return Err(Error::Backend(
                "embedding and lm_head must have the same dtype class for the GPU backend".into(),
            ));
        }
        let fused_widths = [cfg.hidden_size.max(cfg.q_dim()), cfg.intermediate_size];
        let pipes = Pipelines::new(
            device,
            ctx.desc.subgroup_size,
            f32_head,
            fused_widths,
            opts.kv,
        );

        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let hp = pad8(h);
        let kpmax = pad64(h).max(pad64(q)).max(pad64(i));
        let vocab = cfg.vocab_size;
        let logit_rows = ((64usize << 20) / (vocab * 4))
            .min(max_binding as usize / (vocab * 4))
            .clamp(1, max_step);
        let f = 4usize;
        let bufs = Bufs {
            step: uniform(device, "step", &[0; 8]),
            tokens: storage(device, "tokens", max_step * 4),
            x: storage(device, "x", max_step * h * f),
            xq: storage(device, "xq", max_step * kpmax),
            xs: storage(device, "xscale", max_step * f),
            qkv: storage(device, "qkv", max_step * (q + 2 * kv) * f),
            attn: storage(device, "attn", max_step * q * f),
            gu: storage(device, "gate_up", max_step * 2 * i * f),
            hn: storage(device, "final_normed", max_step * hp * f),
            logits: storage(device, "logits", logit_rows * vocab * f),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: (logit_rows * vocab * f) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            argmax_part: storage(device, "argmax partials", kernels::argmax_parts(vocab) * 8),
            argmax_result: storage(device, "argmax", 16),
            argmax_ring: [0, 1, 2].map(|_| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("queued argmax readback"),
                    size: 16,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }),
            topk: [0, 1].map(|_| {
                storage(
                    device,
                    "topk candidates",
                    vocab.div_ceil(kernels::TOPK_CHUNK) * kernels::TOPK_MAX * 8,
                )
            }),
            topk_readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("topk readback"),
                size: (kernels::TOPK_MAX * 8) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            argmax_readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("argmax readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            rope_params: uniform(
                device,
                "rope",
                &[
                    cfg.head_dim as u32,
                    cfg.num_heads as u32,
                    (q + 2 * kv) as u32,
                    kv as u32,
                ],
            ),
        };
        for (name, bytes) in [
            ("x", max_step * h * f),
            ("gate_up", max_step * 2 * i * f),
            ("qkv", max_step * (q + 2 * kv) * f),
        ] {
            if bytes as u64 > max_binding {
                return Err(Error::Backend(format!(
                    "activation buffer {name} ({bytes} bytes for {max_step} tokens) exceeds the \
                     binding limit {max_binding}: lower max_step"
                )));
            }
        }

        let eps = cfg.rms_norm_eps.to_bits();
        let norm_h = uniform(
            device,
            "norm_h",
            &[h as u32, h as u32, (pad64(h) / 4) as u32, eps],
        );
        let norm_q = uniform(
            device,
            "norm_q",
            &[q as u32, q as u32, (pad64(q) / 4) as u32, eps],
        );
        let norm_i = uniform(
            device,
            "norm_i",
            &[i as u32, 2 * i as u32, (pad64(i) / 4) as u32, eps],
        );
        let norm_f = uniform(device, "norm_final", &[h as u32, h as u32, hp as u32, eps]);
        let gamma = |name: &str, v: &[f32]| storage_init(device, name, bytemuck::cast_slice(v));
        let nbg = |name: &str,
                   params: &wgpu::Buffer,
                   src: &wgpu::Buffer,
                   g: &wgpu::Buffer,
                   out: &wgpu::Buffer| {
            bind_group(
                device,
                name,
                &pipes.norm_layout,
                &[&bufs.step, params, src, g, out, &bufs.xs],
            )
        };

        let hd = cfg.head_dim;
        let fused = opts.fused
            && [h, q, i]
                .iter()
                .all(|&n| pad64(n) <= FUSED_MAX_WIDTH && n.is_multiple_of(4))
            && hd.is_multiple_of(2);
        // Fused GEMV parameters: rows, kvec, ld, width, src_stride, eps, q, kv, hd.
        let fparams = |name: &str, m: &Mat, width: usize, src_stride: usize| {
            uniform(
                device,
                name,
                &[
                    m.rows as u32,
                    m.kvec as u32,
                    m.rows as u32,
                    width as u32,
                    src_stride as u32,
                    eps,
                    q as u32,
                    kv as u32,
                    hd as u32,
                    0,
                    0,
                    0,
                ],
            )
        };
        let fbg = |name: &str,
                   params: &wgpu::Buffer,
                   m: &Mat,
                   src: &wgpu::Buffer,
                   g: &wgpu::Buffer,
                   out: &wgpu::Buffer| {
            bind_group(
                device,
                name,
                &pipes.fused_layout,
                &[&bufs.step, params, &m.w, &m.rs, src, g, out],
            )
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for (li, l) in w.layers.iter().enumerate() {
            let n = |s: &str| format!("layer {li} {s}");
            let g_in = gamma(&n("input_norm"), &l.input_norm);
            let g_post = gamma(&n("post_norm"), &l.post_attention_norm);
            let g_attn = gamma(&n("attn_sub_norm"), &l.attn_sub_norm);
            let g_ffn = gamma(&n("ffn_sub_norm"), &l.ffn_sub_norm);
            let matrix = |parts: &[&crate::format::TernaryMatrix], out, name: &str| {
                Ok::<_, Error>(mat(
                    device,
                    &pipes,
                    &bufs,
                    PackedMatrix::new(parts)?,
                    out,
                    name,
                ))
            };
            let qkv = matrix(&[&l.q, &l.k, &l.v], &bufs.qkv, &n("qkv"))?;
            let o = matrix(&[&l.o], &bufs.x, &n("o"))?;
            let gate_up = matrix(&[&l.gate, &l.up], &bufs.gu, &n("gate_up"))?;
            let down = matrix(&[&l.down], &bufs.x, &n("down"))?;
            let fused = fused.then(|| FusedLayer {
                o: fbg(
                    &n("fused o"),
                    &fparams(&n("fused o"), &o, q, q),
                    &o,
                    &bufs.attn,
                    &g_attn,
                    &bufs.x,
                ),
                gate_up: fbg(
                    &n("fused gate_up"),
                    &fparams(&n("fused gate_up"), &gate_up, h, h),
                    &gate_up,
                    &bufs.x,
                    &g_post,
                    &bufs.gu,
                ),
                down: fbg(
                    &n("fused down"),
                    &fparams(&n("fused down"), &down, i, 2 * i),
                    &down,
                    &bufs.gu,
                    &g_ffn,
                    &bufs.x,
                ),
            });
            layers.push(GpuLayer {
                norm_input: nbg(&n("input_norm"), &norm_h, &bufs.x, &g_in, &bufs.xq),
                norm_post: nbg(&n("post_norm"), &norm_h, &bufs.x, &g_post, &bufs.xq),
                norm_attn: nbg(&n("attn_sub_norm"), &norm_q, &bufs.attn, &g_attn, &bufs.xq),
                norm_ffn: nbg(&n("ffn_sub_norm"), &norm_i, &bufs.gu, &g_ffn, &bufs.xq),
                input_gamma: g_in,
                qkv,
                o,
                gate_up,
                down,
                fused,
            });
        }
        let g_final = gamma("final_norm", &w.final_norm);
        let final_norm_bg = nbg("final_norm", &norm_f, &bufs.x, &g_final, &bufs.hn);
        let final_norm_q_bg = (opts.head == HeadMode::Int8)
            .then(|| nbg("final_norm_q", &norm_h, &bufs.x, &g_final, &bufs.xq));

        let argmax_params = uniform(
            device,
            "argmax",
            &[vocab as u32, kernels::argmax_parts(vocab) as u32],
        );
        let argmax_bg = bind_group(
            device,
            "argmax",
            &pipes.argmax_layout,
            &[
                &argmax_params,
                &bufs.logits,
                &bufs.argmax_part,
                &bufs.argmax_result,
            ],
        );
        let topk_passes = (0..kernels::TOPK_PASSES)
            .map(|i| {
                let params = uniform(device, "topk", &[0u32; 4]);
                let (src, dst) = (&bufs.topk[(i + 1) % 2], &bufs.topk[i % 2]);
                let bg = bind_group(
                    device,
                    "topk",
                    &pipes.topk_layout,
                    &[&params, &bufs.logits, src, dst],
                );
                (params, bg)
            })
            .collect();
        let embed_bg = |s: &Shard| {
            bind_group(
                device,
                "embed",
                &pipes.embed_layout,
                &[&bufs.step, &s.uni, &bufs.tokens, &s.buf, &bufs.x],
            )
        };
        let head_bg = |s: &Shard| {
            bind_group(
                device,
                "head",
                &pipes.head_layout,
                &[&bufs.step, &s.uni, &s.buf, &bufs.hn, &bufs.logits],
            )
        };
        let make = |s: Shard, bg: &dyn Fn(&Shard) -> wgpu::BindGroup| {
            let g = bg(&s);
            (s, g)
        };
        let embed_raw = buffers::upload_shards(device, &w.embed, shard_bytes)?;
        let int8_head = opts.head == HeadMode::Int8;
        let head_bytes = if int8_head {
            (head_t.rows * (pad64(head_t.cols) + 4)) as u64
        } else {
            (head_t.rows * buffers::head_row_words(head_t) * 4) as u64
        };
        let head_shards: Vec<_> = if int8_head {
            buffers::upload_i8_shards(device, head_t, shard_bytes)?
                .into_iter()
                .map(|(s, scales)| {
                    let bg = bind_group(
                        device,
                        "head_i8",
                        &pipes.head_i8_layout,
                        &[
                            &bufs.step,
                            &s.uni,
                            &s.buf,
                            &scales,
                            &bufs.xq,
                            &bufs.xs,
                            &bufs.logits,
                        ],
                    );
                    (s, bg)
                })
                .collect()
        } else {
            match &w.lm_head {
                // Tied: the head reads the embedding's shards.
                None => embed_raw
                    .iter()
                    .map(|s| make(s.clone(), &head_bg))
                    .collect(),
                Some(lm) => buffers::upload_shards(device, lm, shard_bytes)?
                    .into_iter()
                    .map(|s| make(s, &head_bg))
                    .collect(),
            }
        };
        let embed_shards: Vec<_> = embed_raw.into_iter().map(|s| make(s, &embed_bg)).collect();
        let most = ctx.limits.max_compute_workgroups_per_dimension as usize;
        let rpw = pipes.rows_per_wg() as usize;
        if let Some((s, _)) = head_shards
            .iter()
            .find(|(s, _)| s.rows.div_ceil(rpw) > most)
        {
            return Err(Error::Backend(format!(
                "a head shard of {} vocabulary rows needs more than {most} workgroups",
                s.rows
            )));
        }

        let mut rec = Recorder::new(&ctx.device);
        if std::env::var_os("BITNET_GPU_PROFILE").is_some() {
            rec.set_profiling(true, &ctx.queue);
        }
        Ok(GpuBackend {
            inv_freq: rope_inv_freq(cfg.rope_theta, cfg.head_dim),
            cfg,
            pipes,
            bufs,
            layers,
            final_norm_bg,
            argmax_bg,
            topk_passes,
            embed_shards,
            head_shards,
            head_bytes,
            final_norm_q_bg,
            kv: opts.kv,
            max_step,
            max_binding,
            logit_rows,
            rec,
            tokens: Vec::new(),
            queued: Default::default(),
            queued_total: 0,
            whole_step: false,
            step: [0; 8],
            timing: std::env::var_os("BITNET_GPU_TIMING").map(|_| HostTiming::default()),
            #[cfg(not(target_arch = "wasm32"))]
            batch_error: None,
            ctx,
        })
    }

    /// Prints the per-kernel GPU time accumulated since profiling was turned on (stderr).
    pub fn print_gpu_profile(&mut self) {
        let Some(p) = self.rec.take_profile() else {
            return;
        };
        let total: f64 = p.iter().map(|e| e.1).sum();
        eprintln!(
            "gpu kernel time (timestamp queries), total {:.3} ms",
            total * 1e3
        );
        for (name, secs, calls) in p {
            eprintln!(
                "  {name:<20} {:>10.3} ms {:>5.1}%  {calls:>6} dispatches  {:>8.2} us/dispatch",
                secs * 1e3,
                100.0 * secs / total.max(1e-12),
                secs * 1e6 / calls.max(1) as f64
            );
        }
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterDesc {
        &self.ctx.desc
    }

    /// Most tokens in one step.
    pub fn max_step(&self) -> usize {
        self.max_step
    }

    /// Number of shards the head is split into (1 when it fits one binding).
    pub fn head_shards(&self) -> usize {
        self.head_shards.len()
    }

    /// Whether row reductions use subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.pipes.subgroups
    }

    fn t(&self) -> usize {
        self.step[0] as usize
    }

    /// Writes the step uniform and tokens, and submits the recorded work (if any).
    fn flush(&mut self) -> Option<wgpu::SubmissionIndex> {
        let q = &self.ctx.queue;
        q.write_buffer(&self.bufs.step, 0, bytemuck::cast_slice(&self.step));
        if !self.tokens.is_empty() {
            q.write_buffer(&self.bufs.tokens, 0, bytemuck::cast_slice(&self.tokens));
        }
        self.rec.submit(q)
    }

    /// RoPE cos/sin per (position, j) for `positions` positions, computed exactly like the CPU
    /// backend's `ops::rope`.
    fn rope_table(&self, positions: usize) -> wgpu::Buffer {
        let half = self.cfg.head_dim / 2;
        let mut table = Vec::with_capacity(positions * 2 * half);
        for p in 0..positions {
            for &f in &self.inv_freq[..half] {
                let (s, co) = (p as f32 * f).sin_cos();
                table.push(co);
                table.push(s);
            }
        }
        storage_init(&self.ctx.device, "rope table", bytemuck::cast_slice(&table))
    }

    /// Records the final norm, head and argmax of the step's last position (into the argmax
    /// result word).
    fn record_argmax(&mut self) {
        self.record_head_last();
        kernels::argmax(
            &mut self.rec,
            &self.pipes,
            &self.argmax_bg,
            self.cfg.vocab_size,
        );
    }

    /// Records the final norm, head and argmax of the step's last position and the copy of
    /// the result word into the returned readback buffer.
    pub(super) fn record_argmax_last(&mut self) -> wgpu::Buffer {
        self.record_argmax();
        let (res, rb) = (
            self.bufs.argmax_result.clone(),
            self.bufs.argmax_readback.clone(),
        );
        self.rec.encoder().copy_buffer_to_buffer(&res, 0, &rb, 0, 4);
        rb
    }

    /// Whether the head is stored as int8 (`--head int8`).
    fn int8_head(&self) -> bool {
        self.final_norm_q_bg.is_some()
    }

    /// Records the final norm of every row of the step.
    /// With the int8 head, the norm quantizes the rows to int8 instead (xq, xs).
    fn record_final_norm(&mut self) {
        let t = self.t();
        let (kind, bg) = match &self.final_norm_q_bg {
            Some(bg) => (NormKind::Quant, bg),
            None => (NormKind::F32, &self.final_norm_bg),
        };
        kernels::norm(&mut self.rec, &self.pipes, kind, bg, t);
    }

    /// Runs the head over the final-normed rows `range` (recorded with the step so far),
    /// in batches of the logits buffer's rows, and appends their logits to `out`.
    fn read_head_rows(&mut self, range: std::ops::Range<usize>, out: &mut Vec<f32>) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        if range.is_empty() {
            self.flush();
            return Ok(());
        }
        out.reserve(range.len() * vocab);
        let mut r0 = range.start;
        while r0 < range.end {
            let n = self.logit_rows.min(range.end - r0);
            self.step[5] = r0 as u32;
            self.step[6] = n as u32;
            let bytes = (n * vocab * 4) as u64;
            let int8 = self.int8_head();
            for (s, bg) in &self.head_shards {
                kernels::head(&mut self.rec, &self.pipes, bg, s.rows, n, int8);
            }
            let (logits, readback) = (self.bufs.logits.clone(), self.bufs.readback.clone());
            self.rec
                .encoder()
                .copy_buffer_to_buffer(&logits, 0, &readback, 0, bytes);
            self.flush();
            self.read_mapped(&readback, bytes, |data| {
                out.extend_from_slice(bytemuck::cast_slice(data));
            })?;
            r0 += n;
        }
        Ok(())
    }

    /// Records the final norm and the head of the step's last position (logits row 0).
    pub(super) fn record_head_last(&mut self) {
        let t = self.t();
        self.record_final_norm();
        self.step[5] = (t - 1) as u32;
        self.step[6] = 1;
        let int8 = self.int8_head();
        for (s, bg) in &self.head_shards {
            kernels::head(&mut self.rec, &self.pipes, bg, s.rows, 1, int8);
        }
    }

    /// After a step's `layer`: submits what is recorded so far every few layers, so the GPU
    /// starts on the first layers while the host encodes the rest (wgpu's per-dispatch encoding
    /// at submit costs a large part of a decode step's GPU time), unless the GPU is still busy
    /// with queued steps: then the step goes in one submit (H200: decode 446 vs 427 tok/s).
    fn end_layer(&mut self, layer: usize) {
        if !self.whole_step && layer % SUBMIT_LAYERS == 1 && layer + 1 < self.cfg.num_layers {
            self.flush();
        }
    }

    /// Starts recording a step of `t` tokens (`host` of them written at submit; none when the
    /// tokens buffer already holds the input) with its embedding gather.
    fn begin_step(&mut self, host: &[u32], t: usize) {
        // Drop any unsubmitted work of an abandoned step.
        self.rec.discard();
        if let Some(timing) = &mut self.timing {
            timing.started = Some(std::time::Instant::now());
        }
        self.tokens.clear();
        self.tokens.extend_from_slice(host);
        self.whole_step = !self.queued.is_empty();
        self.step = [t as u32, 0, 64, 1, 0, 0, 0, 0];
        let h = self.cfg.hidden_size;
        for (_, bg) in &self.embed_shards {
            kernels::embed(&mut self.rec, &self.pipes, bg, h, t);
        }
    }

    fn wait_map(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        self.read_mapped(buf, bytes, |data| data.to_vec())
    }

    /// Waits for the submitted work, maps the first `bytes` of `buf` and hands them to `f`.
    fn read_mapped<T>(
        &self,
        buf: &wgpu::Buffer,
        bytes: u64,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        self.read_mapped_after(buf, bytes, None, f)
    }

    /// [`Self::read_mapped`] waiting only for submission `index` (all work when None), so
    /// work queued after it keeps the GPU busy meanwhile.
    fn read_mapped_after<T>(
        &self,
        buf: &wgpu::Buffer,
        bytes: u64,
        index: Option<wgpu::SubmissionIndex>,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.ctx
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map_err(|e| Error::Backend(format!("poll: {e}")))?;
        rx.recv()
            .map_err(|e| Error::Backend(format!("map: {e}")))?
            .map_err(|e| Error::Backend(format!("map: {e}")))?;
        let data = buf
            .get_mapped_range(0..bytes)
            .map_err(|e| Error::Backend(format!("map: {e}")))?;
        let r = f(&data);
        drop(data);
        buf.unmap();
        Ok(r)
    }

    fn activation(&self, a: Activation) -> &wgpu::Buffer {
        let b = &self.bufs;
        match a {
            Activation::Residual => &b.x,
            Activation::Quantized => &b.xq,
            Activation::Scales => &b.xs,
            Activation::Qkv => &b.qkv,
            Activation::Attention => &b.attn,
            Activation::GateUp => &b.gu,
            Activation::FinalNormed => &b.hn,
            Activation::Logits => &b.logits,
        }
    }

    /// Records the top-k passes over logits row 0 (k <= [`kernels::TOPK_MAX`], at most the
    /// vocab), submits, and reads the k best (logit × `inv_t`, id) back, best first, in the
    /// order of [`crate::engine::sampler::top_candidates`].
    pub fn top_k_of_logits(
        &mut self,
        k: usize,
        inv_t: f32,
        out: &mut Vec<(f32, u32)>,
    ) -> Result<()> {
        if k == 0 || k > kernels::TOPK_MAX.min(self.cfg.vocab_size) {
            return Err(Error::Request(format!(
                "GPU top-k takes k in 1..={}, got {k}",
                kernels::TOPK_MAX.min(self.cfg.vocab_size)
            )));
        }
        let mut n = self.cfg.vocab_size;
        let mut pass = 0;
        loop {
            let (params, bg) = &self.topk_passes[pass];
            let words = [n as u32, k as u32, inv_t.to_bits(), 0];
            self.ctx
                .queue
                .write_buffer(params, 0, bytemuck::cast_slice(&words));
            kernels::topk(&mut self.rec, &self.pipes, bg, pass == 0, n);
            let groups = n.div_ceil(kernels::TOPK_CHUNK);
            if groups == 1 {
                break;
            }
            n = groups * k;
            pass += 1;
        }
        let (res, rb) = (&self.bufs.topk[pass % 2], self.bufs.topk_readback.clone());
        let bytes = (k * 8) as u64;
        self.rec
            .encoder()
            .copy_buffer_to_buffer(res, 0, &rb, 0, bytes);
        self.flush();
        self.read_mapped(&rb, bytes, |data| {
            out.clear();
            out.extend(data.chunks_exact(8).map(|e| {
                let key = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                // Undo topk.wgsl's key_of.
                let bits = if key & 0x8000_0000 != 0 {
                    key & 0x7fff_ffff
                } else {
                    !key
                };
                (f32::from_bits(bits), id)
            }));
        })
    }

    /// Submits pending work and reads a whole activation buffer (as u32 words; tests and
    /// debugging only: this allocates a staging buffer).
    pub fn read_activation(&mut self, a: Activation) -> Result<Vec<u32>> {
        self.flush();
        let src = self.activation(a).clone();
        let staging = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("debug read"),
            size: src.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(&src, 0, &staging, 0, src.size());
        self.ctx.queue.submit([enc.finish()]);
        let bytes = self.wait_map(&staging, src.size())?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Submits pending work, then overwrites the start of an activation buffer with `words`
    /// (tests and debugging).
    pub fn write_activation(&mut self, a: Activation, words: &[u32]) {
        self.flush();
        let buf = self.activation(a).clone();
        self.ctx
            .queue
            .write_buffer(&buf, 0, bytemuck::cast_slice(words));
    }

    fn norm(
        &mut self,
        kind: NormKind,
        which: impl Fn(&GpuLayer) -> &wgpu::BindGroup,
        layer: usize,
    ) {
        let t = self.t();
        kernels::norm(
            &mut self.rec,
            &self.pipes,
            kind,
            which(&self.layers[layer]),
            t,
        );
    }
}

impl Drop for GpuBackend {
    fn drop(&mut self) {
        // BITNET_GPU_PROFILE=1: every kernel is timed from load on; the totals print at exit.
        if std::env::var_os("BITNET_GPU_PROFILE").is_some() {
            self.print_gpu_profile();
        }
        if let Some(t) = &self.timing {
            let n = t.steps.max(1) as f64 * 1e-6;
            eprintln!(
                "host timing over {} greedy steps: record {:.1} us, submit {:.1} us, wait {:.1} us per step",
                t.steps,
                t.record / n,
                t.submit / n,
                t.wait / n
            );
        }
    }
}

impl Backend for GpuBackend {
    type Cache = GpuCache;

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn describe(&self) -> String {
        let head = if self.int8_head() { ", int8 head" } else { "" };
        let kv = match self.kv {
            KvDtype::F32 => "",
            KvDtype::F16 => ", f16 KV cache",
        };
        format!("gpu ({}{head}{kv})", self.ctx.desc)
    }

    fn prefill_chunk(&self) -> usize {
        self.max_step
    }

    fn new_cache(&self, capacity: usize) -> Result<GpuCache> {
        let c = &self.cfg;
        let device = &self.ctx.device;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let layer_bytes = (nkv * capacity * hd * self.kv.bytes()) as u64;
        if layer_bytes > self.max_binding {
            return Err(Error::Backend(format!(
                "a layer's KV cache ({layer_bytes} bytes for {capacity} positions) exceeds the \
                 binding limit {}",
                self.max_binding
            )));
        }
        let table = self.rope_table(capacity);
        let unit = (self.max_step * nh * (hd + 2) * 4) as u64;
        let budget = self.max_binding.min(64 << 20);
        let maxsplit = ((budget / unit) as usize).clamp(1, capacity.div_ceil(64));
        let part = storage(device, "attention partials", unit as usize * maxsplit);
        let attn_params = uniform(
            device,
            "attention",
            &[
                hd as u32,
                nh as u32,
                (nh / nkv) as u32,
                (c.q_dim() + 2 * c.kv_dim()) as u32,
                c.q_dim() as u32,
                maxsplit as u32,
                (1.0 / (hd as f32).sqrt()).to_bits(),
                0,
            ],
        );
        let b = &self.bufs;
        let mut k = Vec::new();
        let mut v = Vec::new();
        let mut rope_bgs = Vec::new();
        let mut attn_bgs = Vec::new();
        let mut qkv_bgs = Vec::new();
        for l in 0..c.num_layers {
            let kb = storage(device, &format!("k cache {l}"), layer_bytes as usize);
            let vb = storage(device, &format!("v cache {l}"), layer_bytes as usize);
            rope_bgs.push(bind_group(
                device,
                "rope",
                &self.pipes.rope_layout,
                &[&b.step, &b.rope_params, &b.qkv, &kb, &vb, &table],
            ));
            attn_bgs.push(bind_group(
                device,
                "attention",
                &self.pipes.attn_layout,
                &[
                    &b.step,
                    &attn_params,
                    &b.qkv,
                    &kb,
                    &vb,
                    &part,
                    &b.attn,
                    &kb,
                    &vb,
                ],
            ));
            let layer = &self.layers[l];
            if layer.fused.is_some() {
                let m = &layer.qkv;
                let h = c.hidden_size;
                let params = uniform(
                    device,
                    "fused qkv",
                    &[
                        m.rows as u32,
                        m.kvec as u32,
                        m.rows as u32,
                        h as u32,
                        h as u32,
                        c.rms_norm_eps.to_bits(),
                        c.q_dim() as u32,
                        c.kv_dim() as u32,
                        hd as u32,
                        0,
                        0,
                        0,
                    ],
                );
                qkv_bgs.push(bind_group(
                    device,
                    "fused qkv",
                    &self.pipes.fused_rope_layout,
                    &[
                        &b.step,
                        &params,
                        &m.w,
                        &m.rs,
                        &b.x,
                        &layer.input_gamma,
                        &b.qkv,
                        &table,
                        &kb,
                        &vb,
                    ],
                ));
            }
            k.push(kb);
            v.push(vb);
        }
        Ok(GpuCache {
            capacity,
            maxsplit,
            k,
            v,
            rope_bgs,
            attn_bgs,
            qkv_bgs,
        })
    }

    fn embed(&mut self, tokens: &[u32]) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Request(format!(
                "token id {bad} is out of range (vocab_size {vocab})"
            )));
        }
        if tokens.len() > self.max_step {
            return Err(Error::Request(format!(
                "{} tokens in one step but the GPU backend was planned for at most {}",
                tokens.len(),
                self.max_step
            )));
        }
        // Host tokens start over: queued steps no one reads any more are dropped.
        self.queued.clear();
        self.begin_step(tokens, tokens.len());
        Ok(())
    }

    fn can_queue_steps(&self) -> bool {
        // The browser reads results asynchronously (web.rs) and never blocks on a step.
        !cfg!(target_arch = "wasm32")
    }

    fn embed_queued_argmax(&mut self) -> Result<()> {
        if self.queued.is_empty() {
            return Err(Error::Request(
                "no queued decode step to take the input token from".into(),
            ));
        }
        if self.queued.len() >= self.bufs.argmax_ring.len() {
            return Err(Error::Request(format!(
                "at most {} decode steps may be queued",
                self.bufs.argmax_ring.len()
            )));
        }
        // The tokens buffer holds the last queued step's argmax (copied there on the device).
        self.begin_step(&[], 1);
        Ok(())
    }

    fn queue_argmax_last(&mut self) -> Result<()> {
        self.record_argmax();
        let rb = self.bufs.argmax_ring[self.queued_total % self.bufs.argmax_ring.len()].clone();
        self.queued_total += 1;
        let enc = self.rec.encoder();
        enc.copy_buffer_to_buffer(&self.bufs.argmax_result, 0, &rb, 0, 4);
        enc.copy_buffer_to_buffer(&self.bufs.argmax_result, 0, &self.bufs.tokens, 0, 4);
        let t0 = std::time::Instant::now();
        let index = self.flush();
        if let Some(t) = &mut self.timing {
            if let Some(s) = t.started.take() {
                t.record += (t0 - s).as_secs_f64();
                t.submit += t0.elapsed().as_secs_f64();
            }
        }
        self.queued.push_back((rb, index));
        Ok(())
    }

    fn read_queued_argmax(&mut self) -> Result<u32> {
        let (rb, index) = self
            .queued
            .pop_front()
            .ok_or_else(|| Error::Request("no queued decode step to read".into()))?;
        let t0 = std::time::Instant::now();
        let token = self.read_mapped_after(&rb, 4, index, first_word)?;
        if let Some(t) = &mut self.timing {
            t.steps += 1;
            t.wait += t0.elapsed().as_secs_f64();
        }
        Ok(token)
    }

    fn rmsnorm_quant(&mut self, layer: usize, site: NormSite) {
        match site {
            NormSite::Input => self.norm(NormKind::Quant, |l| &l.norm_input, layer),
            NormSite::PostAttention => self.norm(NormKind::Quant, |l| &l.norm_post, layer),
        }
    }

    fn ternary_matmul(&mut self, layer: usize, linear: Linear) {
        let t = self.t();
        let l = &self.layers[layer];
        let (m, acc, label) = match linear {
            Linear::Qkv => (&l.qkv, false, "matmul_qkv"),
            Linear::O => (&l.o, true, "matmul_o"),
            Linear::GateUp => (&l.gate_up, false, "matmul_gate_up"),
            Linear::Down => (&l.down, true, "matmul_down"),
        };
        kernels::matmul(&mut self.rec, &self.pipes, label, &m.bg, m.rows, t, acc);
        if matches!(linear, Linear::Down) {
            self.end_layer(layer);
        }
    }

    fn rope_kv_write(&mut self, cache: &mut GpuCache, layer: usize, pos: usize) {
        let t = self.t();
        self.step[1] = pos as u32;
        self.step[4] = cache.capacity as u32;
        let heads = self.cfg.num_heads + self.cfg.num_kv_heads;
        kernels::rope(&mut self.rec, &self.pipes, &cache.rope_bgs[layer], heads, t);
    }

    fn attention(&mut self, cache: &GpuCache, layer: usize, pos: usize) {
        let t = self.t();
        let maxlen = pos + t;
        let chunk = maxlen.div_ceil(cache.maxsplit).div_ceil(64) * 64;
        let nsplit = maxlen.div_ceil(chunk);
        self.step[1] = pos as u32;
        self.step[2] = chunk as u32;
        self.step[3] = nsplit as u32;
        self.step[4] = cache.capacity as u32;
        let heads = self.cfg.num_heads;
        let kv_heads = self.cfg.num_kv_heads;
        let group = heads / kv_heads;
        if t > 1 && kernels::tiled_attention_fits(self.cfg.head_dim, group) {
            kernels::attention_tiled(
                &mut self.rec,
                &self.pipes,
                &cache.attn_bgs[layer],
                kv_heads,
                group,
                nsplit,
                t,
            );
            return;
        }
        kernels::attention(
            &mut self.rec,
            &self.pipes,
            &cache.attn_bgs[layer],
            nsplit,
            heads,
            t,
            self.cfg.head_dim,
        );
    }

    fn fused_layer(&mut self, cache: &mut GpuCache, layer: usize, pos: usize) -> bool {
        if self.t() != 1 || cache.qkv_bgs.len() <= layer || self.layers[layer].fused.is_none() {
            return false;
        }
        self.step[1] = pos as u32;
        self.step[4] = cache.capacity as u32;
        let rows = self.layers[layer].qkv.rows;
        let qkv = &cache.qkv_bgs[layer];
        kernels::gemv_fused(
            &mut self.rec,
            "fused_qkv",
            &self.pipes.gemv_norm_rope,
            qkv,
            rows,
        );
        self.attention(cache, layer, pos);
        let (l, p, rec) = (&self.layers[layer], &self.pipes, &mut self.rec);
        if let Some(f) = &l.fused {
            kernels::gemv_fused(rec, "fused_o", &p.gemv_norm_acc, &f.o, l.o.rows);
            kernels::gemv_fused(
                rec,
                "fused_gate_up",
                &p.gemv_norm,
                &f.gate_up,
                l.gate_up.rows,
            );
            kernels::gemv_fused(rec, "fused_down", &p.gemv_relu2_acc, &f.down, l.down.rows);
        }
        self.end_layer(layer);
        true
    }

    fn attn_sub_norm_quant(&mut self, layer: usize) {
        self.norm(NormKind::Quant, |l| &l.norm_attn, layer);
    }

    fn relu2_mul_norm_quant(&mut self, layer: usize) {
        self.norm(NormKind::Relu2Quant, |l| &l.norm_ffn, layer);
    }

    fn logits(&mut self, rows: LogitRows, out: &mut Vec<f32>) -> Result<()> {
        let t = self.t();
        let range = match rows {
            LogitRows::None => {
                self.flush();
                return Ok(());
            }
            LogitRows::Last => t - 1..t,
            LogitRows::All => 0..t,
        };
        self.record_final_norm();
        out.clear();
        self.read_head_rows(range, out)
    }

    fn argmax_last(&mut self, _scratch: &mut Vec<f32>) -> Result<u32> {
        let rb = self.record_argmax_last();
        let t0 = std::time::Instant::now();
        self.flush();
        let t1 = std::time::Instant::now();
        let token = self.read_mapped(&rb, 4, first_word)?;
        if let Some(t) = &mut self.timing {
            if let Some(s) = t.started.take() {
                t.steps += 1;
                t.record += (t0 - s).as_secs_f64();
                t.submit += (t1 - t0).as_secs_f64();
                t.wait += t1.elapsed().as_secs_f64();
            }
        }
        Ok(token)
    }

    fn top_k_last(
        &mut self,
        k: usize,
        inv_t: f32,
        scratch: &mut Vec<f32>,
        out: &mut Vec<(f32, u32)>,
    ) -> Result<()> {
        let k = k.min(self.cfg.vocab_size);
        if k == 0 || k > kernels::TOPK_MAX {
            return top_k_from_logits(self, k, inv_t, scratch, out);
        }
        self.record_head_last();
        self.top_k_of_logits(k, inv_t, out)
    }

    fn set_gpu_profiling(&mut self, on: bool) {
        self.rec.set_profiling(on, &self.ctx.queue);
    }

    fn gpu_profile(&mut self) -> Option<Vec<(&'static str, f64, u64)>> {
        self.rec.take_profile()
    }

    fn decode_bytes_per_token(&self) -> u64 {
        let ternary: u64 = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes + l.o.bytes + l.gate_up.bytes + l.down.bytes)
            .sum();
        let c = &self.cfg;
        let norms = (c.num_layers * 4 * (2 * c.hidden_size + c.intermediate_size)) as u64;
        ternary + self.head_bytes + norms
    }
}

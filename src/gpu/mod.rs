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
mod cache;
#[cfg(all(test, not(target_arch = "wasm32")))]
mod common_tests;
pub mod context;
mod device;
pub mod ops;
pub mod params;
mod recorder;
mod setup;
mod step;
#[cfg(all(target_arch = "wasm32", feature = "wasm"))]
pub mod web;

use std::sync::mpsc;

use buffers::{bind_group, pad64, pad8, storage, storage_init, uniform, Shard};
pub use cache::GpuCache;
pub use context::{AdapterDesc, GpuContext};
use device::HostTiming;
use ops::gemv_fused::{Fused, FUSED_MAX_WIDTH};
use ops::norm::NormKind;
use ops::Ops;
use recorder::Recorder;
pub use step::Activation;

use crate::arch::{layer_ops, GatedAct, LayerOp, BITNET_B158};
use crate::backend::{Backend, HeadMode, KvDtype, Linear, LogitRows, NormSite, PREFILL_CHUNK};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::format::{FloatDtype, Weights};
use crate::reference::rope_inv_freq;

/// The GPU backend's default step size, and so its prompt chunk: four times the CPU's, because
/// a larger step keeps more of the GPU busy in each GEMM and runs the per-step kernels fewer
/// times (prefill of a 512-token prompt 10.5k instead of 9.1k tok/s on an H200 with steps of
/// 512 against 256; of a 3,900-token prompt 12,903 / 12,890 instead of 11,835 / 11,815 on an
/// H100 with 1,024 against 512).
pub const PREFILL_CHUNK_GPU: usize = 4 * PREFILL_CHUNK;

/// Options of the GPU backend.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// Most tokens in one step (buffers are planned for it); the generator's prefill chunk
    /// (see [`Backend::prefill_chunk`]).
    pub max_step: usize,
    /// Use subgroup reductions when the adapter has them.
    pub subgroups: bool,
    /// Run the matmuls of steps over [`ops::matmul::COOP_MIN_T`] tokens on cooperative matrices
    /// (tensor cores) when the adapter has them (see [`AdapterDesc::tensor_cores`]); off keeps
    /// the dp4a kernels. Both read the same packed weights.
    pub tensor_cores: bool,
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
    /// Which adapter, in [`probe`]'s order (0: the best).
    pub adapter: usize,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            max_step: PREFILL_CHUNK_GPU,
            subgroups: true,
            tensor_cores: false,
            max_binding_bytes: None,
            fused: true,
            head: HeadMode::Native,
            kv: KvDtype::F32,
            adapter: 0,
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
    /// `use_rms_norm` models: the norm inside each linear and the parts' matmuls.
    linear_norms: Option<LinearNorms>,
}

/// A `use_rms_norm` layer's norms and part matmuls.
struct LinearNorms {
    /// The layer norm of each site ([`NormSite::Input`], [`NormSite::PostAttention`]) into f32
    /// rows of `hn`, which each part's own norm then reads.
    first: [wgpu::BindGroup; 2],
    /// Q, K, V, Gate, Up ([`crate::format::NORMED_PARTS`] order).
    parts: Vec<LinearPart>,
}

/// One part of a fused linear: its own norm into int8 rows, its rows of the fused matmul.
struct LinearPart {
    linear: Linear,
    rows: usize,
    kvec: usize,
    norm: wgpu::BindGroup,
    matmul: wgpu::BindGroup,
}

struct Bufs {
    step: wgpu::Buffer,
    /// Drafts the last queued step of several rows rejected (`accept.wgsl`).
    rejected: wgpu::Buffer,
    tokens: wgpu::Buffer,
    x: wgpu::Buffer,
    xq: wgpu::Buffer,
    xs: wgpu::Buffer,
    /// The split-K GEMM's i32 sums ([`ops::matmul::PART_BYTES`]), zero between matmuls.
    part: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    gu: wgpu::Buffer,
    hn: wgpu::Buffer,
    logits: wgpu::Buffer,
    readback: wgpu::Buffer,
    rope_params: wgpu::Buffer,
    /// Argmax of the logits rows: (value, index) partials, one result word per row, and the
    /// readback of a step's ids (one word per step row).
    argmax_part: wgpu::Buffer,
    argmax_result: wgpu::Buffer,
    argmax_readback: wgpu::Buffer,
    /// Readbacks of queued greedy steps' argmax of every row (one per step in flight).
    argmax_ring: [wgpu::Buffer; 3],
    /// Top-k candidates: two buffers the passes alternate between, and the readback.
    topk: [wgpu::Buffer; 2],
    /// The rows a top-k selects: (logits row, bits of 1 / temperature) each.
    topk_sel: wgpu::Buffer,
    topk_readback: wgpu::Buffer,
}

/// A step is submitted in parts of this many layers (the first part after two), unless it is
/// queued behind other steps.
const SUBMIT_LAYERS: usize = 8;

/// A greedy step submitted without waiting: where its rows' argmax will be read.
struct QueuedStep {
    readback: wgpu::Buffer,
    submission: Option<wgpu::SubmissionIndex>,
    rows: usize,
}

/// The GPU backend.
pub struct GpuBackend {
    ctx: GpuContext,
    cfg: ModelConfig,
    ops: Ops,
    bufs: Bufs,
    layers: Vec<GpuLayer>,
    final_norm_bg: wgpu::BindGroup,
    argmax_bg: wgpu::BindGroup,
    /// Acceptance of queued steps' drafts on the device (`ops::accept`).
    accept_bg: wgpu::BindGroup,
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
    /// Host tokens of the step being recorded, written at submit from input `tokens_at` on.
    tokens: Vec<u32>,
    tokens_at: usize,
    /// Whether the step's rows are computed as one-token steps' (a decode step of several
    /// tokens: speculative verification), rather than by the kernels for many rows.
    decode_rows: bool,
    /// Queued greedy steps (`queue_greedy_step`), oldest first.
    queued: std::collections::VecDeque<QueuedStep>,
    /// Steps queued so far (picks the next readback of `argmax_ring`).
    queued_total: usize,
    /// Drafts of the last queued step: how far a step queued behind it with its input from
    /// the device may move back.
    ahead_drafts: usize,
    /// Whether the step being recorded is submitted at once (the GPU has queued steps to run
    /// meanwhile) rather than in parts of a few layers.
    whole_step: bool,
    /// How many positions the step being recorded may move back on the device: the drafts
    /// of the queued step ahead of it, when its input comes from that step (`ops::accept`).
    moves: usize,
    /// The step uniform's values.
    step: params::Step,
    /// Host-side timing of decode steps (`BITNET_GPU_TIMING=1`).
    timing: Option<HostTiming>,
    /// A batched step's invalid row slots, reported by its `logits_rows`.
    #[cfg(not(target_arch = "wasm32"))]
    batch_error: Option<Error>,
}

impl Backend for GpuBackend {
    type Cache = GpuCache;

    fn kv_shift(
        &mut self,
        cache: &mut GpuCache,
        table: &[u32],
        from: usize,
        to: usize,
        n: usize,
    ) -> Result<()> {
        self.shift_cache(cache, table, from, to, n)
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn describe(&self) -> String {
        let head = if self.int8_head() { ", int8 head" } else { "" };
        let kv = match self.kv {
            KvDtype::F32 => "",
            KvDtype::F16 => ", f16 KV cache",
            KvDtype::Int8 => ", int8 KV cache",
        };
        format!("gpu ({}{head}{kv})", self.ctx.desc)
    }

    fn prefill_chunk(&self) -> usize {
        self.max_step
    }

    fn new_pool(&self, blocks: usize, block_size: usize) -> Result<GpuCache> {
        self.create_cache(blocks, block_size)
    }

    fn block_bytes(&self, block_size: usize) -> usize {
        self.kv_block_bytes(block_size)
    }

    fn embed(&mut self, tokens: &[u32]) -> Result<()> {
        self.check_inputs(tokens, tokens.len())?;
        // Host tokens start over: queued steps no one reads any more are dropped.
        self.queued.clear();
        self.ahead_drafts = 0;
        self.begin_step(tokens, tokens.len());
        Ok(())
    }

    fn rmsnorm_quant(&mut self, layer: usize, site: NormSite) {
        match site {
            NormSite::Input => self.norm(NormKind::QUANT, |l| &l.norm_input, layer),
            NormSite::PostAttention => self.norm(NormKind::QUANT, |l| &l.norm_post, layer),
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
            Linear::Q | Linear::K | Linear::V | Linear::Gate | Linear::Up => {
                let part = l
                    .linear_norms
                    .as_ref()
                    .and_then(|ln| ln.parts.iter().find(|p| p.linear == linear));
                if let Some(p) = part {
                    self.ops.matmul.record(
                        &mut self.rec,
                        "matmul_part",
                        &p.matmul,
                        p.rows,
                        p.kvec,
                        t,
                        false,
                    );
                }
                return;
            }
        };
        self.ops
            .matmul
            .record(&mut self.rec, label, &m.bg, m.rows, m.kvec, t, acc);
    }

    fn layer_done(&mut self, layer: usize) {
        self.end_layer(layer);
    }

    fn linear_norm_quant(&mut self, layer: usize, site: NormSite, linear: Linear) {
        let t = self.t();
        let Some(ln) = &self.layers[layer].linear_norms else {
            return;
        };
        let first = match site {
            NormSite::Input => &ln.first[0],
            NormSite::PostAttention => &ln.first[1],
        };
        self.ops.norm.record(&mut self.rec, NormKind::F32, first, t);
        if let Some(p) = ln.parts.iter().find(|p| p.linear == linear) {
            self.ops
                .norm
                .record(&mut self.rec, NormKind::QUANT, &p.norm, t);
        }
    }

    /// The single-sequence specialisation (a one-block cache; the engine checks the context
    /// against [`crate::backend::KvCache::capacity`], 0 for a pool, before any op runs).
    fn rope_kv_write(&mut self, cache: &mut GpuCache, layer: usize, pos: usize) {
        let Some(single) = &cache.single else {
            return;
        };
        let t = self.t();
        self.step.pos = pos as u32;
        self.step.cap = cache.block_size as u32;
        let heads = self.cfg.num_heads + self.cfg.num_kv_heads;
        self.ops
            .rope
            .record(&mut self.rec, &single.rope_bgs[layer], heads, t);
    }

    fn attention(&mut self, cache: &GpuCache, layer: usize, pos: usize) {
        let Some(single) = &cache.single else {
            return;
        };
        let t = self.t();
        let maxlen = pos + t;
        let (chunk, nsplit) = single.splits(t, maxlen);
        self.step.pos = pos as u32;
        self.step.chunk = chunk as u32;
        self.step.nsplit = nsplit as u32;
        self.step.most = single.most_splits(t) as u32;
        // A step the device may move back (`ops::accept`) runs as many splits as any of its
        // possible lengths needs; the extra ones return at once.
        let nsplit = (maxlen - self.moves.min(pos)..=maxlen)
            .map(|m| single.splits(t, m).1)
            .max()
            .unwrap_or(nsplit);
        self.step.cap = cache.block_size as u32;
        let heads = self.cfg.num_heads;
        let kv_heads = self.cfg.num_kv_heads;
        let group = heads / kv_heads;
        if !self.one_token_rows() && ops::attention::tiled_fits(self.cfg.head_dim, group) {
            self.ops.attention.record_tiled(
                &mut self.rec,
                &single.attn_bgs[layer],
                kv_heads,
                group,
                nsplit,
                t,
            );
            return;
        }
        self.ops.attention.record(
            &mut self.rec,
            &single.attn_bgs[layer],
            nsplit,
            heads,
            t,
            self.cfg.head_dim,
        );
    }

    /// A decode step's whole layer in five kernels: each norm folded into the matmul that
    /// consumes it, RoPE and the KV write into the q|k|v GEMV. A decode step of several
    /// tokens (speculative verification) runs the same kernels per token, so each row's
    /// results are exactly a one-token step's.
    fn fuse(&mut self, cache: &mut GpuCache, layer: usize, pos: usize, ops: &[LayerOp]) -> usize {
        let Some(qkv) = cache.single.as_ref().and_then(|s| s.qkv_bgs.get(layer)) else {
            return 0;
        };
        let t = self.t();
        if ops != BITNET_B158 || !self.one_token_rows() || self.layers[layer].fused.is_none() {
            return 0;
        }
        self.step.pos = pos as u32;
        self.step.cap = cache.block_size as u32;
        let rows = self.layers[layer].qkv.rows;
        let fused = &self.ops.fused;
        fused.record(&mut self.rec, Fused::QkvRope, qkv, rows, t);
        // The fused GEMV puts the cache an element at a time: int8 rows, whose scale needs the
        // whole row, are written after it from q|k|v.
        if self.kv == KvDtype::Int8 {
            if let Some(single) = &cache.single {
                let kv_heads = self.cfg.num_kv_heads;
                self.ops
                    .rope
                    .record_store(&mut self.rec, &single.rope_bgs[layer], kv_heads, t);
            }
        }
        self.attention(cache, layer, pos);
        let (l, fused, rec) = (&self.layers[layer], &self.ops.fused, &mut self.rec);
        if let Some(f) = &l.fused {
            fused.record(rec, Fused::O, &f.o, l.o.rows, t);
            fused.record(rec, Fused::GateUp, &f.gate_up, l.gate_up.rows, t);
            fused.record(rec, Fused::Down, &f.down, l.down.rows, t);
        }
        ops.len()
    }

    fn attn_out_quant(&mut self, layer: usize, sub_norm: bool) {
        let kind = NormKind::Quant {
            act: None,
            normed: sub_norm,
        };
        self.norm(kind, |l| &l.norm_attn, layer);
    }

    fn gated_act_quant(&mut self, layer: usize, act: GatedAct, sub_norm: bool) {
        let kind = NormKind::Quant {
            act: Some(act),
            normed: sub_norm,
        };
        self.norm(kind, |l| &l.norm_ffn, layer);
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
        self.read_head_logits(range, out)
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn device(&mut self) -> Option<&mut dyn crate::backend::DeviceSteps> {
        Some(self)
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

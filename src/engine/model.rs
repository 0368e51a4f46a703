//! The forward pass, written once over the [`Backend`] trait (FORMAT.md §6).

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Where an RMSNorm + int8 quantization reads the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSite {
    /// input_layernorm, feeding q/k/v.
    Input,
    /// post_attention_layernorm, feeding gate/up.
    PostAttention,
}

/// The fused ternary linears of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linear {
    /// q, k and v stacked: quantized normed input → q|k|v.
    Qkv,
    /// o_proj, added into the residual stream.
    O,
    /// gate and up stacked.
    GateUp,
    /// down_proj, added into the residual stream.
    Down,
}

/// Which positions of a step need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last position only.
    Last,
    /// Every position of the step.
    All,
}

/// A key/value cache of some capacity.
pub trait KvCache {
    /// Positions the cache can hold.
    fn capacity(&self) -> usize;
}

/// The element type of a KV cache (and of a serving pool): f32 everywhere, f16 on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// f32, as the CPU backend (exact against it).
    #[default]
    F32,
    /// Keys and values rounded to f16: the GPU stores them as f16 pairs in u32 words (half the
    /// memory and half the attention reads); the CPU only rounds them, to be compared with it.
    F16,
}

impl KvDtype {
    /// Parses `f32` or `f16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(Error::Config(format!(
                "unknown KV cache type `{other}` (expected f32 or f16)"
            ))),
        }
    }

    /// Bytes per cached value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// The ops a backend implements. A step processes `T` consecutive tokens; its buffers (the
/// residual stream, quantized activations, q|k|v, attention output, gate|up) live in the backend.
pub trait Backend {
    /// The backend's KV cache.
    type Cache: KvCache;
    /// The model configuration.
    fn config(&self) -> &ModelConfig;
    /// A human-readable description (backend, kernels, device).
    fn describe(&self) -> String;
    /// A KV cache for `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<Self::Cache>;
    /// Starts a step: looks up the embeddings of `tokens` into the residual stream.
    fn embed(&mut self, tokens: &[u32]) -> Result<()>;
    /// RMSNorm of the residual stream at `site`, then per-token int8 quantization.
    fn rmsnorm_quant(&mut self, layer: usize, site: NormSite);
    /// A ternary × int8 matmul; `O` and `Down` add their output into the residual stream.
    fn ternary_matmul(&mut self, layer: usize, linear: Linear);
    /// RoPE on q and k for positions `pos..pos+T`, then k and v written into the cache.
    fn rope_kv_write(&mut self, cache: &mut Self::Cache, layer: usize, pos: usize);
    /// Causal GQA attention of the step's queries over cache positions `0..pos+T`.
    fn attention(&mut self, cache: &Self::Cache, layer: usize, pos: usize);
    /// attn_sub_norm of the attention output, then int8 quantization.
    fn attn_sub_norm_quant(&mut self, layer: usize);
    /// relu(gate)² · up, ffn_sub_norm, then int8 quantization.
    fn relu2_mul_norm_quant(&mut self, layer: usize);
    /// Records all of `layer` for the current step at once when the backend has a fused path
    /// for this step's shape (returns true), instead of the per-op sequence (returns false).
    fn fused_layer(&mut self, _cache: &mut Self::Cache, _layer: usize, _pos: usize) -> bool {
        false
    }
    /// Final norm and head for `rows`; logits appended to `out` (`vocab` per row).
    fn logits(&mut self, rows: LogitRows, out: &mut Vec<f32>) -> Result<()>;
    /// Bytes of weights one decode step reads (ternary weights, head, norms).
    fn decode_bytes_per_token(&self) -> u64;
    /// Final norm and head of the step's last position, then the index of its largest logit
    /// (the lowest id on ties, as [`crate::engine::sampler::argmax`]). `scratch` may receive
    /// the logits. Backends that can find it without reading the logits back override this.
    fn argmax_last(&mut self, scratch: &mut Vec<f32>) -> Result<u32> {
        self.logits(LogitRows::Last, scratch)?;
        Ok(crate::engine::sampler::argmax(scratch))
    }
    /// Final norm and head of the step's last position, then its `k` best candidates for
    /// temperature sampling ([`crate::engine::sampler::top_candidates`] with `inv_t`) into
    /// `out`; `scratch` may receive the logits. Backends that can select them without reading
    /// the logits back override this.
    fn top_k_last(
        &mut self,
        k: usize,
        inv_t: f32,
        scratch: &mut Vec<f32>,
        out: &mut Vec<(f32, u32)>,
    ) -> Result<()> {
        top_k_from_logits(self, k, inv_t, scratch, out)
    }
    /// Whether the backend can queue greedy decode steps ([`queue_greedy_step`]): each
    /// step's argmax stays on the device as the next step's input, so the device never waits
    /// for the host between steps.
    fn can_queue_steps(&self) -> bool {
        false
    }
    /// Starts a step (one token, as [`Backend::embed`]) whose input is the argmax of the step
    /// queued last, still on the device.
    fn embed_queued_argmax(&mut self) -> Result<()> {
        Err(not_queueing())
    }
    /// Records the final norm, head and argmax of the step, submits it without waiting, and
    /// queues its argmax for [`Backend::read_queued_argmax`].
    fn queue_argmax_last(&mut self) -> Result<()> {
        Err(not_queueing())
    }
    /// The argmax of the oldest queued step, waiting for it. Starting a step from host tokens
    /// ([`Backend::embed`]) drops the queue.
    fn read_queued_argmax(&mut self) -> Result<u32> {
        Err(not_queueing())
    }
    /// Most prompt tokens the generator should run in one step: the CPU's chunk by default;
    /// the GPU backend takes the step size its buffers are planned for.
    fn prefill_chunk(&self) -> usize {
        crate::engine::generate::PREFILL_CHUNK
    }
    /// Turns per-kernel device timing on or off (backends without it ignore this).
    fn set_gpu_profiling(&mut self, _on: bool) {}
    /// Device time per kernel, (name, seconds, dispatches), accumulated since profiling was
    /// turned on or last taken; None when the backend has no such timing.
    fn gpu_profile(&mut self) -> Option<Vec<(&'static str, f64, u64)>> {
        None
    }
}

/// Wall-clock time per op kind, accumulated over forward passes (meaningful for backends whose
/// ops complete synchronously, like the CPU backend).
#[derive(Debug, Clone, Default)]
pub struct OpProfile {
    /// (op name, seconds, calls) in first-seen order.
    pub entries: Vec<(&'static str, f64, u64)>,
}

impl OpProfile {
    pub(crate) fn add(&mut self, name: &'static str, secs: f64) {
        match self.entries.iter_mut().find(|e| e.0 == name) {
            Some(e) => {
                e.1 += secs;
                e.2 += 1;
            }
            None => self.entries.push((name, secs, 1)),
        }
    }
}

/// Runs `tokens` at positions `pos..` through the model, filling `cache` and writing the logits
/// of `rows` into `out` (cleared first). With `profile`, each op's wall time is recorded.
pub fn forward<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    tokens: &[u32],
    pos: usize,
    rows: LogitRows,
    out: &mut Vec<f32>,
    mut profile: Option<&mut OpProfile>,
) -> Result<()> {
    out.clear();
    layers(b, cache, tokens, pos, profile.as_deref_mut())?;
    let t0 = profile.is_some().then(crate::time::Instant::now);
    let r = b.logits(rows, out);
    if let (Some(p), Some(t0)) = (profile, t0) {
        p.add("final_norm_head", t0.elapsed().as_secs_f64());
    }
    r
}

/// Like [`forward`] for greedy decoding: returns the argmax of the last position's logits
/// ([`Backend::argmax_last`]); `scratch` may receive logits.
pub fn forward_argmax<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    tokens: &[u32],
    pos: usize,
    scratch: &mut Vec<f32>,
    mut profile: Option<&mut OpProfile>,
) -> Result<u32> {
    scratch.clear();
    layers(b, cache, tokens, pos, profile.as_deref_mut())?;
    let t0 = profile.is_some().then(crate::time::Instant::now);
    let r = b.argmax_last(scratch);
    if let (Some(p), Some(t0)) = (profile, t0) {
        p.add("final_norm_head", t0.elapsed().as_secs_f64());
    }
    r
}

/// [`Backend::top_k_last`] through the full logits (read into `scratch`).
pub fn top_k_from_logits<B: Backend + ?Sized>(
    b: &mut B,
    k: usize,
    inv_t: f32,
    scratch: &mut Vec<f32>,
    out: &mut Vec<(f32, u32)>,
) -> Result<()> {
    b.logits(LogitRows::Last, scratch)?;
    crate::engine::sampler::top_candidates(scratch, k, inv_t, out);
    Ok(())
}

/// Like [`forward_argmax`] for top-k sampling: the last position's `k` best candidates
/// ([`Backend::top_k_last`]) into `out`.
#[allow(clippy::too_many_arguments)]
pub fn forward_top_k<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    tokens: &[u32],
    pos: usize,
    (k, inv_t): (usize, f32),
    scratch: &mut Vec<f32>,
    out: &mut Vec<(f32, u32)>,
    mut profile: Option<&mut OpProfile>,
) -> Result<()> {
    scratch.clear();
    layers(b, cache, tokens, pos, profile.as_deref_mut())?;
    let t0 = profile.is_some().then(crate::time::Instant::now);
    let r = b.top_k_last(k, inv_t, scratch, out);
    if let (Some(p), Some(t0)) = (profile, t0) {
        p.add("final_norm_head", t0.elapsed().as_secs_f64());
    }
    r
}

/// Greedy decoding with queued steps: queues the decode step at `pos` whose input is `token`,
/// or (None) the argmax of the step queued before it, kept on the device; its argmax is read
/// later with [`Backend::read_queued_argmax`]. Returns false (recording nothing) when the
/// backend cannot queue steps.
pub fn queue_greedy_step<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    token: Option<u32>,
    pos: usize,
    mut profile: Option<&mut OpProfile>,
) -> Result<bool> {
    if !b.can_queue_steps() {
        return Ok(false);
    }
    check_context(cache, pos, 1)?;
    match token {
        Some(t) => b.embed(&[t])?,
        None => b.embed_queued_argmax()?,
    }
    layer_stack(b, cache, pos, profile.as_deref_mut());
    let t0 = profile.is_some().then(crate::time::Instant::now);
    b.queue_argmax_last()?;
    if let (Some(p), Some(t0)) = (profile, t0) {
        p.add("final_norm_head", t0.elapsed().as_secs_f64());
    }
    Ok(true)
}

/// The error of [`Backend`]'s step-queueing defaults.
fn not_queueing() -> Error {
    Error::Backend("this backend does not queue decode steps".into())
}

fn check_context<C: KvCache>(cache: &C, pos: usize, tokens: usize) -> Result<()> {
    if pos + tokens > cache.capacity() {
        return Err(Error::Request(format!(
            "context overflow: {} positions needed but the context holds {}",
            pos + tokens,
            cache.capacity()
        )));
    }
    Ok(())
}

/// Embedding and every layer of a step (everything before the final norm); backends that
/// finish a step asynchronously (WebGPU in the browser) call it, then read the result.
pub fn layers<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    tokens: &[u32],
    pos: usize,
    mut profile: Option<&mut OpProfile>,
) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::Request("empty token sequence".into()));
    }
    check_context(cache, pos, tokens.len())?;
    let t0 = profile.is_some().then(crate::time::Instant::now);
    b.embed(tokens)?;
    if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
        p.add("embed", t0.elapsed().as_secs_f64());
    }
    layer_stack(b, cache, pos, profile);
    Ok(())
}

/// Every layer of the embedded step at `pos`.
fn layer_stack<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    pos: usize,
    mut profile: Option<&mut OpProfile>,
) {
    macro_rules! op {
        ($name:literal, $e:expr) => {{
            let t0 = profile.is_some().then(crate::time::Instant::now);
            let r = $e;
            if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                p.add($name, t0.elapsed().as_secs_f64());
            }
            r
        }};
    }
    for l in 0..b.config().num_layers {
        if op!("fused_layer", b.fused_layer(cache, l, pos)) {
            continue;
        }
        op!("rmsnorm_quant", b.rmsnorm_quant(l, NormSite::Input));
        op!("matmul_qkv", b.ternary_matmul(l, Linear::Qkv));
        op!("rope_kv_write", b.rope_kv_write(cache, l, pos));
        op!("attention", b.attention(cache, l, pos));
        op!("attn_sub_norm_quant", b.attn_sub_norm_quant(l));
        op!("matmul_o", b.ternary_matmul(l, Linear::O));
        op!("rmsnorm_quant", b.rmsnorm_quant(l, NormSite::PostAttention));
        op!("matmul_gate_up", b.ternary_matmul(l, Linear::GateUp));
        op!("relu2_mul_norm_quant", b.relu2_mul_norm_quant(l));
        op!("matmul_down", b.ternary_matmul(l, Linear::Down));
    }
}

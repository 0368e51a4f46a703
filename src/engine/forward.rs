//! The forward pass, written once: the model's layer description ([`crate::arch`]) run over
//! the [`Backend`] ops, for a single sequence (its own KV cache) or for batched rows of many
//! sequences (a paged pool). Everything in the engine and the front ends goes through here.

use crate::arch::{layer_ops, LayerOp};
use crate::backend::{
    select_from_logits, Backend, BatchBackend, DeviceSteps, HeadRows, KvCache, LogitRows, RowNeed,
    RowSlot,
};
use crate::error::{Error, Result};
use crate::reference::{argmax, top_candidates};
use crate::time::Instant;

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

    /// Runs `f`, adding its wall time under `name` when profiling.
    fn time<R>(p: &mut Option<&mut OpProfile>, name: &'static str, f: impl FnOnce() -> R) -> R {
        let t0 = p.is_some().then(Instant::now);
        let r = f();
        if let (Some(p), Some(t0)) = (p.as_deref_mut(), t0) {
            p.add(name, t0.elapsed().as_secs_f64());
        }
        r
    }
}

/// Where a step's keys and values go and are read from: the two ops of a layer description
/// that touch the KV cache, for a single sequence or for batched rows.
pub trait StepKv<B: Backend + ?Sized> {
    /// RoPE of the step's q and k, then k and v into the cache.
    fn rope_kv_write(&mut self, b: &mut B, layer: usize);
    /// Attention of the step's queries over the cache.
    fn attention(&mut self, b: &mut B, layer: usize);
    /// Lets the backend record leading ops of `ops` fused; returns how many it recorded.
    fn fuse(&mut self, _b: &mut B, _layer: usize, _ops: &[LayerOp]) -> usize {
        0
    }
}

/// A single sequence's step at `pos` over its own cache.
pub struct SeqKv<'a, C> {
    /// The sequence's cache.
    pub cache: &'a mut C,
    /// Position of the step's first token.
    pub pos: usize,
}

impl<B: Backend> StepKv<B> for SeqKv<'_, B::Cache> {
    fn rope_kv_write(&mut self, b: &mut B, layer: usize) {
        b.rope_kv_write(self.cache, layer, self.pos);
    }
    fn attention(&mut self, b: &mut B, layer: usize) {
        b.attention(self.cache, layer, self.pos);
    }
    fn fuse(&mut self, b: &mut B, layer: usize, ops: &[LayerOp]) -> usize {
        b.fuse(self.cache, layer, self.pos, ops)
    }
}

/// A batched step: row `i` at `rows[i]`, its sequence's blocks in `tables`.
pub struct RowsKv<'a, P> {
    /// The paged pool.
    pub pool: &'a mut P,
    /// Each row's sequence and position.
    pub rows: &'a [RowSlot],
    /// Each sequence's block table.
    pub tables: &'a [Vec<u32>],
}

impl<B: BatchBackend> StepKv<B> for RowsKv<'_, B::Cache> {
    fn rope_kv_write(&mut self, b: &mut B, layer: usize) {
        b.rope_kv_write_rows(self.pool, layer, self.rows, self.tables);
    }
    fn attention(&mut self, b: &mut B, layer: usize) {
        b.attention_rows(self.pool, layer, self.rows, self.tables);
    }
}

/// Every layer of the embedded step: the model's layer description, op by op (or fused
/// where the backend offers to).
pub fn run_layers<B: Backend, K: StepKv<B>>(
    b: &mut B,
    kv: &mut K,
    mut profile: Option<&mut OpProfile>,
) {
    let ops = layer_ops(b.config());
    for l in 0..b.config().num_layers {
        let mut i = 0;
        while i < ops.len() {
            let t0 = profile.is_some().then(Instant::now);
            let fused = kv.fuse(b, l, &ops[i..]);
            if fused > 0 {
                if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                    p.add("fused_ops", t0.elapsed().as_secs_f64());
                }
                i += fused;
                continue;
            }
            let op = ops[i];
            OpProfile::time(&mut profile, op.name(), || match op {
                LayerOp::NormQuant(site) => b.rmsnorm_quant(l, site),
                LayerOp::LinearNormQuant { site, linear } => b.linear_norm_quant(l, site, linear),
                LayerOp::Matmul(linear) => b.ternary_matmul(l, linear),
                LayerOp::RopeKvWrite => kv.rope_kv_write(b, l),
                LayerOp::Attention => kv.attention(b, l),
                LayerOp::AttnOutQuant { sub_norm } => b.attn_out_quant(l, sub_norm),
                LayerOp::GatedActQuant { act, sub_norm } => b.gated_act_quant(l, act, sub_norm),
            });
            i += 1;
        }
        b.layer_done(l);
    }
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
    OpProfile::time(&mut profile, "embed", || b.embed(tokens))?;
    run_layers(b, &mut SeqKv { cache, pos }, profile);
    Ok(())
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
    OpProfile::time(&mut profile, "final_norm_head", || b.logits(rows, out))
}

/// Final norm and head of the step's last position, then its argmax: on the device when the
/// backend can, else from the logits (read into `scratch`).
pub fn argmax_last<B: Backend>(b: &mut B, scratch: &mut Vec<f32>) -> Result<u32> {
    if let Some(d) = b.device() {
        return d.argmax_last();
    }
    b.logits(LogitRows::Last, scratch)?;
    Ok(argmax(scratch))
}

/// Final norm and head of every position of the step, each as `need[i]` asks (see
/// [`BatchBackend::head_rows`]): selected on the device when the backend can, else from the
/// logits on the host.
pub fn head_step_rows<B: Backend>(b: &mut B, need: &[RowNeed], out: &mut HeadRows) -> Result<()> {
    if let Some(d) = b.device() {
        return d.head_step_rows(need, out);
    }
    out.clear();
    b.logits(LogitRows::All, &mut out.logits)?;
    let vocab = b.config().vocab_size;
    if out.logits.len() != need.len() * vocab {
        return Err(Error::Request(format!(
            "{} row needs for a step of {} rows",
            need.len(),
            out.logits.len() / vocab.max(1)
        )));
    }
    select_from_logits(vocab, need, out);
    Ok(())
}

/// Final norm and head of the step's last position, then its `k` best candidates at
/// `1 / inv_t` temperature into `out`: on the device when the backend can, else from the
/// logits (read into `scratch`).
pub fn top_k_last<B: Backend>(
    b: &mut B,
    (k, inv_t): (usize, f32),
    scratch: &mut Vec<f32>,
    out: &mut Vec<(f32, u32)>,
) -> Result<()> {
    if let Some(d) = b.device() {
        if d.top_k_last(k, inv_t, out)? {
            return Ok(());
        }
    }
    b.logits(LogitRows::Last, scratch)?;
    top_candidates(scratch, k, inv_t, out);
    Ok(())
}

/// Like [`forward`] for greedy decoding: returns the argmax of the last position's logits
/// ([`argmax_last`]); `scratch` may receive logits.
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
    OpProfile::time(&mut profile, "final_norm_head", || argmax_last(b, scratch))
}

/// Like [`forward_argmax`] for top-k sampling: the last position's `k` best candidates
/// ([`top_k_last`]) into `out`.
#[allow(clippy::too_many_arguments)]
pub fn forward_top_k<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    tokens: &[u32],
    pos: usize,
    request: (usize, f32),
    scratch: &mut Vec<f32>,
    out: &mut Vec<(f32, u32)>,
    mut profile: Option<&mut OpProfile>,
) -> Result<()> {
    scratch.clear();
    layers(b, cache, tokens, pos, profile.as_deref_mut())?;
    OpProfile::time(&mut profile, "final_norm_head", || {
        top_k_last(b, request, scratch, out)
    })
}

/// Greedy decoding with queued steps: queues the decode step at `pos` over `first` and then
/// `drafts` (speculative tokens to verify), where `first` None is the argmax of the last row of
/// the step queued before it, kept on the device; the argmax of every row is read later with
/// [`crate::backend::DeviceSteps::read_queued_argmax`]. Returns false (recording nothing) when
/// the backend cannot queue steps.
pub fn queue_greedy_step<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    (first, drafts): (Option<u32>, &[u32]),
    pos: usize,
    profile: Option<&mut OpProfile>,
) -> Result<bool> {
    queue_greedy_step_with(b, cache, (first, drafts), pos, profile, |b| b.device())
}

/// [`queue_greedy_step`] with the device steps from `dev` rather than [`Backend::device`]: the
/// browser's backend queues steps although it offers no blocking reads.
pub fn queue_greedy_step_with<B: Backend>(
    b: &mut B,
    cache: &mut B::Cache,
    (first, drafts): (Option<u32>, &[u32]),
    pos: usize,
    mut profile: Option<&mut OpProfile>,
    dev: impl Fn(&mut B) -> Option<&mut dyn DeviceSteps>,
) -> Result<bool> {
    let Some(d) = dev(b) else {
        return Ok(false);
    };
    check_context(cache, pos, 1 + drafts.len())?;
    d.embed_decode_step(first, drafts)?;
    run_layers(b, &mut SeqKv { cache, pos }, profile.as_deref_mut());
    OpProfile::time(&mut profile, "final_norm_head", || match dev(b) {
        Some(d) => d.queue_argmax_rows(),
        None => Ok(()),
    })?;
    Ok(true)
}

/// Runs one batched step: `tokens[i]` at `rows[i]`, then the logits of the step rows
/// `logit_rows` into `out`.
pub fn forward_rows<B: BatchBackend>(
    b: &mut B,
    pool: &mut B::Cache,
    tokens: &[u32],
    rows: &[RowSlot],
    tables: &[Vec<u32>],
    logit_rows: &[usize],
    out: &mut Vec<f32>,
) -> Result<()> {
    run_rows(b, pool, tokens, rows, tables)?;
    b.logits_rows(logit_rows, out)
}

/// [`forward_rows`] for sampling: of each of the step rows `logit_rows`, what its sampler
/// needs (`need`), into `out` ([`BatchBackend::head_rows`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_rows_sampled<B: BatchBackend>(
    b: &mut B,
    pool: &mut B::Cache,
    tokens: &[u32],
    rows: &[RowSlot],
    tables: &[Vec<u32>],
    logit_rows: &[usize],
    need: &[RowNeed],
    out: &mut HeadRows,
) -> Result<()> {
    run_rows(b, pool, tokens, rows, tables)?;
    b.head_rows(logit_rows, need, out)
}

fn run_rows<B: BatchBackend>(
    b: &mut B,
    pool: &mut B::Cache,
    tokens: &[u32],
    rows: &[RowSlot],
    tables: &[Vec<u32>],
) -> Result<()> {
    if tokens.is_empty() || tokens.len() != rows.len() {
        return Err(Error::Request(format!(
            "a batched step needs one slot per token ({} tokens, {} slots)",
            tokens.len(),
            rows.len()
        )));
    }
    b.embed(tokens)?;
    run_layers(b, &mut RowsKv { pool, rows, tables }, None);
    Ok(())
}

//! The backend contract, the bottom of the engine: the traits every backend implements and
//! the option types they share. `cpu/` and `gpu/` import this module, [`crate::reference`],
//! [`crate::quant`], [`crate::config`] and [`crate::format`], never each other and never the
//! engine above them. The order of ops is not the backend's: [`crate::arch`] describes a
//! layer as data and [`crate::engine::forward`] runs that description over these traits.

mod options;

pub use options::{HeadMode, KvDtype, PREFILL_CHUNK};

pub use crate::arch::{GatedAct, Linear, NormSite};

use crate::arch::LayerOp;
use crate::config::ModelConfig;
use crate::error::Result;

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

/// Keys and values in blocks of positions, the one KV representation of every backend: a
/// single sequence's cache is one block holding its whole context (the layout the backends'
/// single-sequence kernels specialise on); a serving pool has many blocks that sequences
/// share through block tables ([`BatchBackend`]).
pub trait KvCache {
    /// Blocks.
    fn blocks(&self) -> usize;
    /// Positions per block.
    fn block_size(&self) -> usize;
    /// Positions a single sequence can hold: the one block of a single-sequence cache (0 for
    /// a pool of several blocks, whose sequences run as batched rows).
    fn capacity(&self) -> usize {
        if self.blocks() == 1 {
            self.block_size()
        } else {
            0
        }
    }
}

/// One row of a batched step: the sequence (index into the step's block tables) and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSlot {
    /// Index of the row's sequence in the step's block tables.
    pub seq: usize,
    /// Position of the row's token in its sequence.
    pub pos: usize,
}

/// The ops a backend implements. A step processes `T` consecutive tokens; its buffers (the
/// residual stream, quantized activations, q|k|v, attention output, gate|up) live in the
/// backend. Ops that cannot fail on valid state return nothing; the step's checks happen in
/// [`Backend::embed`].
pub trait Backend {
    /// The backend's KV cache (single sequence) and pool (batched rows): one type.
    type Cache: KvCache;
    /// The model configuration.
    fn config(&self) -> &ModelConfig;
    /// A human-readable description (backend, kernels, device).
    fn describe(&self) -> String;
    /// Keys and values for `blocks` blocks of `block_size` positions.
    fn new_pool(&self, blocks: usize, block_size: usize) -> Result<Self::Cache>;
    /// Bytes one block holds (keys and values of every layer).
    fn block_bytes(&self, block_size: usize) -> usize;
    /// A single sequence's KV cache for `capacity` positions: one block of that size.
    fn new_cache(&self, capacity: usize) -> Result<Self::Cache> {
        self.new_pool(1, capacity)
    }
    /// Most prompt tokens one step should take (the step size the backend is planned for).
    fn prefill_chunk(&self) -> usize {
        PREFILL_CHUNK
    }
    /// Starts a step: looks up the embeddings of `tokens` into the residual stream.
    fn embed(&mut self, tokens: &[u32]) -> Result<()>;
    /// RMSNorm of the residual stream at `site`, then per-token int8 quantization.
    fn rmsnorm_quant(&mut self, layer: usize, site: NormSite);
    /// RMSNorm of the residual stream at `site`, then `linear`'s own RMSNorm, then int8
    /// quantization (models with `use_rms_norm`; `linear` is a part of a fused linear).
    fn linear_norm_quant(&mut self, layer: usize, site: NormSite, linear: Linear);
    /// A ternary × int8 matmul; `O` and `Down` add their output into the residual stream; a
    /// part (`Q`, ..., `Up`) computes its rows of the fused linear's output.
    fn ternary_matmul(&mut self, layer: usize, linear: Linear);
    /// RoPE on q and k for positions `pos..pos+T`, then k and v written into the cache.
    fn rope_kv_write(&mut self, cache: &mut Self::Cache, layer: usize, pos: usize);
    /// Causal GQA attention of the step's queries over cache positions `0..pos+T`.
    fn attention(&mut self, cache: &Self::Cache, layer: usize, pos: usize);
    /// The attention output (with its sub-norm when `sub_norm`), then int8 quantization.
    fn attn_out_quant(&mut self, layer: usize, sub_norm: bool);
    /// `act(gate) · up` (with the FFN sub-norm when `sub_norm`), then int8 quantization.
    fn gated_act_quant(&mut self, layer: usize, act: GatedAct, sub_norm: bool);
    /// Records the leading ops of `ops` (the rest of `layer`'s description, in order) fused
    /// when the backend has a fused kernel sequence for them and this step's shape; returns
    /// how many ops it recorded (0: none, run them one by one).
    fn fuse(
        &mut self,
        _cache: &mut Self::Cache,
        _layer: usize,
        _pos: usize,
        _ops: &[LayerOp],
    ) -> usize {
        0
    }
    /// Moves the keys and values of positions `from..from + n` of the sequence whose blocks
    /// `table` lists (`[0]` for a single-sequence cache) to positions `to..to + n` (`to <
    /// from`), each key's RoPE turned back by `from - to` positions, so that the sequence goes
    /// on as if they had always stood there (attention sinks with a sliding window,
    /// [`crate::engine::window`]).
    fn kv_shift(
        &mut self,
        _cache: &mut Self::Cache,
        _table: &[u32],
        _from: usize,
        _to: usize,
        _n: usize,
    ) -> Result<()> {
        Err(crate::Error::Backend(
            "this backend cannot shift its KV cache (no attention sinks / sliding window)".into(),
        ))
    }
    /// Called after the last op of `layer` (backends that submit work in parts use it).
    fn layer_done(&mut self, _layer: usize) {}
    /// Final norm and head for `rows`; logits appended to `out` (`vocab` per row).
    fn logits(&mut self, rows: LogitRows, out: &mut Vec<f32>) -> Result<()>;
    /// Bytes of weights one decode step reads (ternary weights, head, norms).
    fn decode_bytes_per_token(&self) -> u64;
    /// The device capabilities, for backends whose steps run asynchronously on a device.
    fn device(&mut self) -> Option<&mut dyn DeviceSteps> {
        None
    }
}

/// What a backend running on an asynchronous device can do beyond [`Backend`]: pick tokens
/// without reading the logits back, queue steps without waiting for them, time its kernels.
pub trait DeviceSteps {
    /// Final norm and head of the step's last position, then the index of its largest logit
    /// (the lowest id on ties, as [`crate::reference::argmax`]).
    fn argmax_last(&mut self) -> Result<u32>;
    /// Final norm and head of the step's last position, then its `k` best candidates for
    /// temperature sampling ([`crate::reference::top_candidates`] with `inv_t`) into `out`;
    /// false (recording nothing) when `k` is beyond what the device selects.
    fn top_k_last(&mut self, k: usize, inv_t: f32, out: &mut Vec<(f32, u32)>) -> Result<bool>;
    /// Starts a decode step of `1 + drafts.len()` tokens whose every row is computed exactly
    /// as a one-token step's (speculative verification): first `first`, or (None) the pick
    /// of the step queued last, still on the device; then `drafts`. That pick follows the
    /// step's accepted drafts (those equal to the argmax of the row before them), and a step
    /// started from it runs at the position it is recorded at less the drafts the step ahead
    /// rejected: recorded as if every draft were accepted, it stays valid whatever is.
    fn embed_decode_step(&mut self, first: Option<u32>, drafts: &[u32]) -> Result<()>;
    /// Records the final norm, head and argmax of every row of the step, submits it without
    /// waiting, and queues the argmaxes for [`DeviceSteps::read_queued_argmax`].
    fn queue_argmax_rows(&mut self) -> Result<()>;
    /// The argmax of every row of the oldest queued step (into `out`, cleared), waiting for
    /// it. Starting a step from host tokens ([`Backend::embed`]) drops the queue.
    fn read_queued_argmax(&mut self, out: &mut Vec<u32>) -> Result<()>;
    /// Final norm and head of every position of the step, each as `need[i]` asks (one need
    /// per position), selected on the device as [`BatchBackend::head_rows`] does.
    fn head_step_rows(&mut self, need: &[RowNeed], out: &mut HeadRows) -> Result<()>;
    /// Turns per-kernel device timing on or off.
    fn set_profiling(&mut self, on: bool);
    /// Device time per kernel, (name, seconds, dispatches), accumulated since profiling was
    /// turned on or last taken.
    fn take_profile(&mut self) -> Option<Vec<(&'static str, f64, u64)>>;
}

/// Backends that run steps whose rows belong to different sequences, over a paged KV pool.
/// Rows are processed exactly as [`Backend`] processes them in a single-sequence step (the same
/// arithmetic: a row's logits do not depend on the other rows of its step).
pub trait BatchBackend: Backend<Cache: Send> {
    /// RoPE of each row's q and k at its position, then its k and v into the pool at the slot
    /// its sequence's block table gives.
    fn rope_kv_write_rows(
        &mut self,
        pool: &mut Self::Cache,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    );
    /// Causal attention of each row over its sequence's positions `0..=pos`.
    fn attention_rows(
        &mut self,
        pool: &Self::Cache,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    );
    /// Final norm and head of the step rows `rows`; logits (`vocab` per row) into `out`.
    fn logits_rows(&mut self, rows: &[usize], out: &mut Vec<f32>) -> Result<()>;
    /// Final norm and head of the step rows `rows` for sampling, each as its sampler needs
    /// (`need[i]` for `rows[i]`): the argmax of every row into `out.ids` (the lowest id on
    /// ties, as [`crate::reference::argmax`]), the candidates of the [`RowNeed::Candidates`]
    /// rows into `out.cands` (k each, in order) and the logits of the [`RowNeed::Logits`] rows
    /// into `out.logits` (`vocab` each, in order). This default reads every row's logits; a
    /// device backend finds the argmax and the candidates on the device and reads back only
    /// what was asked for.
    fn head_rows(&mut self, rows: &[usize], need: &[RowNeed], out: &mut HeadRows) -> Result<()> {
        check_row_needs(rows, need)?;
        out.clear();
        self.logits_rows(rows, &mut out.logits)?;
        select_from_logits(self.config().vocab_size, need, out);
        Ok(())
    }
    /// Whether the scheduler should sample a step's rows on several host threads (false when
    /// the backend's own workers keep the cores busy).
    fn sample_in_parallel(&self) -> bool {
        true
    }
}

/// What the sampler of one step row needs from [`BatchBackend::head_rows`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowNeed {
    /// The argmax only (greedy).
    Argmax,
    /// The `k` best (logit × `inv_t`, id) pairs, in [`crate::reference::top_candidates`]'
    /// order (see [`crate::engine::sampler::Sampler::candidates_only`]).
    Candidates {
        /// Candidates kept.
        k: usize,
        /// 1 / temperature.
        inv_t: f32,
    },
    /// The whole logits row.
    Logits,
}

/// What [`BatchBackend::head_rows`] gives back for a step.
#[derive(Debug, Default)]
pub struct HeadRows {
    /// The argmax of every row.
    pub ids: Vec<u32>,
    /// The candidates of the [`RowNeed::Candidates`] rows, k each, in row order.
    pub cands: Vec<(f32, u32)>,
    /// The logits of the [`RowNeed::Logits`] rows, `vocab` each, in row order.
    pub logits: Vec<f32>,
}

impl HeadRows {
    /// Empties every part (keeping the allocations).
    pub fn clear(&mut self) {
        self.ids.clear();
        self.cands.clear();
        self.logits.clear();
    }
}

/// Fills `out` from the logits of every row in `out.logits` (`vocab` each) as `need` asks:
/// the argmax of every row (the lowest id on ties), the candidates of the
/// [`RowNeed::Candidates`] rows, and keeps only the [`RowNeed::Logits`] rows' logits.
pub fn select_from_logits(vocab: usize, need: &[RowNeed], out: &mut HeadRows) {
    use rayon::prelude::*;
    out.logits
        .par_chunks(vocab)
        .map(crate::reference::argmax)
        .collect_into_vec(&mut out.ids);
    out.cands.clear();
    let mut kept = 0;
    let mut scratch = Vec::new();
    for (i, n) in need.iter().enumerate() {
        let row = i * vocab..(i + 1) * vocab;
        match *n {
            RowNeed::Argmax => {}
            RowNeed::Candidates { k, inv_t } => {
                crate::reference::top_candidates(&out.logits[row], k, inv_t, &mut scratch);
                out.cands.extend_from_slice(&scratch);
            }
            RowNeed::Logits => {
                out.logits.copy_within(row, kept * vocab);
                kept += 1;
            }
        }
    }
    out.logits.truncate(kept * vocab);
}

/// The check every [`BatchBackend::head_rows`] makes: one need per requested row.
pub fn check_row_needs(rows: &[usize], need: &[RowNeed]) -> Result<()> {
    if need.len() == rows.len() {
        return Ok(());
    }
    Err(crate::Error::Request(format!(
        "{} rows but {} row needs",
        rows.len(),
        need.len()
    )))
}

/// The checks of every [`Backend::kv_shift`]: `to < from` and `from + n` within `positions`.
pub fn check_shift(positions: usize, from: usize, to: usize, n: usize) -> Result<()> {
    if to >= from || from + n > positions {
        return Err(crate::Error::Request(format!(
            "cannot move KV positions {from}..{} to {to} in a cache of {positions}",
            from + n
        )));
    }
    Ok(())
}

//! Continuous batching: many sequences advance together in each step (prompt chunks and
//! decode tokens of different requests as rows of one step), so every ternary weight and the
//! head are read once per step for all of them. Keys and values live in a paged pool of
//! fixed-size blocks ([`blocks`]); [`scheduler`] decides who runs each step.

pub mod blocks;
pub mod scheduler;

use rayon::prelude::*;

use crate::engine::model::{Backend, Linear, NormSite};
use crate::error::{Error, Result};

/// One row of a batched step: the sequence (index into the step's block tables) and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSlot {
    /// Index of the row's sequence in the step's block tables.
    pub seq: usize,
    /// Position of the row's token in its sequence.
    pub pos: usize,
}

/// Backends that run steps whose rows belong to different sequences, over a paged KV pool.
/// Rows are processed exactly as [`Backend`] processes them in a single-sequence step (the same
/// arithmetic: a row's logits do not depend on the other rows of its step).
pub trait BatchBackend: Backend {
    /// The paged KV pool.
    type Pool: Send;
    /// A pool of `blocks` blocks of `block_size` positions.
    fn new_pool(&self, blocks: usize, block_size: usize) -> Result<Self::Pool>;
    /// Bytes one block holds (keys and values of every layer).
    fn block_bytes(&self, block_size: usize) -> usize;
    /// RoPE of each row's q and k at its position, then its k and v into the pool at the slot
    /// its sequence's block table gives.
    fn rope_kv_write_rows(
        &mut self,
        pool: &mut Self::Pool,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    );
    /// Causal attention of each row over its sequence's positions `0..=pos`.
    fn attention_rows(
        &mut self,
        pool: &Self::Pool,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    );
    /// Final norm and head of the step rows `rows`; logits (`vocab` per row) into `out`.
    fn logits_rows(&mut self, rows: &[usize], out: &mut Vec<f32>) -> Result<()>;
    /// Whether the scheduler should sample a step's rows on several host threads (false when
    /// the backend's own workers keep the cores busy).
    fn sample_in_parallel(&self) -> bool {
        true
    }
}

/// Runs one batched step: `tokens[i]` at `rows[i]`, then the logits of the step rows
/// `logit_rows` into `out`.
pub fn forward_rows<B: BatchBackend>(
    b: &mut B,
    pool: &mut B::Pool,
    tokens: &[u32],
    rows: &[RowSlot],
    tables: &[Vec<u32>],
    logit_rows: &[usize],
    out: &mut Vec<f32>,
) -> Result<()> {
    if tokens.is_empty() || tokens.len() != rows.len() {
        return Err(Error::Request(format!(
            "a batched step needs one slot per token ({} tokens, {} slots)",
            tokens.len(),
            rows.len()
        )));
    }
    b.embed(tokens)?;
    for l in 0..b.config().num_layers {
        b.rmsnorm_quant(l, NormSite::Input);
        b.ternary_matmul(l, Linear::Qkv);
        b.rope_kv_write_rows(pool, l, rows, tables);
        b.attention_rows(pool, l, rows, tables);
        b.attn_sub_norm_quant(l);
        b.ternary_matmul(l, Linear::O);
        b.rmsnorm_quant(l, NormSite::PostAttention);
        b.ternary_matmul(l, Linear::GateUp);
        b.relu2_mul_norm_quant(l);
        b.ternary_matmul(l, Linear::Down);
    }
    b.logits_rows(logit_rows, out)
}

/// Batched decode throughput: `seqs` sequences of `prompt_len` prompt tokens each are
/// prefilled, then decode `steps` tokens together (one row each per step, greedy, logits of
/// every row read back and argmax'ed in parallel as the scheduler does). Returns (generated tokens/s,
/// seconds of the steps spent in `forward_rows`).
pub fn decode_throughput<B: BatchBackend>(
    b: &mut B,
    seqs: usize,
    prompt_len: usize,
    steps: usize,
) -> Result<(f64, f64)> {
    let (bs, vocab) = (16, b.config().vocab_size);
    let len = prompt_len.max(1) + steps + 1;
    let per = len.div_ceil(bs);
    let mut pool = b.new_pool(seqs * per, bs)?;
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..per).map(|i| (s * per + i) as u32).collect())
        .collect();
    let mut out = Vec::new();
    let mut next = vec![0u32; seqs];
    for (s, n) in next.iter_mut().enumerate() {
        let prompt: Vec<u32> = (0..prompt_len.max(1))
            .map(|i| ((i * 7919 + 13 * s + 1) % vocab) as u32)
            .collect();
        let rows: Vec<RowSlot> = (0..prompt.len())
            .map(|pos| RowSlot { seq: s, pos })
            .collect();
        for (tok, row) in prompt.chunks(256).zip(rows.chunks(256)) {
            forward_rows(b, &mut pool, tok, row, &tables, &[row.len() - 1], &mut out)?;
        }
        *n = crate::engine::sampler::argmax(&out[..vocab]);
    }
    let all: Vec<usize> = (0..seqs).collect();
    let t0 = crate::time::Instant::now();
    let mut forward = 0.0;
    for k in 0..steps {
        let rows: Vec<RowSlot> = (0..seqs)
            .map(|seq| RowSlot {
                seq,
                pos: prompt_len.max(1) + k,
            })
            .collect();
        let f0 = crate::time::Instant::now();
        forward_rows(b, &mut pool, &next, &rows, &tables, &all, &mut out)?;
        forward += f0.elapsed().as_secs_f64();
        next.par_iter_mut()
            .zip(out.par_chunks(vocab))
            .for_each(|(n, l)| *n = crate::engine::sampler::argmax(l));
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(((seqs * steps) as f64 / secs, forward))
}

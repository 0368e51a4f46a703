//! Continuous batching: many sequences advance together in each step (prompt chunks and
//! decode tokens of different requests as rows of one step), so every ternary weight and the
//! head are read once per step for all of them. Keys and values live in a paged pool of
//! fixed-size blocks ([`blocks`]); [`scheduler`] decides who runs each step.

pub mod blocks;
pub mod scheduler;
pub mod sizing;

use crate::backend::{BatchBackend, HeadRows, RowNeed, RowSlot};
use crate::engine::forward::{forward_rows, forward_rows_sampled};
use crate::error::Result;
use crate::reference::argmax;

/// Batched decode throughput: `seqs` sequences of `prompt_len` prompt tokens each are
/// prefilled, then decode `steps` tokens together (one row each per step, greedy: the argmax
/// of each row from [`BatchBackend::head_rows`], as the scheduler takes it). Returns (generated
/// tokens/s, seconds of the steps spent in the forward pass and the head).
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
        *n = argmax(&out[..vocab]);
    }
    let all: Vec<usize> = (0..seqs).collect();
    let greedy = vec![RowNeed::Argmax; seqs];
    let t0 = crate::time::Instant::now();
    let mut forward = 0.0;
    let mut head = HeadRows::default();
    for k in 0..steps {
        let rows: Vec<RowSlot> = (0..seqs)
            .map(|seq| RowSlot {
                seq,
                pos: prompt_len.max(1) + k,
            })
            .collect();
        let f0 = crate::time::Instant::now();
        forward_rows_sampled(
            b, &mut pool, &next, &rows, &tables, &all, &greedy, &mut head,
        )?;
        forward += f0.elapsed().as_secs_f64();
        next.copy_from_slice(&head.ids);
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(((seqs * steps) as f64 / secs, forward))
}

//! The CPU backend's batched steps: rows of different sequences over a KV pool of blocks.

use super::{CpuBackend, CpuCache, SharedMut, SCORES};
use crate::backend::{BatchBackend, RowSlot};
use crate::error::Result;
use crate::reference as ops;

impl BatchBackend for CpuBackend {
    fn rope_kv_write_rows(
        &mut self,
        pool: &mut CpuCache,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    ) {
        let c = &self.cfg;
        let (hd, q, kv) = (c.head_dim, c.q_dim(), c.kv_dim());
        let bs = pool.block_size;
        let s = &mut self.step;
        for (row, slot) in s.qkv[..s.t * (q + 2 * kv)].chunks_mut(q + 2 * kv).zip(rows) {
            let p = slot.pos;
            ops::rope_heads(&mut row[..q + kv], hd, p, &self.inv_freq);
            let block = tables[slot.seq][p / bs];
            for h in 0..c.num_kv_heads {
                let (ks, vs) = (q + h * hd, q + kv + h * hd);
                pool.put(
                    pool.row(block, layer, h, p % bs),
                    &row[ks..ks + hd],
                    &row[vs..vs + hd],
                );
            }
        }
    }

    fn attention_rows(
        &mut self,
        pool: &CpuCache,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    ) {
        let c = &self.cfg;
        let (hd, q, kv) = (c.head_dim, c.q_dim(), c.kv_dim());
        let group = c.num_heads / c.num_kv_heads;
        let nh = c.num_heads;
        let bs = pool.block_size;
        let s = &mut self.step;
        let qkv = &s.qkv;
        let attn = SharedMut::new(&mut s.attn);
        self.team.run(s.t * nh, &|i| {
            let (ti, h) = (i / nh, i % nh);
            let slot = rows[ti];
            let len = slot.pos + 1;
            let table = &tables[slot.seq];
            let kh = h / group;
            let qv = &qkv[ti * (q + 2 * kv) + h * hd..][..hd];
            // SAFETY: task i writes only head h of row ti.
            let out = unsafe { attn.slice(i * hd, hd) };
            let row = |p: usize| pool.row(table[p / bs], layer, kh, p % bs);
            SCORES.with_borrow_mut(|scores| {
                if scores.len() < len {
                    scores.resize(len, 0.0);
                }
                pool.attend(qv, len, row, scores, out);
            });
        });
    }

    /// The worker team spins between steps: sampling on other threads would compete with it.
    fn sample_in_parallel(&self) -> bool {
        false
    }

    fn logits_rows(&mut self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        self.head_rows(rows.iter().copied(), out)
    }
}

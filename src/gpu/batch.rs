//! The GPU backend's batched steps over a KV pool of blocks: rows of one step belong to
//! different sequences, each row carrying its own position and block table (uploaded once per
//! step, see `cache.rs`).

use super::buffers::{bind_group, storage, uniform};
use super::ops::paged::PagedP;
use super::{GpuBackend, GpuCache};
use crate::backend::{BatchBackend, HeadRows, RowNeed, RowSlot};
use crate::error::{Error, Result};

/// The paged kernels' bindings: the step's row slots and block tables, bind groups per layer.
pub(super) struct Paged {
    /// Block-table entries per sequence (positions the RoPE table covers / block size).
    pub(super) tstride: usize,
    pub(super) rows: wgpu::Buffer,
    pub(super) tables: wgpu::Buffer,
    pub(super) rope_bgs: Vec<wgpu::BindGroup>,
    pub(super) attn_bgs: Vec<wgpu::BindGroup>,
}

/// Whether the paged kernels handle this head dimension.
pub(super) fn paged_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(4) && head_dim <= 128
}

impl GpuBackend {
    /// The paged kernels' bindings over `k` and `v` (per layer).
    pub(super) fn paged_bindings(
        &self,
        k: &[wgpu::Buffer],
        v: &[wgpu::Buffer],
        table: &wgpu::Buffer,
        block_size: usize,
        positions: usize,
    ) -> Paged {
        let c = &self.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let tstride = positions.div_ceil(block_size);
        let device = &self.ctx.device;
        let rows = storage(device, "row slots", self.max_step * 8);
        let tables = storage(device, "block tables", self.max_step * tstride * 4);
        let params = uniform(
            device,
            "paged",
            &PagedP {
                hd: hd as u32,
                nh: nh as u32,
                group: (nh / nkv) as u32,
                stride: (c.q_dim() + 2 * c.kv_dim()) as u32,
                q_dim: c.q_dim() as u32,
                kv_dim: c.kv_dim() as u32,
                kvh: nkv as u32,
                bs: block_size as u32,
                tstride: tstride as u32,
                scale: 1.0 / (hd as f32).sqrt(),
                ..Default::default()
            },
        );
        let b = &self.bufs;
        let (mut rope_bgs, mut attn_bgs) = (vec![], vec![]);
        for (kb, vb) in k.iter().zip(v) {
            rope_bgs.push(bind_group(
                device,
                "paged rope",
                &self.ops.paged.rope_layout,
                &[&b.step, &params, &b.qkv, kb, vb, table, &rows, &tables],
            ));
            attn_bgs.push(bind_group(
                device,
                "paged attention",
                &self.ops.paged.attn_layout,
                &[&b.step, &params, &b.qkv, kb, vb, &rows, &tables, &b.attn],
            ));
        }
        Paged {
            tstride,
            rows,
            tables,
            rope_bgs,
            attn_bgs,
        }
    }

    /// Checks the step's row slots against the pool and uploads them with the block tables
    /// (`[pos, seq]` per row; tables padded to the pool's stride).
    pub(super) fn upload_slots(
        &mut self,
        cache: &GpuCache,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    ) -> Result<()> {
        let Some(paged) = &cache.paged else {
            return Err(Error::Backend(format!(
                "the GPU batch kernels need head_dim % 4 == 0 and <= 128 (head_dim {})",
                self.cfg.head_dim
            )));
        };
        let (bs, ts) = (cache.block_size, paged.tstride);
        if rows.len() != self.t() || tables.len() > self.max_step {
            return Err(Error::Request(format!(
                "a batched step of {} rows has {} slots and {} block tables (at most {})",
                self.t(),
                rows.len(),
                tables.len(),
                self.max_step
            )));
        }
        let mut words = vec![0u32; tables.len().max(1) * ts];
        for (s, table) in tables.iter().enumerate() {
            if table.len() > ts || table.iter().any(|&b| b as usize >= cache.blocks) {
                return Err(Error::Request(format!(
                    "block table {s} ({} blocks) does not fit the pool ({} blocks, at most {ts} \
                     per sequence)",
                    table.len(),
                    cache.blocks
                )));
            }
            words[s * ts..s * ts + table.len()].copy_from_slice(table);
        }
        let mut slots = Vec::with_capacity(2 * rows.len());
        for r in rows {
            if r.seq >= tables.len() || r.pos / bs >= tables[r.seq].len() {
                return Err(Error::Request(format!(
                    "row at position {} of sequence {} has no block in its table",
                    r.pos, r.seq
                )));
            }
            slots.extend([r.pos as u32, r.seq as u32]);
        }
        let q = &self.ctx.queue;
        q.write_buffer(&paged.rows, 0, bytemuck::cast_slice(&slots));
        q.write_buffer(&paged.tables, 0, bytemuck::cast_slice(&words));
        Ok(())
    }
}

impl BatchBackend for GpuBackend {
    fn rope_kv_write_rows(
        &mut self,
        pool: &mut GpuCache,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    ) {
        if layer == 0 {
            self.batch_error = self.upload_slots(pool, rows, tables).err();
        }
        if let (None, Some(p)) = (&self.batch_error, &pool.paged) {
            let heads = self.cfg.num_heads + self.cfg.num_kv_heads;
            self.ops
                .paged
                .record_rope(&mut self.rec, &p.rope_bgs[layer], heads, rows.len());
        }
    }

    fn attention_rows(
        &mut self,
        pool: &GpuCache,
        layer: usize,
        rows: &[RowSlot],
        _tables: &[Vec<u32>],
    ) {
        if let (None, Some(p)) = (&self.batch_error, &pool.paged) {
            let heads = self.cfg.num_heads;
            self.ops
                .paged
                .record_attention(&mut self.rec, &p.attn_bgs[layer], heads, rows.len());
        }
    }

    fn logits_rows(&mut self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        self.gather_head_rows(rows)?;
        self.read_head_logits(0..rows.len(), out)
    }

    fn head_rows(&mut self, rows: &[usize], need: &[RowNeed], out: &mut HeadRows) -> Result<()> {
        if let Err(e) = crate::backend::check_row_needs(rows, need) {
            self.rec.discard();
            return Err(e);
        }
        self.gather_head_rows(rows)?;
        out.clear();
        self.read_head_rows(0..rows.len(), Some(need), out)
    }
}

impl GpuBackend {
    /// Checks `rows`, records the final norm and gathers the head's input rows `rows` to
    /// the front.
    fn gather_head_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(e) = self.batch_error.take() {
            self.rec.discard();
            return Err(e);
        }
        let t = self.t();
        if let Some(&bad) = rows.iter().find(|&&r| r >= t) {
            self.rec.discard();
            return Err(Error::Request(format!(
                "logits of row {bad} requested from a {t}-row step"
            )));
        }
        self.record_final_norm();
        // Gather the requested rows of the head's input (the normed residual, or its int8 rows
        // and scales for the int8 head) to the front, through the gate|up buffer: a copy may
        // not read and write one buffer.
        if rows.iter().enumerate().any(|(i, &r)| i != r) {
            let h = self.cfg.hidden_size;
            let inputs = if self.int8_head() {
                vec![
                    (self.bufs.xq.clone(), super::buffers::pad64(h) as u64),
                    (self.bufs.xs.clone(), 4),
                ]
            } else {
                vec![(self.bufs.hn.clone(), (super::buffers::pad8(h) * 4) as u64)]
            };
            let scratch = self.bufs.gu.clone();
            for (src, row) in inputs {
                if scratch.size() < rows.len() as u64 * row {
                    return Err(Error::Backend(
                        "the gate|up buffer is too small to gather the head's rows".into(),
                    ));
                }
                let enc = self.rec.encoder();
                for (i, &r) in rows.iter().enumerate() {
                    enc.copy_buffer_to_buffer(&src, r as u64 * row, &scratch, i as u64 * row, row);
                }
                enc.copy_buffer_to_buffer(&scratch, 0, &src, 0, rows.len() as u64 * row);
            }
        }
        Ok(())
    }
}

//! The GPU backend's batched steps over a paged KV pool: rows of one step belong to different
//! sequences, each row carrying its own position and block table (uploaded once per step).

use super::buffers::{bind_group, storage, uniform};
use super::params::PagedP;
use super::GpuBackend;
use crate::backend::{BatchBackend, RowSlot};
use crate::error::{Error, Result};

/// Keys and values in blocks, one buffer per layer for each: `[block][kv_head][position in
/// block][head_dim]` f32; the step's row slots and block tables; the kernels' bind groups.
pub struct GpuKvPool {
    blocks: usize,
    block_size: usize,
    /// Block-table entries per sequence (positions the RoPE table covers / block size).
    tstride: usize,
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    rows: wgpu::Buffer,
    tables: wgpu::Buffer,
    rope_bgs: Vec<wgpu::BindGroup>,
    attn_bgs: Vec<wgpu::BindGroup>,
}

impl GpuKvPool {
    /// GPU bytes held by the keys and values.
    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|b| b.size()).sum()
    }
}

impl GpuBackend {
    /// The most blocks of `block_size` positions a pool may have (a layer's keys must fit one
    /// binding).
    pub fn max_pool_blocks(&self, block_size: usize) -> usize {
        let c = &self.cfg;
        let per_block =
            (c.num_kv_heads * block_size.max(1) * c.head_dim * self.kv.bytes()).max(1) as u64;
        (self.max_binding / per_block) as usize
    }

    /// Checks the step's row slots against the pool and uploads them with the block tables
    /// (`[pos, seq]` per row; tables padded to the pool's stride).
    fn upload_slots(
        &mut self,
        pool: &GpuKvPool,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    ) -> Result<()> {
        let (bs, ts) = (pool.block_size, pool.tstride);
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
            if table.len() > ts || table.iter().any(|&b| b as usize >= pool.blocks) {
                return Err(Error::Request(format!(
                    "block table {s} ({} blocks) does not fit the pool ({} blocks, at most {ts} \
                     per sequence)",
                    table.len(),
                    pool.blocks
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
        q.write_buffer(&pool.rows, 0, bytemuck::cast_slice(&slots));
        q.write_buffer(&pool.tables, 0, bytemuck::cast_slice(&words));
        Ok(())
    }
}

impl BatchBackend for GpuBackend {
    type Pool = GpuKvPool;

    fn new_pool(&self, blocks: usize, block_size: usize) -> Result<GpuKvPool> {
        let c = &self.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        if !hd.is_multiple_of(4) || hd > 128 {
            return Err(Error::Backend(format!(
                "the GPU batch kernels need head_dim % 4 == 0 and <= 128 (head_dim {hd})"
            )));
        }
        let (blocks, block_size) = (blocks.max(1), block_size.max(1));
        let layer_bytes = blocks
            .checked_mul(nkv * block_size * hd * self.kv.bytes())
            .ok_or_else(|| Error::Request("KV pool size overflows".into()))?;
        if layer_bytes as u64 > self.max_binding {
            return Err(Error::Backend(format!(
                "a layer's KV pool ({layer_bytes} bytes for {blocks} blocks) exceeds the binding \
                 limit {}: use a smaller KV cache",
                self.max_binding
            )));
        }
        let positions = c.max_position_embeddings.min(blocks * block_size).max(1);
        let tstride = positions.div_ceil(block_size);
        let device = &self.ctx.device;
        let table = self.rope_table(positions);
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
        let (mut k, mut v, mut rope_bgs, mut attn_bgs) = (vec![], vec![], vec![], vec![]);
        for l in 0..c.num_layers {
            let kb = storage(device, &format!("k pool {l}"), layer_bytes);
            let vb = storage(device, &format!("v pool {l}"), layer_bytes);
            rope_bgs.push(bind_group(
                device,
                "paged rope",
                &self.ops.paged.rope_layout,
                &[&b.step, &params, &b.qkv, &kb, &vb, &table, &rows, &tables],
            ));
            attn_bgs.push(bind_group(
                device,
                "paged attention",
                &self.ops.paged.attn_layout,
                &[&b.step, &params, &b.qkv, &kb, &vb, &rows, &tables, &b.attn],
            ));
            k.push(kb);
            v.push(vb);
        }
        Ok(GpuKvPool {
            blocks,
            block_size,
            tstride,
            k,
            v,
            rows,
            tables,
            rope_bgs,
            attn_bgs,
        })
    }

    fn block_bytes(&self, block_size: usize) -> usize {
        2 * self.kv.bytes() * block_size * self.cfg.num_layers * self.cfg.kv_dim()
    }

    fn rope_kv_write_rows(
        &mut self,
        pool: &mut GpuKvPool,
        layer: usize,
        rows: &[RowSlot],
        tables: &[Vec<u32>],
    ) {
        if layer == 0 {
            self.batch_error = self.upload_slots(pool, rows, tables).err();
        }
        if self.batch_error.is_none() {
            let heads = self.cfg.num_heads + self.cfg.num_kv_heads;
            self.ops
                .paged
                .record_rope(&mut self.rec, &pool.rope_bgs[layer], heads, rows.len());
        }
    }

    fn attention_rows(
        &mut self,
        pool: &GpuKvPool,
        layer: usize,
        rows: &[RowSlot],
        _tables: &[Vec<u32>],
    ) {
        if self.batch_error.is_none() {
            let heads = self.cfg.num_heads;
            self.ops.paged.record_attention(
                &mut self.rec,
                &pool.attn_bgs[layer],
                heads,
                rows.len(),
            );
        }
    }

    fn logits_rows(&mut self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
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
        out.clear();
        self.read_head_rows(0..rows.len(), out)
    }
}

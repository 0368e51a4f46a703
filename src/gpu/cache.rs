//! The GPU's KV cache, the one representation for single sequences and serving pools: keys
//! and values in blocks, one buffer per layer for each, `[block][kv_head][position in
//! block][head_dim]`. A single sequence is one block of its whole context, which the decode and
//! prefill kernels specialise on (split and query-tiled attention, RoPE and the KV write fused
//! into the q|k|v GEMV); pools of several blocks run the paged kernels through block tables.
//! The specialisation stays because the paged attention, one workgroup walking a row's whole
//! context, decodes a single sequence about 10× slower (H200: BENCHMARKS.md).

use super::buffers::{bind_group, storage, storage_init, uniform};
use super::ops::attention::{AttnP, MAX_SPLITS};
use super::ops::{gemv_fused::FusedP, kv_shift::ShiftP};
use super::GpuBackend;
use crate::backend::KvCache;
use crate::error::{Error, Result};

/// The single-sequence kernels' bindings (a one-block cache): attention partials and the
/// bind groups of RoPE, attention and the fused q|k|v GEMV per layer.
pub(super) struct Single {
    /// Attention partial slots per head: a step of `t` tokens splits each row up to
    /// `split_slots / t` ways.
    pub(super) split_slots: usize,
    pub(super) rope_bgs: Vec<wgpu::BindGroup>,
    pub(super) attn_bgs: Vec<wgpu::BindGroup>,
    /// Fused norm + q|k|v GEMV + RoPE + KV write, per layer (when fusion is on).
    pub(super) qkv_bgs: Vec<wgpu::BindGroup>,
}

impl Single {
    /// How a `t`-token step's attention rows reaching `maxlen` positions split: as many whole
    /// 64-position blocks as the partials hold for the step, at most [`MAX_SPLITS`] (a
    /// one-token step after a long prompt spreads over hundreds of workgroups instead of a
    /// dozen walking their blocks one after another). Returns (positions per split, splits).
    pub(super) fn splits(&self, t: usize, maxlen: usize) -> (usize, usize) {
        let most = self.most_splits(t);
        let chunk = maxlen.div_ceil(most).div_ceil(64) * 64;
        (chunk, maxlen.div_ceil(chunk))
    }

    /// The most splits a `t`-token step's rows may take (`fixup` in accept.wgsl recomputes
    /// [`Self::splits`] on the device from it).
    pub(super) fn most_splits(&self, t: usize) -> usize {
        (self.split_slots / t).clamp(1, MAX_SPLITS)
    }
}

/// Keys and values on the GPU and the bindings of the kernels that use them.
pub struct GpuCache {
    pub(super) blocks: usize,
    pub(super) block_size: usize,
    pub(super) k: Vec<wgpu::Buffer>,
    pub(super) v: Vec<wgpu::Buffer>,
    /// RoPE's cos/sin of every position the cache holds.
    pub(super) rope: wgpu::Buffer,
    /// The paged kernels' bindings (None when they cannot run this head shape; native only:
    /// the browser build runs single sequences).
    #[cfg(not(target_arch = "wasm32"))]
    pub(super) paged: Option<super::batch::Paged>,
    /// The single-sequence kernels' bindings (one block only).
    pub(super) single: Option<Single>,
}

impl KvCache for GpuCache {
    fn blocks(&self) -> usize {
        self.blocks
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
}

impl GpuCache {
    /// Splits of a one-token step's attention row over the whole of a single-sequence cache
    /// (0 for a pool).
    pub fn max_splits(&self) -> usize {
        self.single
            .as_ref()
            .map_or(0, |s| s.splits(1, self.block_size).1)
    }

    /// GPU bytes held by the keys and values.
    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|b| b.size()).sum()
    }
}

impl GpuBackend {
    /// [`crate::backend::Backend::kv_shift`]: one dispatch per layer, submitted at once (the
    /// steps recorded before it run first).
    pub(super) fn shift_cache(
        &mut self,
        cache: &mut GpuCache,
        table: &[u32],
        from: usize,
        to: usize,
        n: usize,
    ) -> Result<()> {
        let bs = cache.block_size;
        crate::backend::check_shift(table.len() * bs, from, to, n)?;
        if let Some(&bad) = table.iter().find(|&&b| b as usize >= cache.blocks) {
            return Err(Error::Request(format!(
                "block {bad} is outside the KV pool's {} blocks",
                cache.blocks
            )));
        }
        let c = &self.cfg;
        if self.kv != crate::backend::KvDtype::F32 && !c.head_dim.is_multiple_of(4) {
            return Err(Error::Backend(format!(
                "moving an f16 or int8 KV cache needs head_dim % 4 == 0 (head_dim {})",
                c.head_dim
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let device = &self.ctx.device;
        let params = uniform(
            device,
            "kv shift",
            &ShiftP {
                from: from as u32,
                to: to as u32,
                n: n as u32,
                d: (from - to) as u32,
                hd: c.head_dim as u32,
                kv_heads: c.num_kv_heads as u32,
                bs: bs as u32,
                zero: 0,
            },
        );
        let blocks = storage_init(device, "kv shift blocks", bytemuck::cast_slice(table));
        for (kb, vb) in cache.k.iter().zip(&cache.v) {
            let bg = bind_group(
                device,
                "kv shift",
                &self.ops.kv_shift.layout,
                &[&params, &blocks, &cache.rope, kb, vb],
            );
            self.ops.kv_shift.record(&mut self.rec, &bg, c.num_kv_heads);
        }
        self.rec.submit(&self.ctx.queue);
        Ok(())
    }

    /// The most blocks of `block_size` positions a pool may have (a layer's keys must fit one
    /// binding).
    pub fn max_pool_blocks(&self, block_size: usize) -> usize {
        let c = &self.cfg;
        let per_block =
            (c.num_kv_heads * block_size.max(1) * self.kv.row_bytes(c.head_dim)).max(1) as u64;
        (self.max_binding / per_block) as usize
    }

    /// Bytes a KV pool may take on this device: its device-local memory less what is already
    /// allocated (weights, step buffers) and a tenth kept free for the driver,
    /// other users and the allocator's partly used blocks (their free space is counted as
    /// available: a pool's buffers land there first). None where the API does not tell the
    /// memory's size.
    pub fn pool_memory_budget(&self) -> Option<usize> {
        let total = self.ctx.desc.device_memory?;
        let allocated = self
            .ctx
            .device
            .generate_allocator_report()
            .map_or(0, |r| r.total_allocated_bytes);
        let margin = (total / 10).max(512 << 20);
        usize::try_from(total.saturating_sub(allocated).saturating_sub(margin)).ok()
    }

    /// Bytes one block of `block_size` positions holds.
    pub(super) fn kv_block_bytes(&self, block_size: usize) -> usize {
        2 * block_size
            * self.cfg.num_layers
            * self.cfg.num_kv_heads
            * self.kv.row_bytes(self.cfg.head_dim)
    }

    /// `blocks` blocks of `block_size` positions with the bindings of the kernels that can use
    /// them: the single-sequence ones for one block, the paged ones where the head fits.
    pub(super) fn create_cache(&self, blocks: usize, block_size: usize) -> Result<GpuCache> {
        let c = &self.cfg;
        let (blocks, block_size) = (blocks.max(1), block_size.max(1));
        // The paged kernels run pools of several blocks (native builds only).
        #[cfg(not(target_arch = "wasm32"))]
        let paged_ok = super::batch::paged_fits(c.head_dim);
        #[cfg(target_arch = "wasm32")]
        let paged_ok = false;
        if blocks > 1 && !paged_ok {
            return Err(Error::Backend(format!(
                "the GPU batch kernels need head_dim % 4 == 0 and <= 128 (head_dim {})",
                c.head_dim
            )));
        }
        let layer_bytes = blocks
            .checked_mul(c.num_kv_heads * block_size * self.kv.row_bytes(c.head_dim))
            .ok_or_else(|| Error::Request("KV cache size overflows".into()))?;
        if layer_bytes as u64 > self.max_binding {
            return Err(Error::Backend(format!(
                "a layer's KV cache ({layer_bytes} bytes for {blocks} blocks of {block_size} \
                 positions) exceeds the binding limit {}: use a smaller KV cache",
                self.max_binding
            )));
        }
        let positions = if blocks == 1 {
            block_size
        } else {
            c.max_position_embeddings.min(blocks * block_size).max(1)
        };
        let table = self.rope_table(positions);
        let device = &self.ctx.device;
        let (k, v): (Vec<_>, Vec<_>) = (0..c.num_layers)
            .map(|l| {
                (
                    storage(device, &format!("k cache {l}"), layer_bytes),
                    storage(device, &format!("v cache {l}"), layer_bytes),
                )
            })
            .unzip();
        #[cfg(not(target_arch = "wasm32"))]
        let paged = paged_ok.then(|| self.paged_bindings(&k, &v, &table, block_size, positions));
        let single = (blocks == 1).then(|| self.single_bindings(&k, &v, &table, block_size));
        Ok(GpuCache {
            blocks,
            block_size,
            k,
            v,
            rope: table,
            #[cfg(not(target_arch = "wasm32"))]
            paged,
            single,
        })
    }

    fn single_bindings(
        &self,
        k: &[wgpu::Buffer],
        v: &[wgpu::Buffer],
        table: &wgpu::Buffer,
        capacity: usize,
    ) -> Single {
        let c = &self.cfg;
        let device = &self.ctx.device;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let unit = (self.max_step * nh * (hd + 2) * 4) as u64;
        let budget = self.max_binding.min(64 << 20);
        let maxsplit = ((budget / unit) as usize).clamp(1, capacity.div_ceil(64));
        let part = storage(device, "attention partials", unit as usize * maxsplit);
        let attn_params = uniform(
            device,
            "attention",
            &AttnP {
                hd: hd as u32,
                nh: nh as u32,
                group: (nh / nkv) as u32,
                stride: (c.q_dim() + 2 * c.kv_dim()) as u32,
                q_dim: c.q_dim() as u32,
                scale: 1.0 / (hd as f32).sqrt(),
                pad: [0; 2],
            },
        );
        let b = &self.bufs;
        let (mut rope_bgs, mut attn_bgs, mut qkv_bgs) = (vec![], vec![], vec![]);
        for ((kb, vb), layer) in k.iter().zip(v).zip(&self.layers) {
            rope_bgs.push(bind_group(
                device,
                "rope",
                &self.ops.rope.layout,
                &[&b.step, &b.rope_params, &b.qkv, kb, vb, table],
            ));
            attn_bgs.push(bind_group(
                device,
                "attention",
                &self.ops.attention.layout,
                &[
                    &b.step,
                    &attn_params,
                    &b.qkv,
                    kb,
                    vb,
                    &part,
                    &b.attn,
                    kb,
                    vb,
                ],
            ));
            if layer.fused.is_some() {
                let m = &layer.qkv;
                let h = c.hidden_size;
                let p = FusedP::new(c, (m.rows, m.kvec), h, h);
                let params = uniform(device, "fused qkv", &p);
                qkv_bgs.push(bind_group(
                    device,
                    "fused qkv",
                    &self.ops.fused.rope_layout,
                    &[
                        &b.step,
                        &params,
                        &m.w,
                        &m.rs,
                        &b.x,
                        &layer.input_gamma,
                        &b.qkv,
                        table,
                        kb,
                        vb,
                    ],
                ));
            }
        }
        Single {
            split_slots: maxsplit * self.max_step,
            rope_bgs,
            attn_bgs,
            qkv_bgs,
        }
    }
}

//! The GPU's single-sequence KV cache.

use super::params::{AttnP, FusedP};
use super::*;

/// The KV cache on the GPU: f32 keys and values per layer `[kv_head][position][head_dim]`,
/// the RoPE cos/sin table for its positions, attention partials, and the bind groups of the
/// kernels that use them.
pub struct GpuCache {
    pub(super) capacity: usize,
    pub(super) maxsplit: usize,
    pub(super) k: Vec<wgpu::Buffer>,
    pub(super) v: Vec<wgpu::Buffer>,
    pub(super) rope_bgs: Vec<wgpu::BindGroup>,
    pub(super) attn_bgs: Vec<wgpu::BindGroup>,
    /// Fused norm + q|k|v GEMV + RoPE + KV write, per layer (when fusion is on).
    pub(super) qkv_bgs: Vec<wgpu::BindGroup>,
}

impl KvCache for GpuCache {
    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl GpuCache {
    /// Attention partial slots per (token, head).
    pub fn max_splits(&self) -> usize {
        self.maxsplit
    }

    /// GPU bytes held by the keys and values.
    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|b| b.size()).sum()
    }
}

impl GpuBackend {
    /// A KV cache of `capacity` positions with its RoPE table, attention partials and the
    /// bind groups of the kernels that read it.
    pub(super) fn create_cache(&self, capacity: usize) -> Result<GpuCache> {
        let c = &self.cfg;
        let device = &self.ctx.device;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let layer_bytes = (nkv * capacity * hd * self.kv.bytes()) as u64;
        if layer_bytes > self.max_binding {
            return Err(Error::Backend(format!(
                "a layer's KV cache ({layer_bytes} bytes for {capacity} positions) exceeds the \
                 binding limit {}",
                self.max_binding
            )));
        }
        let table = self.rope_table(capacity);
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
                maxsplit: maxsplit as u32,
                scale: 1.0 / (hd as f32).sqrt(),
                pad: 0,
            },
        );
        let b = &self.bufs;
        let mut k = Vec::new();
        let mut v = Vec::new();
        let mut rope_bgs = Vec::new();
        let mut attn_bgs = Vec::new();
        let mut qkv_bgs = Vec::new();
        for l in 0..c.num_layers {
            let kb = storage(device, &format!("k cache {l}"), layer_bytes as usize);
            let vb = storage(device, &format!("v cache {l}"), layer_bytes as usize);
            rope_bgs.push(bind_group(
                device,
                "rope",
                &self.ops.rope.layout,
                &[&b.step, &b.rope_params, &b.qkv, &kb, &vb, &table],
            ));
            attn_bgs.push(bind_group(
                device,
                "attention",
                &self.ops.attention.layout,
                &[
                    &b.step,
                    &attn_params,
                    &b.qkv,
                    &kb,
                    &vb,
                    &part,
                    &b.attn,
                    &kb,
                    &vb,
                ],
            ));
            let layer = &self.layers[l];
            if layer.fused.is_some() {
                let m = &layer.qkv;
                let h = c.hidden_size;
                let params = uniform(
                    device,
                    "fused qkv",
                    &FusedP {
                        rows: m.rows as u32,
                        kvec: m.kvec as u32,
                        ld: m.rows as u32,
                        width: h as u32,
                        src_stride: h as u32,
                        eps: c.rms_norm_eps,
                        q_dim: c.q_dim() as u32,
                        kv_dim: c.kv_dim() as u32,
                        hd: hd as u32,
                        ..Default::default()
                    },
                );
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
                        &table,
                        &kb,
                        &vb,
                    ],
                ));
            }
            k.push(kb);
            v.push(vb);
        }
        Ok(GpuCache {
            capacity,
            maxsplit,
            k,
            v,
            rope_bgs,
            attn_bgs,
            qkv_bgs,
        })
    }
}

//! RoPE of the step's q and k heads, then k and v into the contiguous KV cache.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON, ROPE_HEAD};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/rope.wgsl");

/// RoPE + KV write of a contiguous cache (`RopeP` in rope.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct RopeP {
    /// Head dimension.
    pub hd: u32,
    /// Query heads.
    pub nh: u32,
    /// f32 per q|k|v row.
    pub stride: u32,
    /// Key/value width.
    pub kv_dim: u32,
}

/// The RoPE + KV write kernel.
pub struct Rope {
    /// step, params, qkv, k cache, v cache, cos/sin table.
    pub layout: wgpu::BindGroupLayout,
    pipe: wgpu::ComputePipeline,
    store: wgpu::ComputePipeline,
}

impl Rope {
    /// Compiles the kernel for the KV cache's element type.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("rope", &[Uniform, Uniform, Write, Write, Write, Read]);
        let parts = [
            COMMON,
            t.kv_section("write"),
            t.kv_section("finish"),
            ROPE_HEAD,
            SRC,
        ];
        let m = t.kv_module("rope", &parts);
        let pipe = t.pipeline("rope", &layout, &m, "main", &[]);
        let store = t.pipeline("kv_store", &layout, &m, "store", &[]);
        Rope {
            layout,
            pipe,
            store,
        }
    }

    /// The KV write of `kv_heads` heads of `t` rows already rotated in q|k|v (after the fused
    /// q|k|v GEMV, for caches written a row at a time: int8).
    pub fn record_store(
        &self,
        rec: &mut Recorder,
        bg: &wgpu::BindGroup,
        kv_heads: usize,
        t: usize,
    ) {
        rec.dispatch("kv_store", &self.store, bg, [kv_heads as u32, t as u32, 1]);
    }

    /// RoPE of `heads` (q + kv) heads of `t` rows, and the KV write.
    pub fn record(&self, rec: &mut Recorder, bg: &wgpu::BindGroup, heads: usize, t: usize) {
        rec.dispatch("rope", &self.pipe, bg, [heads as u32, t as u32, 1]);
    }
}

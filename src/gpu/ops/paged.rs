//! RoPE, KV write and attention for batched rows of different sequences over the paged pool.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, ATTEND_VEC_COMMON, COMMON, ROPE_HEAD};
use crate::gpu::recorder::Recorder;

const ROPE: &str = include_str!("../../../shaders/paged_rope.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/paged_attention.wgsl");

/// RoPE, KV write and attention over the paged pool (`PagedP` in paged_rope.wgsl and
/// paged_attention.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct PagedP {
    /// Head dimension.
    pub hd: u32,
    /// Query heads.
    pub nh: u32,
    /// Query heads per KV head.
    pub group: u32,
    /// f32 per q|k|v row.
    pub stride: u32,
    /// Query width.
    pub q_dim: u32,
    /// Key/value width.
    pub kv_dim: u32,
    /// KV heads.
    pub kvh: u32,
    /// Positions per block.
    pub bs: u32,
    /// Block-table entries per sequence.
    pub tstride: u32,
    /// 1 / sqrt(head_dim).
    pub scale: f32,
    /// Padding.
    pub pad0: u32,
    /// Padding.
    pub pad1: u32,
}

/// The paged kernels.
pub struct Paged {
    /// step, params, qkv, k pool, v pool, cos/sin table, row slots, block tables.
    pub rope_layout: wgpu::BindGroupLayout,
    /// step, params, qkv, k pool, v pool, row slots, block tables, out.
    pub attn_layout: wgpu::BindGroupLayout,
    rope: wgpu::ComputePipeline,
    attend: wgpu::ComputePipeline,
}

impl Paged {
    /// Compiles the kernels for the pool's element type.
    pub fn new(t: &Target) -> Self {
        let rope_layout = t.layout(
            "paged_rope",
            &[Uniform, Uniform, Write, Write, Write, Read, Read, Read],
        );
        let attn_layout = t.layout(
            "paged_attention",
            &[Uniform, Uniform, Read, Read, Read, Read, Read, Write],
        );
        let m_rope = t.kv_module(
            "paged_rope",
            &[
                COMMON,
                t.kv_section("write"),
                t.kv_section("finish"),
                ROPE_HEAD,
                ROPE,
            ],
        );
        let m_attn = t.kv_module(
            "paged_attention",
            &[COMMON, t.kv_section("read4"), ATTEND_VEC_COMMON, ATTENTION],
        );
        Paged {
            rope: t.pipeline("paged_rope", &rope_layout, &m_rope, "main", &[]),
            attend: t.pipeline("paged_attend", &attn_layout, &m_attn, "main", &[]),
            rope_layout,
            attn_layout,
        }
    }

    /// RoPE of `heads` (q + kv) heads of `t` rows, and their KV write into the pool.
    pub fn record_rope(&self, rec: &mut Recorder, bg: &wgpu::BindGroup, heads: usize, t: usize) {
        rec.dispatch("paged_rope", &self.rope, bg, [heads as u32, t as u32, 1]);
    }

    /// Attention of `t` rows over the pool.
    pub fn record_attention(
        &self,
        rec: &mut Recorder,
        bg: &wgpu::BindGroup,
        heads: usize,
        t: usize,
    ) {
        let dims = [heads as u32, t as u32, 1];
        rec.dispatch("paged_attend", &self.attend, bg, dims);
    }
}

//! Causal GQA attention over the contiguous KV cache: split partials (scalar, vec4 for decode,
//! query-tiled for prefill, on subgroups where the adapter has them) and their merge.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, ATTEND_VEC_COMMON, COMMON};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/attention.wgsl");
/// The prefill attention on subgroups (appended to [`SRC`] where the adapter has them).
const TILED_SG: &str = include_str!("../../../shaders/attention_tiled_sg.wgsl");

/// Attention over a contiguous cache (`AttnP` in attention.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct AttnP {
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
    /// 1 / sqrt(head_dim).
    pub scale: f32,
    /// Padding.
    pub pad: [u32; 2],
}

/// Most splits of one attention row (`MAX_SPLITS` in attention.wgsl: `combine` stages each
/// split's maximum and sum in workgroup memory).
pub const MAX_SPLITS: usize = 256;

/// The attention kernels.
pub struct Attention {
    /// step, params, qkv, k cache, v cache, partials, out, k and v as vec4.
    pub layout: wgpu::BindGroupLayout,
    attend: wgpu::ComputePipeline,
    attend_vec: wgpu::ComputePipeline,
    combine: wgpu::ComputePipeline,
    tiled: wgpu::ComputePipeline,
    /// `attend_tiled_sg`, where subgroups of 8 or more are available.
    tiled_sg: Option<wgpu::ComputePipeline>,
}

/// Most rows of a decode step (the longest speculative verification), each computed as a
/// one-token step's by the fused GEMVs and the vector attention kernel.
pub const VEC_MAX_T: usize = 1 + crate::engine::speculative::MAX_DRAFT_TOKENS;

/// Invocations of an `attend_tiled_sg` workgroup (`SG_WG`): a quarter as many query rows.
const SG_WG: usize = 128;

/// Whether the query-tiled prefill attention handles this head shape.
pub fn tiled_fits(head_dim: usize, group: usize) -> bool {
    head_dim.is_multiple_of(4) && head_dim <= 128 && (1..=16).contains(&group)
}

impl Attention {
    /// Compiles the kernels for the KV cache's element type.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout(
            "attention",
            &[Uniform, Uniform, Read, Read, Read, Write, Write, Read, Read],
        );
        // The subgroup kernel's row butterflies span 8 invocations.
        let sg = t.subgroup_size.is_some_and(|s| s >= 8);
        let mut parts = vec![
            COMMON,
            t.kv_section("read1"),
            t.kv_section("read4"),
            ATTEND_VEC_COMMON,
            SRC,
        ];
        if sg {
            parts.push(TILED_SG);
        }
        let m = t.kv_module("attention", &parts);
        let p = |label, entry| t.pipeline(label, &layout, &m, entry, &[]);
        Attention {
            attend: p("attend", "attend"),
            attend_vec: p("attend_vec", "attend_vec"),
            combine: p("combine", "combine"),
            tiled: p("attend_tiled", "attend_tiled"),
            tiled_sg: sg.then(|| {
                t.pipeline(
                    "attend_tiled_sg",
                    &layout,
                    &m,
                    "attend_tiled_sg",
                    &[("SG_WG", SG_WG as f64)],
                )
            }),
            layout,
        }
    }

    /// Split attention of `t` rows over `nsplit` splits, then the merge. Up to
    /// [`VEC_MAX_T`] rows with `head_dim % 4 == 0` (<= 128) take the vec4 kernel (one
    /// workgroup per row, head and split, each row's sums exactly a one-row step's), which
    /// writes the output itself when there is one split. (The backend sends it only decode
    /// steps; prefill's rows go to [`Attention::record_tiled`] where the head shape fits.)
    pub fn record(
        &self,
        rec: &mut Recorder,
        bg: &wgpu::BindGroup,
        nsplit: usize,
        heads: usize,
        t: usize,
        head_dim: usize,
    ) {
        let dims = [nsplit as u32, heads as u32, t as u32];
        if t <= VEC_MAX_T && head_dim.is_multiple_of(4) && head_dim <= 128 {
            rec.dispatch("attend_vec", &self.attend_vec, bg, dims);
            if nsplit == 1 {
                return;
            }
        } else {
            rec.dispatch("attend", &self.attend, bg, dims);
        }
        rec.dispatch("combine", &self.combine, bg, [heads as u32, t as u32, 1]);
    }

    /// Prefill attention of `t` rows tiled over queries ([`tiled_fits`]): one workgroup per
    /// (token block, KV head, split), then the merge when there are several splits.
    pub fn record_tiled(
        &self,
        rec: &mut Recorder,
        bg: &wgpu::BindGroup,
        kv_heads: usize,
        group: usize,
        nsplit: usize,
        t: usize,
    ) {
        let (rows, name, pipeline) = match &self.tiled_sg {
            Some(p) => (SG_WG / 4, "attend_tiled_sg", p),
            None => (16, "attend_tiled", &self.tiled),
        };
        let tq = (rows / group).max(1);
        let dims = [t.div_ceil(tq) as u32, kv_heads as u32, nsplit as u32];
        rec.dispatch(name, pipeline, bg, dims);
        if nsplit > 1 {
            let heads = kv_heads * group;
            rec.dispatch("combine", &self.combine, bg, [heads as u32, t as u32, 1]);
        }
    }
}

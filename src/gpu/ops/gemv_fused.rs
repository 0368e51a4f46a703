//! Decode GEMVs with the preceding norm folded in: each workgroup normalises and quantizes the
//! whole input row in registers, then computes its rows. The q|k|v one also applies RoPE and
//! writes k and v into the cache.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON, REDUCE_PAIRS_SHARED, REDUCE_PAIRS_SUBGROUP};
use super::{REDUCE_WG_SHARED, REDUCE_WG_SUBGROUP};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/gemv_fused.wgsl");

/// A fused norm + GEMV (`FusedP` in gemv_fused.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct FusedP {
    /// Output rows.
    pub rows: u32,
    /// vec4<u32> of weights per row.
    pub kvec: u32,
    /// f32 per output row.
    pub ld: u32,
    /// Input elements normalised.
    pub width: u32,
    /// f32 per source row.
    pub src_stride: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Query width (q heads × head_dim).
    pub q_dim: u32,
    /// Key/value width.
    pub kv_dim: u32,
    /// Head dimension.
    pub hd: u32,
    /// Padding.
    pub p0: u32,
    /// Padding.
    pub p1: u32,
    /// Padding.
    pub p2: u32,
}

impl FusedP {
    /// The parameters of a fused GEMV of a `rows`-row matrix (`kvec` vec4 of weights per row)
    /// normalising `width` inputs of rows `src_stride` apart, for `cfg`'s head shape (used by
    /// the q|k|v GEMV's RoPE and KV write).
    pub fn new(
        cfg: &crate::config::ModelConfig,
        (rows, kvec): (usize, usize),
        width: usize,
        src_stride: usize,
    ) -> Self {
        FusedP {
            rows: rows as u32,
            kvec: kvec as u32,
            ld: rows as u32,
            width: width as u32,
            src_stride: src_stride as u32,
            eps: cfg.rms_norm_eps,
            q_dim: cfg.q_dim() as u32,
            kv_dim: cfg.kv_dim() as u32,
            hd: cfg.head_dim as u32,
            ..Default::default()
        }
    }
}

/// Output rows of a fused GEMV workgroup (`2 * FG` in gemv_fused.wgsl).
pub const FUSED_ROWS: u32 = 32;

/// Invocations per fused GEMV workgroup (`FW` in gemv_fused.wgsl).
const FUSED_WG: usize = 256;

/// Most input words (4 columns) one invocation holds in registers (`NW`).
const MAX_WORDS: usize = 7;

/// Widest input the fused GEMV normalises in registers (`4 * NW * FW` in gemv_fused.wgsl).
pub const FUSED_MAX_WIDTH: usize = 4 * MAX_WORDS * FUSED_WG;

/// Which fused GEMV of a layer.
#[derive(Clone, Copy)]
pub enum Fused {
    /// input norm + q|k|v + RoPE + KV write.
    QkvRope,
    /// attn_sub_norm + o_proj, added into the residual.
    O,
    /// post-attention norm + gate|up.
    GateUp,
    /// relu²(gate)·up + ffn_sub_norm + down_proj, added into the residual.
    Down,
}

/// The fused decode GEMVs.
pub struct FusedGemv {
    /// step, params, weights, row scales, source, gamma, out.
    pub layout: wgpu::BindGroupLayout,
    /// The above, then cos/sin table, k cache, v cache.
    pub rope_layout: wgpu::BindGroupLayout,
    norm: wgpu::ComputePipeline,
    norm_acc: wgpu::ComputePipeline,
    relu2_acc: wgpu::ComputePipeline,
    norm_rope: wgpu::ComputePipeline,
}

/// The declarations gemv_fused.wgsl expects for inputs up to `width` wide: the workgroup
/// shape, `NW` words (4 columns) per invocation, as few registers as the width allows, and
/// `XMAX` vec4 of input.
fn width_prelude(width: usize) -> String {
    let words = crate::gpu::buffers::pad64(width) / 4;
    let nw = words.div_ceil(FUSED_WG).clamp(1, MAX_WORDS);
    Target::consts(&[
        ("FW", FUSED_WG),
        ("FG", FUSED_ROWS as usize / 2),
        ("NW", nw),
        ("XMAX", nw * FUSED_WG / 4),
    ])
}

impl FusedGemv {
    /// Compiles the four kernels; `widths` are the widest hidden-sized and intermediate-sized
    /// inputs.
    pub fn new(t: &Target, widths: [usize; 2]) -> Self {
        let layout = t.layout(
            "gemv_fused",
            &[Uniform, Uniform, Read, Read, Read, Read, Write],
        );
        let rope_layout = t.layout(
            "gemv_fused_rope",
            &[
                Uniform, Uniform, Read, Read, Read, Read, Write, Read, Write, Write,
            ],
        );
        let wg_reduce = if t.subgroups() {
            REDUCE_WG_SUBGROUP
        } else {
            REDUCE_WG_SHARED
        };
        // The row-pair butterfly needs a subgroup to hold a pair's 16 invocations.
        let pair_sums = if t.subgroups() && t.tpr() >= 16 {
            REDUCE_PAIRS_SUBGROUP
        } else {
            REDUCE_PAIRS_SHARED
        };
        let write = t.kv_section("write");
        let module = |label, width| {
            let prelude = width_prelude(width);
            t.kv_module(label, &[&prelude, COMMON, wg_reduce, pair_sums, SRC, write])
        };
        let m_hidden = module("gemv_fused", widths[0]);
        let m_inter = module("gemv_fused_intermediate", widths[1]);
        let consts = |mode: f64, acc: f64| {
            let mut c = vec![("MODE", mode), ("ACCUM", acc)];
            if t.subgroups() {
                c.push(("SG", t.tpr() as f64));
            }
            c
        };
        FusedGemv {
            norm: t.pipeline(
                "gemv_norm",
                &layout,
                &m_hidden,
                "gemv_norm",
                &consts(0.0, 0.0),
            ),
            norm_acc: t.pipeline(
                "gemv_norm_acc",
                &layout,
                &m_hidden,
                "gemv_norm",
                &consts(0.0, 1.0),
            ),
            relu2_acc: t.pipeline(
                "gemv_relu2_acc",
                &layout,
                &m_inter,
                "gemv_norm",
                &consts(1.0, 1.0),
            ),
            norm_rope: t.pipeline(
                "gemv_norm_rope",
                &rope_layout,
                &m_hidden,
                "gemv_norm_rope",
                &consts(0.0, 0.0),
            ),
            layout,
            rope_layout,
        }
    }

    /// The fused GEMV `which` producing `rows` rows for each of `t` tokens.
    pub fn record(
        &self,
        rec: &mut Recorder,
        which: Fused,
        bg: &wgpu::BindGroup,
        rows: usize,
        t: usize,
    ) {
        let (label, pl) = match which {
            Fused::QkvRope => ("fused_qkv", &self.norm_rope),
            Fused::O => ("fused_o", &self.norm_acc),
            Fused::GateUp => ("fused_gate_up", &self.norm),
            Fused::Down => ("fused_down", &self.relu2_acc),
        };
        let wgs = rows.div_ceil(FUSED_ROWS as usize);
        rec.dispatch(label, pl, bg, [wgs as u32, t as u32, 1]);
    }
}

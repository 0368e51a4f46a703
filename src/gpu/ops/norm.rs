//! RMSNorm of step rows (optionally after the gating activation of gate|up, optionally without
//! the norm), then int8 quantization, or to f32 (the final norm).

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON, REDUCE_WG_SHARED};
use crate::arch::GatedAct;
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/norm.wgsl");

/// An RMSNorm (+ quantization) (`NormP` in norm.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct NormP {
    /// Elements normalised.
    pub width: u32,
    /// f32 per source row.
    pub src_stride: u32,
    /// u32 per output row (int8 ×4, or f32).
    pub out_words: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
}

/// Invocations per norm workgroup (one workgroup per row; `FW` in norm.wgsl).
const NORM_WG: u32 = 256;

/// Which norm kernel variant.
#[derive(Clone, Copy)]
pub enum NormKind {
    /// [act(gate)·up →] [RMSNorm →] int8.
    Quant {
        /// The gating activation of a gate|up row, if the row is one.
        act: Option<GatedAct>,
        /// With the RMSNorm (else the values are quantized as they are).
        normed: bool,
    },
    /// RMSNorm → f32.
    F32,
}

impl NormKind {
    /// RMSNorm → int8.
    pub const QUANT: NormKind = NormKind::Quant {
        act: None,
        normed: true,
    };
}

/// The norm kernels.
pub struct Norm {
    /// step, params, src, gamma, out words, out scales.
    pub layout: wgpu::BindGroupLayout,
    /// [act][normed]: act none, relu², SiLU.
    quant: [[wgpu::ComputePipeline; 2]; 3],
    f32: wgpu::ComputePipeline,
}

impl Norm {
    /// Compiles the variants (overrides `MODE`, `ACT`, `NORMED`).
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("norm", &[Uniform, Uniform, Read, Read, Write, Write]);
        let consts = Target::consts(&[("FW", NORM_WG as usize)]);
        // The tree in workgroup memory, on every adapter: its summation order keeps the int8
        // codes of the oracle fixture's prompts where the CPU has them (a subgroup reduction
        // flipped one code of the chat prompt on 16-wide lavapipe, 0.023 on its logits) and
        // it measured no slower on the H200.
        let m = t.module("norm", &[&consts, COMMON, REDUCE_WG_SHARED, SRC]);
        let p = |label, mode: f64, act: usize, normed: bool| {
            let c = [
                ("MODE", mode),
                ("ACT", act as f64),
                ("NORMED", normed as u8 as f64),
            ];
            t.pipeline(label, &layout, &m, "main", &c)
        };
        let q = |act| [p("quant", 0.0, act, false), p("norm_quant", 0.0, act, true)];
        Norm {
            quant: [q(0), q(1), q(2)],
            f32: p("norm_f32", 2.0, 0, true),
            layout,
        }
    }

    /// The norm of `t` rows.
    pub fn record(&self, rec: &mut Recorder, kind: NormKind, bg: &wgpu::BindGroup, t: usize) {
        let (label, pl) = match kind {
            NormKind::Quant { act, normed } => {
                let (label, a) = match act {
                    None => ("norm_quant", 0),
                    Some(GatedAct::Relu2) => ("relu2_norm_quant", 1),
                    Some(GatedAct::Silu) => ("silu_norm_quant", 2),
                };
                (label, &self.quant[a][normed as usize])
            }
            NormKind::F32 => ("final_norm", &self.f32),
        };
        rec.dispatch(label, pl, bg, [t as u32, 1, 1]);
    }
}

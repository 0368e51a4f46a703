//! RMSNorm of step rows, then int8 quantization (optionally after relu²(gate)·up), or to f32
//! (the final norm).

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON, REDUCE_WG_SHARED, REDUCE_WG_SUBGROUP};
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
    /// RMSNorm → int8.
    Quant,
    /// relu²(gate)·up → RMSNorm → int8.
    Relu2Quant,
    /// RMSNorm → f32.
    F32,
}

/// The norm kernels.
pub struct Norm {
    /// step, params, src, gamma, out words, out scales.
    pub layout: wgpu::BindGroupLayout,
    quant: wgpu::ComputePipeline,
    relu2: wgpu::ComputePipeline,
    f32: wgpu::ComputePipeline,
}

impl Norm {
    /// Compiles the three variants (override `MODE`).
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("norm", &[Uniform, Uniform, Read, Read, Write, Write]);
        let consts = Target::consts(&[("FW", NORM_WG as usize)]);
        let reduce = if t.subgroups() {
            REDUCE_WG_SUBGROUP
        } else {
            REDUCE_WG_SHARED
        };
        let m = t.module("norm", &[&consts, COMMON, reduce, SRC]);
        let p = |label, mode: f64| {
            let mut c = vec![("MODE", mode)];
            if t.subgroups() {
                c.push(("SG", t.tpr() as f64));
            }
            t.pipeline(label, &layout, &m, "main", &c)
        };
        Norm {
            quant: p("norm_quant", 0.0),
            relu2: p("norm_relu2", 1.0),
            f32: p("norm_f32", 2.0),
            layout,
        }
    }

    /// The norm of `t` rows.
    pub fn record(&self, rec: &mut Recorder, kind: NormKind, bg: &wgpu::BindGroup, t: usize) {
        let (label, pl) = match kind {
            NormKind::Quant => ("norm_quant", &self.quant),
            NormKind::Relu2Quant => ("relu2_norm_quant", &self.relu2),
            NormKind::F32 => ("final_norm", &self.f32),
        };
        rec.dispatch(label, pl, bg, [t as u32, 1, 1]);
    }
}

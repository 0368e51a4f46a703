//! Moving a sequence's KV positions down with their keys re-rotated (attention sinks with a
//! sliding window; [`crate::backend::Backend::kv_shift`]).

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON};
use crate::backend::KvDtype;
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/kv_shift.wgsl");

/// The shift's parameters (`ShiftP` in kv_shift.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct ShiftP {
    /// First position moved.
    pub from: u32,
    /// Where it lands.
    pub to: u32,
    /// Positions moved.
    pub n: u32,
    /// `from - to`: the rotation's row of the cos/sin table.
    pub d: u32,
    /// Head dimension.
    pub hd: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Positions per block.
    pub bs: u32,
    /// 0 (hides products from FMA contraction).
    pub zero: u32,
}

/// The KV shift kernel.
pub struct KvShift {
    /// params, block table, cos/sin table, k cache, v cache (one layer).
    pub layout: wgpu::BindGroupLayout,
    pipe: wgpu::ComputePipeline,
}

impl KvShift {
    /// Compiles the kernel for the KV cache's element type.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("kv_shift", &[Uniform, Read, Read, Write, Write]);
        let m = t.module("kv_shift", &[COMMON, SRC]);
        let mode = match t.kv {
            KvDtype::F32 => 0.0,
            KvDtype::F16 => 1.0,
            KvDtype::Int8 => 2.0,
        };
        let pipe = t.pipeline("kv_shift", &layout, &m, "main", &[("MODE", mode)]);
        KvShift { layout, pipe }
    }

    /// The shift of one layer's `kv_heads` heads.
    pub fn record(&self, rec: &mut Recorder, bg: &wgpu::BindGroup, kv_heads: usize) {
        rec.dispatch("kv_shift", &self.pipe, bg, [kv_heads as u32, 1, 1]);
    }
}

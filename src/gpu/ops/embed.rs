//! Embedding gather: the step's token rows of the (bf16 or f32) embedding, one shard at a time.

use super::{Target, Use::*, COMMON};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/embed.wgsl");

/// The embedding gather.
pub struct Embed {
    /// step, shard, tokens, weights, x.
    pub layout: wgpu::BindGroupLayout,
    pipe: wgpu::ComputePipeline,
}

impl Embed {
    /// Compiles the gather for `t`'s weight format.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("embed", &[Uniform, Uniform, Read, Read, Write]);
        let m = t.module("embed", &[COMMON, SRC]);
        let f32w = if t.f32_head { 1.0 } else { 0.0 };
        let pipe = t.pipeline("embed", &layout, &m, "main", &[("F32_WEIGHTS", f32w)]);
        Embed { layout, pipe }
    }

    /// Gathers `t` tokens from one shard (`cols` = hidden size).
    pub fn record(&self, rec: &mut Recorder, bg: &wgpu::BindGroup, cols: usize, t: usize) {
        let dims = [cols.div_ceil(64) as u32, t as u32, 1];
        rec.dispatch("embed", &self.pipe, bg, dims);
    }
}

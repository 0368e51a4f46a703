//! Argmax of each logits row on the device (the lowest id on ties, as
//! [`crate::reference::argmax`]): partials per 4,096 logits of each row, then one merge per row.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/argmax.wgsl");

/// Argmax over the logits (`ArgP` in argmax.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct ArgP {
    /// Logits.
    pub n: u32,
    /// Partial results.
    pub parts: u32,
    /// Padding.
    pub pad0: u32,
    /// Padding.
    pub pad1: u32,
}

/// Logits one partial covers (`ARG_CHUNK` in argmax.wgsl).
const CHUNK: usize = 4096;

/// Partial results of the argmax over `vocab` logits.
pub fn parts(vocab: usize) -> usize {
    vocab.div_ceil(CHUNK)
}

/// The argmax kernels.
pub struct Argmax {
    /// params, logits, partials, result.
    pub layout: wgpu::BindGroupLayout,
    partial: wgpu::ComputePipeline,
    merge: wgpu::ComputePipeline,
}

impl Argmax {
    /// Compiles both passes.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("argmax", &[Uniform, Read, Write, Write]);
        let consts = Target::consts(&[("ARG_CHUNK", CHUNK)]);
        let m = t.module("argmax", &[&consts, COMMON, SRC]);
        Argmax {
            partial: t.pipeline("argmax_partial", &layout, &m, "partial", &[]),
            merge: t.pipeline("argmax_final", &layout, &m, "final_", &[]),
            layout,
        }
    }

    /// Argmax of logits rows `0..rows` into result words `0..rows` (the partials buffer holds
    /// `parts(vocab)` entries per row).
    pub fn record(&self, rec: &mut Recorder, bg: &wgpu::BindGroup, vocab: usize, rows: usize) {
        let dims = [parts(vocab) as u32, rows as u32, 1];
        rec.dispatch("argmax", &self.partial, bg, dims);
        rec.dispatch("argmax_final", &self.merge, bg, [rows as u32, 1, 1]);
    }
}

//! Top-k of selected logits rows on the device: bitonic sorts of 1,024-entry chunks in
//! workgroup memory, passes until one workgroup per row is left; candidates in
//! [`crate::reference::top_candidates`]' order.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/topk.wgsl");

/// One top-k pass (`TopkP` in topk.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct TopkP {
    /// Entries of each row this pass reads.
    pub n: u32,
    /// Entries each workgroup keeps.
    pub k: u32,
    /// f32 per logits row (first pass).
    pub ld: u32,
    /// Padding.
    pub pad: u32,
}

/// Entries one top-k workgroup sorts (`TK_CHUNK` in topk.wgsl).
pub const CHUNK: usize = 1024;

/// Largest k the GPU selects (each pass keeps k of every chunk: at least 8× fewer).
pub const MAX_K: usize = CHUNK / 8;

/// Passes the top-k of a vocabulary may take (one per 8× reduction).
pub const PASSES: usize = 8;

/// The top-k kernels.
pub struct TopK {
    /// params, logits, source pairs, destination pairs, selected rows (logits row, 1 / temperature).
    pub layout: wgpu::BindGroupLayout,
    first: wgpu::ComputePipeline,
    merge: wgpu::ComputePipeline,
}

impl TopK {
    /// Compiles the first pass (over the logits) and the merge pass (override `FIRST`).
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("topk", &[Uniform, Read, Read, Write, Read]);
        let consts = Target::consts(&[("TK_CHUNK", CHUNK)]);
        let m = t.module("topk", &[&consts, COMMON, SRC]);
        TopK {
            first: t.pipeline("topk_first", &layout, &m, "main", &[("FIRST", 1.0)]),
            merge: t.pipeline("topk_merge", &layout, &m, "main", &[("FIRST", 0.0)]),
            layout,
        }
    }

    /// One pass over `n` entries of each of `rows` selected rows (`first`: the logits),
    /// `ceil(n / CHUNK)` workgroups per row.
    pub fn record(
        &self,
        rec: &mut Recorder,
        bg: &wgpu::BindGroup,
        first: bool,
        n: usize,
        rows: usize,
    ) {
        let (label, pl) = if first {
            ("topk", &self.first)
        } else {
            ("topk_merge", &self.merge)
        };
        rec.dispatch(label, pl, bg, [n.div_ceil(CHUNK) as u32, rows as u32, 1]);
    }
}

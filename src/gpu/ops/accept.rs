//! Device-side acceptance of a queued decode step's drafts, so the step queued behind it stays
//! valid whatever it accepts: `accept` ends a step of several rows (the next input is the pick
//! after its accepted drafts), `fixup` starts the step behind it (its position moves back by the
//! drafts rejected). Tested through queued speculation (tests/gpu.rs).

use super::{Target, Use::*, COMMON};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/accept.wgsl");

/// The acceptance and fix-up kernels.
pub struct Accept {
    /// step (as storage), tokens, argmax result, rejected count.
    pub layout: wgpu::BindGroupLayout,
    accept: wgpu::ComputePipeline,
    fixup: wgpu::ComputePipeline,
}

impl Accept {
    /// Compiles both kernels.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("accept", &[Write, Write, Read, Write]);
        let m = t.module("accept", &[COMMON, SRC]);
        Accept {
            accept: t.pipeline("accept", &layout, &m, "accept", &[]),
            fixup: t.pipeline("fixup", &layout, &m, "fixup", &[]),
            layout,
        }
    }

    /// After a step's argmax rows: accepts its drafts and sets the next step's input.
    pub fn record_accept(&self, rec: &mut Recorder, bg: &wgpu::BindGroup) {
        rec.dispatch("accept", &self.accept, bg, [1, 1, 1]);
    }

    /// First in a step whose input came from the device: moves its position back by the drafts
    /// the step ahead rejected.
    pub fn record_fixup(&self, rec: &mut Recorder, bg: &wgpu::BindGroup) {
        rec.dispatch("fixup", &self.fixup, bg, [1, 1, 1]);
    }
}

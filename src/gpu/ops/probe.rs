//! Memory bandwidth probes (`bench --membw`): a copy and a read-only sum over large buffers.

use super::{Target, Use::*};

const SRC: &str = include_str!("../../../shaders/copy.wgsl");

/// The probe kernels.
pub struct Probe {
    /// source, destination.
    pub layout: wgpu::BindGroupLayout,
    /// Copies the source into the destination.
    pub copy: wgpu::ComputePipeline,
    /// Reads the source (the read bandwidth).
    pub read: wgpu::ComputePipeline,
}

impl Probe {
    /// Compiles both probes.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("probe", &[Read, Write]);
        let m = t.module("copy", &[SRC]);
        Probe {
            copy: t.pipeline("probe_copy", &layout, &m, "probe_copy", &[]),
            read: t.pipeline("probe_read", &layout, &m, "probe_read", &[]),
            layout,
        }
    }
}

//! Device probes (`bench --membw`): a copy and a read-only sum over large buffers (memory
//! bandwidth), and a device-wide barrier between co-resident workgroups (what a persistent
//! kernel's phases would cost against dependent dispatches).

use super::{Target, Use::*};

const SRC: &str = include_str!("../../../shaders/copy.wgsl");
const GRID_SRC: &str = include_str!("../../../shaders/grid.wgsl");

/// `GridP` in grid.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GridP {
    /// Workgroups that meet at each barrier (the dispatch's size).
    pub n: u32,
    /// Barriers each workgroup passes.
    pub rounds: u32,
    /// Spins before a workgroup gives up waiting and counts a timeout.
    pub spin: u32,
    /// 1: every round writes rows of its own (none re-read in the dispatch); 0: two sets of
    /// rows, alternating.
    pub fresh: u32,
}

/// The probe kernels.
pub struct Probe {
    /// source, destination.
    pub layout: wgpu::BindGroupLayout,
    /// Copies the source into the destination.
    pub copy: wgpu::ComputePipeline,
    /// Reads the source (the read bandwidth).
    pub read: wgpu::ComputePipeline,
    /// params, counters, rows.
    pub grid_layout: wgpu::BindGroupLayout,
    /// Workgroups meeting at device-wide barriers (grid.wgsl).
    pub grid: wgpu::ComputePipeline,
}

impl Probe {
    /// Compiles the probes.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("probe", &[Read, Write]);
        let m = t.module("copy", &[SRC]);
        let grid_layout = t.layout("grid probe", &[Uniform, Write, Write]);
        let g = t.module("grid", &[GRID_SRC]);
        Probe {
            copy: t.pipeline("probe_copy", &layout, &m, "probe_copy", &[]),
            read: t.pipeline("probe_read", &layout, &m, "probe_read", &[]),
            grid: t.pipeline("grid_barrier", &grid_layout, &g, "grid_barrier", &[]),
            layout,
            grid_layout,
        }
    }
}

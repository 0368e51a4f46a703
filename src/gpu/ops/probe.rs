//! Device probes (`bench --membw`): a copy and a read-only sum over large buffers (memory
//! bandwidth), and a device-wide barrier between co-resident workgroups (what a persistent
//! kernel's phases would cost against dependent dispatches), and the tensor cores' products
//! with and without their fragment loads (where the matmuls use them).

use super::{Target, Use::*};

const SRC: &str = include_str!("../../../shaders/copy.wgsl");
const GRID_SRC: &str = include_str!("../../../shaders/grid.wgsl");
const COOP_SRC: &str = include_str!("../../../shaders/coop_probe.wgsl");

/// Rounds of 16 products each subgroup of the tensor-core probe runs (`ITERS`).
pub const COOP_ITERS: u32 = 256;

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
    /// output.
    pub coop_layout: wgpu::BindGroupLayout,
    /// The tensor-core probe (coop_probe.wgsl) with and without fragment loads in its rounds,
    /// where the target's matmuls use tensor cores.
    pub coop: Option<[wgpu::ComputePipeline; 2]>,
}

impl Probe {
    /// Compiles the probes.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("probe", &[Read, Write]);
        let m = t.module("copy", &[SRC]);
        let grid_layout = t.layout("grid probe", &[Uniform, Write, Write]);
        let g = t.module("grid", &[GRID_SRC]);
        let coop_layout = t.layout("tensor-core probe", &[Write]);
        let coop = t.tensor_cores.then(|| {
            let m = t.module("coop_probe", &[super::matmul::COOP_ENABLE, COOP_SRC]);
            let iters = ("ITERS", COOP_ITERS as f64);
            [true, false].map(|loads| {
                let c = [("LOADS", loads as u8 as f64), iters];
                t.pipeline("coop_probe", &coop_layout, &m, "coop_probe", &c)
            })
        });
        Probe {
            copy: t.pipeline("probe_copy", &layout, &m, "probe_copy", &[]),
            read: t.pipeline("probe_read", &layout, &m, "probe_read", &[]),
            grid: t.pipeline("grid_barrier", &grid_layout, &g, "grid_barrier", &[]),
            layout,
            grid_layout,
            coop_layout,
            coop,
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// The tensor-core probe runs only where the matmuls use tensor cores (no CI adapter).
    #[test]
    fn tensor_core_probe_compiles_to_spirv() {
        let src = [crate::gpu::ops::matmul::COOP_ENABLE, COOP_SRC].concat();
        for loads in [0.0, 1.0] {
            let overrides = [("LOADS", loads), ("ITERS", COOP_ITERS as f64)];
            crate::gpu::ops::compiles_to_spirv(&src, "coop_probe", &overrides);
        }
    }
}

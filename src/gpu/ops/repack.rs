//! Ternary weights repacked on the device: the checkpoint-packed bytes are uploaded as they
//! are and a kernel writes the matmul layout (per row `kvec` vec4<u32>, 16 codes `w + 1` per
//! word, column `16 k + 4 s + b` at bits `8 b + 2 s` of word `k`, padding columns code 0;
//! see matmul_io.wgsl), so loading does no per-code work on the CPU.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*};
use crate::format::TernaryMatrix;
use crate::gpu::buffers::{bind_group, storage_upload, uniform};

const SRC: &str = include_str!("../../../shaders/repack.wgsl");

/// One repack dispatch (`RepackP` in repack.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct RepackP {
    /// Rows of the packed matrix.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// vec4<u32> per output row.
    pub kvec: u32,
    /// First output row of the matrix.
    pub row0: u32,
    /// First matrix row of the dispatch.
    pub rbase: u32,
    /// Padding to 32 bytes.
    pub pad: [u32; 3],
}

/// Rows one dispatch covers (the per-dimension workgroup limit).
const MAX_ROWS: usize = 65_535;

/// The repack kernel.
pub struct Repack {
    /// params, packed source, output words.
    pub layout: wgpu::BindGroupLayout,
    pipe: wgpu::ComputePipeline,
}

impl Repack {
    /// Compiles the kernel.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("repack", &[Uniform, Read, Write]);
        let m = t.module("repack", &[SRC]);
        let pipe = t.pipeline("repack", &layout, &m, "main", &[]);
        Repack { layout, pipe }
    }

    /// Records the repack of `m` into rows `row0..row0 + m.rows` of `dst` (`kvec` vec4 per
    /// row) on `enc`. The codes must have been checked (no code 3) on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        enc: &mut wgpu::CommandEncoder,
        m: &TernaryMatrix,
        kvec: usize,
        row0: usize,
        dst: &wgpu::Buffer,
    ) {
        let src = storage_upload(device, queue, &m.name, m.packed.as_slice());
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("repack"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipe);
        for rbase in (0..m.rows).step_by(MAX_ROWS) {
            let p = RepackP {
                rows: m.rows as u32,
                cols: m.cols as u32,
                kvec: kvec as u32,
                row0: row0 as u32,
                rbase: rbase as u32,
                pad: [0; 3],
            };
            let params = uniform(device, "repack", &p);
            let bg = bind_group(device, "repack", &self.layout, &[&params, &src, dst]);
            pass.set_bind_group(0, &bg, &[]);
            let rows = (m.rows - rbase).min(MAX_ROWS) as u32;
            pass.dispatch_workgroups((kvec * 4).div_ceil(64) as u32, rows, 1);
        }
    }
}

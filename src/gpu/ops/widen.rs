//! f16 copies of the matmul operands for the tensor-core GEMM (`ops::matmul`): each matrix's
//! ternary codes once at load, each batched step's int8 activations before the GEMM reads
//! them (widen.wgsl).

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON};
use crate::gpu::buffers::{bind_group, uniform};
use crate::gpu::recorder::Recorder;

const SRC: &str = include_str!("../../../shaders/widen.wgsl");

/// One widening (`WidenP` in widen.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct WidenP {
    /// Rows of a weight matrix (0 for activations: the step's tokens).
    pub rows: u32,
    /// Input u32 words per row.
    pub words: u32,
    /// First row of a weight dispatch.
    pub rbase: u32,
    /// Padding to 16 bytes.
    pub pad: u32,
}

/// Rows one weight dispatch covers (the per-dimension workgroup limit).
const MAX_ROWS: usize = 65_535;

/// The widening kernels.
pub struct Widen {
    /// params, step, source words, f16 pairs out.
    pub layout: wgpu::BindGroupLayout,
    weights: wgpu::ComputePipeline,
    acts: wgpu::ComputePipeline,
}

impl Widen {
    /// Compiles both kernels.
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("widen", &[Uniform, Uniform, Read, Write]);
        let m = t.module("widen", &[COMMON, SRC]);
        Widen {
            weights: t.pipeline("widen_weights", &layout, &m, "widen_weights", &[]),
            acts: t.pipeline("widen_acts", &layout, &m, "widen_acts", &[]),
            layout,
        }
    }

    /// Records on `enc` the f16 copy of a matmul-layout matrix `w` (`rows` × `kvec` vec4 of
    /// codes) into `dst` (`rows` × `kvec * 64` f16); `step` is any step uniform (unread).
    pub fn record_weights(
        &self,
        device: &wgpu::Device,
        enc: &mut wgpu::CommandEncoder,
        step: &wgpu::Buffer,
        (w, rows, kvec): (&wgpu::Buffer, usize, usize),
        dst: &wgpu::Buffer,
    ) {
        let words = kvec * 4;
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("widen_weights"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.weights);
        for rbase in (0..rows).step_by(MAX_ROWS) {
            let p = WidenP {
                rows: rows as u32,
                words: words as u32,
                rbase: rbase as u32,
                pad: 0,
            };
            let params = uniform(device, "widen", &p);
            let bg = bind_group(device, "widen", &self.layout, &[&params, step, w, dst]);
            pass.set_bind_group(0, &bg, &[]);
            let n = (rows - rbase).min(MAX_ROWS) as u32;
            pass.dispatch_workgroups(words.div_ceil(64) as u32, n, 1);
        }
    }

    /// The bind group that widens a step's int8 rows of `kvec * 64` columns in `xq` into
    /// `xh`.
    pub fn acts_bind_group(
        &self,
        device: &wgpu::Device,
        step: &wgpu::Buffer,
        kvec: usize,
        xq: &wgpu::Buffer,
        xh: &wgpu::Buffer,
    ) -> wgpu::BindGroup {
        let p = WidenP {
            words: (kvec * 16) as u32,
            ..Default::default()
        };
        let params = uniform(device, "widen", &p);
        bind_group(device, "widen_acts", &self.layout, &[&params, step, xq, xh])
    }

    /// Records the widening of a `t`-token step's rows of `kvec * 64` columns.
    pub fn record_acts(&self, rec: &mut Recorder, bg: &wgpu::BindGroup, kvec: usize, t: usize) {
        let dims = [(kvec * 16).div_ceil(64) as u32, t as u32, 1];
        rec.dispatch("widen_acts", &self.acts, bg, dims);
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::backend::KvDtype;
    use crate::gpu::buffers::{storage, storage_init};
    use crate::gpu::params::Step;
    use crate::gpu::GpuContext;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The f16 values of a buffer's first `n` halves.
    fn halves(ctx: &GpuContext, buf: &wgpu::Buffer, n: usize) -> Vec<f32> {
        let d = &ctx.device;
        let bytes = (n * 2).next_multiple_of(4) as u64;
        let read = d.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = d.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &read, 0, bytes);
        ctx.queue.submit([enc.finish()]);
        read.slice(..)
            .map_async(wgpu::MapMode::Read, |r| r.expect("map"));
        d.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
        let data = read.slice(..).get_mapped_range().expect("mapped");
        bytemuck::cast_slice::<u8, u16>(&data[..])[..n]
            .iter()
            .map(|&h| half::f16::from_bits(h).to_f32())
            .collect()
    }

    /// Weights in the matmul layout and int8 rows come out as their values in column order,
    /// on odd row counts and widths, and only the step's tokens are widened.
    #[test]
    fn widened_copies_hold_every_value_in_column_order() {
        let ctx = GpuContext::new(false, false).expect("a wgpu adapter");
        let d = &ctx.device;
        let target = Target {
            device: d,
            subgroup_size: None,
            tensor_cores: false,
            f32_head: false,
            kv: KvDtype::F32,
            head_dim: 64,
        };
        let widen = Widen::new(&target);
        let mut rng = StdRng::seed_from_u64(3);
        let (rows, kvec, t) = (37, 3, 5);
        let k = kvec * 64;
        // Weights: codes 0..=2 at column 16 j + 4 s + b -> bits 8 b + 2 s of word j.
        let codes: Vec<u32> = (0..rows * k).map(|_| rng.random_range(0..3)).collect();
        let words: Vec<u32> = (0..rows * kvec * 4)
            .map(|i| {
                let (r, j) = (i / (kvec * 4), i % (kvec * 4));
                (0..16).fold(0, |acc, c| {
                    acc | codes[r * k + 16 * j + c] << (8 * (c % 4) + 2 * (c / 4))
                })
            })
            .collect();
        let w = storage_init(d, "w", bytemuck::cast_slice(&words));
        let wh = storage(d, "wh", rows * k * 2);
        let step = Step {
            t: t as u32,
            ..Default::default()
        };
        let step = uniform(d, "step", &step);
        let mut enc = d.create_command_encoder(&Default::default());
        widen.record_weights(d, &mut enc, &step, (&w, rows, kvec), &wh);
        ctx.queue.submit([enc.finish()]);
        let want: Vec<f32> = codes.iter().map(|&c| c as f32 - 1.0).collect();
        assert_eq!(halves(&ctx, &wh, rows * k), want);

        // Activations: t + 2 rows of int8, of which the step's t are widened.
        let acts: Vec<i8> = (0..(t + 2) * k)
            .map(|_| rng.random_range(-128i32..=127) as i8)
            .collect();
        let xq = storage_init(d, "xq", bytemuck::cast_slice(&acts));
        let xh = storage(d, "xh", (t + 2) * k * 2);
        let bg = widen.acts_bind_group(d, &step, kvec, &xq, &xh);
        let mut rec = Recorder::new(d);
        widen.record_acts(&mut rec, &bg, kvec, t);
        rec.submit(&ctx.queue);
        let mut want: Vec<f32> = acts[..t * k].iter().map(|&x| x as f32).collect();
        want.resize((t + 2) * k, 0.0);
        assert_eq!(halves(&ctx, &xh, (t + 2) * k), want);
    }
}

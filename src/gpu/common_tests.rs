//! The helpers of `shaders/common.wgsl` run on the adapter and compared bit for bit with the
//! CPU's arithmetic.

use std::sync::mpsc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu::util::DeviceExt;

use super::ops::COMMON;
use super::GpuContext;

const KERNEL: &str = "
@group(0) @binding(0) var<storage, read> args: array<vec2<f32>>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if id.x < arrayLength(&out) {
        out[id.x] = div_exact(args[id.x].x, args[id.x].y);
    }
}
";

/// `div_exact(a, b)` for each pair, on the GPU.
fn gpu_div(pairs: &[[f32; 2]]) -> Vec<f32> {
    let ctx = GpuContext::new(false, false).expect("a wgpu adapter");
    let d = &ctx.device;
    let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("div_exact test"),
        source: wgpu::ShaderSource::Wgsl([COMMON, KERNEL].concat().into()),
    });
    let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("div_exact test"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let args = d.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(pairs),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let bytes = 4 * pairs.len() as u64;
    let out = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let read = d.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: args.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: out.as_entire_binding(),
            },
        ],
    });
    let mut enc = d.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(pairs.len().div_ceil(64) as u32, 1, 1);
    }
    enc.copy_buffer_to_buffer(&out, 0, &read, 0, bytes);
    ctx.queue.submit([enc.finish()]);
    let (tx, rx) = mpsc::channel();
    read.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    d.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
    rx.recv().expect("map callback").expect("map");
    let data = read.slice(..).get_mapped_range().expect("mapped");
    bytemuck::cast_slice::<u8, f32>(&data[..]).to_vec()
}

#[test]
fn div_exact_rounds_like_cpu_division() {
    let mut rng = StdRng::seed_from_u64(5);
    // The quantizer's divisions (127 / absmax, absmax / 127) over absmax's whole range, random
    // operands over many binades, equal significands, and the sign and zero cases.
    let mut pairs = Vec::new();
    for _ in 0..20_000 {
        let absmax = 10f32.powf(rng.random_range(-5.0..6.0));
        pairs.push([127.0, absmax]);
        pairs.push([absmax, 127.0]);
        let a = rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-20..20));
        let b = rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-20..20));
        // div_exact's domain: normal operands with a normal quotient.
        if a.is_normal() && b.is_normal() && (a / b).is_normal() {
            pairs.push([a, b]);
        }
    }
    for (a, b) in [
        (1.0, 1.0),
        (3.0, 3.0),
        (-6.0, 3.0),
        (0.0, 7.0),
        (-0.0, 7.0),
        (1.0, 3.0),
    ] {
        pairs.push([a, b]);
    }
    let got = gpu_div(&pairs);
    let wrong: Vec<_> = pairs
        .iter()
        .zip(&got)
        .filter(|([a, b], g)| (a / b).to_bits() != g.to_bits())
        .take(5)
        .map(|([a, b], g)| format!("{a:e} / {b:e}: {g:e}, cpu {:e}", a / b))
        .collect();
    assert!(wrong.is_empty(), "div_exact differs from CPU: {wrong:?}");
}

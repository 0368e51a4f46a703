//! The device's memory bandwidth and the ternary GEMV's share of it
//! (`bitnet bench --backend gpu --membw`).
//!
//! Copy and read-only kernels stream a buffer far larger than the GPU's caches; the GEMV
//! figures run the decode GEMV kernel over every layer's four matrices (all of a step's ternary
//! weights) with no other kernel in between: once as in a decode step, where each dispatch
//! waits for the previous one (they share an output buffer), and once with an output buffer
//! per matrix, so the GPU may overlap them. Times are GPU timestamps around one compute pass
//! when the device has them, else the wall time of a submit.

use super::buffers::{bind_group, storage, uniform};
use super::ops::matmul::MatP;
use super::GpuBackend;

/// Bytes each probe streams (capped by the device's largest binding): just under 1 GiB, the
/// most one dispatch of 16 KiB workgroups covers (65,535 in a dimension).
const PROBE_BYTES: u64 = 65_535 * 16_384;

/// What [`GpuBackend::bandwidth`] measured (best of the repeats), in bytes per second.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Bandwidth {
    /// Bytes read plus bytes written per second by the copy kernel.
    pub copy: f64,
    /// Bytes read per second by the read-only kernel.
    pub read: f64,
    /// Ternary weight bytes per second of the GEMVs run back to back as a decode step orders
    /// them (each waits for the previous).
    pub gemv_serial: f64,
    /// The same dispatches with an output buffer each (no waits between them).
    pub gemv_independent: f64,
    /// Ternary weight bytes the GEMV runs read (all layers).
    pub gemv_bytes: u64,
    /// Whether the times are GPU timestamps (else host wall time).
    pub timestamps: bool,
}

/// GPU time of one compute pass (timestamps) or the wall time of its submit.
struct PassTimer {
    set: Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer, f64)>,
}

impl PassTimer {
    fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Self {
        let set = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| {
                let set = device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("bandwidth timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                });
                let resolve = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bandwidth resolve"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                let read = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bandwidth readback"),
                    size: 16,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                (
                    set,
                    resolve,
                    read,
                    queue.get_timestamp_period() as f64 * 1e-9,
                )
            });
        PassTimer { set }
    }

    /// Seconds `record` takes on the GPU.
    fn time(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>),
    ) -> f64 {
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bandwidth"),
                timestamp_writes: self.set.as_ref().map(|(set, ..)| {
                    wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: Some(0),
                        end_of_pass_write_index: Some(1),
                    }
                }),
            });
            record(&mut pass);
        }
        if let Some((set, resolve, read, _)) = &self.set {
            enc.resolve_query_set(set, 0..2, resolve, 0);
            enc.copy_buffer_to_buffer(resolve, 0, read, 0, 16);
        }
        let t0 = std::time::Instant::now();
        queue.submit([enc.finish()]);
        let _ = device.poll(wgpu::PollType::wait_indefinitely());
        let wall = t0.elapsed().as_secs_f64();
        let Some((_, _, read, period)) = &self.set else {
            return wall;
        };
        let slice = read.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        let _ = device.poll(wgpu::PollType::wait_indefinitely());
        let secs = match slice.get_mapped_range() {
            Ok(data) => {
                let ts: &[u64] = bytemuck::cast_slice(&data[..]);
                ts[1].saturating_sub(ts[0]) as f64 * period
            }
            Err(_) => wall,
        };
        read.unmap();
        secs
    }
}

impl GpuBackend {
    /// Measures copy and read bandwidth and the decode GEMV's weight bandwidth; each figure is
    /// the best of `repeats` runs.
    pub fn bandwidth(&mut self, repeats: usize) -> Bandwidth {
        self.flush();
        let device = self.ctx.device.clone();
        let queue = self.ctx.queue.clone();
        let timer = PassTimer::new(&device, &queue);
        let best = |f: &mut dyn FnMut() -> f64| {
            (0..repeats.max(1))
                .map(|_| f())
                .fold(f64::INFINITY, f64::min)
        };

        // Copy / read probes.
        let bytes = PROBE_BYTES.min(self.max_binding) / 16384 * 16384;
        let src = storage(&device, "probe src", bytes as usize);
        let dst = storage(&device, "probe dst", bytes as usize);
        let bg = bind_group(&device, "probe", &self.ops.probe.layout, &[&src, &dst]);
        let groups = (bytes / 16384) as u32;
        let probe = |pl: &wgpu::ComputePipeline| {
            best(&mut || {
                timer.time(&device, &queue, |pass| {
                    pass.set_pipeline(pl);
                    pass.set_bind_group(0, &bg, &[]);
                    pass.dispatch_workgroups(groups, 1, 1);
                })
            })
        };
        let copy = 2.0 * bytes as f64 / probe(&self.ops.probe.copy);
        let read = bytes as f64 / probe(&self.ops.probe.read);
        drop((src, dst));

        // The GEMV over every layer's matrices, for one token.
        self.step.t = 1;
        queue.write_buffer(&self.bufs.step, 0, bytemuck::bytes_of(&self.step));
        let rpw = super::ops::matmul::GEMV_ROWS_PER_WG;
        let mats: Vec<_> = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .collect();
        let gemv_bytes: u64 = mats.iter().map(|m| m.bytes).sum();
        let own: Vec<wgpu::BindGroup> = mats
            .iter()
            .map(|m| {
                let params = uniform(
                    &device,
                    "probe gemv",
                    &MatP {
                        rows: m.rows as u32,
                        kvec: m.kvec as u32,
                        ld: m.rows as u32,
                        ..Default::default()
                    },
                );
                let out = storage(&device, "probe gemv out", m.rows * 4);
                bind_group(
                    &device,
                    "probe gemv",
                    &self.ops.matmul.layout,
                    &[
                        &self.bufs.step,
                        &params,
                        &m.w,
                        &m.rs,
                        &self.bufs.xq,
                        &self.bufs.xs,
                        &out,
                        &self.bufs.part,
                    ],
                )
            })
            .collect();
        let gemv = &self.ops.matmul.gemv;
        let run = |independent: bool| {
            best(&mut || {
                timer.time(&device, &queue, |pass| {
                    pass.set_pipeline(gemv);
                    for (i, m) in mats.iter().enumerate() {
                        let bg = if independent { &own[i] } else { &m.bg };
                        pass.set_bind_group(0, bg, &[]);
                        pass.dispatch_workgroups(m.rows.div_ceil(rpw) as u32, 1, 1);
                    }
                })
            })
        };
        let gemv_serial = gemv_bytes as f64 / run(false);
        let gemv_independent = gemv_bytes as f64 / run(true);
        Bandwidth {
            copy,
            read,
            gemv_serial,
            gemv_independent,
            gemv_bytes,
            timestamps: timer.set.is_some(),
        }
    }
}

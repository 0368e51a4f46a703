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
use super::ops::probe::{GridP, COOP_ITERS};
use super::GpuBackend;

/// Bytes each probe streams (capped by the device's largest binding): just under 1 GiB, the
/// most one dispatch of 16 KiB workgroups covers (65,535 in a dimension).
const PROBE_BYTES: u64 = 65_535 * 16_384;

/// What [`GpuBackend::bandwidth`] measured (best of the repeats), in bytes per second.
#[derive(Debug, Clone, serde::Serialize)]
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
    /// Device-wide barriers between co-resident workgroups (None on software adapters and
    /// where no two workgroups were seen resident at once).
    pub grid: Option<GridBarrier>,
    /// The tensor cores' 16×16×16 f16 products (None where the matmuls do not use them).
    pub tensor: Option<TensorCores>,
}

/// What the tensor-core probe (coop_probe.wgsl) measured, in multiply-adds per second.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorCores {
    /// Products alone, each subgroup's fragments loaded once.
    pub mma: f64,
    /// Products with gemm_coop's fragment loads from workgroup memory before each round.
    pub load_mma: f64,
}

/// What the device-wide barrier probe (grid.wgsl) measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GridBarrier {
    /// The most workgroups (of 256 invocations) seen resident at once, of 8, 16, … 1024.
    pub workgroups: u32,
    /// (workgroups, seconds per barrier among them) for 64, 128, … up to `workgroups`.
    pub barrier_s: Vec<(u32, f64)>,
    /// Seconds per dependent dispatch of the same kernel without barriers, 128 workgroups
    /// each (or `workgroups` if fewer).
    pub dispatch_s: f64,
    /// Share of the words read after a barrier that did not hold what was written before it,
    /// rows re-read every other barrier (0: the barrier orders memory across workgroups).
    pub stale_reused: f64,
    /// The same share with every round's rows fresh (read once in the dispatch).
    pub stale_fresh: f64,
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
        let grid = self.grid_barrier(&timer, repeats);
        let tensor = self.tensor_cores(&timer, repeats);
        Bandwidth {
            copy,
            read,
            gemv_serial,
            gemv_independent,
            gemv_bytes,
            timestamps: timer.set.is_some(),
            grid,
            tensor,
        }
    }

    /// Finds how many workgroups are resident at once (doubling from 8 until one misses a
    /// barrier), then times barriers among 64, 128, … of them and dependent dispatches of the
    /// same kernel, and checks what reads after a barrier see.
    fn grid_barrier(&self, timer: &PassTimer, repeats: usize) -> Option<GridBarrier> {
        const MOST: u32 = 1024;
        const ROUNDS: u32 = 256;
        // Fresh rows: at most FRESH_MOST workgroups × FRESH_ROUNDS rounds of 1 KiB.
        const FRESH_MOST: u32 = 256;
        const FRESH_ROUNDS: u32 = 64;
        const DISPATCHES: u32 = 64;
        // Software adapters run workgroups in a thread pool; their barriers would be meaningless.
        if self.ctx.desc.is_cpu {
            return None;
        }
        let device = &self.ctx.device;
        let queue = &self.ctx.queue;
        let params = uniform(device, "grid params", &GridP::default());
        let sync = storage(device, "grid counters", 16);
        let words = (2 * MOST).max(FRESH_MOST * FRESH_ROUNDS) as usize * 256;
        let rows = storage(device, "grid rows", words * 4);
        let read = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("grid readback"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let bg = bind_group(
            device,
            "grid probe",
            &self.ops.probe.grid_layout,
            &[&params, &sync, &rows],
        );
        let pl = &self.ops.probe.grid;
        // One pass of `dispatches` dispatches of `n` workgroups, `rounds` barriers each.
        let run = |n: u32, rounds: u32, dispatches: u32, fresh: bool| {
            let p = GridP {
                n,
                rounds,
                spin: 1 << 18,
                fresh: fresh as u32,
            };
            queue.write_buffer(&params, 0, bytemuck::bytes_of(&p));
            queue.write_buffer(&sync, 0, &[0; 16]);
            timer.time(device, queue, |pass| {
                pass.set_pipeline(pl);
                pass.set_bind_group(0, &bg, &[]);
                for _ in 0..dispatches {
                    pass.dispatch_workgroups(n, 1, 1);
                }
            })
        };
        // [arrivals, timeouts, stale reads] of the last run.
        let counters = || -> Option<[u32; 3]> {
            let mut enc = device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&sync, 0, &read, 0, 16);
            queue.submit([enc.finish()]);
            let c = self.read_mapped(&read, 16, |d| {
                let w: &[u32] = bytemuck::cast_slice(d);
                [w[0], w[1], w[2]]
            });
            c.ok()
        };
        let mut resident = 0;
        let mut n = 8;
        while n <= MOST {
            run(n, 1, 1, false);
            match counters() {
                Some([_, 0, _]) => resident = n,
                _ => break,
            }
            n *= 2;
        }
        if resident == 0 {
            return None;
        }
        let best = |n: u32, rounds: u32, dispatches: u32| {
            (0..repeats.max(1))
                .map(|_| run(n, rounds, dispatches, false))
                .fold(f64::INFINITY, f64::min)
        };
        let mut barrier_s = Vec::new();
        let mut stale_reused = 0.0f64;
        for n in [64, 128, 256, 512, 1024]
            .into_iter()
            .filter(|&n| n <= resident)
        {
            let one = best(n, 0, 1);
            let barriers = best(n, ROUNDS, 1);
            let [_, timeouts, stale] = counters()?;
            if timeouts > 0 {
                break;
            }
            barrier_s.push((n, (barriers - one).max(0.0) / ROUNDS as f64));
            stale_reused = stale_reused.max(stale as f64 / (n as f64 * ROUNDS as f64 * 256.0));
        }
        let n = resident.min(128);
        let dispatch_s =
            (best(n, 0, DISPATCHES) - best(n, 0, 1)).max(0.0) / (DISPATCHES - 1) as f64;
        let n = resident.min(FRESH_MOST);
        run(n, FRESH_ROUNDS, 1, true);
        let [_, timeouts, stale] = counters()?;
        (timeouts == 0).then(|| GridBarrier {
            workgroups: resident,
            barrier_s,
            dispatch_s,
            stale_reused,
            stale_fresh: stale as f64 / (n as f64 * FRESH_ROUNDS as f64 * 256.0),
        })
    }

    /// Times the tensor-core probe with and without fragment loads in its rounds.
    fn tensor_cores(&self, timer: &PassTimer, repeats: usize) -> Option<TensorCores> {
        const WORKGROUPS: u32 = 1024;
        let [load_mma, mma] = self.ops.probe.coop.as_ref()?;
        let device = &self.ctx.device;
        let queue = &self.ctx.queue;
        let out = storage(device, "tensor probe out", WORKGROUPS as usize * 4096 * 4);
        let bg = bind_group(device, "tensor probe", &self.ops.probe.coop_layout, &[&out]);
        let macs = WORKGROUPS as f64 * 4.0 * COOP_ITERS as f64 * 16.0 * 4096.0;
        let rate = |pl: &wgpu::ComputePipeline| {
            let secs = (0..repeats.max(1))
                .map(|_| {
                    timer.time(device, queue, |pass| {
                        pass.set_pipeline(pl);
                        pass.set_bind_group(0, &bg, &[]);
                        pass.dispatch_workgroups(WORKGROUPS, 1, 1);
                    })
                })
                .fold(f64::INFINITY, f64::min);
            macs / secs
        };
        Some(TensorCores {
            mma: rate(mma),
            load_mma: rate(load_mma),
        })
    }
}

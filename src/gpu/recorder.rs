//! Recording a step: its dispatches into one command encoder (normally one compute pass),
//! with optional GPU timestamps around each dispatch.

/// Most timestamp queries of one submit (two per profiled dispatch).
const MAX_QUERIES: u32 = 4096;

/// GPU timestamps around each dispatch of a submit (profiling only): each dispatch then gets
/// its own compute pass with begin/end timestamp writes.
struct Profiler {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Nanoseconds per tick.
    period: f64,
    /// Labels of the current submit's timed dispatches.
    labels: Vec<&'static str>,
    /// (label, seconds, dispatches) accumulated since the last take.
    totals: Vec<(&'static str, f64, u64)>,
}

/// Records a step's dispatches into one command encoder and, normally, one compute pass.
pub struct Recorder {
    device: wgpu::Device,
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    prof: Option<Profiler>,
}

impl Recorder {
    /// A recorder for `device`.
    pub fn new(device: &wgpu::Device) -> Self {
        Recorder {
            device: device.clone(),
            encoder: None,
            pass: None,
            prof: None,
        }
    }

    /// Turns per-dispatch GPU timing on (when the device has `TIMESTAMP_QUERY`) or off.
    pub fn set_profiling(&mut self, on: bool, queue: &wgpu::Queue) {
        if !on {
            self.prof = None;
            return;
        }
        if self.prof.is_some()
            || !self
                .device
                .features()
                .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            return;
        }
        let bytes = MAX_QUERIES as u64 * 8;
        self.prof = Some(Profiler {
            set: self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: MAX_QUERIES,
            }),
            resolve: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period: queue.get_timestamp_period() as f64,
            labels: Vec::new(),
            totals: Vec::new(),
        });
    }

    /// Whether GPU timing is on.
    pub fn profiling(&self) -> bool {
        self.prof.is_some()
    }

    /// The accumulated (kernel, seconds, dispatches) since the last call; None when off.
    pub fn take_profile(&mut self) -> Option<Vec<(&'static str, f64, u64)>> {
        self.prof.as_mut().map(|p| std::mem::take(&mut p.totals))
    }

    /// Drops unsubmitted work.
    pub fn discard(&mut self) {
        self.pass = None;
        self.encoder = None;
        if let Some(p) = &mut self.prof {
            p.labels.clear();
        }
    }

    /// The encoder, outside any compute pass (for copies).
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        let device = &self.device;
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            })
        })
    }

    /// Records one dispatch of `pipeline` with `bg` as group 0.
    pub fn dispatch(
        &mut self,
        label: &'static str,
        pipeline: &wgpu::ComputePipeline,
        bg: &wgpu::BindGroup,
        dims: [u32; 3],
    ) {
        if dims.contains(&0) {
            return;
        }
        let timed = self
            .prof
            .as_ref()
            .is_some_and(|p| (p.labels.len() as u32) < MAX_QUERIES / 2);
        if timed || self.pass.is_none() {
            self.pass = None;
            let tw = if timed {
                let p = self.prof.as_mut().unwrap();
                let i = p.labels.len() as u32;
                p.labels.push(label);
                Some((p.set.clone(), i))
            } else {
                None
            };
            let enc = self.encoder();
            let pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(if timed { label } else { "step" }),
                timestamp_writes: tw
                    .as_ref()
                    .map(|(set, i)| wgpu::ComputePassTimestampWrites {
                        query_set: set,
                        beginning_of_pass_write_index: Some(2 * i),
                        end_of_pass_write_index: Some(2 * i + 1),
                    }),
            });
            self.pass = Some(pass.forget_lifetime());
        }
        let pass = self.pass.as_mut().unwrap();
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bg, &[]);
        pass.dispatch_workgroups(dims[0], dims[1], dims[2]);
        if timed {
            self.pass = None;
        }
    }

    /// Submits the recorded work (if any) and returns its submission; with profiling, waits
    /// for it and adds its timings.
    pub fn submit(&mut self, queue: &wgpu::Queue) -> Option<wgpu::SubmissionIndex> {
        self.pass = None;
        let mut enc = self.encoder.take()?;
        let n = self.prof.as_ref().map_or(0, |p| p.labels.len() as u32);
        if n > 0 {
            let p = self.prof.as_ref().unwrap();
            enc.resolve_query_set(&p.set, 0..2 * n, &p.resolve, 0);
            enc.copy_buffer_to_buffer(&p.resolve, 0, &p.readback, 0, 16 * n as u64);
        }
        let index = queue.submit([enc.finish()]);
        if n == 0 {
            return Some(index);
        }
        let p = self.prof.as_mut().unwrap();
        let slice = p.readback.slice(0..16 * n as u64);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        if let Ok(data) = slice.get_mapped_range() {
            let ts: &[u64] = bytemuck::cast_slice(&data[..]);
            for (i, label) in p.labels.iter().enumerate() {
                let dt = ts[2 * i + 1].saturating_sub(ts[2 * i]) as f64 * p.period * 1e-9;
                match p.totals.iter_mut().find(|e| e.0 == *label) {
                    Some(e) => {
                        e.1 += dt;
                        e.2 += 1;
                    }
                    None => p.totals.push((label, dt, 1)),
                }
            }
        }
        p.readback.unmap();
        p.labels.clear();
        Some(index)
    }
}

//! One launcher per shader: each records one compute pass into the step's encoder.

use super::pipelines::Pipelines;

/// Steps of up to this many tokens (batched decode rows) take the 4-token GEMV instead of
/// the 64 x 64 tiled GEMM: every workgroup splits K over its lanes, so a small step is not
/// bound by one tile's walk over all of K.
pub const GEMV4_MAX_T: usize = 64;

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

/// Embedding gather of `t` tokens from one shard (`cols` = hidden size).
pub fn embed(enc: &mut Recorder, p: &Pipelines, bg: &wgpu::BindGroup, cols: usize, t: usize) {
    enc.dispatch(
        "embed",
        &p.embed,
        bg,
        [cols.div_ceil(64) as u32, t as u32, 1],
    );
}

/// Which norm kernel variant.
#[derive(Clone, Copy)]
pub enum NormKind {
    /// RMSNorm → int8.
    Quant,
    /// relu²(gate)·up → RMSNorm → int8.
    Relu2Quant,
    /// RMSNorm → f32.
    F32,
}

/// Fused norm (+ quant) of `t` rows.
pub fn norm(enc: &mut Recorder, p: &Pipelines, kind: NormKind, bg: &wgpu::BindGroup, t: usize) {
    let (label, pl) = match kind {
        NormKind::Quant => ("norm_quant", &p.norm_quant),
        NormKind::Relu2Quant => ("relu2_norm_quant", &p.norm_relu2),
        NormKind::F32 => ("final_norm", &p.norm_f32),
    };
    enc.dispatch(label, pl, bg, [t as u32, 1, 1]);
}

/// Ternary matmul of `t` rows by a `rows`-row matrix: GEMV for one token, the 4-token GEMV for
/// small steps, tiled GEMM otherwise.
/// `label` names the matrix in profiles.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    enc: &mut Recorder,
    p: &Pipelines,
    label: &'static str,
    bg: &wgpu::BindGroup,
    rows: usize,
    t: usize,
    accumulate: bool,
) {
    let rpw = p.gemv_rows_per_wg() as usize;
    if t == 1 {
        let pl = if accumulate { &p.gemv_acc } else { &p.gemv };
        enc.dispatch(label, pl, bg, [rows.div_ceil(rpw) as u32, 1, 1]);
    } else if t <= GEMV4_MAX_T {
        let pl = if accumulate { &p.gemv4_acc } else { &p.gemv4 };
        let dims = [rows.div_ceil(rpw) as u32, t.div_ceil(4) as u32, 1];
        let label = match label {
            "matmul_qkv" => "gemv4_qkv",
            "matmul_o" => "gemv4_o",
            "matmul_gate_up" => "gemv4_gate_up",
            "matmul_down" => "gemv4_down",
            other => other,
        };
        enc.dispatch(label, pl, bg, dims);
    } else {
        let pl = if accumulate { &p.gemm_acc } else { &p.gemm };
        enc.dispatch(
            label,
            pl,
            bg,
            [rows.div_ceil(64) as u32, t.div_ceil(64) as u32, 1],
        );
    }
}

/// A fused norm + GEMV (`pl` one of the `gemv_norm*` pipelines) producing `rows` rows for
/// one token.
pub fn gemv_fused(
    enc: &mut Recorder,
    label: &'static str,
    pl: &wgpu::ComputePipeline,
    bg: &wgpu::BindGroup,
    rows: usize,
) {
    let wgs = rows.div_ceil(super::pipelines::FUSED_ROWS as usize);
    enc.dispatch(label, pl, bg, [wgs as u32, 1, 1]);
}

/// RoPE of `heads` (q + kv) heads of `t` rows, and the KV write.
pub fn rope(enc: &mut Recorder, p: &Pipelines, bg: &wgpu::BindGroup, heads: usize, t: usize) {
    enc.dispatch("rope", &p.rope, bg, [heads as u32, t as u32, 1]);
}

/// Split attention of `t` rows over `nsplit` splits, then the merge. One decode row with
/// `head_dim % 4 == 0` (<= 128) takes the vec4 kernel, which writes the output itself when
/// there is one split.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    enc: &mut Recorder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    nsplit: usize,
    heads: usize,
    t: usize,
    head_dim: usize,
) {
    let dims = [nsplit as u32, heads as u32, t as u32];
    if t == 1 && head_dim.is_multiple_of(4) && head_dim <= 128 {
        enc.dispatch("attend_vec", &p.attend_vec, bg, dims);
        if nsplit == 1 {
            return;
        }
    } else {
        enc.dispatch("attend", &p.attend, bg, dims);
    }
    enc.dispatch("combine", &p.combine, bg, [heads as u32, t as u32, 1]);
}

/// RoPE of `heads` (q + kv) heads of `t` rows of different sequences, and their KV write into
/// the paged pool.
pub fn paged_rope(enc: &mut Recorder, p: &Pipelines, bg: &wgpu::BindGroup, heads: usize, t: usize) {
    enc.dispatch("paged_rope", &p.paged_rope, bg, [heads as u32, t as u32, 1]);
}

/// Attention of `t` rows of different sequences over the paged pool.
pub fn paged_attention(
    enc: &mut Recorder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    heads: usize,
    t: usize,
) {
    enc.dispatch(
        "paged_attend",
        &p.paged_attend,
        bg,
        [heads as u32, t as u32, 1],
    );
}

/// Whether the query-tiled prefill attention handles this head shape.
pub fn tiled_attention_fits(head_dim: usize, group: usize) -> bool {
    head_dim.is_multiple_of(4) && head_dim <= 128 && (1..=16).contains(&group)
}

/// Prefill attention of `t` rows tiled over queries: one workgroup per (token block, KV head,
/// split), then the merge when there are several splits.
pub fn attention_tiled(
    enc: &mut Recorder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    kv_heads: usize,
    group: usize,
    nsplit: usize,
    t: usize,
) {
    let tq = (16 / group).max(1);
    enc.dispatch(
        "attend_tiled",
        &p.attend_tiled,
        bg,
        [t.div_ceil(tq) as u32, kv_heads as u32, nsplit as u32],
    );
    if nsplit > 1 {
        let heads = kv_heads * group;
        enc.dispatch("combine", &p.combine, bg, [heads as u32, t as u32, 1]);
    }
}

/// The head (float, or `int8`) over one shard of `rows` vocabulary rows for `nrows` step rows.
pub fn head(
    enc: &mut Recorder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    rows: usize,
    nrows: usize,
    int8: bool,
) {
    let rpw = p.rows_per_wg() as usize;
    let (label, pl) = if int8 {
        ("head_i8", &p.head_i8)
    } else {
        ("head", &p.head)
    };
    enc.dispatch(label, pl, bg, [nrows as u32, rows.div_ceil(rpw) as u32, 1]);
}

/// Argmax of logits row 0 into the result word.
pub fn argmax(enc: &mut Recorder, p: &Pipelines, bg: &wgpu::BindGroup, vocab: usize) {
    enc.dispatch(
        "argmax",
        &p.argmax_partial,
        bg,
        [argmax_parts(vocab) as u32, 1, 1],
    );
    enc.dispatch("argmax_final", &p.argmax_final, bg, [1, 1, 1]);
}

/// Entries one top-k workgroup sorts (`TK_CHUNK` in topk.wgsl).
pub const TOPK_CHUNK: usize = 1024;

/// Largest k the GPU selects (each pass keeps k of every chunk: at least 8× fewer).
pub const TOPK_MAX: usize = TOPK_CHUNK / 8;

/// Passes the top-k of `vocab` logits may take (one per 8× reduction).
pub const TOPK_PASSES: usize = 8;

/// One top-k pass over `n` entries (`first`: the logits), `ceil(n / TOPK_CHUNK)` workgroups.
pub fn topk(enc: &mut Recorder, p: &Pipelines, bg: &wgpu::BindGroup, first: bool, n: usize) {
    let (label, pl) = if first {
        ("topk", &p.topk_first)
    } else {
        ("topk_merge", &p.topk_merge)
    };
    enc.dispatch(label, pl, bg, [n.div_ceil(TOPK_CHUNK) as u32, 1, 1]);
}

/// Partial results of the argmax over `vocab` logits.
pub fn argmax_parts(vocab: usize) -> usize {
    vocab.div_ceil(4096)
}

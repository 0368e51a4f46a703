//! Loading the GPU backend: weights repacked and uploaded, pipelines compiled, every bind
//! group of the model built once.

use super::ops::matmul::MatP;
use super::ops::{argmax::ArgP, gemv_fused::FusedP, norm::NormP};
use super::ops::{rope::RopeP, topk::TopkP};
use super::params::Step;
use super::*;
use crate::arch::{LLAMA_BITNET, LLAMA_BITNET_LINEAR_NORMS, ONEBIT_LLM};
use crate::format::NORMED_PARTS;
use crate::format::{Bytes, FloatTensor, TernaryMatrix};
use std::borrow::Cow;
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// The fused matrix of `parts` (stacked by rows) in the matmul layout, with its bind group
/// writing into `out`. The checkpoint-packed codes are checked on the host (no code 3) and
/// repacked by the device ([`ops::repack`]), recorded on `enc`.
#[allow(clippy::too_many_arguments)]
fn mat(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    enc: &mut wgpu::CommandEncoder,
    p: &Ops,
    b: &Bufs,
    parts: &[&TernaryMatrix],
    out: &wgpu::Buffer,
    name: &str,
) -> Result<Mat> {
    let cols = parts[0].cols;
    if parts.iter().any(|m| m.cols != cols) {
        return Err(Error::Backend("fused matrices differ in columns".into()));
    }
    let kvec = pad64(cols) / 64;
    let rows: usize = parts.iter().map(|m| m.rows).sum();
    let w = storage(device, name, rows * kvec * 16);
    let mut row0 = 0;
    for m in parts {
        if m.packed.as_slice().len() != m.rows / 4 * cols {
            return Err(Error::Backend(format!(
                "{}: {} packed bytes for {} x {cols} codes",
                m.name,
                m.packed.as_slice().len(),
                m.rows
            )));
        }
        crate::quant::check_codes(m)?;
        p.repack.record(device, queue, enc, m, kvec, row0, &w);
        row0 += m.rows;
    }
    let row_scale: Vec<f32> = parts
        .iter()
        .flat_map(|m| std::iter::repeat_n(m.scale, m.rows))
        .collect();
    let rs = storage_init(device, name, bytemuck::cast_slice(&row_scale));
    let params = uniform(
        device,
        name,
        &MatP {
            rows: rows as u32,
            kvec: kvec as u32,
            ld: rows as u32,
            ..Default::default()
        },
    );
    let bg = bind_group(
        device,
        name,
        &p.matmul.layout,
        &[&b.step, &params, &w, &rs, &b.xq, &b.xs, out, &b.part],
    );
    Ok(Mat {
        rows,
        kvec,
        bytes: (rows * kvec * 16) as u64,
        w,
        rs,
        bg,
    })
}

impl GpuBackend {
    /// Repacks and uploads `w`, compiles the kernels and builds every bind group.
    pub fn load(w: &Weights, opts: &GpuOptions) -> Result<Self> {
        Self::with_context(
            GpuContext::on_adapter(opts.adapter, opts.subgroups, opts.tensor_cores)?,
            w,
            opts,
        )
    }

    /// [`Self::load`] on a device already created (e.g. asynchronously, in a browser).
    pub fn with_context(ctx: GpuContext, w: &Weights, opts: &GpuOptions) -> Result<Self> {
        let cfg = w.config.clone();
        cfg.validate()?;
        let mut phases = crate::time::Phases::new();
        let ops_of = layer_ops(&cfg);
        if ![
            BITNET_B158,
            LLAMA_BITNET,
            LLAMA_BITNET_LINEAR_NORMS,
            ONEBIT_LLM,
        ]
        .contains(&ops_of)
        {
            return Err(Error::Backend(
                "the GPU backend runs the BitNet b1.58, Llama-BitNet and 1bitLLM layers only"
                    .into(),
            ));
        }
        if opts.kv == crate::backend::KvDtype::Int8 && !cfg.head_dim.is_multiple_of(4) {
            return Err(Error::Backend(format!(
                "the GPU's int8 KV cache needs head_dim % 4 == 0 (head_dim {})",
                cfg.head_dim
            )));
        }
        if cfg.head_dim > 256 {
            return Err(Error::Backend(format!(
                "head_dim {} > 256 is not supported by the GPU attention kernel",
                cfg.head_dim
            )));
        }
        let max_step = opts.max_step.max(1);
        let device = &ctx.device;
        let max_binding = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        let shard_bytes = opts
            .max_binding_bytes
            .map_or(max_binding, |m| m.min(max_binding));
        // The embedding and head share one float class on the device (bf16 pairs or f32):
        // a file that stores them differently (GGUF) gets its bf16 one widened.
        let mixed = (w.embed.dtype == FloatDtype::BF16) != (w.head().dtype == FloatDtype::BF16);
        let (embed_t, head_t) = (stored(&w.embed, mixed), stored(w.head(), mixed));
        let (embed_t, head_t) = (embed_t.as_ref(), head_t.as_ref());
        let f32_head = head_t.dtype != FloatDtype::BF16;
        let fused_widths = [cfg.hidden_size.max(cfg.q_dim()), cfg.intermediate_size];
        // The head's input (final-normed rows) is at most sqrt(hidden) × the largest gamma in
        // magnitude: below 2^15 it fits the tensor-core head's f16 split.
        let gamma = w.final_norm.iter().fold(0f32, |m, g| m.max(g.abs()));
        let head_input_fits_f16 = gamma * (cfg.hidden_size as f32).sqrt() < 32768.0;
        let target = ops::Target {
            device,
            subgroup_size: ctx.desc.subgroup_size,
            tensor_cores: ctx.desc.tensor_cores,
            tensor_core_head: ctx.desc.tensor_cores && !f32_head && head_input_fits_f16,
            f32_head,
            kv: opts.kv,
            head_dim: cfg.head_dim,
        };
        let ops = Ops::new(&target, fused_widths);
        phases.mark("gpu pipelines");

        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let hp = pad8(h);
        let kpmax = pad64(h).max(pad64(q)).max(pad64(i));
        let vocab = cfg.vocab_size;
        let logit_rows = ((64usize << 20) / (vocab * 4))
            .min(max_binding as usize / (vocab * 4))
            .clamp(1, max_step);
        let f = 4usize;
        let bufs = Bufs {
            // Also storage: `accept.wgsl`'s fix-up moves a queued step's position.
            step: device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("step"),
                contents: bytemuck::bytes_of(&Step::default()),
                usage: wgpu::BufferUsages::UNIFORM
                    | wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST,
            }),
            rejected: storage(device, "rejected drafts", 4),
            tokens: storage(device, "tokens", max_step * 4),
            x: storage(device, "x", max_step * h * f),
            xq: storage(device, "xq", max_step * kpmax),
            xs: storage(device, "xscale", max_step * f),
            part: storage(device, "split-K sums", ops::matmul::PART_BYTES),
            qkv: storage(device, "qkv", max_step * (q + 2 * kv) * f),
            attn: storage(device, "attn", max_step * q * f),
            gu: storage(device, "gate_up", max_step * 2 * i * f),
            hn: storage(device, "final_normed", max_step * hp * f),
            logits: storage(device, "logits", logit_rows * vocab * f),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: (logit_rows * vocab * f) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            argmax_part: storage(
                device,
                "argmax partials",
                ops::argmax::parts(vocab) * logit_rows * 8,
            ),
            argmax_result: storage(device, "argmax", logit_rows * 4),
            argmax_ring: [0, 1, 2].map(|_| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("queued argmax readback"),
                    size: (logit_rows * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }),
            topk: [0, 1].map(|_| {
                storage(
                    device,
                    "topk candidates",
                    logit_rows * vocab.div_ceil(ops::topk::CHUNK) * ops::topk::MAX_K * 8,
                )
            }),
            topk_sel: storage(device, "topk rows", logit_rows * 8),
            topk_readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("topk readback"),
                size: (logit_rows * ops::topk::MAX_K * 8) as u64,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            argmax_readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("argmax readback"),
                size: (max_step * 4).div_ceil(16) as u64 * 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            rope_params: uniform(
                device,
                "rope",
                &RopeP {
                    hd: cfg.head_dim as u32,
                    nh: cfg.num_heads as u32,
                    stride: (q + 2 * kv) as u32,
                    kv_dim: kv as u32,
                },
            ),
        };
        for (name, bytes) in [
            ("x", max_step * h * f),
            ("gate_up", max_step * 2 * i * f),
            ("qkv", max_step * (q + 2 * kv) * f),
        ] {
            if bytes as u64 > max_binding {
                return Err(Error::Backend(format!(
                    "activation buffer {name} ({bytes} bytes for {max_step} tokens) exceeds the \
                     binding limit {max_binding}: lower max_step"
                )));
            }
        }

        let (eps, sub_eps) = (cfg.rms_norm_eps, cfg.sub_norm_eps());
        let norm_p = |name: &str, width: usize, src_stride: usize, out_words: usize, eps| {
            let p = NormP {
                width: width as u32,
                src_stride: src_stride as u32,
                out_words: out_words as u32,
                eps,
            };
            uniform(device, name, &p)
        };
        let norm_h = norm_p("norm_h", h, h, pad64(h) / 4, eps);
        let norm_q = norm_p("norm_q", q, q, pad64(q) / 4, sub_eps);
        let norm_i = norm_p("norm_i", i, 2 * i, pad64(i) / 4, sub_eps);
        let norm_f = norm_p("norm_final", h, h, hp, eps);
        // use_rms_norm: a linear's own norm over the layer norm's f32 rows (in `hn`).
        let norm_part = norm_p("norm_part", h, hp, pad64(h) / 4, sub_eps);
        // A layer without a sub-norm binds a one-element placeholder its kernel never reads.
        let gamma = |name: &str, v: &[f32]| {
            let v = if v.is_empty() { &[0.0][..] } else { v };
            storage_init(device, name, bytemuck::cast_slice(v))
        };
        let nbg = |name: &str,
                   params: &wgpu::Buffer,
                   src: &wgpu::Buffer,
                   g: &wgpu::Buffer,
                   out: &wgpu::Buffer| {
            bind_group(
                device,
                name,
                &ops.norm.layout,
                &[&bufs.step, params, src, g, out, &bufs.xs],
            )
        };

        let hd = cfg.head_dim;
        // The fused decode GEMVs implement the BitNet b1.58 layer (sub-norms, relu²).
        let fused = opts.fused
            && ops_of == BITNET_B158
            && [h, q, i]
                .iter()
                .all(|&n| pad64(n) <= FUSED_MAX_WIDTH && n.is_multiple_of(4))
            && hd.is_multiple_of(2);
        // Fused GEMV parameters: rows, kvec, ld, width, src_stride, eps, q, kv, hd.
        let fparams = |name: &str, m: &Mat, width: usize, src_stride: usize| {
            uniform(
                device,
                name,
                &FusedP::new(&cfg, (m.rows, m.kvec), width, src_stride),
            )
        };
        let fbg = |name: &str,
                   params: &wgpu::Buffer,
                   m: &Mat,
                   src: &wgpu::Buffer,
                   g: &wgpu::Buffer,
                   out: &wgpu::Buffer| {
            bind_group(
                device,
                name,
                &ops.fused.layout,
                &[&bufs.step, params, &m.w, &m.rs, src, g, out],
            )
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for (li, l) in w.layers.iter().enumerate() {
            let n = |s: &str| format!("layer {li} {s}");
            let g_in = gamma(&n("input_norm"), &l.input_norm);
            let g_post = gamma(&n("post_norm"), &l.post_attention_norm);
            let g_attn = gamma(&n("attn_sub_norm"), &l.attn_sub_norm);
            let g_ffn = gamma(&n("ffn_sub_norm"), &l.ffn_sub_norm);
            // One submit per layer: its packed uploads are freed as the repacks finish.
            let mut enc = device.create_command_encoder(&Default::default());
            let mut matrix = |parts: &[&TernaryMatrix], out, name: &str| {
                mat(device, &ctx.queue, &mut enc, &ops, &bufs, parts, out, name)
            };
            let qkv = matrix(&[&l.q, &l.k, &l.v], &bufs.qkv, &n("qkv"))?;
            let o = matrix(&[&l.o], &bufs.x, &n("o"))?;
            let gate_up = matrix(&[&l.gate, &l.up], &bufs.gu, &n("gate_up"))?;
            let down = matrix(&[&l.down], &bufs.x, &n("down"))?;
            ctx.queue.submit([enc.finish()]);
            let fused = fused.then(|| FusedLayer {
                o: fbg(
                    &n("fused o"),
                    &fparams(&n("fused o"), &o, q, q),
                    &o,
                    &bufs.attn,
                    &g_attn,
                    &bufs.x,
                ),
                gate_up: fbg(
                    &n("fused gate_up"),
                    &fparams(&n("fused gate_up"), &gate_up, h, h),
                    &gate_up,
                    &bufs.x,
                    &g_post,
                    &bufs.gu,
                ),
                down: fbg(
                    &n("fused down"),
                    &fparams(&n("fused down"), &down, i, 2 * i),
                    &down,
                    &bufs.gu,
                    &g_ffn,
                    &bufs.x,
                ),
            });
            let linear_norms = (ops_of == LLAMA_BITNET_LINEAR_NORMS).then(|| {
                let part = |(linear, name): &(Linear, &str), own: &Vec<f32>| {
                    let (m, out, row0, rows) = match linear {
                        Linear::Q => (&qkv, &bufs.qkv, 0, q),
                        Linear::K => (&qkv, &bufs.qkv, q, kv),
                        Linear::V => (&qkv, &bufs.qkv, q + kv, kv),
                        Linear::Gate => (&gate_up, &bufs.gu, 0, i),
                        _ => (&gate_up, &bufs.gu, i, i),
                    };
                    let params = uniform(
                        device,
                        &n(name),
                        &MatP {
                            rows: rows as u32,
                            kvec: m.kvec as u32,
                            ld: m.rows as u32,
                            row0: row0 as u32,
                            ..Default::default()
                        },
                    );
                    let g = gamma(&n(&format!("{name} norm")), own);
                    LinearPart {
                        linear: *linear,
                        rows,
                        kvec: m.kvec,
                        norm: nbg(&n(name), &norm_part, &bufs.hn, &g, &bufs.xq),
                        matmul: bind_group(
                            device,
                            &n(name),
                            &ops.matmul.layout,
                            &[
                                &bufs.step, &params, &m.w, &m.rs, &bufs.xq, &bufs.xs, out,
                                &bufs.part,
                            ],
                        ),
                    }
                };
                LinearNorms {
                    first: [
                        nbg(&n("input_norm f32"), &norm_f, &bufs.x, &g_in, &bufs.hn),
                        nbg(&n("post_norm f32"), &norm_f, &bufs.x, &g_post, &bufs.hn),
                    ],
                    parts: NORMED_PARTS
                        .iter()
                        .zip(&l.linear_norms)
                        .map(|(p, own)| part(p, own))
                        .collect(),
                }
            });
            layers.push(GpuLayer {
                norm_input: nbg(&n("input_norm"), &norm_h, &bufs.x, &g_in, &bufs.xq),
                norm_post: nbg(&n("post_norm"), &norm_h, &bufs.x, &g_post, &bufs.xq),
                norm_attn: nbg(&n("attn_sub_norm"), &norm_q, &bufs.attn, &g_attn, &bufs.xq),
                norm_ffn: nbg(&n("ffn_sub_norm"), &norm_i, &bufs.gu, &g_ffn, &bufs.xq),
                input_gamma: g_in,
                qkv,
                o,
                gate_up,
                down,
                fused,
                linear_norms,
            });
        }
        phases.mark("gpu layers (upload + repack recorded)");
        let g_final = gamma("final_norm", &w.final_norm);
        let final_norm_bg = nbg("final_norm", &norm_f, &bufs.x, &g_final, &bufs.hn);
        let final_norm_q_bg = (opts.head == HeadMode::Int8)
            .then(|| nbg("final_norm_q", &norm_h, &bufs.x, &g_final, &bufs.xq));

        let argmax_params = uniform(
            device,
            "argmax",
            &ArgP {
                n: vocab as u32,
                parts: ops::argmax::parts(vocab) as u32,
                ..Default::default()
            },
        );
        let argmax_bg = bind_group(
            device,
            "argmax",
            &ops.argmax.layout,
            &[
                &argmax_params,
                &bufs.logits,
                &bufs.argmax_part,
                &bufs.argmax_result,
            ],
        );
        let accept_bg = bind_group(
            device,
            "accept",
            &ops.accept.layout,
            &[
                &bufs.step,
                &bufs.tokens,
                &bufs.argmax_result,
                &bufs.rejected,
            ],
        );
        let topk_passes = (0..ops::topk::PASSES)
            .map(|i| {
                let params = uniform(device, "topk", &TopkP::default());
                let (src, dst) = (&bufs.topk[(i + 1) % 2], &bufs.topk[i % 2]);
                let bg = bind_group(
                    device,
                    "topk",
                    &ops.topk.layout,
                    &[&params, &bufs.logits, src, dst, &bufs.topk_sel],
                );
                (params, bg)
            })
            .collect();
        let embed_bg = |s: &Shard| {
            bind_group(
                device,
                "embed",
                &ops.embed.layout,
                &[&bufs.step, &s.uni, &bufs.tokens, &s.buf, &bufs.x],
            )
        };
        let head_bg = |s: &Shard| {
            bind_group(
                device,
                "head",
                &ops.head.layout,
                &[&bufs.step, &s.uni, &s.buf, &bufs.hn, &bufs.logits],
            )
        };
        let make = |s: Shard, bg: &dyn Fn(&Shard) -> wgpu::BindGroup| {
            let g = bg(&s);
            (s, g)
        };
        let f16_scale = target.tensor_core_head;
        let tied = w.lm_head.is_none();
        let embed_raw =
            buffers::upload_shards(device, &ctx.queue, embed_t, shard_bytes, f16_scale && tied)?;
        let int8_head = opts.head == HeadMode::Int8;
        let head_bytes = if int8_head {
            (head_t.rows * (pad64(head_t.cols) + 4)) as u64
        } else {
            (head_t.rows * buffers::head_row_words(head_t) * 4) as u64
        };
        let head_shards: Vec<_> = if int8_head {
            buffers::upload_i8_shards(device, &ctx.queue, head_t, shard_bytes)?
                .into_iter()
                .map(|(s, scales)| {
                    let bg = bind_group(
                        device,
                        "head_i8",
                        &ops.head.i8_layout,
                        &[
                            &bufs.step,
                            &s.uni,
                            &s.buf,
                            &scales,
                            &bufs.xq,
                            &bufs.xs,
                            &bufs.logits,
                        ],
                    );
                    (s, bg)
                })
                .collect()
        } else {
            match &w.lm_head {
                // Tied: the head reads the embedding's shards.
                None => embed_raw
                    .iter()
                    .map(|s| make(s.clone(), &head_bg))
                    .collect(),
                Some(lm) => buffers::upload_shards(device, &ctx.queue, lm, shard_bytes, f16_scale)?
                    .into_iter()
                    .map(|s| make(s, &head_bg))
                    .collect(),
            }
        };
        let embed_shards: Vec<_> = embed_raw.into_iter().map(|s| make(s, &embed_bg)).collect();
        phases.mark("gpu embedding and head");
        let most = ctx.limits.max_compute_workgroups_per_dimension as usize;
        let rpw = ops.head.rows_per_wg();
        if let Some((s, _)) = head_shards
            .iter()
            .find(|(s, _)| s.rows.div_ceil(rpw) > most)
        {
            return Err(Error::Backend(format!(
                "a head shard of {} vocabulary rows needs more than {most} workgroups",
                s.rows
            )));
        }

        let mut rec = Recorder::new(&ctx.device);
        if std::env::var_os("BITNET_GPU_PROFILE").is_some() {
            rec.set_profiling(true, &ctx.queue);
        }
        Ok(GpuBackend {
            inv_freq: rope_inv_freq(cfg.rope_theta, cfg.head_dim),
            cfg,
            ops,
            bufs,
            layers,
            final_norm_bg,
            argmax_bg,
            accept_bg,
            topk_passes,
            embed_shards,
            head_shards,
            head_bytes,
            final_norm_q_bg,
            kv: opts.kv,
            max_step,
            max_binding,
            logit_rows,
            rec,
            tokens: Vec::new(),
            queued: Default::default(),
            tokens_at: 0,
            decode_rows: false,
            queued_total: 0,
            ahead_drafts: 0,
            moves: 0,
            whole_step: false,
            step: Step::default(),
            timing: std::env::var_os("BITNET_GPU_TIMING").map(|_| HostTiming::default()),
            #[cfg(not(target_arch = "wasm32"))]
            batch_error: None,
            ctx,
        })
    }
}

/// `t` as the device stores it: a bf16 tensor widened to f32 when `widen`, else as it is.
fn stored(t: &FloatTensor, widen: bool) -> Cow<'_, FloatTensor> {
    if !(widen && t.dtype == FloatDtype::BF16) {
        return Cow::Borrowed(t);
    }
    let v = t.to_f32();
    Cow::Owned(FloatTensor {
        dtype: FloatDtype::F32,
        bytes: Bytes::Owned(Arc::new(bytemuck::cast_slice(&v).to_vec())),
        ..t.clone()
    })
}

//! WGSL modules compiled once at load, with per-device choices (subgroup or shared-memory
//! reductions, invocations per row) and per-model choices (head weight format) as override
//! constants or prelude selection.

use std::borrow::Cow;

use crate::backend::KvDtype;

pub(super) const COMMON: &str = include_str!("../../shaders/common.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");
const REDUCE_SHARED: &str = include_str!("../../shaders/reduce_shared.wgsl");
const EMBED: &str = include_str!("../../shaders/embed.wgsl");
const NORM: &str = include_str!("../../shaders/norm.wgsl");
const MATMUL: &str = include_str!("../../shaders/matmul.wgsl");
const ROPE: &str = include_str!("../../shaders/rope.wgsl");
const ROPE_HEAD: &str = include_str!("../../shaders/rope_head.wgsl");
const ATTENTION: &str = include_str!("../../shaders/attention.wgsl");
const ATTEND_VEC_COMMON: &str = include_str!("../../shaders/attend_vec_common.wgsl");
const HEAD_SHARD: &str = include_str!("../../shaders/head_shard.wgsl");
const HEAD: &str = include_str!("../../shaders/head.wgsl");
const HEAD_I8: &str = include_str!("../../shaders/head_i8.wgsl");
const GEMV_FUSED: &str = include_str!("../../shaders/gemv_fused.wgsl");
const REDUCE_WG_SHARED: &str = include_str!("../../shaders/reduce_wg_shared.wgsl");
const REDUCE_WG_SUBGROUP: &str = include_str!("../../shaders/reduce_wg_subgroup.wgsl");
const REDUCE_PAIRS_SHARED: &str = include_str!("../../shaders/reduce_pairs_shared.wgsl");
const REDUCE_PAIRS_SUBGROUP: &str = include_str!("../../shaders/reduce_pairs_subgroup.wgsl");
const ARGMAX: &str = include_str!("../../shaders/argmax.wgsl");
const TOPK: &str = include_str!("../../shaders/topk.wgsl");
const PAGED_ROPE: &str = include_str!("../../shaders/paged_rope.wgsl");
const COPY: &str = include_str!("../../shaders/copy.wgsl");
const KV_F32: &str = include_str!("../../shaders/kv_f32.wgsl");
const KV_F16: &str = include_str!("../../shaders/kv_f16.wgsl");
const PAGED_ATTENTION: &str = include_str!("../../shaders/paged_attention.wgsl");

/// How a binding is used by a kernel.
#[derive(Clone, Copy)]
enum Use {
    Uniform,
    Read,
    Write,
}

/// Invocations per workgroup of the row-parallel kernels (GEMV, head).
pub const ROW_WG: u32 = 256;

/// Invocations per GEMV workgroup (`GV_WG` in matmul.wgsl).
pub const GEMV_WG: u32 = 128;

/// Output rows of a fused GEMV workgroup (`2 * FG` in gemv_fused.wgsl).
pub const FUSED_ROWS: u32 = 32;

/// Widest input the fused GEMV normalises in registers (`4 * NW * FW` in gemv_fused.wgsl).
pub const FUSED_MAX_WIDTH: usize = 7168;

/// Invocations per GEMV row (each group of them computes two rows): 8 streams the weights at
/// 63% of an H200's copy bandwidth (16: 60%, 32: 48%) and batches of 32 decode 7% faster.
pub const GEMV_TPR: u32 = 8;

/// The compiled kernels and their bind group layouts.
pub struct Pipelines {
    /// Invocations that cooperate on one output row (GEMV, head).
    pub tpr: u32,
    /// Whether row reductions use subgroup operations.
    pub subgroups: bool,
    /// Embedding gather layout: step, shard, tokens, weights, x.
    pub embed_layout: wgpu::BindGroupLayout,
    /// Norm layout: step, params, src, gamma, out words, out scales.
    pub norm_layout: wgpu::BindGroupLayout,
    /// Matmul layout: step, params, weights, row scales, xq, xscale, out.
    pub matmul_layout: wgpu::BindGroupLayout,
    /// RoPE layout: step, params, qkv, k cache, v cache, cos/sin table.
    pub rope_layout: wgpu::BindGroupLayout,
    /// Attention layout: step, params, qkv, k cache, v cache, partials, out, k and v as vec4.
    pub attn_layout: wgpu::BindGroupLayout,
    /// Head layout: step, shard, weights, normed x, logits.
    pub head_layout: wgpu::BindGroupLayout,
    /// Fused norm + GEMV layout: step, params, weights, row scales, source, gamma, out.
    pub fused_layout: wgpu::BindGroupLayout,
    /// Fused norm + GEMV + RoPE layout: the above, then cos/sin table, k cache, v cache.
    pub fused_rope_layout: wgpu::BindGroupLayout,
    /// RMSNorm + quant fused into a storing GEMV (gate|up).
    pub gemv_norm: wgpu::ComputePipeline,
    /// RMSNorm + quant fused into an accumulating GEMV (o).
    pub gemv_norm_acc: wgpu::ComputePipeline,
    /// relu²·up + RMSNorm + quant fused into an accumulating GEMV (down).
    pub gemv_relu2_acc: wgpu::ComputePipeline,
    /// RMSNorm + quant + q|k|v GEMV + RoPE + KV write.
    pub gemv_norm_rope: wgpu::ComputePipeline,
    /// Embedding gather.
    pub embed: wgpu::ComputePipeline,
    /// RMSNorm + int8 quant.
    pub norm_quant: wgpu::ComputePipeline,
    /// relu²·up + RMSNorm + int8 quant.
    pub norm_relu2: wgpu::ComputePipeline,
    /// RMSNorm to f32 (final norm).
    pub norm_f32: wgpu::ComputePipeline,
    /// Ternary GEMV (decode), storing.
    pub gemv: wgpu::ComputePipeline,
    /// Ternary GEMV, adding into the output.
    pub gemv_acc: wgpu::ComputePipeline,
    /// Ternary GEMV of 4 tokens at once (small batches), storing.
    pub gemv4: wgpu::ComputePipeline,
    /// Ternary GEMV of 4 tokens at once, adding into the output.
    pub gemv4_acc: wgpu::ComputePipeline,
    /// Ternary tiled GEMM (prefill), storing.
    pub gemm: wgpu::ComputePipeline,
    /// Ternary tiled GEMM, adding into the output.
    pub gemm_acc: wgpu::ComputePipeline,

    /// Bandwidth probe layout: source, destination.
    pub probe_layout: wgpu::BindGroupLayout,
    /// Copy bandwidth probe.
    pub probe_copy: wgpu::ComputePipeline,
    /// Read bandwidth probe.
    pub probe_read: wgpu::ComputePipeline,
    /// RoPE + KV write.
    pub rope: wgpu::ComputePipeline,
    /// Attention partials per split.
    pub attend: wgpu::ComputePipeline,
    /// Decode attention partials with vec4 K/V rows (hd % 4 == 0, hd <= 128).
    pub attend_vec: wgpu::ComputePipeline,
    /// Attention split merge.
    pub combine: wgpu::ComputePipeline,
    /// Prefill attention tiled over queries (T > 1).
    pub attend_tiled: wgpu::ComputePipeline,
    /// Output head.
    pub head: wgpu::ComputePipeline,
    /// The int8 head (`--head int8`).
    pub head_i8: wgpu::ComputePipeline,
    /// Its layout: step, shard, int8 rows, row scales, xq, xscale, logits.
    pub head_i8_layout: wgpu::BindGroupLayout,
    /// Argmax layout: params, logits, partials, result.
    pub argmax_layout: wgpu::BindGroupLayout,
    /// Argmax partials.
    pub argmax_partial: wgpu::ComputePipeline,
    /// Argmax merge.
    pub argmax_final: wgpu::ComputePipeline,
    /// Top-k layout: params, logits, source pairs, destination pairs.
    pub topk_layout: wgpu::BindGroupLayout,
    /// Top-k first pass (over the logits).
    pub topk_first: wgpu::ComputePipeline,
    /// Top-k merge pass (over the previous pass's candidates).
    pub topk_merge: wgpu::ComputePipeline,
    /// Paged RoPE + KV write layout: step, params, qkv, k pool, v pool, cos/sin table, row
    /// slots, block tables.
    pub paged_rope_layout: wgpu::BindGroupLayout,
    /// Paged attention layout: step, params, qkv, k pool, v pool, row slots, block tables, out.
    pub paged_attn_layout: wgpu::BindGroupLayout,
    /// RoPE + KV write of rows of different sequences into the paged pool.
    pub paged_rope: wgpu::ComputePipeline,
    /// Attention of rows of different sequences over the paged pool.
    pub paged_attend: wgpu::ComputePipeline,
}

fn layout(device: &wgpu::Device, label: &str, uses: &[Use]) -> wgpu::BindGroupLayout {
    let entries: Vec<_> = uses
        .iter()
        .enumerate()
        .map(|(i, u)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match u {
                    Use::Uniform => wgpu::BufferBindingType::Uniform,
                    Use::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Use::Write => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    })
}

/// Section `name` (`read1`, `read4` or `write`) of the KV cache accessors for `kv`.
fn kv_section(kv: KvDtype, name: &str) -> &'static str {
    let src = match kv {
        KvDtype::F32 => KV_F32,
        KvDtype::F16 => KV_F16,
    };
    let marker = format!("// --- {name}\n");
    let start = src
        .find(&marker)
        .map(|i| i + marker.len())
        .expect("every KV accessor file has the three sections");
    let end = src[start..]
        .find("// --- ")
        .map_or(src.len(), |e| start + e);
    &src[start..end]
}

/// A module from `parts` with the KV cache element types of `kv` filled in.
fn kv_module(
    device: &wgpu::Device,
    label: &str,
    parts: &[&str],
    kv: KvDtype,
) -> wgpu::ShaderModule {
    let (s, v4, w) = match kv {
        KvDtype::F32 => ("f32", "vec4<f32>", "f32"),
        KvDtype::F16 => ("u32", "vec2<u32>", "atomic<u32>"),
    };
    let src = parts
        .concat()
        .replace("KV_S", s)
        .replace("KV_V4", v4)
        .replace("KV_W", w);
    module(device, label, &[&src])
}

fn module(device: &wgpu::Device, label: &str, parts: &[&str]) -> wgpu::ShaderModule {
    device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(Cow::Owned(parts.concat())),
    })
}

fn pipeline(
    device: &wgpu::Device,
    label: &str,
    bgl: &wgpu::BindGroupLayout,
    module: &wgpu::ShaderModule,
    entry: &str,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(label),
        bind_group_layouts: &[Some(bgl)],
        immediate_size: 0,
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: Some(&pl),
        module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    })
}

impl Pipelines {
    /// Compiles every kernel. `subgroup_size` selects subgroup reductions (one subgroup per
    /// row); `f32_head` selects f32 instead of bf16 embedding/head storage.
    /// `kv` is the KV cache's element type.
    /// `fused_widths` are the widest inputs of the fused decode GEMVs that normalise a
    /// hidden-sized row (q|k|v, o, gate|up) and an intermediate-sized one (down).
    pub fn new(
        device: &wgpu::Device,
        subgroup_size: Option<u32>,
        f32_head: bool,
        fused_widths: [usize; 2],
        kv: KvDtype,
    ) -> Self {
        use Use::*;
        let subgroups = subgroup_size.is_some();
        let tpr = subgroup_size.unwrap_or(32).min(ROW_WG);
        let reduce = if subgroups {
            REDUCE_SUBGROUP
        } else {
            REDUCE_SHARED
        };
        let embed_layout = layout(device, "embed", &[Uniform, Uniform, Read, Read, Write]);
        let norm_layout = layout(
            device,
            "norm",
            &[Uniform, Uniform, Read, Read, Write, Write],
        );
        let matmul_layout = layout(
            device,
            "matmul",
            &[Uniform, Uniform, Read, Read, Read, Read, Write],
        );
        let rope_layout = layout(
            device,
            "rope",
            &[Uniform, Uniform, Write, Write, Write, Read],
        );
        let attn_layout = layout(
            device,
            "attention",
            &[Uniform, Uniform, Read, Read, Read, Write, Write, Read, Read],
        );
        let fused_layout = layout(
            device,
            "gemv_fused",
            &[Uniform, Uniform, Read, Read, Read, Read, Write],
        );
        let fused_rope_layout = layout(
            device,
            "gemv_fused_rope",
            &[
                Uniform, Uniform, Read, Read, Read, Read, Write, Read, Write, Write,
            ],
        );
        let head_layout = layout(device, "head", &[Uniform, Uniform, Read, Read, Write]);
        let argmax_layout = layout(device, "argmax", &[Uniform, Read, Write, Write]);
        let topk_layout = layout(device, "topk", &[Uniform, Read, Read, Write]);
        let paged_rope_layout = layout(
            device,
            "paged_rope",
            &[Uniform, Uniform, Write, Write, Write, Read, Read, Read],
        );
        let paged_attn_layout = layout(
            device,
            "paged_attention",
            &[Uniform, Uniform, Read, Read, Read, Read, Read, Write],
        );

        let f32w = if f32_head { 1.0 } else { 0.0 };
        let tprf = tpr as f64;
        let m_embed = module(device, "embed", &[COMMON, EMBED]);
        let m_norm = module(device, "norm", &[COMMON, NORM]);
        let m_matmul = module(device, "matmul", &[COMMON, MATMUL]);
        let probe_layout = layout(device, "probe", &[Read, Write]);
        let m_copy = module(device, "copy", &[COPY]);
        let probe_copy = pipeline(
            device,
            "probe_copy",
            &probe_layout,
            &m_copy,
            "probe_copy",
            &[],
        );
        let probe_read = pipeline(
            device,
            "probe_read",
            &probe_layout,
            &m_copy,
            "probe_read",
            &[],
        );
        let wg_reduce = if subgroups {
            REDUCE_WG_SUBGROUP
        } else {
            REDUCE_WG_SHARED
        };
        let fused_src = |width: usize| {
            // Words (4 columns) each of the 256 invocations holds: as few registers as the
            // width allows.
            let nw = (super::buffers::pad64(width) / 4).div_ceil(256).clamp(1, 7);
            GEMV_FUSED
                .replace("const NW: u32 = 7u;", &format!("const NW: u32 = {nw}u;"))
                .replace(
                    "const XMAX: u32 = 448u;",
                    &format!("const XMAX: u32 = {}u;", nw * 64),
                )
        };
        // The row-pair butterfly needs a subgroup to hold a pair's 16 invocations.
        let pair_sums = if subgroups && tpr >= 16 {
            REDUCE_PAIRS_SUBGROUP
        } else {
            REDUCE_PAIRS_SHARED
        };
        let (read1, read4, write) = (
            kv_section(kv, "read1"),
            kv_section(kv, "read4"),
            kv_section(kv, "write"),
        );
        let m_fused = kv_module(
            device,
            "gemv_fused",
            &[
                COMMON,
                wg_reduce,
                pair_sums,
                &fused_src(fused_widths[0]),
                write,
            ],
            kv,
        );
        let m_fused_i = kv_module(
            device,
            "gemv_fused_intermediate",
            &[
                COMMON,
                wg_reduce,
                pair_sums,
                &fused_src(fused_widths[1]),
                write,
            ],
            kv,
        );
        let sg = [("SG", tprf)];
        let fc = |mode: f64, acc: f64| {
            let mut c = vec![("MODE", mode), ("ACCUM", acc)];
            if subgroups {
                c.extend(sg);
            }
            c
        };
        let m_argmax = module(device, "argmax", &[COMMON, ARGMAX]);
        let m_topk = module(device, "topk", &[COMMON, TOPK]);
        let m_rope = kv_module(device, "rope", &[COMMON, write, ROPE_HEAD, ROPE], kv);
        let m_attn = kv_module(
            device,
            "attention",
            &[COMMON, read1, read4, ATTEND_VEC_COMMON, ATTENTION],
            kv,
        );
        let m_head = module(device, "head", &[COMMON, reduce, HEAD_SHARD, HEAD]);
        let m_head_i8 = module(device, "head_i8", &[COMMON, reduce, HEAD_SHARD, HEAD_I8]);
        let head_i8_layout = layout(
            device,
            "head_i8",
            &[Uniform, Uniform, Read, Read, Read, Read, Write],
        );
        let m_paged_rope = kv_module(
            device,
            "paged_rope",
            &[COMMON, write, ROPE_HEAD, PAGED_ROPE],
            kv,
        );
        let m_paged_attn = kv_module(
            device,
            "paged_attention",
            &[COMMON, read4, ATTEND_VEC_COMMON, PAGED_ATTENTION],
            kv,
        );
        Pipelines {
            tpr,
            subgroups,
            embed: pipeline(
                device,
                "embed",
                &embed_layout,
                &m_embed,
                "main",
                &[("F32_WEIGHTS", f32w)],
            ),
            norm_quant: pipeline(
                device,
                "norm_quant",
                &norm_layout,
                &m_norm,
                "main",
                &[("MODE", 0.0)],
            ),
            norm_relu2: pipeline(
                device,
                "norm_relu2",
                &norm_layout,
                &m_norm,
                "main",
                &[("MODE", 1.0)],
            ),
            norm_f32: pipeline(
                device,
                "norm_f32",
                &norm_layout,
                &m_norm,
                "main",
                &[("MODE", 2.0)],
            ),
            gemv: pipeline(
                device,
                "gemv",
                &matmul_layout,
                &m_matmul,
                "gemv",
                &[("ACCUM", 0.0), ("TPR", GEMV_TPR as f64)],
            ),
            gemv4: pipeline(
                device,
                "gemv4",
                &matmul_layout,
                &m_matmul,
                "gemv4",
                &[("ACCUM", 0.0), ("TPR", GEMV_TPR as f64)],
            ),
            gemv4_acc: pipeline(
                device,
                "gemv4_acc",
                &matmul_layout,
                &m_matmul,
                "gemv4",
                &[("ACCUM", 1.0), ("TPR", GEMV_TPR as f64)],
            ),
            gemv_acc: pipeline(
                device,
                "gemv_acc",
                &matmul_layout,
                &m_matmul,
                "gemv",
                &[("ACCUM", 1.0), ("TPR", GEMV_TPR as f64)],
            ),
            gemm: pipeline(
                device,
                "gemm",
                &matmul_layout,
                &m_matmul,
                "gemm",
                &[("ACCUM", 0.0)],
            ),
            gemm_acc: pipeline(
                device,
                "gemm_acc",
                &matmul_layout,
                &m_matmul,
                "gemm",
                &[("ACCUM", 1.0)],
            ),
            probe_layout,
            probe_copy,
            probe_read,
            gemv_norm: pipeline(
                device,
                "gemv_norm",
                &fused_layout,
                &m_fused,
                "gemv_norm",
                &fc(0.0, 0.0),
            ),
            gemv_norm_acc: pipeline(
                device,
                "gemv_norm_acc",
                &fused_layout,
                &m_fused,
                "gemv_norm",
                &fc(0.0, 1.0),
            ),
            gemv_relu2_acc: pipeline(
                device,
                "gemv_relu2_acc",
                &fused_layout,
                &m_fused_i,
                "gemv_norm",
                &fc(1.0, 1.0),
            ),
            gemv_norm_rope: pipeline(
                device,
                "gemv_norm_rope",
                &fused_rope_layout,
                &m_fused,
                "gemv_norm_rope",
                &fc(0.0, 0.0),
            ),
            rope: pipeline(device, "rope", &rope_layout, &m_rope, "main", &[]),
            attend: pipeline(device, "attend", &attn_layout, &m_attn, "attend", &[]),
            attend_vec: pipeline(
                device,
                "attend_vec",
                &attn_layout,
                &m_attn,
                "attend_vec",
                &[],
            ),
            combine: pipeline(device, "combine", &attn_layout, &m_attn, "combine", &[]),
            attend_tiled: pipeline(
                device,
                "attend_tiled",
                &attn_layout,
                &m_attn,
                "attend_tiled",
                &[],
            ),
            head: pipeline(
                device,
                "head",
                &head_layout,
                &m_head,
                "main",
                &[("F32_WEIGHTS", f32w), ("TPR", tprf)],
            ),
            head_i8: pipeline(
                device,
                "head_i8",
                &head_i8_layout,
                &m_head_i8,
                "main",
                &[("TPR", tprf)],
            ),
            head_i8_layout,
            topk_first: pipeline(
                device,
                "topk_first",
                &topk_layout,
                &m_topk,
                "main",
                &[("FIRST", 1.0)],
            ),
            topk_merge: pipeline(
                device,
                "topk_merge",
                &topk_layout,
                &m_topk,
                "main",
                &[("FIRST", 0.0)],
            ),
            argmax_partial: pipeline(
                device,
                "argmax_partial",
                &argmax_layout,
                &m_argmax,
                "partial",
                &[],
            ),
            argmax_final: pipeline(
                device,
                "argmax_final",
                &argmax_layout,
                &m_argmax,
                "final_",
                &[],
            ),
            paged_rope: pipeline(
                device,
                "paged_rope",
                &paged_rope_layout,
                &m_paged_rope,
                "main",
                &[],
            ),
            paged_attend: pipeline(
                device,
                "paged_attend",
                &paged_attn_layout,
                &m_paged_attn,
                "main",
                &[],
            ),
            paged_rope_layout,
            paged_attn_layout,
            argmax_layout,
            topk_layout,
            fused_layout,
            fused_rope_layout,
            embed_layout,
            norm_layout,
            matmul_layout,
            rope_layout,
            attn_layout,
            head_layout,
        }
    }

    /// Rows of a GEMV workgroup.
    pub fn gemv_rows_per_wg(&self) -> u32 {
        2 * GEMV_WG / GEMV_TPR
    }

    /// Rows of a head workgroup.
    pub fn rows_per_wg(&self) -> u32 {
        ROW_WG / self.tpr
    }
}

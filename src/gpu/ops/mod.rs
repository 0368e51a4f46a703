//! The GPU ops, one file per kernel family: each owns its shader include, its bind group
//! layouts, its pipelines (per-device constants as WGSL `override`s or a declaration prelude,
//! never text replacement), and its dispatch. Their parameter structs are in
//! [`super::params`]; their tests against [`crate::reference`] are in `tests/gpu.rs`.
//! [`Ops`] compiles them all once at load.

pub mod accept;
pub mod argmax;
pub mod attention;
pub mod embed;
pub mod gemv_fused;
pub mod head;
pub mod kv_shift;
pub mod matmul;
pub mod norm;
pub mod paged;
pub mod probe;
pub mod repack;
pub mod rope;
pub mod topk;

use std::borrow::Cow;

use crate::backend::KvDtype;

/// Shared definitions: the step uniform, exact division, constants.
pub(crate) const COMMON: &str = include_str!("../../../shaders/common.wgsl");
/// Row reduction over one row's invocations: subgroup operations.
const REDUCE_SUBGROUP: &str = include_str!("../../../shaders/reduce_subgroup.wgsl");
/// Row reduction over one row's invocations: workgroup memory.
const REDUCE_SHARED: &str = include_str!("../../../shaders/reduce_shared.wgsl");
/// Whole-workgroup reduction: workgroup memory.
const REDUCE_WG_SHARED: &str = include_str!("../../../shaders/reduce_wg_shared.wgsl");
/// Whole-workgroup reduction: subgroup operations.
const REDUCE_WG_SUBGROUP: &str = include_str!("../../../shaders/reduce_wg_subgroup.wgsl");
/// Row-pair sums: workgroup memory.
const REDUCE_PAIRS_SHARED: &str = include_str!("../../../shaders/reduce_pairs_shared.wgsl");
/// Row-pair sums: subgroup butterflies.
const REDUCE_PAIRS_SUBGROUP: &str = include_str!("../../../shaders/reduce_pairs_subgroup.wgsl");
/// KV cache accessors for f32 storage.
const KV_F32: &str = include_str!("../../../shaders/kv_f32.wgsl");
/// KV cache accessors for f16 pairs in u32 words.
const KV_F16: &str = include_str!("../../../shaders/kv_f16.wgsl");
/// KV cache accessors for int8 rows with a scale each.
const KV_I8: &str = include_str!("../../../shaders/kv_i8.wgsl");
/// RoPE of one head (shared by the contiguous and paged KV writes).
const ROPE_HEAD: &str = include_str!("../../../shaders/rope_head.wgsl");
/// Decode attention scoring shared by the contiguous and paged kernels.
const ATTEND_VEC_COMMON: &str = include_str!("../../../shaders/attend_vec_common.wgsl");

/// Invocations per workgroup of the row-parallel kernels (GEMV, head).
pub const ROW_WG: u32 = 256;

/// How a binding is used.
#[derive(Clone, Copy)]
pub(crate) enum Use {
    Uniform,
    Read,
    Write,
}

/// What every op's pipelines are compiled for: the device, its reductions, the model's
/// storage choices.
pub struct Target<'a> {
    /// The device.
    pub device: &'a wgpu::Device,
    /// The adapter's subgroup size, when subgroup reductions are used.
    pub subgroup_size: Option<u32>,
    /// Cooperative matrices for the batched matmuls (see `ops::matmul`).
    pub tensor_cores: bool,
    /// Cooperative matrices for the batched head too: bf16 weights and inputs that fit its
    /// f16 split (see `ops::head`).
    pub tensor_core_head: bool,
    /// f32 (not bf16) embedding and head storage.
    pub f32_head: bool,
    /// The KV cache's element type.
    pub kv: KvDtype,
    /// The model's head dimension (the int8 cache's row layout).
    pub head_dim: usize,
}

impl Target<'_> {
    /// Whether row reductions use subgroup operations.
    pub fn subgroups(&self) -> bool {
        self.subgroup_size.is_some()
    }

    /// Invocations that cooperate on one head row.
    pub fn tpr(&self) -> u32 {
        self.subgroup_size.unwrap_or(32).min(ROW_WG)
    }

    /// The row reduction prelude.
    fn reduce(&self) -> &'static str {
        if self.subgroups() {
            REDUCE_SUBGROUP
        } else {
            REDUCE_SHARED
        }
    }

    /// A bind group layout of buffers used as `uses`, bindings 0, 1, ...
    fn layout(&self, label: &str, uses: &[Use]) -> wgpu::BindGroupLayout {
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
        self.device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(label),
                entries: &entries,
            })
    }

    /// WGSL declarations of the constants a shader shares with its Rust op (one source of
    /// truth: the shader uses them, the op declares them).
    fn consts(pairs: &[(&str, usize)]) -> String {
        pairs
            .iter()
            .map(|(name, v)| format!("const {name}: u32 = {v}u;\n"))
            .collect()
    }

    /// A module from WGSL `parts`, concatenated (declarations first).
    fn module(&self, label: &str, parts: &[&str]) -> wgpu::ShaderModule {
        self.device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(Cow::Owned(parts.concat())),
            })
    }

    /// A module from `parts` after the KV cache element types as WGSL type aliases
    /// (`KV_S`, `KV_V4`, `KV_W`; and the int8 row layout, `KV_Q` and `KV_RW`).
    fn kv_module(&self, label: &str, parts: &[&str]) -> wgpu::ShaderModule {
        let (s, v4, w) = match self.kv {
            KvDtype::F32 => ("f32", "vec4<f32>", "f32"),
            KvDtype::F16 => ("u32", "vec2<u32>", "atomic<u32>"),
            KvDtype::Int8 => ("u32", "u32", "u32"),
        };
        let mut types = format!("alias KV_S = {s};\nalias KV_V4 = {v4};\nalias KV_W = {w};\n");
        if self.kv == KvDtype::Int8 {
            let q = self.head_dim / 4;
            types += &Self::consts(&[("KV_Q", q), ("KV_RW", q + 1)]);
        }
        let mut all = vec![types.as_str()];
        all.extend_from_slice(parts);
        self.module(label, &all)
    }

    /// Section `name` (`read1`, `read4`, `write` or `finish`) of the KV cache accessors.
    fn kv_section(&self, name: &str) -> &'static str {
        let src = match self.kv {
            KvDtype::F32 => KV_F32,
            KvDtype::F16 => KV_F16,
            KvDtype::Int8 => KV_I8,
        };
        let marker = format!("// --- {name}\n");
        let start = src
            .find(&marker)
            .map(|i| i + marker.len())
            .expect("every KV accessor file has the four sections");
        let end = src[start..]
            .find("// --- ")
            .map_or(src.len(), |e| start + e);
        &src[start..end]
    }

    /// A compute pipeline of `entry` in `module` with override `constants`.
    fn pipeline(
        &self,
        label: &str,
        bgl: &wgpu::BindGroupLayout,
        module: &wgpu::ShaderModule,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> wgpu::ComputePipeline {
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(label),
                bind_group_layouts: &[Some(bgl)],
                immediate_size: 0,
            });
        self.device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
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
}

/// Every op, compiled for one device and model.
pub struct Ops {
    /// Invocations that cooperate on one head row.
    pub tpr: u32,
    /// Whether row reductions use subgroup operations.
    pub subgroups: bool,
    /// Embedding gather.
    pub embed: embed::Embed,
    /// RMSNorm (+ activation) + int8 quantization, or to f32.
    pub norm: norm::Norm,
    /// Ternary GEMV and GEMM.
    pub matmul: matmul::Matmul,
    /// Decode GEMVs with the norm folded in (and RoPE + KV write for q|k|v).
    pub fused: gemv_fused::FusedGemv,
    /// RoPE + KV write into the contiguous cache.
    pub rope: rope::Rope,
    /// Attention over the contiguous cache.
    pub attention: attention::Attention,
    /// RoPE, KV write and attention over the paged pool.
    pub paged: paged::Paged,
    /// The output head (float or int8).
    pub head: head::Head,
    /// Argmax of the logits.
    pub argmax: argmax::Argmax,
    /// Device-side acceptance of queued steps' drafts.
    pub accept: accept::Accept,
    /// KV positions moved down with their keys re-rotated.
    pub kv_shift: kv_shift::KvShift,
    /// Top-k selection of the logits.
    pub topk: topk::TopK,
    /// Memory bandwidth probes.
    pub probe: probe::Probe,
    /// Checkpoint-packed ternary codes into the matmul layout, on the device.
    pub repack: repack::Repack,
}

impl Ops {
    /// Compiles every op for `target`. `fused_widths` are the widest inputs of the fused
    /// decode GEMVs that normalise a hidden-sized row (q|k|v, o, gate|up) and an
    /// intermediate-sized one (down).
    pub fn new(target: &Target, fused_widths: [usize; 2]) -> Self {
        Ops {
            tpr: target.tpr(),
            subgroups: target.subgroups(),
            embed: embed::Embed::new(target),
            norm: norm::Norm::new(target),
            matmul: matmul::Matmul::new(target),
            fused: gemv_fused::FusedGemv::new(target, fused_widths),
            rope: rope::Rope::new(target),
            attention: attention::Attention::new(target),
            paged: paged::Paged::new(target),
            head: head::Head::new(target),
            argmax: argmax::Argmax::new(target),
            accept: accept::Accept::new(target),
            kv_shift: kv_shift::KvShift::new(target),
            topk: topk::TopK::new(target),
            probe: probe::Probe::new(target),
            repack: repack::Repack::new(target),
        }
    }
}

/// Parses, validates (every capability) and translates `src`'s `entry` to SPIR-V with
/// `overrides`, panicking with naga's error: a check for shaders that no CI adapter runs.
#[cfg(all(test, not(target_arch = "wasm32")))]
pub(crate) fn compiles_to_spirv(src: &str, entry: &str, overrides: &[(&str, f64)]) {
    use wgpu::naga;
    let module = naga::front::wgsl::parse_str(src).expect("the module parses");
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .expect("the module validates");
    let mut constants = naga::back::PipelineConstants::default();
    for (name, v) in overrides {
        constants.insert(name.to_string(), *v);
    }
    let stage = naga::ShaderStage::Compute;
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        &module,
        &info,
        Some((stage, entry)),
        &constants,
    )
    .expect("the overrides apply");
    let words = naga::back::spv::write_vec(
        &module,
        &info,
        &naga::back::spv::Options::default(),
        Some(&naga::back::spv::PipelineOptions {
            shader_stage: stage,
            entry_point: entry.into(),
        }),
    )
    .expect("the module translates to SPIR-V");
    assert!(words.len() > 100);
}

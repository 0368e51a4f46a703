//! Ternary × int8 matmuls: the GEMV for one token, the 4-token GEMV for small steps, the
//! tiled GEMM (dp4a) for larger ones, split over K where a step has few tiles, and the
//! tensor-core GEMM that replaces the last two for steps of more than [`COOP_MIN_T`] tokens
//! where the adapter has cooperative matrices (on f16 copies of its operands, [`super::widen`]);
//! each storing or adding into its output.

use bytemuck::{Pod, Zeroable};

use super::{widen::Widen, Target, Use::*, COMMON};
use crate::gpu::recorder::Recorder;

const IO: &str = include_str!("../../../shaders/matmul_io.wgsl");
const SRC: &str = include_str!("../../../shaders/matmul.wgsl");
const COOP: &str = include_str!("../../../shaders/matmul_coop.wgsl");
pub(super) const COOP_ENABLE: &str = "enable f16;\nenable wgpu_cooperative_matrix;\n";

/// Workgroup memory of the tensor-core GEMM: 128 × 40 and 64 × 40 f16 tiles and eight 16 × 16
/// f32 staging fragments (`ta`, `tb`, `tc` in matmul_coop.wgsl).
pub const COOP_WORKGROUP_BYTES: u32 = (128 + 64) * 40 * 2 + 8 * 256 * 4;

/// Rows of a tensor-core GEMM tile; its matrices' f16 copies are padded to a multiple.
pub const COOP_ROWS: usize = 128;

/// Tokens of a tensor-core GEMM tile; the f16 activation rows are allocated for a multiple.
pub const COOP_TOKENS: usize = 64;

/// Steps of more tokens than this take the tensor-core GEMM where there is one: up to 192-token
/// batched decode steps the dp4a kernels were as fast or faster on an H100 (`bench --batch`
/// 64 / 80 / 96 / 128 / 192: 6,450 / 5,101 / 5,993 / 7,632 / 7,695 tok/s against 5,350 /
/// 5,041 / 5,731 / 7,302 / 7,239), at 256 even, from 512-token prefill chunks on +9%.
pub const COOP_MIN_T: usize = 256;

/// A ternary matmul's matrix (`MatP` in matmul.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct MatP {
    /// Output rows.
    pub rows: u32,
    /// vec4<u32> of weights per row.
    pub kvec: u32,
    /// f32 per output row.
    pub ld: u32,
    /// Always 0 (the zero `rounded()` in common.wgsl ORs into products).
    pub pad: u32,
    /// The first row (of the weights, row scales and output) this matmul computes: a part of
    /// a fused matrix computes rows `row0..row0 + rows`.
    pub row0: u32,
    /// Padding to 32 bytes.
    pub pad1: [u32; 3],
}

/// Invocations per GEMV workgroup (`GV_WG` in matmul.wgsl).
pub const GEMV_WG: u32 = 128;

/// Invocations per GEMV row (each group of them computes two rows): 8 streams the weights at
/// 63% of an H200's copy bandwidth (16: 60%, 32: 48%) and batches of 32 decode 7% faster.
pub const GEMV_TPR: u32 = 8;

/// Steps of up to this many tokens (batched decode rows) take the 4-token GEMV instead of
/// the 64 x 64 tiled GEMM.
pub const GEMV4_MAX_T: usize = 16;

/// The GEMM splits K over workgroups (split-K) until a matmul has about this many: a step of
/// few tokens has too few 64 × 64 tiles to fill the device, and one tile's walk over all of K
/// is then the whole matmul's time.
pub const SPLIT_K_WORKGROUPS: usize = 528;

/// Each split-K share covers at least this many steps of 64 columns.
pub const SPLIT_K_MIN_STEPS: usize = 4;

/// Bytes of the split-K scratch: a split GEMM has fewer than [`SPLIT_K_WORKGROUPS`] tiles of
/// 64 × 64 sums.
pub const PART_BYTES: usize = SPLIT_K_WORKGROUPS * 64 * 64 * 4;

/// K splits of a `rows` × `kvec` matmul of `t` tokens on the 64 × 64 GEMM (1: no split).
pub fn k_splits(rows: usize, kvec: usize, t: usize) -> usize {
    let tiles = rows.div_ceil(64) * t.div_ceil(64);
    if tiles >= SPLIT_K_WORKGROUPS {
        return 1;
    }
    SPLIT_K_WORKGROUPS
        .div_ceil(tiles)
        .min(kvec / SPLIT_K_MIN_STEPS)
        .max(1)
}

/// K splits of a `rows` × `kvec` tensor-core GEMM of `t` tokens (1: no split): as
/// [`k_splits`] over its 128 × 64 tiles, each share at least 4 steps of 32 columns, where the
/// scratch holds the sums.
pub fn coop_splits(rows: usize, kvec: usize, t: usize) -> usize {
    let tiles = rows.div_ceil(COOP_ROWS) * t.div_ceil(COOP_TOKENS);
    if tiles >= SPLIT_K_WORKGROUPS || rows * t * 4 > PART_BYTES {
        return 1;
    }
    SPLIT_K_WORKGROUPS.div_ceil(tiles).min(kvec / 2).max(1)
}

/// The tensor-core GEMM's pipelines (storing, adding) and its operands' widening.
pub struct Coop {
    gemm: [wgpu::ComputePipeline; 2],
    /// The f16 copies of weights (at load) and activations (per step).
    pub widen: Widen,
}

/// A matrix's bind groups for the tensor-core GEMM: the GEMM's (its f16 copy, the f16
/// activations) and the widening of the step's activations.
pub struct CoopBinds {
    /// step, params, f16 weights, row scales, f16 activations, xscale, out, scratch.
    pub gemm: wgpu::BindGroup,
    /// The activations' widening ([`Widen::acts_bind_group`]).
    pub widen: wgpu::BindGroup,
}

/// Rows of a GEMV workgroup.
pub const GEMV_ROWS_PER_WG: usize = (2 * GEMV_WG / GEMV_TPR) as usize;

/// The matmul kernels.
pub struct Matmul {
    /// step, params, weights, row scales, xq, xscale, out.
    pub layout: wgpu::BindGroupLayout,
    /// The one-token GEMV, storing (the bandwidth probe times it alone).
    pub gemv: wgpu::ComputePipeline,
    gemv_acc: wgpu::ComputePipeline,
    gemv4: wgpu::ComputePipeline,
    gemv4_acc: wgpu::ComputePipeline,
    gemm: wgpu::ComputePipeline,
    gemm_acc: wgpu::ComputePipeline,
    finish: wgpu::ComputePipeline,
    finish_acc: wgpu::ComputePipeline,
    /// The tensor-core GEMM, where the target has cooperative matrices.
    pub coop: Option<Coop>,
}

impl Matmul {
    /// Compiles every variant (overrides `ACCUM`, `TPR`).
    pub fn new(t: &Target) -> Self {
        let layout = t.layout(
            "matmul",
            &[Uniform, Uniform, Read, Read, Read, Read, Write, Write],
        );
        let consts = Target::consts(&[("GV_WG", GEMV_WG as usize)]);
        let m = t.module("matmul", &[&consts, COMMON, IO, SRC]);
        let coop = t.tensor_cores.then(|| {
            let m = t.module("matmul_coop", &[COOP_ENABLE, COMMON, IO, COOP]);
            let p =
                |label, acc: f64| t.pipeline(label, &layout, &m, "gemm_coop", &[("ACCUM", acc)]);
            Coop {
                gemm: [p("gemm_coop", 0.0), p("gemm_coop_acc", 1.0)],
                widen: Widen::new(t),
            }
        });
        let tpr = GEMV_TPR as f64;
        let p = |label, entry, acc: f64, with_tpr: bool| {
            let mut c = vec![("ACCUM", acc)];
            if with_tpr {
                c.push(("TPR", tpr));
            }
            t.pipeline(label, &layout, &m, entry, &c)
        };
        Matmul {
            gemv: p("gemv", "gemv", 0.0, true),
            gemv_acc: p("gemv_acc", "gemv", 1.0, true),
            gemv4: p("gemv4", "gemv4", 0.0, true),
            gemv4_acc: p("gemv4_acc", "gemv4", 1.0, true),
            gemm: p("gemm", "gemm", 0.0, false),
            gemm_acc: p("gemm_acc", "gemm", 1.0, false),
            finish: p("gemm_finish", "gemm_finish", 0.0, false),
            finish_acc: p("gemm_finish_acc", "gemm_finish", 1.0, false),
            coop,
            layout,
        }
    }

    /// Ternary matmul of `t` rows by a `rows` × `kvec` matrix; `label` names the matrix in
    /// profiles. `coop`: the matrix's tensor-core bind groups, where it has them.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        rec: &mut Recorder,
        label: &'static str,
        (bg, coop_bgs): (&wgpu::BindGroup, Option<&CoopBinds>),
        rows: usize,
        kvec: usize,
        t: usize,
        accumulate: bool,
    ) {
        let rpw = GEMV_ROWS_PER_WG;
        let tensor = self.coop.as_ref().zip(coop_bgs).filter(|_| t > COOP_MIN_T);
        if let Some((coop, cb)) = tensor {
            coop.widen.record_acts(rec, &cb.widen, kvec, t);
            let splits = coop_splits(rows, kvec, t);
            let dims = [
                rows.div_ceil(COOP_ROWS) as u32,
                t.div_ceil(COOP_TOKENS) as u32,
                splits as u32,
            ];
            if splits == 1 {
                rec.dispatch(label, &coop.gemm[accumulate as usize], &cb.gemm, dims);
            } else {
                rec.dispatch(label, &coop.gemm[0], &cb.gemm, dims);
                self.record_finish(rec, bg, rows, t, accumulate);
            }
        } else if t == 1 {
            let pl = if accumulate {
                &self.gemv_acc
            } else {
                &self.gemv
            };
            rec.dispatch(label, pl, bg, [rows.div_ceil(rpw) as u32, 1, 1]);
        } else if t <= GEMV4_MAX_T {
            let pl = if accumulate {
                &self.gemv4_acc
            } else {
                &self.gemv4
            };
            let dims = [rows.div_ceil(rpw) as u32, t.div_ceil(4) as u32, 1];
            let label = match label {
                "matmul_qkv" => "gemv4_qkv",
                "matmul_o" => "gemv4_o",
                "matmul_gate_up" => "gemv4_gate_up",
                "matmul_down" => "gemv4_down",
                other => other,
            };
            rec.dispatch(label, pl, bg, dims);
        } else {
            let splits = k_splits(rows, kvec, t);
            let dims = [
                rows.div_ceil(64) as u32,
                t.div_ceil(64) as u32,
                splits as u32,
            ];
            if splits == 1 {
                let pl = if accumulate {
                    &self.gemm_acc
                } else {
                    &self.gemm
                };
                rec.dispatch(label, pl, bg, dims);
            } else {
                rec.dispatch(label, &self.gemm, bg, dims);
                self.record_finish(rec, bg, rows, t, accumulate);
            }
        }
    }

    /// The epilogue of a split-K GEMM (either kind: both leave their sums in the scratch).
    fn record_finish(
        &self,
        rec: &mut Recorder,
        bg: &wgpu::BindGroup,
        rows: usize,
        t: usize,
        accumulate: bool,
    ) {
        let finish = if accumulate {
            &self.finish_acc
        } else {
            &self.finish
        };
        let dims = [rows.div_ceil(256) as u32, t as u32, 1];
        rec.dispatch("gemm_finish", finish, bg, dims);
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// The tensor-core GEMM runs only on adapters with cooperative matrices (none in CI), so
    /// its module is at least parsed, validated and translated to SPIR-V (both `ACCUM`s) here.
    #[test]
    fn tensor_core_gemm_compiles_to_spirv() {
        let src = [COOP_ENABLE, COMMON, IO, COOP].concat();
        for accum in [0.0, 1.0] {
            crate::gpu::ops::compiles_to_spirv(&src, "gemm_coop", &[("ACCUM", accum)]);
        }
    }
}

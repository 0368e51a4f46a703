//! Ternary × int8 matmuls: the GEMV for one token, the 4-token GEMV for small steps, the
//! tiled GEMM (dp4a) for larger ones, split over K where a step has few tiles, and the
//! tensor-core GEMM that replaces the last two for steps of more than [`COOP_MIN_T`] tokens
//! where the adapter has cooperative matrices (widening the same packed operands to f16 in its
//! loaders); each storing or adding into its output.

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON};
use crate::gpu::recorder::Recorder;

const IO: &str = include_str!("../../../shaders/matmul_io.wgsl");
const SRC: &str = include_str!("../../../shaders/matmul.wgsl");
const COOP: &str = include_str!("../../../shaders/matmul_coop.wgsl");
pub(super) const COOP_ENABLE: &str = "enable f16;\nenable wgpu_cooperative_matrix;\n";

/// Workgroup memory of a tensor-core GEMM of `tokens` tokens a tile: 128 × 72 and `tokens` ×
/// 72 f16 tiles, eight 16 × 16 f32 staging fragments and the 256 × 4 f16 code table (`ta`,
/// `tb`, `tc`, `lut` in matmul_coop.wgsl).
pub const fn coop_workgroup_bytes(tokens: usize) -> u32 {
    ((COOP_ROWS + tokens) * 72 * 2 + 8 * 256 * 4 + 256 * 8) as u32
}

/// Workgroup memory the tensor-core GEMM needs at least (its narrow tile).
pub const COOP_WORKGROUP_BYTES: u32 = coop_workgroup_bytes(COOP_TOKENS_NARROW);

/// Rows of a tensor-core GEMM tile.
pub const COOP_ROWS: usize = 128;

/// Tokens of the tensor-core GEMM's narrow tile, for adapters without the workgroup memory of
/// [`COOP_TOKENS`].
pub const COOP_TOKENS_NARROW: usize = 64;

/// Tokens of a tensor-core GEMM tile where the adapter has the workgroup memory for it
/// (47,104 bytes), else [`COOP_TOKENS_NARROW`]: each weight tile widened into workgroup memory
/// then feeds twice the tokens. H100, prefill-512 / 3,900 tok/s, two rounds: 64 tokens
/// 15,235 / 10,948 and 15,386 / 11,023; 128 tokens 17,091 / 11,842 and 17,343 / 11,834.
pub const COOP_TOKENS: usize = 128;

/// Steps of more tokens than this take the 128-token tensor-core GEMM: at 256-row batched
/// decode steps it beats dp4a (H100, `bench --batch 256` 8,803 against 8,262 tok/s), at 128
/// rows it loses (6,885 against 7,662).
pub const COOP_MIN_T: usize = 192;

/// As [`COOP_MIN_T`] for the narrow tile: up to 192-token batched decode steps the dp4a
/// kernels were as fast or faster on an H100 (`bench --batch` 64 / 80 / 96 / 128 / 192: 6,450
/// / 5,101 / 5,993 / 7,632 / 7,695 tok/s against 5,350 / 5,041 / 5,731 / 7,302 / 7,239), at 256
/// even, from 512-token prefill chunks on +9%.
pub const COOP_MIN_T_NARROW: usize = 256;

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

/// Workgroups a split-K tensor-core GEMM aims for (2 an SM of an H100): its 128 × 128 tiles
/// are twice the dp4a GEMM's work, so half of [`SPLIT_K_WORKGROUPS`]. H100, two rounds,
/// 264 / 528 / 132: prefill-512 17,891 / 18,052 against 17,292 / 17,101 and 17,260 / 17,168
/// tok/s, `--batch 256` 9,077 / 9,075 against 8,781 / 8,763 and 9,042 / 9,039.
pub const COOP_SPLIT_WORKGROUPS: usize = 264;

/// K splits of a `rows` × `kvec` tensor-core GEMM of `t` tokens (1: no split): enough for
/// [`COOP_SPLIT_WORKGROUPS`] workgroups over its 128-row × `tokens` tiles, each share at least 2
/// steps of 64 columns, where the scratch holds the sums. Tiles that fill at least nine tenths
/// of one wave (a workgroup an SM: half of [`COOP_SPLIT_WORKGROUPS`]) and no more run unsplit:
/// q|k|v's 120 tiles at 512 tokens, H100, two rounds, prefill-512 18,159 / 18,508 tok/s
/// unsplit against 17,797 / 18,064 split three ways.
pub fn coop_splits(rows: usize, kvec: usize, t: usize, tokens: usize) -> usize {
    let tiles = rows.div_ceil(COOP_ROWS) * t.div_ceil(tokens);
    let wave = COOP_SPLIT_WORKGROUPS / 2;
    let one_wave = tiles * 10 >= wave * 9 && tiles <= wave;
    if one_wave || tiles >= COOP_SPLIT_WORKGROUPS || rows * t * 4 > PART_BYTES {
        return 1;
    }
    COOP_SPLIT_WORKGROUPS.div_ceil(tiles).min(kvec / 2).max(1)
}

/// The tensor-core GEMM's pipelines (storing, adding).
pub struct Coop {
    gemm: [wgpu::ComputePipeline; 2],
    /// Tokens a tile ([`COOP_TOKENS`] or [`COOP_TOKENS_NARROW`]).
    tokens: usize,
    /// Steps of more tokens than this take it ([`COOP_MIN_T`] or [`COOP_MIN_T_NARROW`]).
    min_t: usize,
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
            let wide = t.device.limits().max_compute_workgroup_storage_size
                >= coop_workgroup_bytes(COOP_TOKENS);
            let (tokens, min_t) = if wide {
                (COOP_TOKENS, COOP_MIN_T)
            } else {
                (COOP_TOKENS_NARROW, COOP_MIN_T_NARROW)
            };
            let tn = Target::consts(&[("TN", tokens)]);
            let m = t.module("matmul_coop", &[COOP_ENABLE, &tn, COMMON, IO, COOP]);
            let p =
                |label, acc: f64| t.pipeline(label, &layout, &m, "gemm_coop", &[("ACCUM", acc)]);
            Coop {
                gemm: [p("gemm_coop", 0.0), p("gemm_coop_acc", 1.0)],
                tokens,
                min_t,
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

    /// Ternary matmul of `t` rows by a `rows` × `kvec` matrix (its bind group `bg`); `label`
    /// names the matrix in profiles.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        rec: &mut Recorder,
        label: &'static str,
        bg: &wgpu::BindGroup,
        rows: usize,
        kvec: usize,
        t: usize,
        accumulate: bool,
    ) {
        let rpw = GEMV_ROWS_PER_WG;
        let tensor = self.coop.as_ref().filter(|c| t > c.min_t);
        if let Some(coop) = tensor {
            let splits = coop_splits(rows, kvec, t, coop.tokens);
            let dims = [
                rows.div_ceil(COOP_ROWS) as u32,
                t.div_ceil(coop.tokens) as u32,
                splits as u32,
            ];
            if splits == 1 {
                rec.dispatch(label, &coop.gemm[accumulate as usize], bg, dims);
            } else {
                rec.dispatch(label, &coop.gemm[0], bg, dims);
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

    /// At the 2B-4T shape's 512-token steps q|k|v (3,840 rows: 120 tiles, nearly a wave) runs
    /// unsplit, o and down (2,560 rows: 80 tiles) split, gate|up (13,824 rows: 432 tiles) not.
    #[test]
    fn tensor_core_splits_leave_nearly_full_waves_unsplit() {
        let t = 512;
        assert_eq!(coop_splits(3840, 40, t, COOP_TOKENS), 1);
        assert_eq!(coop_splits(2560, 40, t, COOP_TOKENS), 4);
        assert_eq!(coop_splits(2560, 108, t, COOP_TOKENS), 4);
        assert_eq!(coop_splits(13824, 40, t, COOP_TOKENS), 1);
        // Narrow tiles: more than a wave but fewer than two splits in two.
        assert_eq!(coop_splits(1280, 40, 1536, COOP_TOKENS_NARROW), 2);
    }

    /// The tensor-core GEMM runs only on adapters with cooperative matrices (none in CI), so
    /// its module is at least parsed, validated and translated to SPIR-V (both `ACCUM`s) here.
    #[test]
    fn tensor_core_gemm_compiles_to_spirv() {
        for tokens in [COOP_TOKENS_NARROW, COOP_TOKENS] {
            let tn = Target::consts(&[("TN", tokens)]);
            let src = [COOP_ENABLE, &tn, COMMON, IO, COOP].concat();
            for accum in [0.0, 1.0] {
                crate::gpu::ops::compiles_to_spirv(&src, "gemm_coop", &[("ACCUM", accum)]);
            }
        }
    }
}

//! The output head over one shard of vocabulary rows: float (bf16 or f32) rows against the
//! final-normed f32 row, or int8 rows with per-row scales against the quantized row. Steps of
//! many rows take tiles that read each weight once per 16 or 64 rows, on tensor cores where
//! the adapter has them (bf16 weights, head_coop.wgsl).

use bytemuck::{Pod, Zeroable};

use super::{Target, Use::*, COMMON, ROW_WG};
use crate::gpu::recorder::Recorder;

const SHARD: &str = include_str!("../../../shaders/head_shard.wgsl");
const FLOAT: &str = include_str!("../../../shaders/head.wgsl");
const INT8: &str = include_str!("../../../shaders/head_i8.wgsl");
const COOP: &str = include_str!("../../../shaders/head_coop.wgsl");

/// Workgroup memory of the tensor-core head: a 128 × 72 f16 weight tile, two 64 × 72 f16
/// input tiles (hi, lo) and eight 16 × 16 f32 staging fragments (head_coop.wgsl).
pub const COOP_WORKGROUP_BYTES: u32 = (128 * 72 * 2 + 2 * 64 * 72 * 2 + 8 * 256 * 4) as u32;

/// Step rows from which the float head runs on tensor cores, where the target has them.
pub const COOP_MIN_ROWS: usize = 32;

/// Step rows from which the float head runs as tiles of 16 and of 64 step rows
/// ([`Head::record`]). H200, synth 2B-4T, batched decode: below 16 rows the one-row kernel is
/// faster (tiles of 16 at 8 rows −2%); tiles of 16 +9% at 16 rows, tiles of 64 +17% at 32,
/// +50% at 64 and +58% at 256 rows.
pub const GEMM_MIN_ROWS: [usize; 2] = [16, 32];

/// One shard of the embedding or head (`Shard` in embed.wgsl and head_shard.wgsl).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct ShardP {
    /// First vocabulary row held by this shard.
    pub row0: u32,
    /// Rows in this shard.
    pub rows: u32,
    /// Hidden size.
    pub cols: u32,
    /// u32 words per stored row (padded).
    pub row_words: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// vec4 per row of the final-normed activations.
    pub hn_vec4: u32,
    /// bf16 weights: a power of two that scales the shard's largest weight below 2^15, so
    /// every weight is an f16 (the tensor-core head); else 1.
    pub scale: f32,
    /// `1 / scale`.
    pub unscale: f32,
}

/// The head kernels.
pub struct Head {
    /// step, shard, weights, normed x, logits.
    pub layout: wgpu::BindGroupLayout,
    /// step, shard, int8 rows, row scales, xq, xscale, logits.
    pub i8_layout: wgpu::BindGroupLayout,
    float: wgpu::ComputePipeline,
    /// Tiles of 16 and of 64 step rows.
    float_gemm: [wgpu::ComputePipeline; 2],
    int8: wgpu::ComputePipeline,
    /// The tensor-core tiles of 128 vocabulary × 64 step rows.
    coop: Option<wgpu::ComputePipeline>,
    rows_per_wg: usize,
}

impl Head {
    /// Compiles both heads (overrides `F32_WEIGHTS`, `TPR`).
    pub fn new(t: &Target) -> Self {
        let layout = t.layout("head", &[Uniform, Uniform, Read, Read, Write]);
        let i8_layout = t.layout(
            "head_i8",
            &[Uniform, Uniform, Read, Read, Read, Read, Write],
        );
        let tpr = t.tpr() as f64;
        let f32w = if t.f32_head { 1.0 } else { 0.0 };
        let m = t.module("head", &[COMMON, t.reduce(), SHARD, FLOAT]);
        let m_i8 = t.module("head_i8", &[COMMON, t.reduce(), SHARD, INT8]);
        let consts = [("F32_WEIGHTS", f32w), ("TPR", tpr)];
        let coop = (t.tensor_core_head
            && t.device.limits().max_compute_workgroup_storage_size >= COOP_WORKGROUP_BYTES)
            .then(|| {
                let src = [super::matmul::COOP_ENABLE, COMMON, SHARD, COOP];
                let m = t.module("head_coop", &src);
                t.pipeline("head_coop", &layout, &m, "head_coop", &[])
            });
        Head {
            coop,
            float: t.pipeline("head", &layout, &m, "main", &consts),
            float_gemm: [16.0, 64.0]
                .map(|tt| t.pipeline("head_gemm", &layout, &m, "gemm", &[consts[0], ("TT", tt)])),
            int8: t.pipeline("head_i8", &i8_layout, &m_i8, "main", &[("TPR", tpr)]),
            layout,
            i8_layout,
            rows_per_wg: (ROW_WG / t.tpr()) as usize,
        }
    }

    /// Vocabulary rows one workgroup computes.
    pub fn rows_per_wg(&self) -> usize {
        self.rows_per_wg
    }

    /// The head over one shard of `rows` vocabulary rows for `nrows` step rows: from
    /// [`GEMM_MIN_ROWS`] step rows on (float heads), as tiles that read each weight once per
    /// 64 step rows, unless `one_row_sums` asks for every row's logits exactly as the one-row
    /// kernel sums them (decode steps).
    pub fn record(
        &self,
        rec: &mut Recorder,
        bg: &wgpu::BindGroup,
        rows: usize,
        nrows: usize,
        int8: bool,
        one_row_sums: bool,
    ) {
        let [min16, min64] = GEMM_MIN_ROWS;
        let coop = self.coop.as_ref().filter(|_| nrows >= COOP_MIN_ROWS);
        if let (false, false, Some(pl)) = (int8, one_row_sums, coop) {
            let dims = [rows.div_ceil(128) as u32, nrows.div_ceil(64) as u32, 1];
            rec.dispatch("head_coop", pl, bg, dims);
            return;
        }
        if !int8 && !one_row_sums && nrows >= min16 {
            let (tt, pl) = if nrows >= min64 {
                (64, &self.float_gemm[1])
            } else {
                (16, &self.float_gemm[0])
            };
            let dims = [rows.div_ceil(64) as u32, nrows.div_ceil(tt) as u32, 1];
            rec.dispatch("head_gemm", pl, bg, dims);
            return;
        }
        let (label, pl) = if int8 {
            ("head_i8", &self.int8)
        } else {
            ("head", &self.float)
        };
        let dims = [nrows as u32, rows.div_ceil(self.rows_per_wg) as u32, 1];
        rec.dispatch(label, pl, bg, dims);
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// The tensor-core head runs only on adapters with cooperative matrices (none in CI), so
    /// its module is at least parsed, validated and translated to SPIR-V here.
    #[test]
    fn tensor_core_head_compiles_to_spirv() {
        let src = [super::super::matmul::COOP_ENABLE, COMMON, SHARD, COOP].concat();
        crate::gpu::ops::compiles_to_spirv(&src, "head_coop", &[]);
    }
}

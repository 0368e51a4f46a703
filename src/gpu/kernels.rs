//! One launcher per shader: each records one compute pass into the step's encoder.

use super::pipelines::Pipelines;

/// Records one dispatch of `pipeline` with `bg` as group 0.
fn dispatch(
    enc: &mut wgpu::CommandEncoder,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    bg: &wgpu::BindGroup,
    dims: [u32; 3],
) {
    if dims.contains(&0) {
        return;
    }
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, bg, &[]);
    pass.dispatch_workgroups(dims[0], dims[1], dims[2]);
}

/// Embedding gather of `t` tokens from one shard (`cols` = hidden size).
pub fn embed(
    enc: &mut wgpu::CommandEncoder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    cols: usize,
    t: usize,
) {
    dispatch(
        enc,
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
pub fn norm(
    enc: &mut wgpu::CommandEncoder,
    p: &Pipelines,
    kind: NormKind,
    bg: &wgpu::BindGroup,
    t: usize,
) {
    let pl = match kind {
        NormKind::Quant => &p.norm_quant,
        NormKind::Relu2Quant => &p.norm_relu2,
        NormKind::F32 => &p.norm_f32,
    };
    dispatch(enc, "norm", pl, bg, [t as u32, 1, 1]);
}

/// Ternary matmul of `t` rows by a `rows`-row matrix: GEMV for one token, tiled GEMM otherwise.
pub fn matmul(
    enc: &mut wgpu::CommandEncoder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    rows: usize,
    t: usize,
    accumulate: bool,
) {
    if t == 1 {
        let pl = if accumulate { &p.gemv_acc } else { &p.gemv };
        let rpw = p.rows_per_wg() as usize;
        dispatch(enc, "gemv", pl, bg, [rows.div_ceil(rpw) as u32, 1, 1]);
    } else {
        let pl = if accumulate { &p.gemm_acc } else { &p.gemm };
        dispatch(
            enc,
            "gemm",
            pl,
            bg,
            [rows.div_ceil(64) as u32, t.div_ceil(8) as u32, 1],
        );
    }
}

/// RoPE of `heads` (q + kv) heads of `t` rows, and the KV write.
pub fn rope(
    enc: &mut wgpu::CommandEncoder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    heads: usize,
    t: usize,
) {
    dispatch(enc, "rope", &p.rope, bg, [heads as u32, t as u32, 1]);
}

/// Split attention of `t` rows over `nsplit` splits, then the merge.
pub fn attention(
    enc: &mut wgpu::CommandEncoder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    nsplit: usize,
    heads: usize,
    t: usize,
) {
    dispatch(
        enc,
        "attend",
        &p.attend,
        bg,
        [nsplit as u32, heads as u32, t as u32],
    );
    dispatch(enc, "combine", &p.combine, bg, [heads as u32, t as u32, 1]);
}

/// The head over one shard of `rows` vocabulary rows for `nrows` step rows.
pub fn head(
    enc: &mut wgpu::CommandEncoder,
    p: &Pipelines,
    bg: &wgpu::BindGroup,
    rows: usize,
    nrows: usize,
) {
    let rpw = p.rows_per_wg() as usize;
    dispatch(
        enc,
        "head",
        &p.head,
        bg,
        [rows.div_ceil(rpw) as u32, nrows as u32, 1],
    );
}

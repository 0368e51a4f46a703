// f16 copies for the tensor-core GEMM (matmul_coop.wgsl), two f16 to a u32 (pack2x16float: the
// lower column in the low half), so that this file needs no f16 support of its own. Every value
// (a weight -1, 0, 1 or an int8 activation) is exact in f16.
// widen_weights: the matmul layout's code words (matmul_io.wgsl: `words` per row, column
// 16 k + 4 s + b of a row at bits 8 b + 2 s of its word k) -> f16 rows of 16 * words columns
// in column order, each input word to 8 output words.
// Dispatch: (ceil(words / 64), rows of this slice); row `rbase + y`.
// widen_acts: int8 activation rows (4 to a u32, column 4 i + b at byte b of word i) -> f16 rows,
// each input word to 2 output words. Dispatch: (ceil(words / 64), T).

struct WidenP {
    rows: u32,  // rows (weights) or 0 (activations: the step's T)
    words: u32, // input u32 per row
    rbase: u32, // first row of the dispatch (weights)
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: WidenP;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(64)
fn widen_weights(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let r = p.rbase + gid.y;
    if k >= p.words || r >= p.rows {
        return;
    }
    let wd = src[r * p.words + k];
    let o = (r * p.words + k) * 8u;
    for (var j = 0u; j < 8u; j = j + 1u) {
        // Columns 16 k + 2 j and 16 k + 2 j + 1: s = j / 2, b = 2 (j % 2) and b + 1.
        let sh = 2u * (j / 2u) + 16u * (j % 2u);
        let lo = f32((wd >> sh) & 3u) - 1.0;
        let hi = f32((wd >> (sh + 8u)) & 3u) - 1.0;
        dst[o + j] = pack2x16float(vec2<f32>(lo, hi));
    }
}

@compute @workgroup_size(64)
fn widen_acts(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if i >= p.words || t >= step.t {
        return;
    }
    let x = vec4<f32>(unpack4xI8(src[t * p.words + i]));
    let o = (t * p.words + i) * 2u;
    dst[o] = pack2x16float(x.xy);
    dst[o + 1u] = pack2x16float(x.zw);
}

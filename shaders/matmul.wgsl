// Ternary (2-bit codes, 16 per u32, code = w + 1) x int8 (4 per u32) matmul with exact i32
// accumulation and one f32 rescale: out = f32(sum) * xscale[t] * row_scale[r].
// Weights: row-major, each row padded to a multiple of 64 columns (one vec4<u32>).
// Activations: row t holds kvec * 4 vec4<u32> (64 int8 per weight vec4).
// gemv: dispatch (ceil(rows / (256 / TPR)), T); TPR invocations per row.
// gemm: dispatch (ceil(rows / 64), ceil(T / 8)); one row x 8 tokens per invocation.

struct MatP {
    rows: u32,
    kvec: u32, // vec4<u32> of weights per row
    ld: u32,   // f32 per output row
    pad: u32,
}

override ACCUM: bool = false;
override TPR: u32 = 32u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> mp: MatP;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rs: array<f32>;
@group(0) @binding(4) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> xs: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

// 16 ternary codes of `wb` times the 16 int8 of `xv`.
fn dot16(wb: u32, xv: vec4<u32>) -> i32 {
    var acc = 0;
    for (var j = 0u; j < 4u; j = j + 1u) {
        let xw = xv[j];
        let cw = wb >> (8u * j);
        acc = acc + (i32(cw & 3u) - 1) * (bitcast<i32>(xw << 24u) >> 24u);
        acc = acc + (i32((cw >> 2u) & 3u) - 1) * (bitcast<i32>(xw << 16u) >> 24u);
        acc = acc + (i32((cw >> 4u) & 3u) - 1) * (bitcast<i32>(xw << 8u) >> 24u);
        acc = acc + (i32((cw >> 6u) & 3u) - 1) * (bitcast<i32>(xw) >> 24u);
    }
    return acc;
}

fn store(t: u32, row: u32, acc: i32) {
    let v = f32(acc) * xs[t] * rs[row];
    let o = t * mp.ld + row;
    if ACCUM {
        out[o] = out[o] + v;
    } else {
        out[o] = v;
    }
}

@compute @workgroup_size(256)
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let rpw = 256u / TPR;
    let row = wg.x * rpw + li / TPR;
    let lane = li % TPR;
    let t = wg.y;
    var acc = 0;
    if row < mp.rows {
        let wbase = row * mp.kvec;
        let xbase = t * mp.kvec * 4u;
        for (var m = lane; m < mp.kvec; m = m + TPR) {
            let wv = w[wbase + m];
            let xb = xbase + 4u * m;
            acc = acc + dot16(wv.x, xq[xb]) + dot16(wv.y, xq[xb + 1u])
                + dot16(wv.z, xq[xb + 2u]) + dot16(wv.w, xq[xb + 3u]);
        }
    }
    acc = reduce_i32(acc, li);
    if lane == 0u && row < mp.rows {
        store(t, row, acc);
    }
}

// 8 tokens x 4 weight vec4 (256 columns) of activations per k-step.
var<workgroup> xt: array<vec4<u32>, 128>;

@compute @workgroup_size(64)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.x * 64u + li;
    let t0 = wg.y * 8u;
    let xrow = mp.kvec * 4u;
    var acc: array<i32, 8>;
    for (var i = 0u; i < 8u; i = i + 1u) {
        acc[i] = 0;
    }
    for (var m0 = 0u; m0 < mp.kvec; m0 = m0 + 4u) {
        for (var i = 0u; i < 2u; i = i + 1u) {
            let e = li + 64u * i;
            let tt = e / 16u;
            let gi = m0 * 4u + e % 16u;
            var v = vec4<u32>(0u);
            if t0 + tt < step.t && gi < xrow {
                v = xq[(t0 + tt) * xrow + gi];
            }
            xt[e] = v;
        }
        workgroupBarrier();
        if row < mp.rows {
            let mend = min(4u, mp.kvec - m0);
            for (var mm = 0u; mm < mend; mm = mm + 1u) {
                let wv = w[row * mp.kvec + m0 + mm];
                for (var tt = 0u; tt < 8u; tt = tt + 1u) {
                    let xb = tt * 16u + mm * 4u;
                    acc[tt] = acc[tt] + dot16(wv.x, xt[xb]) + dot16(wv.y, xt[xb + 1u])
                        + dot16(wv.z, xt[xb + 2u]) + dot16(wv.w, xt[xb + 3u]);
                }
            }
        }
        workgroupBarrier();
    }
    if row < mp.rows {
        for (var tt = 0u; tt < 8u; tt = tt + 1u) {
            if t0 + tt < step.t {
                store(t0 + tt, row, acc[tt]);
            }
        }
    }
}

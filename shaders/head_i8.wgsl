// The int8 output head (`--head int8`): logits[r] = f32(q[r] · xq[t]) * xs[t] * scale[r], with
// per-row int8 weights (absmax / 127 scales, quantized at load like the CPU backend's) and the
// final-normed row quantized per token by the norm kernel (xq, xs). Exact i32 dot products.
// Rows of `row_words` u32 (4 int8 each, padded to 64). Dispatch as head.wgsl.

override TPR: u32 = 32u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> shard: Shard;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> ws: array<f32>;
@group(0) @binding(4) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> xs: array<f32>;
@group(0) @binding(6) var<storage, read_write> logits: array<f32>;

fn dot16(a: vec4<u32>, b: vec4<u32>) -> i32 {
    return dot4I8Packed(a.x, b.x) + dot4I8Packed(a.y, b.y) + dot4I8Packed(a.z, b.z)
        + dot4I8Packed(a.w, b.w);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let rpw = 256u / TPR;
    let row = wg.y * rpw + li / TPR;
    let lane = li % TPR;
    let tl = wg.x;
    let t = step.row0 + tl;
    var acc = 0;
    if row < shard.rows {
        let nv = shard.row_words / 4u;
        let wbase = row * nv;
        let xbase = t * shard.hn_vec4;
        for (var m = lane; m < nv; m = m + TPR) {
            acc = acc + dot16(w[wbase + m], xq[xbase + m]);
        }
    }
    acc = reduce_i32(acc, li);
    if lane == 0u && row < shard.rows {
        logits[tl * shard.vocab + shard.row0 + row] = f32(acc) * xs[t] * ws[row];
    }
}

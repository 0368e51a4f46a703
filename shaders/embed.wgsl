// Embedding gather from one shard of the (bf16 or f32) embedding matrix.
// Dispatch: (ceil(cols / 64), T).

struct Shard {
    row0: u32,      // first vocabulary row held by this shard
    rows: u32,      // rows in this shard
    cols: u32,      // hidden size
    row_words: u32, // u32 words per stored row (padded)
    vocab: u32,
    hn_vec4: u32,   // vec4 per row of the final-normed activations
    scale: f32,   // the head's (head_shard.wgsl)
    unscale: f32,
}

override F32_WEIGHTS: bool = false;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> shard: Shard;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.y;
    let c = wg.x * 64u + li;
    if t >= step.t || c >= shard.cols {
        return;
    }
    let tok = tokens[t];
    if tok < shard.row0 || tok >= shard.row0 + shard.rows {
        return;
    }
    let r = tok - shard.row0;
    var v: f32;
    if F32_WEIGHTS {
        v = bitcast<f32>(w[r * shard.row_words + c]);
    } else {
        let word = w[r * shard.row_words + c / 2u];
        // bf16 -> f32: the 16 bits become the high half of an f32.
        v = bitcast<f32>(select(word << 16u, word & 0xffff0000u, (c & 1u) == 1u));
    }
    x[t * shard.cols + c] = v;
}

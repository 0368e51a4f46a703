// The output head over one shard of the vocabulary: logits[r] = head[r] · hn[t] for the step
// rows row0..row0+nrows. Weights are bf16 pairs in u32 (or f32 bits), rows padded to 8 elements.
// Dispatch: (nrows, ceil(shard rows / (256 / TPR))); TPR invocations per row. The step rows
// of one block of vocabulary rows are neighbouring workgroups, so a batch reads each weight
// from memory once (the others hit L2). `struct Shard` comes from head_shard.wgsl.

override F32_WEIGHTS: bool = false;
override TPR: u32 = 32u;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> shard: Shard;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> hn: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;

fn lo(v: u32) -> f32 {
    return bitcast<f32>(v << 16u);
}

fn hi(v: u32) -> f32 {
    return bitcast<f32>(v & 0xffff0000u);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let rpw = 256u / TPR;
    let row = wg.y * rpw + li / TPR;
    let lane = li % TPR;
    let tl = wg.x;
    let t = step.row0 + tl;
    var acc = 0.0;
    if row < shard.rows {
        let nv = shard.row_words / 4u;
        let wbase = row * nv;
        let hbase = t * shard.hn_vec4;
        for (var m = lane; m < nv; m = m + TPR) {
            let wv = w[wbase + m];
            if F32_WEIGHTS {
                acc = acc + dot(bitcast<vec4<f32>>(wv), hn[hbase + m]);
            } else {
                let h0 = hn[hbase + 2u * m];
                let h1 = hn[hbase + 2u * m + 1u];
                acc = acc + dot(vec4<f32>(lo(wv.x), hi(wv.x), lo(wv.y), hi(wv.y)), h0)
                    + dot(vec4<f32>(lo(wv.z), hi(wv.z), lo(wv.w), hi(wv.w)), h1);
            }
        }
    }
    acc = reduce_f32(acc, li);
    if lane == 0u && row < shard.rows {
        logits[tl * shard.vocab + shard.row0 + row] = acc;
    }
}

// Greedy decoding on the GPU: the index of the largest logit of each logits row (the lowest
// index on ties, like the CPU sampler), so a step reads back 4 bytes per row instead of the
// logits. partial: dispatch (ceil(vocab / ARG_CHUNK), rows), 256 invocations; each workgroup
// writes its (value, index) to part[row * parts + chunk]. final: dispatch (rows), reads a row's
// partials and writes result[row].

struct ArgP {
    n: u32,     // logits
    parts: u32, // partial results
    pad0: u32,
    pad1: u32,
}

// ARG_CHUNK (logits per partial) is declared by src/gpu/ops/argmax.rs.

@group(0) @binding(0) var<uniform> ap: ArgP;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> part: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> result: array<u32>;

var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;

// Is (v, i) before (bv, bj) in argmax order?
fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
    return v > w || (v == w && i < j);
}

fn tree(li: u32) {
    for (var s = 128u; s > 0u; s = s >> 1u) {
        if li < s {
            let v = bv[li + s];
            let i = bi[li + s];
            if better(v, i, bv[li], bi[li]) {
                bv[li] = v;
                bi[li] = i;
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let start = wg.x * ARG_CHUNK;
    let end = min(start + ARG_CHUNK, ap.n);
    let base = wg.y * ap.n;
    var best = NEG_BIG;
    var bidx = 0xffffffffu;
    for (var i = start + li; i < end; i = i + 256u) {
        let v = logits[base + i];
        if better(v, i, best, bidx) {
            best = v;
            bidx = i;
        }
    }
    bv[li] = best;
    bi[li] = bidx;
    workgroupBarrier();
    tree(li);
    if li == 0u {
        part[wg.y * ap.parts + wg.x] = vec2<u32>(bitcast<u32>(bv[0]), bi[0]);
    }
}

@compute @workgroup_size(256)
fn final_(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    var best = NEG_BIG;
    var bidx = 0xffffffffu;
    for (var i = li; i < ap.parts; i = i + 256u) {
        let p = part[wg.x * ap.parts + i];
        let v = bitcast<f32>(p.x);
        if better(v, p.y, best, bidx) {
            best = v;
            bidx = p.y;
        }
    }
    bv[li] = best;
    bi[li] = bidx;
    workgroupBarrier();
    tree(li);
    if li == 0u {
        // All logits below NEG_BIG (or NaN): fall back to 0, like the CPU's argmax start.
        result[wg.x] = select(bi[0], 0u, bi[0] == 0xffffffffu);
    }
}

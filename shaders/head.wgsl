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

// gemm: the head for many step rows at once, each weight read from memory once per TT step
// rows: a 64 vocabulary-row x TT step-row tile per 256-invocation workgroup, 4 x TT / 16 of
// them per invocation, K in chunks of 32 columns through workgroup memory (the weights widened
// to f32 once per tile, not once per step row). Sums in a different order than `main`'s.
// Dispatch: (ceil(shard rows / 64), ceil(nrows / TT)).
override TT: u32 = 64u; // 16 or 64
// 16 KiB of workgroup memory (WebGPU's default limit): 64 rows x 8 vec4 each, the vec4 of a row
// swizzled (`at`) so that 8 rows read at one column hit different banks.
var<workgroup> hw: array<vec4<f32>, 512>; // [vocabulary row][column / 4]
var<workgroup> hx: array<vec4<f32>, 512>; // [step row][column / 4]

fn at(row: u32, k: u32) -> u32 {
    return row * 8u + (k ^ (row & 7u));
}

// Weight columns 8q..8q+8 of a chunk as two vec4 (`a`, `b`: vec4<u32> number 2q and 2q + 1
// of the chunk for f32 weights; `a` alone holds them as bf16).
fn widen_lo(a: vec4<u32>) -> vec4<f32> {
    if F32_WEIGHTS {
        return bitcast<vec4<f32>>(a);
    }
    return vec4<f32>(lo(a.x), hi(a.x), lo(a.y), hi(a.y));
}

fn widen_hi(a: vec4<u32>, b: vec4<u32>) -> vec4<f32> {
    if F32_WEIGHTS {
        return bitcast<vec4<f32>>(b);
    }
    return vec4<f32>(lo(a.z), hi(a.z), lo(a.w), hi(a.w));
}

// One loader's share of chunk c (32 columns): 8 columns of a weight row and of a step row.
struct HeadChunk {
    wa: vec4<u32>,
    wb: vec4<u32>,
    xa: vec4<f32>,
    xb: vec4<f32>,
}

fn load_chunk(c: u32, lq: u32, wsrc: u32, wok: bool, xsrc: u32, xok: bool) -> HeadChunk {
    var l = HeadChunk(vec4<u32>(0u), vec4<u32>(0u), vec4<f32>(0.0), vec4<f32>(0.0));
    // Columns past the padded row (the last chunk; all of chunk `chunks`) are zero.
    if 8u * c + 2u * lq >= shard.hn_vec4 {
        return l;
    }
    if wok {
        // vec4<u32> per chunk of a weight row: 4 of bf16 pairs, 8 of f32.
        if F32_WEIGHTS {
            l.wa = w[wsrc + 8u * c + 2u * lq];
            l.wb = w[wsrc + 8u * c + 2u * lq + 1u];
        } else {
            l.wa = w[wsrc + 4u * c + lq];
        }
    }
    if xok {
        l.xa = hn[xsrc + 8u * c + 2u * lq];
        l.xb = hn[xsrc + 8u * c + 2u * lq + 1u];
    }
    return l;
}

// Row i's weights against the four step rows' activations.
fn dots4(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
}

@compute @workgroup_size(256)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r0 = wg.x * 64u;
    let t0 = wg.y * TT;
    let tx = li % 16u; // vocabulary rows tx + 16 i
    let ty = li / 16u; // step rows ty + 16 j
    // Loader roles: vocabulary / step row li / 4, columns 8 (li % 4) .. + 8 of each chunk.
    let lr = li / 4u;
    let lq = li % 4u;
    let nv = shard.row_words / 4u;
    let wok = r0 + lr < shard.rows;
    let wsrc = select(0u, r0 + lr, wok) * nv;
    let xok = lr < TT && t0 + lr < step.nrows;
    let xsrc = (step.row0 + select(0u, t0 + lr, xok)) * shard.hn_vec4;
    let chunks = (shard.hn_vec4 + 7u) / 8u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // The global loads of chunk c + 1 are issued before chunk c's arithmetic, so their latency
    // hides behind it.
    var l = load_chunk(0u, lq, wsrc, wok, xsrc, xok);
    for (var c = 0u; c < chunks; c = c + 1u) {
        workgroupBarrier();
        hw[at(lr, 2u * lq)] = widen_lo(l.wa);
        hw[at(lr, 2u * lq + 1u)] = widen_hi(l.wa, l.wb);
        if lr < TT {
            hx[at(lr, 2u * lq)] = l.xa;
            hx[at(lr, 2u * lq + 1u)] = l.xb;
        }
        workgroupBarrier();
        l = load_chunk(c + 1u, lq, wsrc, wok, xsrc, xok);
        for (var k = 0u; k < 8u; k = k + 1u) {
            let a0 = hw[at(tx, k)];
            let a1 = hw[at(tx + 16u, k)];
            let a2 = hw[at(tx + 32u, k)];
            let a3 = hw[at(tx + 48u, k)];
            if TT == 16u {
                // One step row per invocation: component x only.
                let b = hx[at(ty, k)];
                acc0.x = acc0.x + dot(a0, b);
                acc1.x = acc1.x + dot(a1, b);
                acc2.x = acc2.x + dot(a2, b);
                acc3.x = acc3.x + dot(a3, b);
            } else {
                let b0 = hx[at(ty, k)];
                let b1 = hx[at(ty + 16u, k)];
                let b2 = hx[at(ty + 32u, k)];
                let b3 = hx[at(ty + 48u, k)];
                acc0 = acc0 + dots4(a0, b0, b1, b2, b3);
                acc1 = acc1 + dots4(a1, b0, b1, b2, b3);
                acc2 = acc2 + dots4(a2, b0, b1, b2, b3);
                acc3 = acc3 + dots4(a3, b0, b1, b2, b3);
            }
        }
    }
    put_logits(r0 + tx, t0 + ty, acc0);
    put_logits(r0 + tx + 16u, t0 + ty, acc1);
    put_logits(r0 + tx + 32u, t0 + ty, acc2);
    put_logits(r0 + tx + 48u, t0 + ty, acc3);
}

// Step rows t, t + 16, t + 32, t + 48 of vocabulary row `row` of the shard.
fn put_logits(row: u32, t: u32, a: vec4<f32>) {
    if row >= shard.rows {
        return;
    }
    for (var j = 0u; j < TT / 16u; j = j + 1u) {
        if t + 16u * j < step.nrows {
            logits[(t + 16u * j) * shard.vocab + shard.row0 + row] = a[j];
        }
    }
}

// Top-k sampling on the GPU: for each selected logits row, its k best logits scaled by the row's
// 1 / temperature, as the CPU sampler orders them (larger value first, `total_cmp`, then lower
// id), so a sampled step reads back k (value, id) pairs per row instead of the logits. Each
// workgroup sorts a chunk of TK_CHUNK entries of one row in workgroup memory (bitonic) and writes
// its first k to dst; passes repeat over those until one workgroup per row is left. Entries are
// (key, id): key orders like `total_cmp` as a u32.
// Dispatch: (ceil(n / TK_CHUNK), selected rows); FIRST (the first pass) reads `logits` row
// sel[j].x scaled by bitcast<f32>(sel[j].y), later passes the previous pass's pairs from `src`
// (n per row).

struct TopkP {
    n: u32,  // entries of each row this pass reads
    k: u32,  // entries each workgroup keeps (k <= TK_CHUNK / 8)
    ld: u32, // f32 per logits row (first pass)
    pad: u32,
}

// TK_CHUNK (entries a workgroup sorts) is declared by src/gpu/ops/topk.rs.

@group(0) @binding(0) var<uniform> tp: TopkP;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> dst: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read> sel: array<vec2<u32>>;

var<workgroup> sk: array<vec2<u32>, TK_CHUNK>;

// The f32 order of `total_cmp` as a u32 order: negatives (sign set) have every bit flipped,
// the rest the sign bit set.
fn key_of(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// Does a come before b (larger key, then lower id)? Padding is (0, 0xffffffff): last.
fn before(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x > b.x || (a.x == b.x && a.y < b.y);
}

// Sorts sk best first (bitonic network, 4 entries and 2 compare-exchanges per invocation and
// stage), then writes the first k to slot `slot` (k entries each) of dst.
fn sort_and_keep(slot: u32, li: u32) {
    workgroupBarrier();
    for (var size = 2u; size <= TK_CHUNK; size = size << 1u) {
        for (var stride = size >> 1u; stride > 0u; stride = stride >> 1u) {
            for (var h = 0u; h < 2u; h = h + 1u) {
                let p = li + 256u * h;
                let i = 2u * stride * (p / stride) + p % stride;
                let j = i + stride;
                let a = sk[i];
                let b = sk[j];
                // Blocks with (i & size) == 0 end best first, the others best last.
                let swap = select(before(a, b), before(b, a), (i & size) == 0u);
                if swap {
                    sk[i] = b;
                    sk[j] = a;
                }
            }
            workgroupBarrier();
        }
    }
    if li < tp.k {
        dst[slot * tp.k + li] = sk[li];
    }
}

override FIRST: bool = true;

// Entry g of selected row j of this pass's input: a logit as (key, id) in the first pass, else
// a previous pair.
fn entry(j: u32, g: u32) -> vec2<u32> {
    if FIRST {
        let s = sel[j];
        return vec2<u32>(key_of(logits[s.x * tp.ld + g] * bitcast<f32>(s.y)), g);
    }
    return src[j * tp.n + g];
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    for (var h = 0u; h < 4u; h = h + 1u) {
        let e = li + 256u * h;
        let g = wg.x * TK_CHUNK + e;
        var v = vec2<u32>(0u, 0xffffffffu);
        if g < tp.n {
            v = entry(wg.y, g);
        }
        sk[e] = v;
    }
    sort_and_keep(wg.y * nwg.x + wg.x, li);
}

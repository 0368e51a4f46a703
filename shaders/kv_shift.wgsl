// Moves positions `src..src+n` of one sequence's keys and values to `dst..dst+n` (dst < src)
// for attention sinks with a sliding window (src/engine/window.rs): each key rotated back by
// d = src - dst positions (the cos/sin `table` row of d, rotation by -d), values copied. One
// workgroup per KV head; positions move in ascending chunks of at most d rows, so a chunk only
// lands on rows an earlier chunk has read (storageBarrier between chunks). Words are raw: f32
// values, or with F16 two f16 values per word (value i in half i % 2 of word i / 2).

struct ShiftP {
    src: u32,
    dst: u32,
    n: u32,
    d: u32,
    hd: u32,
    kv_heads: u32,
    bs: u32,    // positions per block
    zero: u32,  // 0, for `rounded`
}

@group(0) @binding(0) var<uniform> sp: ShiftP;
@group(0) @binding(1) var<storage, read> blocks: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> kc: array<u32>;
@group(0) @binding(4) var<storage, read_write> vc: array<u32>;

override F16: bool = false;
const WG: u32 = 64u;

// First word of position p's row of KV head kh.
fn row_word(p: u32, kh: u32) -> u32 {
    let words = select(sp.hd, sp.hd / 2u, F16);
    return ((blocks[p / sp.bs] * sp.kv_heads + kh) * sp.bs + p % sp.bs) * words;
}

// The pair (a, b) = (x_j, x_{j+hd/2}) rotated by -d: (a c + b s, b c - a s), each product
// rounded as the CPU's separate operations round it.
fn turn(a: f32, b: f32, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(
        rounded(a * cs.x, sp.zero) + rounded(b * cs.y, sp.zero),
        rounded(b * cs.x, sp.zero) - rounded(a * cs.y, sp.zero),
    );
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let kh = wg.x;
    let half = sp.hd / 2u;
    // Invocations per row: one per rotated pair of words.
    let units = select(half, sp.hd / 4u, F16);
    let per = max(1u, min(sp.d, WG / units));
    let tb = sp.d * half;
    for (var c = 0u; c < sp.n; c = c + per) {
        let rows = min(per, sp.n - c);
        for (var x = li; x < rows * units; x = x + WG) {
            let i = c + x / units;
            let u = x % units;
            let src = row_word(sp.src + i, kh);
            let dst = row_word(sp.dst + i, kh);
            if F16 {
                let q = sp.hd / 4u;
                let lo = unpack2x16float(kc[src + u]);
                let hi = unpack2x16float(kc[src + u + q]);
                let r0 = turn(lo.x, hi.x, table[tb + 2u * u]);
                let r1 = turn(lo.y, hi.y, table[tb + 2u * u + 1u]);
                kc[dst + u] = pack2x16float(vec2<f32>(round_f16(r0.x), round_f16(r1.x)));
                kc[dst + u + q] = pack2x16float(vec2<f32>(round_f16(r0.y), round_f16(r1.y)));
                vc[dst + u] = vc[src + u];
                vc[dst + u + q] = vc[src + u + q];
            } else {
                let r = turn(bitcast<f32>(kc[src + u]), bitcast<f32>(kc[src + u + half]), table[tb + u]);
                kc[dst + u] = bitcast<u32>(r.x);
                kc[dst + u + half] = bitcast<u32>(r.y);
                vc[dst + u] = vc[src + u];
                vc[dst + u + half] = vc[src + u + half];
            }
        }
        storageBarrier();
    }
}

// Moves positions `src..src+n` of one sequence's keys and values to `dst..dst+n` (dst < src)
// for attention sinks with a sliding window (src/engine/window.rs): each key rotated back by
// d = src - dst positions (the cos/sin `table` row of d, rotation by -d), values copied. One
// workgroup per KV head; positions move in ascending chunks of at most d rows, so a chunk only
// lands on rows an earlier chunk has read (storageBarrier between chunks). Words are raw: f32
// values (MODE 0), two f16 values per word (MODE 1: value i in half i % 2 of word i / 2), or
// int8 rows (MODE 2: hd / 4 words of codes and a scale word, shaders/kv_i8.wgsl), moved a row
// at a time: the key dequantized, rotated and quantized again exactly as the CPU does it.

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

override MODE: u32 = 0u;
const WG: u32 = 64u;

// First word of position p's row of KV head kh.
fn row_word(p: u32, kh: u32) -> u32 {
    var words = sp.hd;
    if MODE == 1u {
        words = sp.hd / 2u;
    } else if MODE == 2u {
        words = sp.hd / 4u + 1u;
    }
    return ((blocks[p / sp.bs] * sp.kv_heads + kh) * sp.bs + p % sp.bs) * words;
}

var<workgroup> sh: array<f32, 256>;
var<workgroup> red: array<f32, 64>;

// An int8 row from word src to word dst: the key dequantized, turned by the table row at tb,
// quantized again (quant::quantize_row_absmax's arithmetic); the value's words copied.
fn move_i8_row(li: u32, src: u32, dst: u32, tb: u32) {
    let q = sp.hd / 4u;
    let half = sp.hd / 2u;
    let ks = bitcast<f32>(kc[src + q]);
    for (var d = li; d < sp.hd; d = d + WG) {
        let w = kc[src + d / 4u];
        sh[d] = f32(i32(w << (24u - 8u * (d % 4u))) >> 24u) * ks;
    }
    workgroupBarrier();
    var m = 0.0;
    for (var j = li; j < half; j = j + WG) {
        let r = turn(sh[j], sh[j + half], table[tb + j]);
        sh[j] = r.x;
        sh[j + half] = r.y;
        m = max(m, max(abs(r.x), abs(r.y)));
    }
    red[li] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if li < s {
            red[li] = max(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    let mx = red[0];
    let inv = select(0.0, div_exact(127.0, mx), mx > 0.0);
    for (var w = li; w < q; w = w + WG) {
        var word = 0u;
        for (var b = 0u; b < 4u; b = b + 1u) {
            let c = i32(clamp(round(sh[4u * w + b] * inv), -127.0, 127.0));
            word = word | ((u32(c) & 0xffu) << (8u * b));
        }
        kc[dst + w] = word;
    }
    if li == 0u {
        kc[dst + q] = bitcast<u32>(div_exact(mx, 127.0));
    }
    for (var w = li; w <= q; w = w + WG) {
        vc[dst + w] = vc[src + w];
    }
    // The next row reuses sh and red.
    workgroupBarrier();
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
    let tb = sp.d * half;
    if MODE == 2u {
        // Rows in order: a row lands only where an earlier row was read.
        for (var i = 0u; i < sp.n; i = i + 1u) {
            move_i8_row(li, row_word(sp.src + i, kh), row_word(sp.dst + i, kh), tb);
        }
        return;
    }
    // Invocations per row: one per rotated pair of words.
    let units = select(half, sp.hd / 4u, MODE == 1u);
    let per = max(1u, min(sp.d, WG / units));
    for (var c = 0u; c < sp.n; c = c + per) {
        let rows = min(per, sp.n - c);
        for (var x = li; x < rows * units; x = x + WG) {
            let i = c + x / units;
            let u = x % units;
            let src = row_word(sp.src + i, kh);
            let dst = row_word(sp.dst + i, kh);
            if MODE == 1u {
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

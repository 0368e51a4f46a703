// KV cache accessors, int8 storage (`--kv int8`): each (position, KV head) row of hd values is
// hd / 4 words of four int8 codes (value j in byte j % 4 of word j / 4) followed by one word
// holding the row's f32 scale, KV_RW = hd / 4 + 1 words a row (KV_Q = hd / 4, both declared
// by src/gpu/ops/mod.rs). Codes are round-half-even(x · 127 / absmax) clamped to ±127 with
// scale absmax / 127, exactly the CPU's `quant::quantize_row_absmax`. Indices count values
// (read1) or groups of four values (read4), as for the other element types; a row is written
// whole, by `kv_finish` after RoPE (the per-element puts do nothing).
// --- read1
fn kv_byte(w: u32, b: u32) -> f32 {
    return f32(i32(w << (24u - 8u * b)) >> 24u);
}

fn k_at(i: u32) -> f32 {
    let g = i / 4u;
    let r = (g / KV_Q) * KV_RW;
    return kv_byte(kc[r + g % KV_Q], i % 4u) * bitcast<f32>(kc[r + KV_Q]);
}

fn v_at(i: u32) -> f32 {
    let g = i / 4u;
    let r = (g / KV_Q) * KV_RW;
    return kv_byte(vc[r + g % KV_Q], i % 4u) * bitcast<f32>(vc[r + KV_Q]);
}
// --- read4
fn kv_unpack4(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(
        i32(w << 24u) >> 24u,
        i32(w << 16u) >> 24u,
        i32(w << 8u) >> 24u,
        i32(w) >> 24u,
    ));
}

fn k4_at(i: u32) -> vec4<f32> {
    let r = (i / KV_Q) * KV_RW;
    return kv_unpack4(kc4[r + i % KV_Q]) * bitcast<f32>(kc4[r + KV_Q]);
}

fn v4_at(i: u32) -> vec4<f32> {
    let r = (i / KV_Q) * KV_RW;
    return kv_unpack4(vc4[r + i % KV_Q]) * bitcast<f32>(vc4[r + KV_Q]);
}
// --- write
fn k_put(i: u32, x: f32) {}

fn v_put(i: u32, x: f32) {}
// --- finish
var<workgroup> kv_red: array<f32, 64>;

// Quantizes hd values of q|k|v from `src` into row `row` of the keys (or the values).
fn kv_quant_row(li: u32, src: u32, row: u32, hd: u32, is_v: bool) {
    var m = 0.0;
    for (var d = li; d < hd; d = d + 64u) {
        m = max(m, abs(qkv[src + d]));
    }
    kv_red[li] = m;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if li < s {
            kv_red[li] = max(kv_red[li], kv_red[li + s]);
        }
        workgroupBarrier();
    }
    let mx = kv_red[0];
    workgroupBarrier();
    let inv = select(0.0, div_exact(127.0, mx), mx > 0.0);
    let wb = row * KV_RW;
    for (var w = li; w < KV_Q; w = w + 64u) {
        var word = 0u;
        for (var b = 0u; b < 4u; b = b + 1u) {
            let q = i32(clamp(round(qkv[src + 4u * w + b] * inv), -127.0, 127.0));
            word = word | ((u32(q) & 0xffu) << (8u * b));
        }
        if is_v {
            vc[wb + w] = word;
        } else {
            kc[wb + w] = word;
        }
    }
    if li == 0u {
        let sc = bitcast<u32>(div_exact(mx, 127.0));
        if is_v {
            vc[wb + KV_Q] = sc;
        } else {
            kc[wb + KV_Q] = sc;
        }
    }
}

// After RoPE of a head (`rope_head`, one workgroup of 64 a head): a k head's rotated key and
// its value, both in q|k|v, quantized into cache row cbase / hd.
fn kv_finish(li: u32, base: u32, cbase: u32, is_k: bool, hd: u32, kv_dim: u32) {
    storageBarrier();
    if is_k {
        kv_quant_row(li, base, cbase / hd, hd, false);
        kv_quant_row(li, base + kv_dim, cbase / hd, hd, true);
    }
}

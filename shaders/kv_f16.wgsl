// KV cache accessors, f16 storage (`--kv f16`): two values per u32 (value i in half i % 2 of
// word i / 2, rounded to nearest even, no `shader-f16` needed), so a cache takes half the
// memory and attention reads half the bytes. Values of one word may come from different
// invocations, so writes replace their half with two atomic ops on disjoint bits.
// --- read1
fn k_at(i: u32) -> f32 {
    let v = unpack2x16float(kc[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

fn v_at(i: u32) -> f32 {
    let v = unpack2x16float(vc[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}
// --- read4
fn k4_at(i: u32) -> vec4<f32> {
    let w = kc4[i];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

fn v4_at(i: u32) -> vec4<f32> {
    let w = vc4[i];
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}
// --- write
fn half_bits(i: u32, x: f32) -> vec2<u32> {
    let sh = (i & 1u) * 16u;
    let h = pack2x16float(vec2<f32>(round_f16(x), 0.0)) & 0xffffu;
    return vec2<u32>(~(0xffffu << sh), h << sh);
}

fn k_put(i: u32, x: f32) {
    let b = half_bits(i, x);
    atomicAnd(&kc[i >> 1u], b.x);
    atomicOr(&kc[i >> 1u], b.y);
}

fn v_put(i: u32, x: f32) {
    let b = half_bits(i, x);
    atomicAnd(&vc[i >> 1u], b.x);
    atomicOr(&vc[i >> 1u], b.y);
}
// --- finish
fn kv_finish(li: u32, base: u32, cbase: u32, is_k: bool, hd: u32, kv_dim: u32) {}

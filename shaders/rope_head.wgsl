// Shared by rope.wgsl and paged_rope.wgsl (which bind `qkv`, `kc`, `vc` and the cos/sin
// `table`): invocation li's share of rotate-half RoPE of the head at `base` of q|k|v for position
// p, in place; a k head (is_k) is also written to the cache at `cbase`, with its v head (kv_dim
// further on in the row; `kv_finish` completes the row where the cache type needs the whole
// row, as int8's scale does).
fn rope_head(li: u32, base: u32, cbase: u32, p: u32, is_k: bool, hd: u32, kv_dim: u32) {
    let half = hd / 2u;
    for (var j = li; j < half; j = j + 64u) {
        let cs = table[p * half + j];
        let a = qkv[base + j];
        let b = qkv[base + j + half];
        let na = rounded(a * cs.x, step.pad) - rounded(b * cs.y, step.pad);
        let nb = rounded(b * cs.x, step.pad) + rounded(a * cs.y, step.pad);
        qkv[base + j] = na;
        qkv[base + j + half] = nb;
        if is_k {
            k_put(cbase + j, na);
            k_put(cbase + j + half, nb);
        }
    }
    if is_k {
        let vbase = base + kv_dim;
        for (var d = li; d < hd; d = d + 64u) {
            v_put(cbase + d, qkv[vbase + d]);
        }
    }
    kv_finish(li, base, cbase, is_k, hd, kv_dim);
}

// Shared by the decode attention kernels (`attend_vec` in attention.wgsl, paged_attention.wgsl):
// one workgroup of 64 invocations per (head, row), the query as vec4 in workgroup memory, block
// max/sum by tree reductions. The including module binds the keys as `kc4: array<vec4<f32>>`.
var<workgroup> q4: array<vec4<f32>, 32>;
var<workgroup> dp: array<f32, 64>;
var<workgroup> dred: array<f32, 64>;
var<workgroup> dpv: array<vec4<f32>, 64>;

fn dreduce(v: f32, li: u32, is_max: bool) -> f32 {
    dred[li] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if li < s {
            let o = dred[li + s];
            dred[li] = select(dred[li] + o, max(dred[li], o), is_max);
        }
        workgroupBarrier();
    }
    let r = dred[0];
    workgroupBarrier();
    return r;
}

// q4 · the key row starting at vec4 index kr (hd4 vec4s), eight loads in flight.
fn qk4(kr: u32, hd4: u32) -> f32 {
    var acc = 0.0;
    var d = 0u;
    for (; d + 8u <= hd4; d = d + 8u) {
        let k0 = k4_at(kr + d);
        let k1 = k4_at(kr + d + 1u);
        let k2 = k4_at(kr + d + 2u);
        let k3 = k4_at(kr + d + 3u);
        let k4 = k4_at(kr + d + 4u);
        let k5 = k4_at(kr + d + 5u);
        let k6 = k4_at(kr + d + 6u);
        let k7 = k4_at(kr + d + 7u);
        acc = acc + dot(q4[d], k0) + dot(q4[d + 1u], k1) + dot(q4[d + 2u], k2)
            + dot(q4[d + 3u], k3) + dot(q4[d + 4u], k4) + dot(q4[d + 5u], k5)
            + dot(q4[d + 6u], k6) + dot(q4[d + 7u], k7);
    }
    for (; d < hd4; d = d + 1u) {
        acc = acc + dot(q4[d], k4_at(kr + d));
    }
    return acc;
}

// The online softmax of one row, one block of up to 64 positions [b, end) at a time: each
// invocation scores one position, the block's max and sum update (m, l), and the block's P·V is
// added into o (two halves of 32 positions, one vec4 column per invocation, eight loads in
// flight). The including module defines `kv_row4(ctx, p)`, the vec4 index of position p's key
// and value rows. Called by every invocation of the workgroup (it synchronises).
struct Online {
    m: f32,
    l: f32,
    o: vec4<f32>,
}

fn online_block(st: Online, b: u32, end: u32, li: u32, hd4: u32, scale: f32, ctx: vec2<u32>) -> Online {
    let c4 = li % 32u;
    let half = li / 32u;
    let p = b + li;
    var score = NEG_BIG;
    if p < end {
        score = qk4(kv_row4(ctx, p), hd4) * scale;
    }
    let mn = max(st.m, dreduce(score, li, true));
    let f = exp(st.m - mn);
    let e = select(0.0, exp(score - mn), p < end);
    dp[li] = e;
    let l = st.l * f + dreduce(e, li, false);
    // dreduce's barriers also publish dp.
    var o = st.o * f;
    if c4 < hd4 {
        let i0 = 32u * half;
        let n = min(i0 + 32u, end - b);
        var i = i0;
        for (; i + 8u <= n; i = i + 8u) {
            let v0 = v4_at(kv_row4(ctx, b + i) + c4);
            let v1 = v4_at(kv_row4(ctx, b + i + 1u) + c4);
            let v2 = v4_at(kv_row4(ctx, b + i + 2u) + c4);
            let v3 = v4_at(kv_row4(ctx, b + i + 3u) + c4);
            let v4 = v4_at(kv_row4(ctx, b + i + 4u) + c4);
            let v5 = v4_at(kv_row4(ctx, b + i + 5u) + c4);
            let v6 = v4_at(kv_row4(ctx, b + i + 6u) + c4);
            let v7 = v4_at(kv_row4(ctx, b + i + 7u) + c4);
            o = o + dp[i] * v0 + dp[i + 1u] * v1 + dp[i + 2u] * v2 + dp[i + 3u] * v3
                + dp[i + 4u] * v4 + dp[i + 5u] * v5 + dp[i + 6u] * v6 + dp[i + 7u] * v7;
        }
        for (; i < n; i = i + 1u) {
            o = o + dp[i] * v4_at(kv_row4(ctx, b + i) + c4);
        }
    }
    workgroupBarrier();
    return Online(mn, l, o);
}

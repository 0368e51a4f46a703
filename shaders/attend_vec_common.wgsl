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

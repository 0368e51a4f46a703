// Prefill attention on subgroups of 8 or more (appended to attention.wgsl; replaces
// `attend_tiled` where the adapter has them). As `attend_tiled`: one workgroup per (block of
// query tokens, KV head, split), K/V streamed through workgroup memory 16 positions at a time,
// online softmax, causal mask. Different: 32 rows (tokens x heads of the GQA group) a
// workgroup, two per invocation, so each K/V vec4 read from workgroup memory feeds two rows and
// each tile load serves twice the rows; the 8 invocations of a row pair sum its scores by a
// reduce-scatter of subgroup shuffles (each ends with two positions' scores), softmax runs in
// registers and the weights reach P.V by shuffles: two barriers a block, no score arrays.
// Invocation (pair p = li / 8, lane = li % 8) owns the vec4 columns lane + 8m (m < 4) of rows
// 2p and 2p + 1. Tiles are stored with 32 vec4 a position whatever hd4, zero past hd4, so the
// products need no column masks. Dispatch: (ceil(T / tq), num_kv_heads, nsplit),
// tq = max(1, 32 / group); `combine` after it when nsplit > 1.
const SB: u32 = 16u;
// Invocations a workgroup (128 or 256): SG_WG / 4 rows.
override SG_WG: u32 = 128u;
var<workgroup> sk: array<vec4<f32>, 512>;
var<workgroup> sv: array<vec4<f32>, 512>;

// Two rows' partial scores against four positions.
struct Quad {
    a: vec4<f32>,
    b: vec4<f32>,
}

// This invocation's partial scores of rows a and b against tile position j.
fn pair_dot(
    j: u32,
    lane: u32,
    a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>,
    b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>,
) -> vec2<f32> {
    let k = j * 32u + lane;
    let k0 = sk[k];
    let k1 = sk[k + 8u];
    let k2 = sk[k + 16u];
    let k3 = sk[k + 24u];
    return vec2<f32>(
        (dot(a0, k0) + dot(a1, k1)) + (dot(a2, k2) + dot(a3, k3)),
        (dot(b0, k0) + dot(b1, k1)) + (dot(b2, k2) + dot(b3, k3)),
    );
}

fn quad(
    j: u32,
    lane: u32,
    a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>,
    b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>,
) -> Quad {
    let p0 = pair_dot(j, lane, a0, a1, a2, a3, b0, b1, b2, b3);
    let p1 = pair_dot(j + 1u, lane, a0, a1, a2, a3, b0, b1, b2, b3);
    let p2 = pair_dot(j + 2u, lane, a0, a1, a2, a3, b0, b1, b2, b3);
    let p3 = pair_dot(j + 3u, lane, a0, a1, a2, a3, b0, b1, b2, b3);
    return Quad(vec4<f32>(p0.x, p1.x, p2.x, p3.x), vec4<f32>(p0.y, p1.y, p2.y, p3.y));
}

// Reduce-scatter over the 8 invocations of a row: partials of positions 0..15 (s0: 0..3, ...,
// s3: 12..15) in, the whole sums of positions 2 lane and 2 lane + 1 out.
fn scatter_sums(s0: vec4<f32>, s1: vec4<f32>, s2: vec4<f32>, s3: vec4<f32>, lane: u32) -> vec2<f32> {
    let h4 = (lane & 4u) != 0u;
    let k0 = select(s0, s2, h4) + subgroupShuffleXor(select(s2, s0, h4), 4u);
    let k1 = select(s1, s3, h4) + subgroupShuffleXor(select(s3, s1, h4), 4u);
    let h2 = (lane & 2u) != 0u;
    let t = select(k0, k1, h2) + subgroupShuffleXor(select(k1, k0, h2), 2u);
    let h1 = (lane & 1u) != 0u;
    return select(t.xy, t.zw, h1) + subgroupShuffleXor(select(t.zw, t.xy, h1), 1u);
}

// Maximum and sum over the 8 invocations of a row pair (x: row a, y: row b).
fn pair_max(x: vec2<f32>) -> vec2<f32> {
    var m = max(x, subgroupShuffleXor(x, 1u));
    m = max(m, subgroupShuffleXor(m, 2u));
    return max(m, subgroupShuffleXor(m, 4u));
}

fn pair_sum(x: vec2<f32>) -> vec2<f32> {
    var s = x + subgroupShuffleXor(x, 1u);
    s = s + subgroupShuffleXor(s, 2u);
    return s + subgroupShuffleXor(s, 4u);
}

fn load_q4(ok: bool, a: u32, lane: u32, hd4: u32, m: u32) -> vec4<f32> {
    return load_q(ok && lane + 8u * m < hd4, a + 4u * (lane + 8u * m));
}

fn store_row(live: bool, split_ok: bool, tr: u32, h: u32, lane: u32, hd: u32, z: u32,
             m: f32, l: f32, o0: vec4<f32>, o1: vec4<f32>, o2: vec4<f32>, o3: vec4<f32>) {
    let hd4 = hd / 4u;
    if live && step.nsplit > 1u && split_ok {
        let idx = ((tr * ap.nh + h) * step.nsplit + z) * (hd + 2u);
        if lane == 0u {
            part[idx] = m;
            part[idx + 1u] = l;
        }
        store_p(lane < hd4, idx + 2u + 4u * lane, o0);
        store_p(lane + 8u < hd4, idx + 2u + 4u * (lane + 8u), o1);
        store_p(lane + 16u < hd4, idx + 2u + 4u * (lane + 16u), o2);
        store_p(lane + 24u < hd4, idx + 2u + 4u * (lane + 24u), o3);
    }
    if live && step.nsplit == 1u {
        let oa = tr * ap.q_dim + h * hd;
        store_o(lane < hd4, oa + 4u * lane, o0 / l);
        store_o(lane + 8u < hd4, oa + 4u * (lane + 8u), o1 / l);
        store_o(lane + 16u < hd4, oa + 4u * (lane + 16u), o2 / l);
        store_o(lane + 24u < hd4, oa + 4u * (lane + 24u), o3 / l);
    }
}

@compute @workgroup_size(SG_WG)
fn attend_tiled_sg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) sid: u32,
) {
    let hd = ap.hd;
    let hd4 = hd / 4u;
    let g = ap.group;
    let tq = max(1u, (SG_WG / 4u) / g);
    let kvh = wg.y;
    let t0 = wg.x * tq;
    let lane = li % 8u;
    let base = sid & ~7u;
    let ra = 2u * (li / 8u);
    let rb = ra + 1u;
    let tra = t0 + ra / g;
    let trb = t0 + rb / g;
    let ha = kvh * g + ra % g;
    let hb = kvh * g + rb % g;
    let live_a = ra < tq * g && tra < step.t;
    let live_b = rb < tq * g && trb < step.t;
    let start = wg.z * step.chunk;
    let end = min(step.pos + min(t0 + tq, step.t), start + step.chunk);
    if start >= end {
        return;
    }
    // Positions each row attends to in this split end before lim (0 for a dead row).
    let lim_a = select(0u, min(step.pos + tra + 1u, end), live_a);
    let lim_b = select(0u, min(step.pos + trb + 1u, end), live_b);
    let kbase4 = kvh * step.cap * hd4;
    let qa = tra * ap.stride + ha * hd;
    let qb = trb * ap.stride + hb * hd;
    let a0 = load_q4(live_a, qa, lane, hd4, 0u);
    let a1 = load_q4(live_a, qa, lane, hd4, 1u);
    let a2 = load_q4(live_a, qa, lane, hd4, 2u);
    let a3 = load_q4(live_a, qa, lane, hd4, 3u);
    let b0 = load_q4(live_b, qb, lane, hd4, 0u);
    let b1 = load_q4(live_b, qb, lane, hd4, 1u);
    let b2 = load_q4(live_b, qb, lane, hd4, 2u);
    let b3 = load_q4(live_b, qb, lane, hd4, 3u);
    var oa0 = vec4<f32>(0.0);
    var oa1 = vec4<f32>(0.0);
    var oa2 = vec4<f32>(0.0);
    var oa3 = vec4<f32>(0.0);
    var ob0 = vec4<f32>(0.0);
    var ob1 = vec4<f32>(0.0);
    var ob2 = vec4<f32>(0.0);
    var ob3 = vec4<f32>(0.0);
    var m = vec2<f32>(NEG_BIG);
    var l = vec2<f32>(0.0);
    for (var b = start; b < end; b = b + SB) {
        let n = min(SB, end - b);
        for (var i = li; i < SB * 32u; i = i + SG_WG) {
            let j = i / 32u;
            let c = i % 32u;
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if j < n && c < hd4 {
                let a = kbase4 + (b + j) * hd4 + c;
                kv = k4_at(a);
                vv = v4_at(a);
            }
            sk[i] = kv;
            sv[i] = vv;
        }
        workgroupBarrier();
        let q0 = quad(0u, lane, a0, a1, a2, a3, b0, b1, b2, b3);
        let q1 = quad(4u, lane, a0, a1, a2, a3, b0, b1, b2, b3);
        let q2 = quad(8u, lane, a0, a1, a2, a3, b0, b1, b2, b3);
        let q3 = quad(12u, lane, a0, a1, a2, a3, b0, b1, b2, b3);
        let sa = scatter_sums(q0.a, q1.a, q2.a, q3.a, lane) * ap.scale;
        let sb = scatter_sums(q0.b, q1.b, q2.b, q3.b, lane) * ap.scale;
        // This invocation's positions: b + 2 lane and b + 2 lane + 1.
        let p = b + 2u * lane;
        let ok_a = vec2<bool>(p < lim_a, p + 1u < lim_a);
        let ok_b = vec2<bool>(p < lim_b, p + 1u < lim_b);
        let xa = select(vec2<f32>(NEG_BIG), sa, ok_a);
        let xb = select(vec2<f32>(NEG_BIG), sb, ok_b);
        let mn = max(m, pair_max(vec2<f32>(max(xa.x, xa.y), max(xb.x, xb.y))));
        let f = exp(m - mn);
        let ea = select(vec2<f32>(0.0), exp(xa - mn.x), ok_a);
        let eb = select(vec2<f32>(0.0), exp(xb - mn.y), ok_b);
        l = l * f + pair_sum(vec2<f32>(ea.x + ea.y, eb.x + eb.y));
        m = mn;
        oa0 = oa0 * f.x;
        oa1 = oa1 * f.x;
        oa2 = oa2 * f.x;
        oa3 = oa3 * f.x;
        ob0 = ob0 * f.y;
        ob1 = ob1 * f.y;
        ob2 = ob2 * f.y;
        ob3 = ob3 * f.y;
        let e = vec4<f32>(ea, eb);
        for (var s = 0u; s < 8u; s = s + 1u) {
            // Weights of positions 2s (x: row a, z: row b) and 2s + 1 (y, w).
            let w = subgroupShuffle(e, base + s);
            let v = 64u * s + lane;
            let v0 = sv[v];
            let v1 = sv[v + 8u];
            let v2 = sv[v + 16u];
            let v3 = sv[v + 24u];
            let u0 = sv[v + 32u];
            let u1 = sv[v + 40u];
            let u2 = sv[v + 48u];
            let u3 = sv[v + 56u];
            oa0 = oa0 + w.x * v0 + w.y * u0;
            oa1 = oa1 + w.x * v1 + w.y * u1;
            oa2 = oa2 + w.x * v2 + w.y * u2;
            oa3 = oa3 + w.x * v3 + w.y * u3;
            ob0 = ob0 + w.z * v0 + w.w * u0;
            ob1 = ob1 + w.z * v1 + w.w * u1;
            ob2 = ob2 + w.z * v2 + w.w * u2;
            ob3 = ob3 + w.z * v3 + w.w * u3;
        }
        workgroupBarrier();
    }
    store_row(live_a, start < lim_a, tra, ha, lane, hd, wg.z, m.x, l.x, oa0, oa1, oa2, oa3);
    store_row(live_b, start < lim_b, trb, hb, lane, hd, wg.z, m.y, l.y, ob0, ob1, ob2, ob3);
}

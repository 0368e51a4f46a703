// Causal GQA attention, split over the sequence (flash-decoding): `attend` computes, per
// (split, head, token), a partial softmax (max, sum, unnormalised output) over `chunk` cached
// positions with an online softmax over blocks of 64; `combine` merges the splits.
// attend: dispatch (nsplit, num_heads, T), 64 invocations. combine: (num_heads, T), 256.

struct AttnP {
    hd: u32,
    nh: u32,
    group: u32,    // query heads per KV head
    stride: u32,   // f32 per q|k|v row
    q_dim: u32,
    scale: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> ap: AttnP;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<KV_S>;
@group(0) @binding(4) var<storage, read> vc: array<KV_S>;
@group(0) @binding(5) var<storage, read_write> part: array<f32>;
@group(0) @binding(6) var<storage, read_write> attn: array<f32>;
// The same K and V caches seen as vec4 rows (attend_vec: hd % 4 == 0).
@group(0) @binding(7) var<storage, read> kc4: array<KV_V4>;
@group(0) @binding(8) var<storage, read> vc4: array<KV_V4>;

var<workgroup> qs: array<f32, 256>;
var<workgroup> sc: array<f32, 64>;
var<workgroup> ex: array<f32, 64>;

@compute @workgroup_size(64)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let s = wg.x;
    let h = wg.y;
    let t = wg.z;
    // A step moved back on the device (accept.wgsl) may have fewer splits than dispatched.
    if s >= step.nsplit {
        return;
    }
    let hd = ap.hd;
    let len = step.pos + t + 1u;
    let start = s * step.chunk;
    let end = min(start + step.chunk, len);
    let kbase = (h / ap.group) * step.cap * hd;
    for (var d = li; d < hd; d = d + 64u) {
        qs[d] = qkv[t * ap.stride + h * hd + d];
    }
    workgroupBarrier();
    var m = NEG_BIG;
    var l = 0.0;
    var o = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    for (var b = start; b < end; b = b + 64u) {
        let p = b + li;
        var score = NEG_BIG;
        if p < end {
            var dot = 0.0;
            let kb = kbase + p * hd;
            // Eight loads in flight; the sum keeps the sequential order.
            var d = 0u;
            for (; d + 8u <= hd; d = d + 8u) {
                let k0 = k_at(kb + d);
                let k1 = k_at(kb + d + 1u);
                let k2 = k_at(kb + d + 2u);
                let k3 = k_at(kb + d + 3u);
                let k4 = k_at(kb + d + 4u);
                let k5 = k_at(kb + d + 5u);
                let k6 = k_at(kb + d + 6u);
                let k7 = k_at(kb + d + 7u);
                dot = dot + qs[d] * k0;
                dot = dot + qs[d + 1u] * k1;
                dot = dot + qs[d + 2u] * k2;
                dot = dot + qs[d + 3u] * k3;
                dot = dot + qs[d + 4u] * k4;
                dot = dot + qs[d + 5u] * k5;
                dot = dot + qs[d + 6u] * k6;
                dot = dot + qs[d + 7u] * k7;
            }
            for (; d < hd; d = d + 1u) {
                dot = dot + qs[d] * k_at(kb + d);
            }
            score = dot * ap.scale;
        }
        sc[li] = score;
        workgroupBarrier();
        var bm = NEG_BIG;
        for (var i = 0u; i < 64u; i = i + 1u) {
            bm = max(bm, sc[i]);
        }
        let mn = max(m, bm);
        let f = exp(m - mn);
        ex[li] = select(0.0, exp(score - mn), p < end);
        workgroupBarrier();
        var bl = 0.0;
        let n = min(64u, end - b);
        for (var i = 0u; i < n; i = i + 1u) {
            bl = bl + ex[i];
        }
        l = l * f + bl;
        for (var k = 0u; k < 4u; k = k + 1u) {
            let d = li + 64u * k;
            if d < hd {
                var acc = o[k] * f;
                let vb = kbase + b * hd + d;
                var i = 0u;
                for (; i + 8u <= n; i = i + 8u) {
                    let v0 = v_at(vb + i * hd);
                    let v1 = v_at(vb + (i + 1u) * hd);
                    let v2 = v_at(vb + (i + 2u) * hd);
                    let v3 = v_at(vb + (i + 3u) * hd);
                    let v4 = v_at(vb + (i + 4u) * hd);
                    let v5 = v_at(vb + (i + 5u) * hd);
                    let v6 = v_at(vb + (i + 6u) * hd);
                    let v7 = v_at(vb + (i + 7u) * hd);
                    acc = acc + ex[i] * v0;
                    acc = acc + ex[i + 1u] * v1;
                    acc = acc + ex[i + 2u] * v2;
                    acc = acc + ex[i + 3u] * v3;
                    acc = acc + ex[i + 4u] * v4;
                    acc = acc + ex[i + 5u] * v5;
                    acc = acc + ex[i + 6u] * v6;
                    acc = acc + ex[i + 7u] * v7;
                }
                for (; i < n; i = i + 1u) {
                    acc = acc + ex[i] * v_at(vb + i * hd);
                }
                o[k] = acc;
            }
        }
        m = mn;
        workgroupBarrier();
    }
    let idx = ((t * ap.nh + h) * step.nsplit + s) * (hd + 2u);
    if li == 0u {
        part[idx] = m;
        part[idx + 1u] = l;
    }
    for (var k = 0u; k < 4u; k = k + 1u) {
        let d = li + 64u * k;
        if d < hd {
            part[idx + 2u + d] = o[k];
        }
    }
}

// `combine`: one workgroup per (head, token row). The splits' maxima, sums and weights are
// staged in workgroup memory (at most MAX_SPLITS splits); each output column is summed by four
// invocations over every fourth split, so a row of many splits waits on a quarter of its loads
// in sequence.
const MAX_SPLITS: u32 = 256u;
var<workgroup> cm: array<f32, 256>;
var<workgroup> cl: array<f32, 256>;
var<workgroup> cw: array<f32, 256>;
var<workgroup> cacc: array<f32, 256>;

@compute @workgroup_size(256)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let hd = ap.hd;
    let len = step.pos + t + 1u;
    let ns = min((len + step.chunk - 1u) / step.chunk, MAX_SPLITS);
    let base = (t * ap.nh + h) * step.nsplit;
    if li < ns {
        cm[li] = part[(base + li) * (hd + 2u)];
        cl[li] = part[(base + li) * (hd + 2u) + 1u];
    }
    workgroupBarrier();
    var mx = NEG_BIG;
    for (var s = 0u; s < ns; s = s + 1u) {
        mx = max(mx, cm[s]);
    }
    if li < ns {
        cw[li] = exp(cm[li] - mx);
    }
    workgroupBarrier();
    var total = 0.0;
    for (var s = 0u; s < ns; s = s + 1u) {
        total = total + cw[s] * cl[s];
    }
    let col = li % 64u;
    let lane = li / 64u;
    for (var d0 = 0u; d0 < hd; d0 = d0 + 64u) {
        let d = d0 + col;
        var acc = 0.0;
        if d < hd {
            for (var s = lane; s < ns; s = s + 4u) {
                acc = acc + cw[s] * part[(base + s) * (hd + 2u) + 2u + d];
            }
        }
        cacc[li] = acc;
        workgroupBarrier();
        if lane == 0u && d < hd {
            let sum = ((cacc[col] + cacc[col + 64u]) + cacc[col + 128u]) + cacc[col + 192u];
            attn[t * ap.q_dim + h * hd + d] = sum / total;
        }
        workgroupBarrier();
    }
}

// Prefill attention, tiled over queries: one workgroup per (block of query tokens, KV head)
// serves every query head of the GQA group (16 rows = tokens x heads), streams K/V through
// workgroup memory in blocks of 16 positions, online softmax, causal mask; writes `attn`
// directly (no split, no combine). 128 invocations: 8 per row, each owning the vec4 columns
// lane, lane + 8, lane + 16, lane + 24 of the head in registers (hd % 4 == 0, hd <= 128,
// group <= 16; else `attend`). Columns past hd4 hold q = 0 and are never written.
// Dispatch: (ceil(T / tq), num_kv_heads, nsplit), tq = max(1, 16 / group); `combine` after it
// when nsplit > 1.
const TB: u32 = 16u;
var<workgroup> tk: array<vec4<f32>, 512>;
var<workgroup> tv: array<vec4<f32>, 512>;
var<workgroup> tred: array<f32, 2048>;
var<workgroup> tsc: array<f32, 256>;

@compute @workgroup_size(128)
fn attend_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let hd = ap.hd;
    let hd4 = hd / 4u;
    let g = ap.group;
    let tq = max(1u, 16u / g);
    let kvh = wg.y;
    let t0 = wg.x * tq;
    let r = li / 8u;
    let lane = li % 8u;
    let tr = t0 + r / g;
    let h = kvh * g + r % g;
    let live = r < tq * g && tr < step.t;
    // Split wg.z covers positions [start, kend) of step.chunk (as `attend`); its partials
    // go to `part` for `combine`, or straight to `attn` when there is one split.
    let start = wg.z * step.chunk;
    let end = min(step.pos + min(t0 + tq, step.t), start + step.chunk);
    if start >= end {
        return;
    }
    let rlen = step.pos + tr + 1u;
    let kbase = kvh * step.cap * hd;
    let qa = tr * ap.stride + h * hd;
    let c0 = lane < hd4;
    let c1 = lane + 8u < hd4;
    let c2 = lane + 16u < hd4;
    let c3 = lane + 24u < hd4;
    let q0 = load_q(live && c0, qa + 4u * lane);
    let q1 = load_q(live && c1, qa + 4u * (lane + 8u));
    let q2 = load_q(live && c2, qa + 4u * (lane + 16u));
    let q3 = load_q(live && c3, qa + 4u * (lane + 24u));
    var o0 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    var o2 = vec4<f32>(0.0);
    var o3 = vec4<f32>(0.0);
    var m = NEG_BIG;
    var l = 0.0;
    for (var b = start; b < end; b = b + TB) {
        let n = min(TB, end - b);
        for (var i = li; i < TB * hd4; i = i + 128u) {
            let j = i / hd4;
            let c = i % hd4;
            var kv = vec4<f32>(0.0);
            var vv = vec4<f32>(0.0);
            if j < n {
                let a = kbase + (b + j) * hd + 4u * c;
                kv = vec4<f32>(k_at(a), k_at(a + 1u), k_at(a + 2u), k_at(a + 3u));
                vv = vec4<f32>(v_at(a), v_at(a + 1u), v_at(a + 2u), v_at(a + 3u));
            }
            tk[i] = kv;
            tv[i] = vv;
        }
        workgroupBarrier();
        for (var j = 0u; j < TB; j = j + 1u) {
            let kb = j * hd4 + lane;
            // Columns past hd4 would read stale workgroup memory (maybe NaN): select, not 0*x.
            var acc = select(0.0, dot(q0, tk[kb]), c0);
            acc = acc + select(0.0, dot(q1, tk[min(kb + 8u, 511u)]), c1);
            acc = acc + select(0.0, dot(q2, tk[min(kb + 16u, 511u)]), c2);
            acc = acc + select(0.0, dot(q3, tk[min(kb + 24u, 511u)]), c3);
            tred[j * 128u + li] = acc;
        }
        workgroupBarrier();
        for (var jj = 0u; jj < 2u; jj = jj + 1u) {
            let j = lane + 8u * jj;
            let rb = j * 128u + r * 8u;
            let s = ((tred[rb] + tred[rb + 1u]) + (tred[rb + 2u] + tred[rb + 3u]))
                + ((tred[rb + 4u] + tred[rb + 5u]) + (tred[rb + 6u] + tred[rb + 7u]));
            tsc[r * TB + j] = select(NEG_BIG, s * ap.scale, b + j < rlen);
        }
        workgroupBarrier();
        var bm = NEG_BIG;
        for (var j = 0u; j < TB; j = j + 1u) {
            bm = max(bm, tsc[r * TB + j]);
        }
        let mn = max(m, bm);
        let f = exp(m - mn);
        o0 = o0 * f;
        o1 = o1 * f;
        o2 = o2 * f;
        o3 = o3 * f;
        var bl = 0.0;
        for (var j = 0u; j < TB; j = j + 1u) {
            let e = select(0.0, exp(tsc[r * TB + j] - mn), b + j < rlen);
            bl = bl + e;
            let vb = j * hd4 + lane;
            o0 = o0 + e * tv[vb];
            o1 = o1 + e * tv[min(vb + 8u, 511u)];
            o2 = o2 + e * tv[min(vb + 16u, 511u)];
            o3 = o3 + e * tv[min(vb + 24u, 511u)];
        }
        l = l * f + bl;
        m = mn;
        workgroupBarrier();
    }
    if live && step.nsplit > 1u && start < rlen {
        let idx = ((tr * ap.nh + h) * step.nsplit + wg.z) * (hd + 2u);
        if lane == 0u {
            part[idx] = m;
            part[idx + 1u] = l;
        }
        store_p(c0, idx + 2u + 4u * lane, o0);
        store_p(c1, idx + 2u + 4u * (lane + 8u), o1);
        store_p(c2, idx + 2u + 4u * (lane + 16u), o2);
        store_p(c3, idx + 2u + 4u * (lane + 24u), o3);
    }
    if live && step.nsplit == 1u {
        let oa = tr * ap.q_dim + h * hd;
        store_o(c0, oa + 4u * lane, o0 / l);
        store_o(c1, oa + 4u * (lane + 8u), o1 / l);
        store_o(c2, oa + 4u * (lane + 16u), o2 / l);
        store_o(c3, oa + 4u * (lane + 24u), o3 / l);
    }
}

fn load_q(ok: bool, a: u32) -> vec4<f32> {
    if ok {
        return vec4<f32>(qkv[a], qkv[a + 1u], qkv[a + 2u], qkv[a + 3u]);
    }
    return vec4<f32>(0.0);
}

fn store_o(ok: bool, a: u32, v: vec4<f32>) {
    if ok {
        attn[a] = v.x;
        attn[a + 1u] = v.y;
        attn[a + 2u] = v.z;
        attn[a + 3u] = v.w;
    }
}

fn store_p(ok: bool, a: u32, v: vec4<f32>) {
    if ok {
        part[a] = v.x;
        part[a + 1u] = v.y;
        part[a + 2u] = v.z;
        part[a + 3u] = v.w;
    }
}

// Decode attention for hd % 4 == 0 and hd <= 128, same partials as `attend` (or `attn` itself
// when the step has one split): per block of 64 positions, invocation i scores position i with
// vec4 K loads (8 in flight), block max and sum by tree reductions, and P·V is split into two
// halves of 32 positions with one vec4 column per invocation. Dispatch: (nsplit, num_heads, T).

// The vec4 index of position p's key/value row in the contiguous cache: ctx = (first row of
// the KV head, vec4 per row).
fn kv_row4(ctx: vec2<u32>, p: u32) -> u32 {
    return ctx.x + p * ctx.y;
}

@compute @workgroup_size(64)
fn attend_vec(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let s = wg.x;
    let h = wg.y;
    let t = wg.z;
    // A step moved back on the device (accept.wgsl) may have fewer splits than dispatched.
    if s >= step.nsplit {
        return;
    }
    let hd4 = ap.hd / 4u;
    let len = step.pos + t + 1u;
    let start = s * step.chunk;
    let end = min(start + step.chunk, len);
    let kb4 = (h / ap.group) * step.cap * hd4;
    if li < hd4 {
        let qb = t * ap.stride + h * ap.hd + 4u * li;
        q4[li] = vec4<f32>(qkv[qb], qkv[qb + 1u], qkv[qb + 2u], qkv[qb + 3u]);
    }
    workgroupBarrier();
    var st = Online(NEG_BIG, 0.0, vec4<f32>(0.0));
    for (var b = start; b < end; b = b + 64u) {
        st = online_block(st, b, end, li, hd4, ap.scale, vec2<u32>(kb4, hd4));
    }
    let m = st.m;
    let l = st.l;
    dpv[li] = st.o;
    workgroupBarrier();
    if li >= hd4 {
        return;
    }
    let tot = dpv[li] + dpv[li + 32u];
    // One split dispatched: no merge follows (with more, `combine` merges however many the
    // step has, one included).
    if nwg.x == 1u {
        let a = t * ap.q_dim + h * ap.hd + 4u * li;
        let r = tot / l;
        attn[a] = r.x;
        attn[a + 1u] = r.y;
        attn[a + 2u] = r.z;
        attn[a + 3u] = r.w;
        return;
    }
    let idx = ((t * ap.nh + h) * step.nsplit + s) * (ap.hd + 2u);
    if li == 0u {
        part[idx] = m;
        part[idx + 1u] = l;
    }
    let a = idx + 2u + 4u * li;
    part[a] = tot.x;
    part[a + 1u] = tot.y;
    part[a + 2u] = tot.z;
    part[a + 3u] = tot.w;
}

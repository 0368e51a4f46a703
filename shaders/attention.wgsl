// Causal GQA attention, split over the sequence (flash-decoding): `attend` computes, per
// (split, head, token), a partial softmax (max, sum, unnormalised output) over `chunk` cached
// positions with an online softmax over blocks of 64; `combine` merges the splits.
// attend: dispatch (nsplit, num_heads, T), 64 invocations. combine: (num_heads, T).

struct AttnP {
    hd: u32,
    nh: u32,
    group: u32,    // query heads per KV head
    stride: u32,   // f32 per q|k|v row
    q_dim: u32,
    maxsplit: u32, // partial slots per (token, head)
    scale: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> ap: AttnP;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<f32>;
@group(0) @binding(4) var<storage, read> vc: array<f32>;
@group(0) @binding(5) var<storage, read_write> part: array<f32>;
@group(0) @binding(6) var<storage, read_write> attn: array<f32>;

var<workgroup> qs: array<f32, 256>;
var<workgroup> sc: array<f32, 64>;
var<workgroup> ex: array<f32, 64>;

@compute @workgroup_size(64)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let s = wg.x;
    let h = wg.y;
    let t = wg.z;
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
                let k0 = kc[kb + d];
                let k1 = kc[kb + d + 1u];
                let k2 = kc[kb + d + 2u];
                let k3 = kc[kb + d + 3u];
                let k4 = kc[kb + d + 4u];
                let k5 = kc[kb + d + 5u];
                let k6 = kc[kb + d + 6u];
                let k7 = kc[kb + d + 7u];
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
                dot = dot + qs[d] * kc[kb + d];
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
                    let v0 = vc[vb + i * hd];
                    let v1 = vc[vb + (i + 1u) * hd];
                    let v2 = vc[vb + (i + 2u) * hd];
                    let v3 = vc[vb + (i + 3u) * hd];
                    let v4 = vc[vb + (i + 4u) * hd];
                    let v5 = vc[vb + (i + 5u) * hd];
                    let v6 = vc[vb + (i + 6u) * hd];
                    let v7 = vc[vb + (i + 7u) * hd];
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
                    acc = acc + ex[i] * vc[vb + i * hd];
                }
                o[k] = acc;
            }
        }
        m = mn;
        workgroupBarrier();
    }
    let idx = ((t * ap.nh + h) * ap.maxsplit + s) * (hd + 2u);
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

@compute @workgroup_size(64)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let hd = ap.hd;
    let len = step.pos + t + 1u;
    let ns = (len + step.chunk - 1u) / step.chunk;
    let base = (t * ap.nh + h) * ap.maxsplit;
    var mx = NEG_BIG;
    for (var s = 0u; s < ns; s = s + 1u) {
        mx = max(mx, part[(base + s) * (hd + 2u)]);
    }
    var total = 0.0;
    for (var s = 0u; s < ns; s = s + 1u) {
        let i = (base + s) * (hd + 2u);
        total = total + exp(part[i] - mx) * part[i + 1u];
    }
    for (var d = li; d < hd; d = d + 64u) {
        var acc = 0.0;
        for (var s = 0u; s < ns; s = s + 1u) {
            let i = (base + s) * (hd + 2u);
            acc = acc + exp(part[i] - mx) * part[i + 2u + d];
        }
        attn[t * ap.q_dim + h * hd + d] = acc / total;
    }
}

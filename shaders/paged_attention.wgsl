// Batched steps over the paged KV pool: causal attention of each row over positions
// 0..=pos of its own sequence (see paged_rope.wgsl for the layout). One workgroup per
// (query head, row) walks the sequence in blocks of 64 positions with an online softmax:
// invocation i scores position i with vec4 K loads, block max and sum by tree reductions, P·V
// split into two halves of 32 positions with one vec4 column per invocation.
// hd % 4 == 0 and hd <= 128. Dispatch: (num_heads, T), 64 invocations.

struct PagedP {
    hd: u32,
    nh: u32,
    group: u32,
    stride: u32,
    q_dim: u32,
    kv_dim: u32,
    kvh: u32,
    bs: u32,
    tstride: u32,
    scale: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> pp: PagedP;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> kc4: array<KV_V4>;
@group(0) @binding(4) var<storage, read> vc4: array<KV_V4>;
@group(0) @binding(5) var<storage, read> rows: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read> blocks: array<u32>;
@group(0) @binding(7) var<storage, read_write> attn: array<f32>;

// vec4 index of position p's row (KV head kh) of sequence s.
fn row4(s: u32, kh: u32, p: u32) -> u32 {
    let blk = blocks[s * pp.tstride + p / pp.bs];
    return ((blk * pp.kvh + kh) * pp.bs + p % pp.bs) * (pp.hd / 4u);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let slot = rows[t];
    let len = slot.x + 1u;
    let s = slot.y;
    let hd4 = pp.hd / 4u;
    let kh = h / pp.group;
    if li < hd4 {
        let qb = t * pp.stride + h * pp.hd + 4u * li;
        q4[li] = vec4<f32>(qkv[qb], qkv[qb + 1u], qkv[qb + 2u], qkv[qb + 3u]);
    }
    workgroupBarrier();
    let c4 = li % 32u;
    let half = li / 32u;
    var m = NEG_BIG;
    var l = 0.0;
    var o = vec4<f32>(0.0);
    for (var b = 0u; b < len; b = b + 64u) {
        let p = b + li;
        var score = NEG_BIG;
        if p < len {
            let kr = row4(s, kh, p);
            score = qk4(kr, hd4) * pp.scale;
        }
        let mn = max(m, dreduce(score, li, true));
        let f = exp(m - mn);
        let e = select(0.0, exp(score - mn), p < len);
        dp[li] = e;
        l = l * f + dreduce(e, li, false);
        // dreduce's barriers also publish dp.
        o = o * f;
        if c4 < hd4 {
            let i0 = 32u * half;
            let n = min(i0 + 32u, len - b);
            var i = i0;
            for (; i + 4u <= n; i = i + 4u) {
                let v0 = v4_at(row4(s, kh, b + i) + c4);
                let v1 = v4_at(row4(s, kh, b + i + 1u) + c4);
                let v2 = v4_at(row4(s, kh, b + i + 2u) + c4);
                let v3 = v4_at(row4(s, kh, b + i + 3u) + c4);
                o = o + dp[i] * v0 + dp[i + 1u] * v1 + dp[i + 2u] * v2 + dp[i + 3u] * v3;
            }
            for (; i < n; i = i + 1u) {
                o = o + dp[i] * v4_at(row4(s, kh, b + i) + c4);
            }
        }
        m = mn;
        workgroupBarrier();
    }
    dpv[li] = o;
    workgroupBarrier();
    if li >= hd4 {
        return;
    }
    let r = (dpv[li] + dpv[li + 32u]) / l;
    let a = t * pp.q_dim + h * pp.hd + 4u * li;
    attn[a] = r.x;
    attn[a + 1u] = r.y;
    attn[a + 2u] = r.z;
    attn[a + 3u] = r.w;
}

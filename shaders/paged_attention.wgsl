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

// The vec4 index of position p's key/value row through the block table: ctx = (sequence,
// KV head).
fn kv_row4(ctx: vec2<u32>, p: u32) -> u32 {
    let blk = blocks[ctx.x * pp.tstride + p / pp.bs];
    return ((blk * pp.kvh + ctx.y) * pp.bs + p % pp.bs) * (pp.hd / 4u);
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
    var st = Online(NEG_BIG, 0.0, vec4<f32>(0.0));
    for (var b = 0u; b < len; b = b + 64u) {
        st = online_block(st, b, len, li, hd4, pp.scale, vec2<u32>(s, kh));
    }
    dpv[li] = st.o;
    workgroupBarrier();
    if li >= hd4 {
        return;
    }
    let r = (dpv[li] + dpv[li + 32u]) / st.l;
    let a = t * pp.q_dim + h * pp.hd + 4u * li;
    attn[a] = r.x;
    attn[a + 1u] = r.y;
    attn[a + 2u] = r.z;
    attn[a + 3u] = r.w;
}

// Batched steps over the paged KV pool: RoPE of each row's q and k heads at the row's own
// position (cos/sin table computed on the host exactly as the CPU backend does), then k and v
// written to the row's slot. Rows belong to different sequences: rows[r] = (position, sequence),
// and position p of sequence s lives in block blocks[s * tstride + p / bs] of the layer's pool
// `[block][kv_head][offset in block][hd]`. Dispatch: (num_heads + num_kv_heads, T), 64 invocations.

struct PagedP {
    hd: u32,
    nh: u32,
    group: u32,   // query heads per KV head
    stride: u32,  // f32 per q|k|v row
    q_dim: u32,
    kv_dim: u32,
    kvh: u32,     // KV heads
    bs: u32,      // positions per block
    tstride: u32, // block-table entries per sequence
    scale: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> pp: PagedP;
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> kc: array<KV_W>;
@group(0) @binding(4) var<storage, read_write> vc: array<KV_W>;
@group(0) @binding(5) var<storage, read> table: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> rows: array<vec2<u32>>;
@group(0) @binding(7) var<storage, read> blocks: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let head = wg.x;
    let t = wg.y;
    let slot = rows[t];
    let p = slot.x;
    let base = t * pp.stride + head * pp.hd;
    let is_k = head >= pp.nh;
    let kh = head - pp.nh;
    let blk = blocks[slot.y * pp.tstride + p / pp.bs];
    let cbase = ((blk * pp.kvh + kh) * pp.bs + p % pp.bs) * pp.hd;
    rope_head(li, base, cbase, p, is_k, pp.hd, pp.kv_dim);
}

// Rotate-half RoPE of the step's q and k heads (in place in q|k|v) from a cos/sin table
// computed on the host exactly as the CPU backend does, then k and v written to the cache.
// Dispatch: (num_heads + num_kv_heads, T), 64 invocations.

struct RopeP {
    hd: u32,
    nh: u32,
    stride: u32, // f32 per q|k|v row
    kv_dim: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> rp: RopeP;
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> kc: array<KV_W>;
@group(0) @binding(4) var<storage, read_write> vc: array<KV_W>;
@group(0) @binding(5) var<storage, read> table: array<vec2<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let head = wg.x;
    let t = wg.y;
    let p = step.pos + t;
    let base = t * rp.stride + head * rp.hd;
    let is_k = head >= rp.nh;
    let kh = head - rp.nh;
    let cbase = (kh * step.cap + p) * rp.hd;
    rope_head(li, base, cbase, p, is_k, rp.hd, rp.kv_dim);
}

// The KV write alone, of rows whose k heads are already rotated in q|k|v (the fused q|k|v GEMV
// rotates them and puts elements; a cache written a row at a time, int8, is written here).
// Dispatch: (num_kv_heads, T), 64 invocations.
@compute @workgroup_size(64)
fn store(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let kh = wg.x;
    let t = wg.y;
    let base = t * rp.stride + (rp.nh + kh) * rp.hd;
    kv_finish(li, base, (kh * step.cap + step.pos + t) * rp.hd, true, rp.hd, rp.kv_dim);
}

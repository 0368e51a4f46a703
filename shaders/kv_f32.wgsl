// KV cache accessors, f32 storage (the default). src/gpu/ops/mod.rs puts each section into the
// modules that bind its arrays: `kc`/`vc` of KV_S (read), `kc4`/`vc4` of KV_V4 (read, 4 values
// per element), `kc`/`vc` of KV_W (written); indices count values (or vec4s of values).
// --- read1
fn k_at(i: u32) -> f32 {
    return kc[i];
}

fn v_at(i: u32) -> f32 {
    return vc[i];
}
// --- read4
fn k4_at(i: u32) -> vec4<f32> {
    return kc4[i];
}

fn v4_at(i: u32) -> vec4<f32> {
    return vc4[i];
}
// --- write
fn k_put(i: u32, x: f32) {
    kc[i] = x;
}

fn v_put(i: u32, x: f32) {
    vc[i] = x;
}
// --- finish
fn kv_finish(li: u32, base: u32, cbase: u32, is_k: bool, hd: u32, kv_dim: u32) {}

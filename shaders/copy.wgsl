// Memory bandwidth probes (`bitnet bench --backend gpu --membw`): each workgroup moves 1024
// vec4<u32> (16 KiB), invocation li the vec4s li, li + 256, li + 512, li + 768 (coalesced).
// Dispatch: (vec4s / 1024, 1, 1).

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn probe_copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = wg.x * 1024u + li;
    let a = src[i];
    let b = src[i + 256u];
    let c = src[i + 512u];
    let d = src[i + 768u];
    dst[i] = a;
    dst[i + 256u] = b;
    dst[i + 512u] = c;
    dst[i + 768u] = d;
}

// Reads only; the store happens only for a pattern the zero-filled source never holds, so the
// loads cannot be removed.
@compute @workgroup_size(256)
fn probe_read(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = wg.x * 1024u + li;
    let s = src[i] ^ src[i + 256u] ^ src[i + 512u] ^ src[i + 768u];
    if all(s == vec4<u32>(0x9e3779b9u)) {
        dst[wg.x] = s;
    }
}

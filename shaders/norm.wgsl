// Fused gating (ACT), RMSNorm (NORMED) and per-token absmax int8 quantization.
// MODE 0: src row -> int8 (4 per u32) + absmax/127; with ACT 1 the row is relu(gate)² · up of a
// gate|up row, with ACT 2 silu(gate) · up; with NORMED false the RMSNorm is skipped.
// MODE 2: src row -> normed f32 (as u32 bits), zero padding (final norm).
// Dispatch: (T, 1, 1), one FW-invocation workgroup per token; `wg_reduce` (the workgroup
// reduction prelude) before this file.

struct NormP {
    width: u32,      // elements normalised
    src_stride: u32, // f32 per source row
    out_words: u32,  // u32 per output row (int8 x4, or f32)
    eps: f32,
}

override MODE: u32 = 0u;
override ACT: u32 = 0u;
override NORMED: bool = true;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> p: NormP;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read_write> outq: array<u32>;
@group(0) @binding(5) var<storage, read_write> outs: array<f32>;

fn value(t: u32, c: u32) -> f32 {
    let base = t * p.src_stride;
    if ACT == 1u {
        let g = max(src[base + c], 0.0);
        return g * g * src[base + p.width + c];
    }
    if ACT == 2u {
        let g = src[base + c];
        return g / (1.0 + exp(-g)) * src[base + p.width + c];
    }
    return src[base + c];
}

// The row's value at c as quantized: normed (gamma · value · inv) or as it is.
fn normed(t: u32, c: u32, inv: f32) -> f32 {
    if NORMED {
        return gamma[c] * (value(t, c) * inv);
    }
    return value(t, c);
}

// value(t, c), or 0 past the row.
fn vat(t: u32, c: u32) -> f32 {
    if c < p.width {
        return value(t, c);
    }
    return 0.0;
}

fn gam(c: u32) -> f32 {
    if c < p.width {
        return gamma[c];
    }
    return 0.0;
}

@compute @workgroup_size(FW)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wg.x;
    // Four loads in flight per iteration; the sum keeps the one-column-at-a-time order.
    // Unnormed rows skip it (the reduction itself stays in uniform control flow).
    var ss = 0.0;
    for (var c = li; NORMED && c < p.width; c = c + 1024u) {
        let v0 = value(t, c);
        let v1 = vat(t, c + 256u);
        let v2 = vat(t, c + 512u);
        let v3 = vat(t, c + 768u);
        ss = ss + v0 * v0;
        ss = ss + v1 * v1;
        ss = ss + v2 * v2;
        ss = ss + v3 * v3;
    }
    let ms = wg_reduce(ss, li, false) / f32(p.width);
    let inv = select(1.0, 1.0 / sqrt(ms + p.eps), NORMED);
    let obase = t * p.out_words;
    if MODE == 2u {
        for (var c = li; c < p.out_words; c = c + 256u) {
            var y = 0.0;
            if c < p.width {
                y = gamma[c] * (value(t, c) * inv);
            }
            outq[obase + c] = bitcast<u32>(y);
        }
        return;
    }
    var am = 0.0;
    for (var c = li; c < p.width; c = c + 1024u) {
        let v0 = value(t, c);
        let v1 = vat(t, c + 256u);
        let v2 = vat(t, c + 512u);
        let v3 = vat(t, c + 768u);
        if NORMED {
            am = max(am, abs(gamma[c] * (v0 * inv)));
            am = max(am, abs(gam(c + 256u) * (v1 * inv)));
            am = max(am, abs(gam(c + 512u) * (v2 * inv)));
            am = max(am, abs(gam(c + 768u) * (v3 * inv)));
        } else {
            am = max(max(am, abs(v0)), max(abs(v1), max(abs(v2), abs(v3))));
        }
    }
    let absmax = max(wg_reduce(am, li, true), 1e-5);
    let scale = div_exact(127.0, absmax);
    for (var wi = li; wi < p.out_words; wi = wi + 256u) {
        var packed = 0u;
        for (var b = 0u; b < 4u; b = b + 1u) {
            let c = wi * 4u + b;
            if c < p.width {
                let y = normed(t, c, inv);
                // WGSL round() is round-half-to-even.
                let q = i32(clamp(round(y * scale), -128.0, 127.0));
                packed = packed | ((bitcast<u32>(q) & 0xffu) << (8u * b));
            }
        }
        outq[obase + wi] = packed;
    }
    if li == 0u {
        outs[t] = div_exact(absmax, 127.0);
    }
}

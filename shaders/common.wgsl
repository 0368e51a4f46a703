// Shared declarations, prepended to every kernel by src/gpu/ops/.

// Per-step values, written once per submit with queue.write_buffer.
struct Step {
    t: u32,      // tokens in the step
    pos: u32,    // position of the step's first token
    chunk: u32,  // attention: positions per split
    nsplit: u32, // attention: splits of the longest row
    cap: u32,    // KV cache capacity (positions)
    row0: u32,   // head: first step row of this logits batch
    nrows: u32,  // head: rows in this logits batch
    pad: u32,    // zero
    most: u32,   // attention: most splits a row may take
    pad1: u32,
    pad2: u32,
    pad3: u32,
}

// A lower bound that is finite (WGSL has no infinity literal).
const NEG_BIG: f32 = -3.0e38;

// `v` rounded to f32 as it is: `zero` (0, read from a uniform) hides that from the compiler, so a
// following add is not contracted with the multiply that produced `v` into one FMA (Vulkan on
// NVIDIA does that), which would round differently from the CPU backend's separate operations.
fn rounded(v: f32, zero: u32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v) | zero);
}

// `a / b` rounded to nearest even, as IEEE division on the CPU, for finite a and normal b with a
// normal quotient (Vulkan lets `/` be 2.5 ulp off, and on NVIDIA it is: the activation scale
// 127 / absmax then moves int8 codes away from the CPU's). A float estimate of the quotient's
// 24-bit significand is corrected with the exact integer remainder, which is small enough to
// come out of wrapping u32 arithmetic.
fn div_exact(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let sign = (ua ^ ub) & 0x80000000u;
    if (ua & 0x7fffffffu) == 0u {
        return bitcast<f32>(sign);
    }
    var ma = (ua & 0x7fffffu) | 0x800000u;
    let mb = (ub & 0x7fffffu) | 0x800000u;
    var e = i32((ua >> 23u) & 0xffu) - i32((ub >> 23u) & 0xffu);
    if ma < mb {
        ma = ma << 1u;
        e = e - 1;
    }
    // ma / mb in [1, 2): the significand Q = ma * 2^23 / mb, estimated to a few units, and the
    // remainder ma * 2^23 - q * mb (|remainder| < 2^31, so the low 32 bits are all of it); one
    // float step brings q within a unit of Q, the integer steps round it to nearest even.
    var q = u32(round(f32(ma) / f32(mb) * 8388608.0));
    var r = bitcast<i32>((ma << 23u) - q * mb);
    let m = i32(mb);
    let c = i32(round(f32(r) / f32(m)));
    q = bitcast<u32>(bitcast<i32>(q) + c);
    r = r - c * m;
    for (var i = 0; i < 2; i = i + 1) {
        if 2 * r > m || (2 * r == m && (q & 1u) == 1u) {
            q = q + 1u;
            r = r - m;
        } else if 2 * r < -m || (2 * r == -m && (q & 1u) == 1u) {
            q = q - 1u;
            r = r + m;
        }
    }
    if q == 0x1000000u {
        q = 0x800000u;
        e = e + 1;
    }
    return bitcast<f32>(sign | (u32(e + 127) << 23u) | (q & 0x7fffffu));
}

// x rounded to the nearest f16 value (ties to even) in f32, so that pack2x16float, whose
// rounding WGSL leaves to the implementation, converts it exactly (as the CPU's `half` does).
fn round_f16(x: f32) -> f32 {
    let c = clamp(x, -65504.0, 65504.0);
    if abs(c) < 6.1035156e-5 {
        // f16 subnormals: multiples of 2^-24.
        return round(c * 16777216.0) / 16777216.0;
    }
    let b = bitcast<u32>(c);
    return bitcast<f32>((b + 0xfffu + ((b >> 13u) & 1u)) & 0xffffe000u);
}

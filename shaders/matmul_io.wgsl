// Ternary (2-bit codes, code = w + 1) x int8 matmul with exact i32 accumulation and one f32
// rescale: out = f32(sum) * xscale[t] * row_scale[r].
//
// Weights: row-major, each row padded to a multiple of 64 columns (one vec4<u32>). Within a u32
// word (16 columns 16k..16k+15), column 16k + 4s + b sits at bits 8b + 2s, so that
// `(word >> 2s) & 0x03030303` puts the codes of the 4 consecutive columns 16k+4s.. in the 4 bytes
// of a word, which `dot4I8Packed` multiplies with one word of 4 int8 activations.
// Activations: row t holds kvec * 4 vec4<u32> (64 int8 per weight vec4).
//
// This part: the matrix parameters, the shared bindings and the epilogue every matmul kernel
// shares.

struct MatP {
    rows: u32,
    kvec: u32, // vec4<u32> of weights per row
    ld: u32,   // f32 per output row
    pad: u32,  // always 0 (see `rounded`)
    row0: u32, // first row of the matrix (weights, row scales, output) this matmul computes
    pad1: u32,
    pad2: u32,
    pad3: u32,
}

override ACCUM: bool = false;

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> mp: MatP;
// Binding 2 (the packed code words) is declared by each kernel's file: the int8 kernels read it
// as vec4s, the tensor-core GEMM as single words.
@group(0) @binding(4) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rs: array<f32>;
@group(0) @binding(5) var<storage, read> xs: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
// The split-K gemm's i32 sums (zero between matmuls: gemm_finish leaves it so).
@group(0) @binding(7) var<storage, read_write> part: array<atomic<i32>>;

const M2: u32 = 0x03030303u;
const ONES: u32 = 0x01010101u;

fn store(t: u32, row: u32, acc: i32) {
    let v = f32(acc) * xs[t] * rs[mp.row0 + row];
    let o = t * mp.ld + mp.row0 + row;
    if ACCUM {
        out[o] = out[o] + rounded(v, mp.pad);
    } else {
        out[o] = v;
    }
}

// Token t's sum of `row`: stored, or (split over K) added into the scratch.
fn put(t: u32, row: u32, acc: i32, split: bool) {
    if t >= step.t {
        return;
    }
    if split {
        atomicAdd(&part[t * mp.rows + row], acc);
    } else {
        store(t, row, acc);
    }
}

//! Portable reference kernels: the ground truth every SIMD kernel is tested against.

use crate::cpu::packed::{block_offset, BLOCK, BLOCK_BYTES};

/// `out[r * ntok + t] = Σ_c code(r, c) · x[t][c]` over the rows of `w` (grouped layout of
/// [`crate::cpu::packed`], `rb` bytes per row) and `ntok` token rows of `x` (`rb * 4` int8 each).
pub fn code_dots(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32]) {
    let kpad = rb * 4;
    for r in 0..w.len() / rb {
        for t in 0..ntok {
            let xt = &x[t * kpad..(t + 1) * kpad];
            let mut acc = 0i32;
            for b in 0..rb / BLOCK_BYTES {
                let blk = &w[block_offset(rb, r, b)..][..BLOCK_BYTES];
                let xb = &xt[b * BLOCK..(b + 1) * BLOCK];
                for (j, &byte) in blk.iter().enumerate() {
                    for i in 0..4 {
                        acc += ((byte >> (2 * i)) & 3) as i32 * xb[i * 32 + j] as i32;
                    }
                }
            }
            out[r * ntok + t] = acc;
        }
    }
}

/// Dot product of a bf16 row (raw little-endian u16 bits) with f32 activations.
pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(&b, &v)| f32::from_bits((b as u32) << 16) * v)
        .sum()
}

/// Dot product of two int8 vectors.
pub fn dot_i8(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

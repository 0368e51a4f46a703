//! NEON kernels (aarch64, always available there).

use std::arch::aarch64::*;

use crate::cpu::packed::{block_offset, BLOCK, BLOCK_BYTES};

/// Blocks accumulated in i16 before widening: 16 products of at most 254 per lane per block.
const FLUSH: usize = 8;

/// See [`super::scalar::code_dots`].
///
/// # Safety
/// `w.len()` a multiple of `rb`, `rb` of 32, `x` holds `ntok` rows of `4 * rb` bytes.
pub unsafe fn code_dots(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32]) {
    let nblocks = rb / BLOCK_BYTES;
    let kpad = rb * 4;
    let mask = vdupq_n_u8(3);
    for r in 0..w.len() / rb {
        for t in 0..ntok {
            let xt = x.as_ptr().add(t * kpad);
            let mut tot = vdupq_n_s32(0);
            let mut b0 = 0;
            while b0 < nblocks {
                let end = (b0 + FLUSH).min(nblocks);
                let mut acc = vdupq_n_s16(0);
                for b in b0..end {
                    for half in 0..2 {
                        let wv = vld1q_u8(w.as_ptr().add(block_offset(rb, r, b) + 16 * half));
                        for i in 0..4 {
                            let c = vreinterpretq_s8_u8(vandq_u8(
                                vshlq_u8(wv, vdupq_n_s8(-2 * i as i8)),
                                mask,
                            ));
                            let xv = vld1q_s8(xt.add(b * BLOCK + i * 32 + 16 * half));
                            acc = vmlal_s8(acc, vget_low_s8(c), vget_low_s8(xv));
                            acc = vmlal_high_s8(acc, c, xv);
                        }
                    }
                }
                tot = vpadalq_s16(tot, acc);
                b0 = end;
            }
            out[r * ntok + t] = vaddvq_s32(tot);
        }
    }
}

/// See [`super::scalar::dot_bf16`].
///
/// # Safety
/// `w.len() == x.len()`.
pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len();
    let mut acc = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 4 <= n {
        let bits = vshlq_n_u32(vmovl_u16(vld1_u16(w.as_ptr().add(i))), 16);
        acc = vfmaq_f32(
            acc,
            vreinterpretq_f32_u32(bits),
            vld1q_f32(x.as_ptr().add(i)),
        );
        i += 4;
    }
    vaddvq_f32(acc) + super::scalar::dot_bf16(&w[i..], &x[i..])
}

/// See [`super::scalar::dot_i8`].
///
/// # Safety
/// `w.len() == x.len()`.
pub unsafe fn dot_i8(w: &[i8], x: &[i8]) -> i32 {
    let n = w.len();
    let mut acc = vdupq_n_s32(0);
    let mut i = 0;
    while i + 16 <= n {
        let a = vld1q_s8(w.as_ptr().add(i));
        let b = vld1q_s8(x.as_ptr().add(i));
        let p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let p = vmlal_high_s8(p, a, b);
        acc = vpadalq_s16(acc, p);
        i += 16;
    }
    vaddvq_s32(acc) + super::scalar::dot_i8(&w[i..], &x[i..])
}

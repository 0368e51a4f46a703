//! WebAssembly SIMD128 kernels (wasm32 built with `+simd128`, chosen at compile time).
//!
//! Ternary × int8: the codes `w + 1` (0..=2) times int8 activations are widened to i16 with
//! `i16x8.extmul_{low,high}_i8x16_s` and summed in i16 lanes for up to [`FLUSH`] blocks
//! (16 products of at most 2·127 per lane and block: 8 blocks ≤ 32512), then widened to i32 with
//! `i32x4.extadd_pairwise_i16x8_s`. The caller subtracts `Σx` as for the other kernel sets.
//! Four rows of a group share each activation load.

use core::arch::wasm32::*;

use crate::cpu::packed::{BLOCK, BLOCK_BYTES, GROUP};

/// Blocks accumulated in i16 before widening.
const FLUSH: usize = 8;

#[inline(always)]
fn hsum_i32(v: v128) -> i32 {
    i32x4_extract_lane::<0>(v)
        + i32x4_extract_lane::<1>(v)
        + i32x4_extract_lane::<2>(v)
        + i32x4_extract_lane::<3>(v)
}

#[inline(always)]
fn hsum_f32(v: v128) -> f32 {
    (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v))
        + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v))
}

/// One row group (4 rows, interleaved layout) × one token row of activations.
///
/// # Safety
/// `g` points at a whole group (`GROUP * rb` bytes), `x` at `4 * rb` int8 values.
#[inline(always)]
unsafe fn group(g: *const u8, rb: usize, x: *const i8) -> [i32; GROUP] {
    let nblocks = rb / BLOCK_BYTES;
    let mask = u8x16_splat(3);
    let mut tot = [i32x4_splat(0); GROUP];
    let mut b0 = 0;
    while b0 < nblocks {
        let end = (b0 + FLUSH).min(nblocks);
        let mut acc = [i16x8_splat(0); GROUP];
        for b in b0..end {
            let xb = x.add(b * BLOCK) as *const v128;
            // Activations of the block: run i (32 columns) in two 16-byte halves.
            let xs: [v128; 8] = [
                v128_load(xb),
                v128_load(xb.add(1)),
                v128_load(xb.add(2)),
                v128_load(xb.add(3)),
                v128_load(xb.add(4)),
                v128_load(xb.add(5)),
                v128_load(xb.add(6)),
                v128_load(xb.add(7)),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let wp = g.add((b * GROUP + r) * BLOCK_BYTES) as *const v128;
                for half in 0..2 {
                    let wv = v128_load(wp.add(half));
                    let c = [
                        v128_and(wv, mask),
                        v128_and(u8x16_shr(wv, 2), mask),
                        v128_and(u8x16_shr(wv, 4), mask),
                        v128_and(u8x16_shr(wv, 6), mask),
                    ];
                    for (i, &ci) in c.iter().enumerate() {
                        let xv = xs[2 * i + half];
                        let p = i16x8_add(
                            i16x8_extmul_low_i8x16(ci, xv),
                            i16x8_extmul_high_i8x16(ci, xv),
                        );
                        *a = i16x8_add(*a, p);
                    }
                }
            }
        }
        for r in 0..GROUP {
            tot[r] = i32x4_add(tot[r], i32x4_extadd_pairwise_i16x8(acc[r]));
        }
        b0 = end;
    }
    [
        hsum_i32(tot[0]),
        hsum_i32(tot[1]),
        hsum_i32(tot[2]),
        hsum_i32(tot[3]),
    ]
}

/// See [`super::scalar::code_dots`].
///
/// # Safety
/// Sizes as in [`super::Kernels::code_dots`] (checked there).
pub unsafe fn code_dots(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32]) {
    let kpad = rb * 4;
    let ngroups = w.len() / (GROUP * rb);
    for g in 0..ngroups {
        let gp = w.as_ptr().add(g * GROUP * rb);
        for t in 0..ntok {
            let o = group(gp, rb, x.as_ptr().add(t * kpad));
            for (r, v) in o.iter().enumerate() {
                out[(g * GROUP + r) * ntok + t] = *v;
            }
        }
    }
}

/// See [`super::scalar::dot_i8`].
///
/// # Safety
/// `w.len() == x.len()` (checked by the caller).
pub unsafe fn dot_i8(w: &[i8], x: &[i8]) -> i32 {
    let n = w.len();
    let mut acc = [i32x4_splat(0); 2];
    let mut i = 0;
    while i + 16 <= n {
        let a = v128_load(w.as_ptr().add(i) as *const v128);
        let b = v128_load(x.as_ptr().add(i) as *const v128);
        // |a·b| ≤ 128², so each i16 product is exact.
        acc[0] = i32x4_add(
            acc[0],
            i32x4_extadd_pairwise_i16x8(i16x8_extmul_low_i8x16(a, b)),
        );
        acc[1] = i32x4_add(
            acc[1],
            i32x4_extadd_pairwise_i16x8(i16x8_extmul_high_i8x16(a, b)),
        );
        i += 16;
    }
    hsum_i32(i32x4_add(acc[0], acc[1])) + super::scalar::dot_i8(&w[i..], &x[i..])
}

/// See [`super::scalar::dot_bf16`]: bf16 bits shifted into the high half of an f32.
///
/// # Safety
/// `w.len() == x.len()` (checked by the caller).
pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len();
    let mut acc = [f32x4_splat(0.0); 2];
    let mut i = 0;
    while i + 8 <= n {
        let bits = v128_load(w.as_ptr().add(i) as *const v128);
        let lo = i32x4_shl(u32x4_extend_low_u16x8(bits), 16);
        let hi = i32x4_shl(u32x4_extend_high_u16x8(bits), 16);
        let xp = x.as_ptr().add(i) as *const v128;
        acc[0] = f32x4_add(acc[0], f32x4_mul(lo, v128_load(xp)));
        acc[1] = f32x4_add(acc[1], f32x4_mul(hi, v128_load(xp.add(1))));
        i += 8;
    }
    hsum_f32(f32x4_add(acc[0], acc[1])) + super::scalar::dot_bf16(&w[i..], &x[i..])
}

//! AVX-512 VNNI kernels (x86_64, chosen at run time): `vpdpbusd` multiplies the unsigned codes by
//! the int8 activations and accumulates straight into i32, on 256-bit vectors (AVX512VL), which
//! also gives the kernel 32 vector registers.

use std::arch::x86_64::*;

use crate::cpu::packed::{BLOCK, BLOCK_BYTES};

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// `R` rows × `T` tokens of code dot products.
#[inline(always)]
unsafe fn tile<const R: usize, const T: usize>(w: *const u8, rb: usize, x: *const i8, kpad: usize, out: &mut [[i32; T]; R]) {
    let nblocks = rb / BLOCK_BYTES;
    let mask = _mm256_set1_epi8(3);
    let mut acc = [[_mm256_setzero_si256(); T]; R];
    for b in 0..nblocks {
        for r in 0..R {
            let wv = _mm256_loadu_si256(w.add(r * rb + b * BLOCK_BYTES) as *const __m256i);
            let c = [
                _mm256_and_si256(wv, mask),
                _mm256_and_si256(_mm256_srli_epi16(wv, 2), mask),
                _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask),
                _mm256_and_si256(_mm256_srli_epi16(wv, 6), mask),
            ];
            for t in 0..T {
                let xp = x.add(t * kpad + b * BLOCK) as *const __m256i;
                let mut a = acc[r][t];
                for (i, ci) in c.iter().enumerate() {
                    a = _mm256_dpbusd_epi32(a, *ci, _mm256_loadu_si256(xp.add(i)));
                }
                acc[r][t] = a;
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum_i32(acc[r][t]);
        }
    }
}

#[inline(always)]
unsafe fn rows_tokens<const R: usize, const T: usize>(w: &[u8], rb: usize, r0: usize, x: &[i8], t0: usize, ntok: usize, out: &mut [i32]) {
    let mut o = [[0i32; T]; R];
    tile::<R, T>(w.as_ptr().add(r0 * rb), rb, x.as_ptr().add(t0 * rb * 4), rb * 4, &mut o);
    for (r, row) in o.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            out[(r0 + r) * ntok + t0 + t] = *v;
        }
    }
}

/// See [`super::scalar::code_dots`].
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; sizes as in [`super::Kernels::code_dots`].
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn code_dots(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32]) {
    let nrows = w.len() / rb;
    let mut r = 0;
    if ntok == 1 {
        while r + 4 <= nrows {
            rows_tokens::<4, 1>(w, rb, r, x, 0, 1, out);
            r += 4;
        }
    } else {
        // Tokens in groups of 4 stay in L1 while the chunk's rows stream past them.
        let mut t = 0;
        while t + 4 <= ntok {
            let mut rr = 0;
            while rr + 4 <= nrows {
                rows_tokens::<4, 4>(w, rb, rr, x, t, ntok, out);
                rr += 4;
            }
            while rr < nrows {
                rows_tokens::<1, 4>(w, rb, rr, x, t, ntok, out);
                rr += 1;
            }
            t += 4;
        }
        while t < ntok {
            for rr in 0..nrows {
                rows_tokens::<1, 1>(w, rb, rr, x, t, ntok, out);
            }
            t += 1;
        }
        return;
    }
    while r < nrows {
        rows_tokens::<1, 1>(w, rb, r, x, 0, 1, out);
        r += 1;
    }
}

/// See [`super::scalar::dot_i8`]. Inputs must not contain -128.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; `w.len() == x.len()`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_i8(w: &[i8], x: &[i8]) -> i32 {
    let n = w.len();
    let mut acc = [_mm256_setzero_si256(); 2];
    let mut i = 0;
    while i + 64 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_loadu_si256(w.as_ptr().add(i + 32 * k) as *const __m256i);
            let xv = _mm256_loadu_si256(x.as_ptr().add(i + 32 * k) as *const __m256i);
            *a = _mm256_dpbusd_epi32(*a, _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        }
        i += 64;
    }
    hsum_i32(_mm256_add_epi32(acc[0], acc[1])) + super::scalar::dot_i8(&w[i..], &x[i..])
}

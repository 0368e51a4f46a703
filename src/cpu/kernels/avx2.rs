//! AVX2 kernels (x86_64, chosen at run time).
//!
//! Ternary × int8: codes `w + 1` are unsigned, so `vpmaddubsw(codes, x)` gives exact pairwise
//! sums; the caller subtracts `Σx` to turn `Σ(w+1)·x` into `Σw·x`. Partial sums stay in i16 for
//! up to 16 blocks (|sum| ≤ 16·4·508 = 32512) before widening to i32.

use std::arch::x86_64::*;

use super::prefetch_ahead;
use crate::cpu::packed::{BLOCK, BLOCK_BYTES, GROUP};
use crate::cpu::{FloatRows, Int8Rows};

/// Blocks that can be accumulated in i16 without overflow.
const FLUSH: usize = 16;

/// Sum of the eight i32 lanes.
#[inline(always)]
pub(super) unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// One row group (4 rows) × `T` tokens of code dot products.
#[inline(always)]
unsafe fn group<const T: usize>(
    g: *const u8,
    rb: usize,
    x: *const i8,
    kpad: usize,
    pf: usize,
) -> [[i32; T]; GROUP] {
    let nblocks = rb / BLOCK_BYTES;
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut tot = [[_mm256_setzero_si256(); T]; GROUP];
    let mut b0 = 0;
    while b0 < nblocks {
        let end = (b0 + FLUSH).min(nblocks);
        let mut acc = [[_mm256_setzero_si256(); T]; GROUP];
        for b in b0..end {
            prefetch_ahead::<2>(g.add(b * GROUP * BLOCK_BYTES), pf);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_si256(g.add((b * GROUP + r) * BLOCK_BYTES) as *const __m256i);
                let c0 = _mm256_and_si256(wv, mask);
                let c1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), mask);
                let c2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
                let c3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), mask);
                for (t, a) in acc_r.iter_mut().enumerate() {
                    let xp = x.add(t * kpad + b * BLOCK) as *const __m256i;
                    let p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(xp));
                    let p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256(xp.add(1)));
                    let p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256(xp.add(2)));
                    let p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256(xp.add(3)));
                    let s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
                    *a = _mm256_add_epi16(*a, s);
                }
            }
        }
        for r in 0..GROUP {
            for t in 0..T {
                tot[r][t] = _mm256_add_epi32(tot[r][t], _mm256_madd_epi16(acc[r][t], ones));
            }
        }
        b0 = end;
    }
    let mut out = [[0i32; T]; GROUP];
    for r in 0..GROUP {
        for t in 0..T {
            out[r][t] = hsum_i32(tot[r][t]);
        }
    }
    out
}

/// See [`super::scalar::code_dots`].
///
/// # Safety
/// The CPU must support AVX2; sizes as in [`super::Kernels::code_dots`].
#[target_feature(enable = "avx2,fma")]
pub unsafe fn code_dots(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32], pf: usize) {
    super::for_each_group!(w, rb, x, ntok, out, pf, [2, 1], group);
}

/// See [`super::scalar::dot_i8`]. Inputs must not contain -128.
///
/// # Safety
/// The CPU must support AVX2; `w.len() == x.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_i8(w: &[i8], x: &[i8], pf: usize) -> i32 {
    let n = w.len();
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); 2];
    let mut i = 0;
    while i + 64 <= n {
        prefetch_ahead::<1>(w.as_ptr().add(i) as *const u8, pf);
        for (k, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_loadu_si256(w.as_ptr().add(i + 32 * k) as *const __m256i);
            let xv = _mm256_loadu_si256(x.as_ptr().add(i + 32 * k) as *const __m256i);
            // |w| · sign(x, w): unsigned × signed pairs, |pair sum| ≤ 2·127·127 < 2^15.
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
        }
        i += 64;
    }
    hsum_i32(_mm256_add_epi32(acc[0], acc[1])) + super::scalar::dot_i8(&w[i..], &x[i..])
}

/// Order of the 32 activations of a chunk as [`head_bf16`] consumes them: `vpunpck{l,h}wd`
/// against zero turns bf16 into f32 within each 128-bit lane.
pub const BF16_PERM: [usize; 32] = [
    0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15, //
    16, 17, 18, 19, 24, 25, 26, 27, 20, 21, 22, 23, 28, 29, 30, 31,
];

/// `out[r] = w[r] · x` for consecutive bf16 rows of `cols`; `xp` is `x` with every full 32-wide
/// chunk reordered by [`BF16_PERM`] (the tail in natural order).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w.len() == out.len() * cols`, `xp.len() == cols`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn head_bf16(w: &[u16], cols: usize, xp: &[f32], out: &mut [f32], pf: usize) {
    head_tile::<1>(w, cols, xp, out, 0, pf);
}

/// [`head_bf16`] of `ntok` token rows (`xp`: `ntok × cols`, `out[t * rows + r]`), each weight
/// chunk widened once for up to three tokens (the accumulators of more would not fit the 16
/// registers); every token's logits bit-identical to [`head_bf16`]'s.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `xp.len() == ntok * cols`, `out.len() == ntok * rows`
/// with `w.len() == rows * cols`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn head_bf16_multi(
    w: &[u16],
    cols: usize,
    xp: &[f32],
    ntok: usize,
    out: &mut [f32],
    pf: usize,
) {
    let mut t = 0;
    while t < ntok {
        let step = (ntok - t).min(3);
        match step {
            1 => head_tile::<1>(w, cols, xp, out, t, pf),
            2 => head_tile::<2>(w, cols, xp, out, t, pf),
            _ => head_tile::<3>(w, cols, xp, out, t, pf),
        }
        t += step;
    }
}

/// Tokens `t0..t0 + T` of [`head_bf16_multi`]: per token the sums of [`head_bf16`] in its order.
#[inline(always)]
unsafe fn head_tile<const T: usize>(
    w: &[u16],
    cols: usize,
    xp: &[f32],
    out: &mut [f32],
    t0: usize,
    pf: usize,
) {
    let rows = w.len() / cols;
    let full = cols / 32 * 32;
    let zero = _mm256_setzero_si256();
    let x = |t: usize, i: usize| xp.as_ptr().add((t0 + t) * cols + i);
    for r in 0..rows {
        let row = w.as_ptr().add(r * cols);
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        let mut i = 0;
        while i < full {
            prefetch_ahead::<1>(row.add(i) as *const u8, pf);
            for k in 0..2 {
                let v = _mm256_loadu_si256(row.add(i + 16 * k) as *const __m256i);
                let lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
                let hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
                for (t, a) in acc.iter_mut().enumerate() {
                    let xk = x(t, i + 16 * k);
                    a[2 * k] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xk), a[2 * k]);
                    a[2 * k + 1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xk.add(8)), a[2 * k + 1]);
                }
            }
            i += 32;
        }
        let tail = std::slice::from_raw_parts(row.add(full), cols - full);
        for (t, a) in acc.iter().enumerate() {
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), s);
            let xt = std::slice::from_raw_parts(x(t, full), cols - full);
            out[(t0 + t) * rows + r] =
                lanes.iter().sum::<f32>() + super::scalar::dot_bf16(tail, xt);
        }
    }
}

/// Key and value rows the AVX2 attention reads.
pub trait KvRows {
    /// Eight values of position `p`'s key from column `c`, as f32.
    ///
    /// # Safety
    /// `p` and `c + 8` within the rows; AVX2 present.
    unsafe fn key8(&self, p: usize, c: usize) -> __m256;
    /// Eight values of position `p`'s value from column `c`, as f32.
    ///
    /// # Safety
    /// As [`Self::key8`].
    unsafe fn value8(&self, p: usize, c: usize) -> __m256;
    /// The factor position `p`'s key dot product takes (1 for float rows: exact).
    fn key_scale(&self, p: usize) -> f32;
    /// The factor position `p`'s weight takes (1 for float rows).
    fn value_scale(&self, p: usize) -> f32;
}

impl<F: Fn(usize) -> usize> KvRows for FloatRows<'_, F> {
    #[inline(always)]
    unsafe fn key8(&self, p: usize, c: usize) -> __m256 {
        _mm256_loadu_ps(self.k.as_ptr().add((self.row)(p) * self.hd + c))
    }
    #[inline(always)]
    unsafe fn value8(&self, p: usize, c: usize) -> __m256 {
        _mm256_loadu_ps(self.v.as_ptr().add((self.row)(p) * self.hd + c))
    }
    #[inline(always)]
    fn key_scale(&self, _: usize) -> f32 {
        1.0
    }
    #[inline(always)]
    fn value_scale(&self, _: usize) -> f32 {
        1.0
    }
}

impl<F: Fn(usize) -> usize> KvRows for Int8Rows<'_, F> {
    #[inline(always)]
    unsafe fn key8(&self, p: usize, c: usize) -> __m256 {
        widen8(self.k.as_ptr().add((self.row)(p) * self.hd + c))
    }
    #[inline(always)]
    unsafe fn value8(&self, p: usize, c: usize) -> __m256 {
        widen8(self.v.as_ptr().add((self.row)(p) * self.hd + c))
    }
    #[inline(always)]
    fn key_scale(&self, p: usize) -> f32 {
        self.k_scale[(self.row)(p)]
    }
    #[inline(always)]
    fn value_scale(&self, p: usize) -> f32 {
        self.v_scale[(self.row)(p)]
    }
}

/// Eight int8 values at `at` as f32 (exact).
#[inline(always)]
unsafe fn widen8(at: *const i8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(at as *const __m128i)))
}

/// Softmax attention of `q` over `len` positions of `rows`, bit-identical to
/// [`crate::reference::attend_with`] with the reference's dot products ([`crate::reference::dot`],
/// or [`crate::reference::dot_i8`] times the key's scale) and weighted sums: the same products and
/// sums in the same order, eight positions' dot products at a time (their partial-sum lanes
/// transposed so the lanes add up as the reference adds them) and the output held in registers
/// across positions. `q.len()` must be a multiple of 8.
///
/// # Safety
/// The CPU must support AVX2; every position below `len` must be in `rows`, `scores` hold
/// `len` and `out` `q.len()` values.
#[target_feature(enable = "avx2")]
pub unsafe fn attend(
    q: &[f32],
    len: usize,
    rows: &impl KvRows,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    debug_assert!(hd.is_multiple_of(8) && scores.len() >= len && out.len() == hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let full = len / 8 * 8;
    let mut maxv = _mm256_set1_ps(f32::NEG_INFINITY);
    for p0 in (0..full).step_by(8) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..hd).step_by(8) {
            let qc = _mm256_loadu_ps(q.as_ptr().add(c));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(qc, rows.key8(p0 + j, c)));
            }
        }
        let t = transpose8(acc);
        let mut s = t[0];
        for ti in &t[1..] {
            s = _mm256_add_ps(s, *ti);
        }
        let ks: [f32; 8] = std::array::from_fn(|j| rows.key_scale(p0 + j));
        s = _mm256_mul_ps(s, _mm256_loadu_ps(ks.as_ptr()));
        s = _mm256_mul_ps(s, _mm256_set1_ps(scale));
        _mm256_storeu_ps(scores.as_mut_ptr().add(p0), s);
        maxv = _mm256_max_ps(maxv, s);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), maxv);
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for (p, score) in scores.iter_mut().enumerate().take(len).skip(full) {
        let mut acc = _mm256_setzero_ps();
        for c in (0..hd).step_by(8) {
            acc = _mm256_add_ps(
                acc,
                _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(c)), rows.key8(p, c)),
            );
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let dot = lanes[1..].iter().fold(lanes[0], |a, &x| a + x);
        let s = dot * rows.key_scale(p) * scale;
        *score = s;
        max = max.max(s);
    }
    let inv = 1.0 / crate::reference::softmax_exps(&mut scores[..len], max);
    for c0 in (0..hd).step_by(64) {
        let o = &mut out[c0..(c0 + 64).min(hd)];
        // As the reference, positions whose exponential is zero are skipped.
        let w = |p: usize| (scores[p] != 0.0).then(|| scores[p] * inv * rows.value_scale(p));
        match o.len() / 8 {
            8 => weighted_rows::<8>(len, c0, rows, &w, o),
            7 => weighted_rows::<7>(len, c0, rows, &w, o),
            6 => weighted_rows::<6>(len, c0, rows, &w, o),
            5 => weighted_rows::<5>(len, c0, rows, &w, o),
            4 => weighted_rows::<4>(len, c0, rows, &w, o),
            3 => weighted_rows::<3>(len, c0, rows, &w, o),
            2 => weighted_rows::<2>(len, c0, rows, &w, o),
            _ => weighted_rows::<1>(len, c0, rows, &w, o),
        }
    }
}

/// `out = Σ_p w(p) · value_p[c0..c0 + 8 N]` in position order from zero (as the reference
/// accumulates) over the positions with a weight, the sums kept in registers.
#[inline(always)]
unsafe fn weighted_rows<const N: usize>(
    len: usize,
    c0: usize,
    rows: &impl KvRows,
    w: &impl Fn(usize) -> Option<f32>,
    out: &mut [f32],
) {
    let mut acc = [_mm256_setzero_ps(); N];
    for p in 0..len {
        let Some(wp) = w(p) else { continue };
        let wp = _mm256_set1_ps(wp);
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_ps(*a, _mm256_mul_ps(wp, rows.value8(p, c0 + 8 * c)));
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(8 * c), *a);
    }
}

/// The 8 × 8 transpose: lane `j` of result `i` is lane `i` of input `j`.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

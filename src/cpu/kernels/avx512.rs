//! AVX-512 VNNI kernels (x86_64, chosen at run time): `vpdpbusd` multiplies the unsigned codes by
//! the int8 activations and accumulates straight into i32, on 256-bit vectors (AVX512VL), which
//! also gives the kernel 32 vector registers.

use std::arch::x86_64::*;

use super::avx2::hsum_i32;
use super::prefetch_ahead;
use crate::cpu::packed::{BLOCK, BLOCK_BYTES, GROUP};

/// One row group × one token (decode). Rows 2p and 2p+1 of a block are adjacent, so one
/// 512-bit load covers both and the activations are broadcast to both halves: half the
/// instructions of a 256-bit loop. Each bit field has its own accumulator, which also lets the
/// fields be masked in place instead of shifted down: field `i` enters `vpdpbusd` as
/// `4^i · code` (≤ 192, still an unsigned byte), and its sum, an exact multiple of `4^i`, is
/// shifted back once at the end: a mask and a `vpdpbusd` per field and 64 bytes.
///
/// `pf`: software prefetch distance (chosen per machine by measurement: Zen 4 streams fastest
/// without, an Intel Xeon 60–80% faster with 16 KiB). Two groups per loop sharing the broadcasts
/// ran 10% faster from L3 but twice as slow from memory on Zen 4 (two streams 4 rows apart).
#[inline(always)]
unsafe fn group_single(g: *const u8, rb: usize, x: *const i8, pf: usize) -> [i32; GROUP] {
    let nblocks = rb / BLOCK_BYTES;
    let masks = [
        _mm512_set1_epi8(0x03),
        _mm512_set1_epi8(0x0c),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0xc0u8 as i8),
    ];
    let mut acc = [[_mm512_setzero_si512(); 4]; GROUP / 2];
    for b in 0..nblocks {
        prefetch_ahead::<2>(g.add(b * GROUP * BLOCK_BYTES), pf);
        let xp = x.add(b * BLOCK) as *const __m256i;
        let xv = [
            _mm512_broadcast_i64x4(_mm256_loadu_si256(xp)),
            _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.add(1))),
            _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.add(2))),
            _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.add(3))),
        ];
        for (pair, a) in acc.iter_mut().enumerate() {
            let wv = _mm512_loadu_si512(g.add((b * GROUP + 2 * pair) * BLOCK_BYTES) as *const _);
            for i in 0..4 {
                a[i] = _mm512_dpbusd_epi32(a[i], _mm512_and_si512(wv, masks[i]), xv[i]);
            }
        }
    }
    let mut out = [0i32; GROUP];
    for (pair, a) in acc.iter().enumerate() {
        // |sum| per field ≤ 192 · 127 · cols / 4 < 2^31: cols ≤ 2^18 (`ModelConfig::validate`).
        let s = _mm512_add_epi32(
            _mm512_add_epi32(a[0], _mm512_srai_epi32::<2>(a[1])),
            _mm512_add_epi32(_mm512_srai_epi32::<4>(a[2]), _mm512_srai_epi32::<6>(a[3])),
        );
        [out[2 * pair], out[2 * pair + 1]] = pair_sums(s);
    }
    out
}

/// The sums of a row pair's accumulator: its low half (row 2p), its high half (row 2p+1).
#[inline(always)]
unsafe fn pair_sums(v: __m512i) -> [i32; 2] {
    [
        hsum_i32(_mm512_castsi512_si256(v)),
        hsum_i32(_mm512_extracti64x4_epi64::<1>(v)),
    ]
}

/// One row group (4 rows) × `T` tokens of code dot products, on 512-bit vectors as
/// [`group_single`]: rows 2p and 2p+1 in one load, each token's activations broadcast to both
/// halves. Each field is shifted down and masked once for all `T` tokens (one accumulator per
/// row pair and token): 64 bytes of weights cost 3 shifts, 4 masks and `4·T` `vpdpbusd`, half
/// the instructions of a 256-bit loop.
#[inline(always)]
unsafe fn group<const T: usize>(
    g: *const u8,
    rb: usize,
    x: *const i8,
    kpad: usize,
    pf: usize,
) -> [[i32; T]; GROUP] {
    let nblocks = rb / BLOCK_BYTES;
    let mask = _mm512_set1_epi8(3);
    let mut acc = [[_mm512_setzero_si512(); T]; GROUP / 2];
    for b in 0..nblocks {
        prefetch_ahead::<2>(g.add(b * GROUP * BLOCK_BYTES), pf);
        for (pair, acc_p) in acc.iter_mut().enumerate() {
            let wv = _mm512_loadu_si512(g.add((b * GROUP + 2 * pair) * BLOCK_BYTES) as *const _);
            let c = [
                _mm512_and_si512(wv, mask),
                _mm512_and_si512(_mm512_srli_epi16::<2>(wv), mask),
                _mm512_and_si512(_mm512_srli_epi16::<4>(wv), mask),
                _mm512_and_si512(_mm512_srli_epi16::<6>(wv), mask),
            ];
            for (t, a) in acc_p.iter_mut().enumerate() {
                let xp = x.add(t * kpad + b * BLOCK) as *const __m256i;
                for (i, ci) in c.iter().enumerate() {
                    let xv = _mm512_broadcast_i64x4(_mm256_loadu_si256(xp.add(i)));
                    *a = _mm512_dpbusd_epi32(*a, *ci, xv);
                }
            }
        }
    }
    let mut out = [[0i32; T]; GROUP];
    for (pair, acc_p) in acc.iter().enumerate() {
        for (t, a) in acc_p.iter().enumerate() {
            [out[2 * pair][t], out[2 * pair + 1][t]] = pair_sums(*a);
        }
    }
    out
}

/// See [`super::scalar::code_dots`].
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; sizes as in [`super::Kernels::code_dots`].
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn code_dots(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32], pf: usize) {
    if ntok == 1 {
        for (i, o) in out[..w.len() / rb].chunks_exact_mut(GROUP).enumerate() {
            o.copy_from_slice(&group_single(
                w.as_ptr().add(i * GROUP * rb),
                rb,
                x.as_ptr(),
                pf,
            ));
        }
        return;
    }
    super::for_each_group!(w, rb, x, ntok, out, pf, [8, 5, 4, 3, 2, 1], group);
}

/// See [`super::scalar::dot_i8`]. Inputs must not contain -128.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; `w.len() == x.len()`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_i8(w: &[i8], x: &[i8], pf: usize) -> i32 {
    let n = w.len();
    let mut acc = [_mm256_setzero_si256(); 2];
    let mut i = 0;
    while i + 64 <= n {
        prefetch_ahead::<1>(w.as_ptr().add(i) as *const u8, pf);
        for (k, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_loadu_si256(w.as_ptr().add(i + 32 * k) as *const __m256i);
            let xv = _mm256_loadu_si256(x.as_ptr().add(i + 32 * k) as *const __m256i);
            *a = _mm256_dpbusd_epi32(*a, _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        }
        i += 64;
    }
    hsum_i32(_mm256_add_epi32(acc[0], acc[1])) + super::scalar::dot_i8(&w[i..], &x[i..])
}

/// Order of the 32 activations of a chunk as [`head_bf16`] consumes them: `vpunpck{l,h}wd`
/// against zero turns bf16 into f32 lane-wise, low quarters of each 128-bit lane first.
pub const BF16_PERM: [usize; 32] = [
    0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27, //
    4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31,
];

/// `out[r] = w[r] · x` for consecutive bf16 rows of `cols`; `xp` is `x` with every full 32-wide
/// chunk reordered by [`BF16_PERM`] (the tail in natural order).
///
/// # Safety
/// The CPU must support AVX-512 F/BW; `w.len() == out.len() * cols`, `xp.len() == cols`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw")]
pub unsafe fn head_bf16(w: &[u16], cols: usize, xp: &[f32], out: &mut [f32], pf: usize) {
    head_tile::<1>(w, cols, xp, out, 0, pf);
}

/// [`head_bf16`] of `ntok` token rows (`xp`: `ntok × cols`, `out[t * rows + r]`), each weight
/// chunk widened once for up to four tokens; every token's logits bit-identical to
/// [`head_bf16`]'s.
///
/// # Safety
/// The CPU must support AVX-512 F/BW; `xp.len() == ntok * cols`, `out.len() == ntok * rows`
/// with `w.len() == rows * cols`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw")]
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
        let step = (ntok - t).min(4);
        match step {
            1 => head_tile::<1>(w, cols, xp, out, t, pf),
            2 => head_tile::<2>(w, cols, xp, out, t, pf),
            3 => head_tile::<3>(w, cols, xp, out, t, pf),
            _ => head_tile::<4>(w, cols, xp, out, t, pf),
        }
        t += step;
    }
}

/// Tokens `t0..t0 + T` of [`head_bf16_multi`]: per token the sums of [`head_bf16`] in its order
/// (four accumulators over 64-column steps, then 32-column steps, then the tail).
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
    let zero = _mm512_setzero_si512();
    let x = |t: usize, i: usize| xp.as_ptr().add((t0 + t) * cols + i);
    for r in 0..rows {
        let row = w.as_ptr().add(r * cols);
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        let mut i = 0;
        while i + 64 <= full {
            prefetch_ahead::<2>(row.add(i) as *const u8, pf);
            for k in 0..2 {
                let v = _mm512_loadu_si512(row.add(i + 32 * k) as *const _);
                let lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
                let hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
                for (t, a) in acc.iter_mut().enumerate() {
                    let xk = x(t, i + 32 * k);
                    a[2 * k] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xk), a[2 * k]);
                    a[2 * k + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xk.add(16)), a[2 * k + 1]);
                }
            }
            i += 64;
        }
        while i < full {
            let v = _mm512_loadu_si512(row.add(i) as *const _);
            let lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
            let hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
            for (t, a) in acc.iter_mut().enumerate() {
                let xk = x(t, i);
                a[0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xk), a[0]);
                a[1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xk.add(16)), a[1]);
            }
            i += 32;
        }
        let tail = std::slice::from_raw_parts(row.add(full), cols - full);
        for (t, a) in acc.iter().enumerate() {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            let xt = std::slice::from_raw_parts(x(t, full), cols - full);
            out[(t0 + t) * rows + r] = _mm512_reduce_add_ps(s) + super::scalar::dot_bf16(tail, xt);
        }
    }
}

//! The scalar reference ops every backend is tested against: f32 norms, RoPE, attention,
//! gated activations, and the token selections (argmax, top-k candidates) a device may make
//! without reading the logits back. The CPU backend runs these very functions.

use crate::quant::quantize_activations;

/// `out = w · x / sqrt(mean(x²) + eps)` (docs/NUMERICS.md §7).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// RMSNorm followed by int8 quantization into `q` (padded); returns the absmax.
pub fn rmsnorm_quant(x: &[f32], w: &[f32], eps: f32, tmp: &mut [f32], q: &mut [i8]) -> f32 {
    rmsnorm(x, w, eps, tmp);
    quantize_activations(tmp, q)
}

/// `1 / theta^(2j/hd)` for j in 0..hd/2, in f32 as transformers computes it.
pub fn rope_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| 1.0 / theta.powf((2 * j) as f32 / head_dim as f32))
        .collect()
}

/// Rotate-half RoPE of one head vector at position `pos` (dimension j pairs with j + hd/2).
pub fn rope(v: &mut [f32], pos: usize, inv_freq: &[f32]) {
    rotate_heads(v, v.len(), pos as f32, inv_freq);
}

/// [`rope`] of every head in `heads` (consecutive vectors of `hd`), each angle's sine and
/// cosine computed once for all of them.
pub fn rope_heads(heads: &mut [f32], hd: usize, pos: usize, inv_freq: &[f32]) {
    rotate_heads(heads, hd, pos as f32, inv_freq);
}

/// Turns a head rotated by [`rope`] at position `p` into the same head at `p - d`: rotation by
/// `-d` positions (RoPE rotations compose: R(p − d) = R(−d)·R(p)). Its sines are the negated
/// sines of `d` (sin is odd), so it rounds as `a·cos + b·sin`, `b·cos − a·sin` with the cos/sin
/// of `d` (the GPU's shift, from its table).
pub fn rope_back(v: &mut [f32], d: usize, inv_freq: &[f32]) {
    rotate_heads(v, v.len(), -(d as f32), inv_freq);
}

/// Rotate-half rotation of each `hd`-wide head of `heads` by `pos` (signed) positions.
fn rotate_heads(heads: &mut [f32], hd: usize, pos: f32, inv_freq: &[f32]) {
    let half = hd / 2;
    for (j, &f) in inv_freq[..half].iter().enumerate() {
        let (s, c) = (pos * f).sin_cos();
        for v in heads.chunks_exact_mut(hd) {
            let (a, b) = (v[j], v[j + half]);
            v[j] = a * c - b * s;
            v[j + half] = b * c + a * s;
        }
    }
}

/// Dot product with eight independent partial sums (vectorizes well).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Softmax attention of `q` over `len` cached positions (`k`, `v`: `len × hd` rows);
/// `scores` is scratch of at least `len`.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], len: usize, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    attend_rows(
        q,
        len,
        |p| &k[p * hd..(p + 1) * hd],
        |p| &v[p * hd..(p + 1) * hd],
        scores,
        out,
    );
}

/// [`attend`] with the key and value rows of position `p` given by `k(p)` and `v(p)` (paged
/// caches); the same arithmetic in the same order.
#[inline(always)]
pub fn attend_rows<'a>(
    q: &[f32],
    len: usize,
    k: impl Fn(usize) -> &'a [f32],
    v: impl Fn(usize) -> &'a [f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_with(
        q.len(),
        len,
        |p| dot(q, k(p)),
        |p, w, out| {
            for (o, &vv) in out.iter_mut().zip(v(p)) {
                *o += w * vv;
            }
        },
        scores,
        out,
    );
}

/// Softmax attention over `len` positions of `hd`-wide heads stored in any form: `score(p)` is
/// the query's dot product with position `p`'s key, `add(p, w, out)` adds `w` times its value
/// into `out` (for every position whose weight's exponential is not zero).
#[inline(always)]
pub fn attend_with(
    hd: usize,
    len: usize,
    score: impl Fn(usize) -> f32,
    add: impl Fn(usize, f32, &mut [f32]),
    scores: &mut [f32],
    out: &mut [f32],
) {
    let scale = 1.0 / (hd as f32).sqrt();
    let mut max = f32::NEG_INFINITY;
    for (p, s) in scores[..len].iter_mut().enumerate() {
        *s = score(p) * scale;
        max = max.max(*s);
    }
    let inv = 1.0 / softmax_exps(&mut scores[..len], max);
    out.fill(0.0);
    // A position whose exponential underflowed to zero adds nothing (`acc + 0·v` is `acc`:
    // the sums never hold −0), so it is skipped, which also keeps accumulators that hold a
    // subnormal from paying a floating-point assist per position.
    for (p, &s) in scores[..len].iter().enumerate() {
        if s != 0.0 {
            add(p, s * inv, out);
        }
    }
}

/// `e^x` for the softmax's `x = score − max ≤ 0` (any x ≤ 88 works): Cody–Waite reduction
/// `x = n·ln 2 + r`, Cephes' degree-7 polynomial for `e^r`, `2^n` put in the exponent; within
/// 2 ulp of the exact value, 0 below −87.3 (where `e^x` leaves the normal range), NaN stays
/// NaN. Only IEEE adds and multiplies in a fixed order, so a vectorized loop of it (the
/// compiler's, or a SIMD kernel's) gives the scalar result bit for bit, at a fraction of a
/// libm call's cost.
#[inline(always)]
pub fn exp_softmax(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN: f32 = -87.336_55;
    let under = x < MIN;
    let x = if under { MIN } else { x };
    // n = round_half_even_small(x·log2 e), and the same integer from the sum's low mantissa
    // bits (a float-to-int cast would keep the compiler from vectorizing the loops of this).
    let t = x * LOG2E + crate::quant::ROUND_MAGIC;
    let n = t - crate::quant::ROUND_MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(crate::quant::ROUND_MAGIC.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5)
        * (r * r)
        + r)
        + 1.0;
    let e = p * f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if under {
        0.0
    } else {
        e
    }
}

/// Replaces each softmax score by `e^(score − max)` ([`exp_softmax`], vectorized) and returns
/// their sum, added in position order.
#[inline(always)]
pub fn softmax_exps(scores: &mut [f32], max: f32) -> f32 {
    for s in scores.iter_mut() {
        *s = exp_softmax(*s - max);
    }
    scores.iter().fold(0.0, |a, &s| a + s)
}

/// Dot product of f32 `a` with int8 `b` (eight partial sums, as [`dot`]).
#[inline(always)]
pub fn dot_i8(a: &[f32], b: &[i8]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, &y)| x * y as f32)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i] as f32;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `m = act(gate) · up` for the architecture's gating activation.
pub fn gated_act(act: crate::arch::GatedAct, gate: &[f32], up: &[f32], out: &mut [f32]) {
    match act {
        crate::arch::GatedAct::Relu2 => relu2_mul(gate, up, out),
        crate::arch::GatedAct::Silu => silu_mul(gate, up, out),
    }
}

/// `m = silu(gate) · up`, `silu(g) = g / (1 + e^-g)`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `m = relu(gate)² · up`.
pub fn relu2_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let r = g.max(0.0);
        *o = r * r * u;
    }
}

/// Index of the largest logit (the lowest id on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    // Two passes the compiler vectorises: the maximum (NaN never wins), then its first index.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        if v > m {
            m = v;
        }
    }
    logits.iter().position(|&v| v == m).unwrap_or(0) as u32
}

/// The `k` largest of `logits × inv_t` (all of them when `k` is 0 or at least the vocab) as
/// (scaled logit, id), best first, ties by lower id: the candidates temperature sampling with
/// top-k draws from.
pub fn top_candidates(logits: &[f32], k: usize, inv_t: f32, out: &mut Vec<(f32, u32)>) {
    out.clear();
    out.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l * inv_t, i as u32)),
    );
    if k > 0 && k < out.len() {
        out.select_nth_unstable_by(k - 1, by_desc);
        out.truncate(k);
    }
    out.sort_unstable_by(by_desc);
}

/// Candidate order: larger scaled logit first (`total_cmp`), then lower id.
fn by_desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_softmax_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=2_000_000u32 {
            let x = -(i as f32) * 4.4e-5 - if i % 2 == 1 { 1e-9 } else { 0.0 };
            let want = (x as f64).exp();
            let got = exp_softmax(x) as f64;
            if want < f32::MIN_POSITIVE as f64 {
                // Below the normal range: flushed to zero.
                assert_eq!(got, 0.0, "{x}");
                continue;
            }
            let ulp = (want as f32).to_bits();
            let ulp = (f32::from_bits(ulp + 1) - f32::from_bits(ulp)) as f64;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp_softmax(0.0), 1.0);
        assert_eq!(exp_softmax(-100.0), 0.0);
        assert_eq!(exp_softmax(f32::NEG_INFINITY), 0.0);
        assert!(exp_softmax(f32::NAN).is_nan());
        // The vectorized loop gives the scalar bits.
        let mut v: Vec<f32> = (0..999).map(|i| -(i as f32) * 0.0931).collect();
        let scalar: Vec<u32> = v.iter().map(|&x| exp_softmax(x - 0.5).to_bits()).collect();
        softmax_exps(&mut v, 0.5);
        assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), scalar);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        let inv = rope_inv_freq(10000.0, 4);
        assert_eq!(inv[0], 1.0);
        let mut v = [1.0, 0.0, 0.0, 0.0];
        rope(&mut v, 1, &inv);
        assert!((v[0] - 1f32.cos()).abs() < 1e-6 && (v[2] - 1f32.sin()).abs() < 1e-6);
        let mut w = [1.0, 2.0, 3.0, 4.0];
        rope(&mut w, 0, &inv);
        assert_eq!(w, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn rope_heads_rotates_each_head_as_rope_does() {
        let (hd, heads) = (12, 5);
        let inv = rope_inv_freq(500000.0, hd);
        let v: Vec<f32> = (0..hd * heads).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut all = v.clone();
        rope_heads(&mut all, hd, 77, &inv);
        for (h, got) in all.chunks(hd).enumerate() {
            let mut want = v[h * hd..(h + 1) * hd].to_vec();
            rope(&mut want, 77, &inv);
            assert_eq!(got, &want[..], "head {h}");
        }
    }

    #[test]
    fn rope_back_undoes_positions() {
        let inv = rope_inv_freq(10000.0, 8);
        let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let (mut at_9, mut at_4) = (x.clone(), x.clone());
        rope(&mut at_9, 9, &inv);
        rope(&mut at_4, 4, &inv);
        rope_back(&mut at_9, 5, &inv);
        for (a, b) in at_9.iter().zip(&at_4) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn attention_weights_sum_to_one() {
        let q = [1.0, 0.0];
        let k = [1.0, 0.0, -1.0, 0.0];
        let v = [2.0, 0.0, 0.0, 2.0];
        let mut s = [0.0; 2];
        let mut o = [0.0; 2];
        attend(&q, &k, &v, 2, &mut s, &mut o);
        let a = (1.0f32 / 2f32.sqrt()).exp();
        let b = (-1.0f32 / 2f32.sqrt()).exp();
        assert!((o[0] - 2.0 * a / (a + b)).abs() < 1e-6);
        assert!((o[1] - 2.0 * b / (a + b)).abs() < 1e-6);
    }

    #[test]
    fn relu2_uses_gate() {
        let mut o = [0.0; 3];
        relu2_mul(&[-1.0, 2.0, 3.0], &[5.0, 5.0, -1.0], &mut o);
        assert_eq!(o, [0.0, 20.0, -9.0]);
    }
}

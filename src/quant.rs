//! The numerics contract shared by every backend (docs/NUMERICS.md §3–5): absmean ternarization,
//! the 2-bit code packing of the checkpoint, and per-token absmax int8 activation quantization.

/// Largest int8 code of an activation (Qp = 127).
pub const ACT_QMAX: f32 = 127.0;
/// Lower clamp of the activation absmax.
pub const ACT_EPS: f32 = 1e-5;

/// 1.5·2^23: adding it to |v| < 2^22 leaves v rounded half to even (the FPU's default mode)
/// in the low mantissa bits.
pub(crate) const ROUND_MAGIC: f32 = 12582912.0;

/// Rounds half to even for |v| < 2^22 without a libm call (adding and removing
/// `ROUND_MAGIC`).
#[inline(always)]
pub fn round_half_even_small(v: f32) -> f32 {
    (v + ROUND_MAGIC) - ROUND_MAGIC
}

/// The largest |v| of `x` (NaNs ignored), in sixteen lanes the compiler vectorizes (a single
/// running maximum stays scalar: 3.8 µs instead of 0.3 for 2560 values).
#[inline]
pub fn absmax(x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let larger = |m: f32, v: f32| {
        let a = v.abs();
        if a > m {
            a
        } else {
            m
        }
    };
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = larger(*l, v);
        }
    }
    lanes.iter().chain(tail).fold(0f32, |m, &v| larger(m, v))
}

/// `v` rounded half to even and clamped to `lo..=127` as an int8 (NaN: 0), for |v| < 2^22:
/// the rounded integer read from the bits of `v + ROUND_MAGIC` (integer steps that vectorize,
/// where a saturating float-to-int cast stays scalar).
#[inline(always)]
fn round_to_i8(v: f32, lo: i32) -> i8 {
    let r = (v + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    if v.is_nan() {
        0
    } else {
        r.clamp(lo, 127) as i8
    }
}

/// Quantizes one token's activations to int8 (round half to even) and returns its absmax.
///
/// `out` may be longer than `x`; the tail is zero-filled (padding for the kernels).
pub fn quantize_activations(x: &[f32], out: &mut [i8]) -> f32 {
    let absmax = absmax(x).max(ACT_EPS);
    let scale = ACT_QMAX / absmax;
    for (o, &v) in out.iter_mut().zip(x) {
        // |v * scale| <= 127 (up to rounding), far inside the exact range of the magic add.
        *o = round_to_i8(v * scale, -128);
    }
    out[x.len()..].fill(0);
    absmax
}

/// Quantizes one row to int8 with its own scale (absmax / 127, round half to even; the int8
/// head and the int8 KV cache of every backend) and returns the scale (`w ≈ q · scale`).
pub fn quantize_row_absmax(row: &[f32], q: &mut [i8]) -> f32 {
    let m = absmax(row);
    let inv = if m > 0.0 { 127.0 / m } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(row) {
        // |v · inv| ≤ 127 (NaN becomes 0).
        *o = round_to_i8(v * inv, -127);
    }
    m / 127.0
}

/// Absmean ternarization of a master weight (`WeightQuant`, docs/NUMERICS.md §4):
/// returns codes in {-1, 0, 1} and the multiplier that restores the real scale.
pub fn ternarize_absmean(w: &[f32]) -> (Vec<i8>, f32) {
    let mean = (w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64) as f32;
    let mean = mean.max(1e-5);
    let s = 1.0 / mean;
    let codes = w
        .iter()
        .map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    (codes, 1.0 / s)
}

/// Packs ternary values `[rows, cols]` (row-major, rows % 4 == 0) into the checkpoint's
/// `[rows/4, cols]` bytes: bit field i of packed row r holds unpacked row `i*rows/4 + r`.
pub fn pack_checkpoint(values: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    let r4 = rows / 4;
    let mut out = vec![0u8; r4 * cols];
    for (i, block) in values.chunks_exact(r4 * cols).enumerate() {
        for (o, &v) in out.iter_mut().zip(block) {
            *o |= ((v + 1) as u8) << (2 * i);
        }
    }
    out
}

/// The ternary value of row `r`, column `c` of a checkpoint-packed `[rows/4, cols]` matrix,
/// as the code `w + 1` (0, 1, 2; 3 means a corrupt byte).
#[inline]
pub fn checkpoint_code(packed: &[u8], rows: usize, cols: usize, r: usize, c: usize) -> u8 {
    let r4 = rows / 4;
    (packed[(r % r4) * cols + c] >> (2 * (r / r4))) & 3
}

/// Checks that `m`'s packed codes hold no 2-bit code 3 (the error names the row and column of
/// the first one), eight bytes at a time.
pub fn check_codes(m: &crate::format::TernaryMatrix) -> crate::Result<()> {
    let packed = m.packed.as_slice();
    let bad = |x: u64| (x & (x >> 1)) & 0x5555_5555_5555_5555;
    let mut chunks = packed.chunks_exact(8);
    let mut at = None;
    for (i, c) in chunks.by_ref().enumerate() {
        if bad(u64::from_le_bytes(c.try_into().expect("8 bytes"))) != 0 {
            at = Some(i * 8);
            break;
        }
    }
    if at.is_none() && chunks.remainder().iter().any(|&b| bad(b as u64) != 0) {
        at = Some(packed.len() - chunks.remainder().len());
    }
    let Some(start) = at else {
        return Ok(());
    };
    let r4 = (m.rows / 4).max(1);
    for (i, &byte) in packed.iter().enumerate().skip(start) {
        for k in 0..4 {
            if (byte >> (2 * k)) & 3 == 3 {
                let (r, c) = (k * r4 + i / m.cols.max(1), i % m.cols.max(1));
                return Err(crate::Error::Format {
                    path: m.name.clone().into(),
                    msg: format!("invalid 2-bit code 3 at row {r}, column {c} of packed weight"),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_codes_finds_the_first_code_3_where_row_codes_does() {
        let (rows, cols) = (8, 13);
        let mut packed = vec![0b0110_0100u8; rows / 4 * cols];
        let ok = crate::format::TernaryMatrix {
            name: "m".into(),
            rows,
            cols,
            packed: crate::format::Bytes::Owned(std::sync::Arc::new(packed.clone())),
            scale: 1.0,
        };
        assert!(check_codes(&ok).is_ok());
        // Byte 17 is packed row 1, column 4; its bits 2..3 belong to row 1 * (8 / 4) + 1 = 3.
        packed[17] |= 0b0000_1100;
        let bad = crate::format::TernaryMatrix {
            packed: crate::format::Bytes::Owned(std::sync::Arc::new(packed)),
            ..ok
        };
        let e = check_codes(&bad).unwrap_err().to_string();
        assert!(e.contains("row 3, column 4"), "{e}");
        let mut codes = vec![0u8; cols];
        let row = bad.row_codes(3, &mut codes).unwrap_err().to_string();
        assert!(row.contains("row 3, column 4"), "{row}");
    }

    #[test]
    fn rounds_half_to_even() {
        // absmax 127 makes scale exactly 1, so the inputs are the pre-round values.
        let x = [0.5, 1.5, 2.5, -0.5, -2.5, 127.0, 3.49];
        let mut q = [0i8; 8];
        let m = quantize_activations(&x, &mut q);
        assert_eq!(m, 127.0);
        assert_eq!(q, [0, 2, 2, 0, -2, 127, 3, 0]);
    }

    #[test]
    fn fast_rounding_matches_round_ties_even() {
        for i in -300_000..300_000 {
            let v = i as f32 * 0.000_5 - 0.25;
            assert_eq!(round_half_even_small(v), v.round_ties_even(), "{v}");
        }
        for v in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 127.49999] {
            assert_eq!(round_half_even_small(v), v.round_ties_even(), "{v}");
        }
    }

    #[test]
    fn integer_rounding_equals_the_float_rounding_and_clamp() {
        let mut vals: Vec<f32> = (-600_000..600_000).map(|i| i as f32 * 0.000_25).collect();
        vals.extend([
            f32::NAN,
            -f32::NAN,
            127.5,
            -128.5,
            -127.5,
            128.49,
            -0.0,
            1e6,
            -1e6,
        ]);
        for v in vals {
            for lo in [-128, -127] {
                let want = if v.is_nan() {
                    0
                } else {
                    round_half_even_small(v).clamp(lo as f32, 127.0) as i8
                };
                assert_eq!(round_to_i8(v, lo), want, "{v}");
            }
        }
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.3) * 0.71).collect();
        assert_eq!(absmax(&x), x.iter().fold(0f32, |m, v| m.max(v.abs())));
        assert_eq!(absmax(&[f32::NAN, -3.0, 2.0]), 3.0);
    }

    #[test]
    fn zero_token_quantizes_to_zero() {
        let mut q = [1i8; 4];
        assert_eq!(quantize_activations(&[0.0; 4], &mut q), ACT_EPS);
        assert_eq!(q, [0; 4]);
    }

    #[test]
    fn pack_then_decode_is_identity() {
        let (rows, cols) = (12, 5);
        let vals: Vec<i8> = (0..rows * cols)
            .map(|i| ((i * 7 + i / 3) % 3) as i8 - 1)
            .collect();
        let packed = pack_checkpoint(&vals, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(
                    checkpoint_code(&packed, rows, cols, r, c) as i8 - 1,
                    vals[r * cols + c]
                );
            }
        }
    }

    #[test]
    fn absmean_matches_definition() {
        let (codes, scale) = ternarize_absmean(&[0.3, -0.1, 0.0, -0.6]);
        assert!((scale - 0.25).abs() < 1e-7);
        assert_eq!(codes, vec![1, 0, 0, -1]);
    }
}

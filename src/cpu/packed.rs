//! Ternary weights repacked at load into the CPU kernels' layout.
//!
//! Each row is padded to a multiple of [`BLOCK`] columns and cut into 32-byte blocks: byte `j`
//! of block `b` holds, in bit field `i`, the code (`w + 1`) of column `b*128 + i*32 + j`.
//! Unpacking a block with four shift-and-mask steps yields the codes of four consecutive
//! 32-column runs, which line up with four plain 32-byte loads of the int8 activations.
//!
//! Rows are interleaved in groups of [`GROUP`]: a group stores block 0 of its four rows, then
//! block 1 of the four rows, and so on, so a kernel working on four rows at once reads memory
//! strictly sequentially (short rows would otherwise defeat the hardware prefetcher).

use rayon::prelude::*;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{weight_buffer, Bytes, KernelMatrix, TernaryMatrix};

/// Columns per packed block.
pub const BLOCK: usize = 128;
/// Bytes per packed block.
pub const BLOCK_BYTES: usize = BLOCK / 4;
/// Rows interleaved together.
pub const GROUP: usize = 4;

/// Byte offset of block `b` of row `r` in a matrix with `rb` bytes per row.
#[inline]
pub fn block_offset(rb: usize, r: usize, b: usize) -> usize {
    (r / GROUP) * GROUP * rb + b * GROUP * BLOCK_BYTES + (r % GROUP) * BLOCK_BYTES
}

/// Rounds `cols` up to whole blocks.
pub fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK
}

/// One or more ternary matrices stacked by rows, in the kernel layout, with per-row scales.
#[derive(Debug, Clone)]
pub struct PackedTernary {
    /// Output rows (sum over the stacked matrices).
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// Columns padded to whole blocks.
    pub kpad: usize,
    /// `rows * kpad / 4` bytes, rows interleaved in groups of [`GROUP`] (owned when repacked
    /// here, mapped when a converted checkpoint holds them).
    pub data: Bytes,
    /// Scale of each row (its matrix's weight scale).
    pub row_scale: Vec<f32>,
}

impl PackedTernary {
    /// Bytes of one packed row.
    pub fn row_bytes(&self) -> usize {
        self.kpad / 4
    }

    /// Packs codes (`w + 1`) of one row into contiguous blocks (see [`Self::pack_group`]).
    pub fn pack_row(codes: &[u8], out: &mut [u8]) {
        out.fill(0);
        for (c, &code) in codes.iter().enumerate() {
            let (b, within) = (c / BLOCK, c % BLOCK);
            out[b * BLOCK_BYTES + within % 32] |= code << (2 * (within / 32));
        }
        // Padding columns get code 1 (weight 0); their activations are 0 as well.
        for c in codes.len()..out.len() * 4 {
            let (b, within) = (c / BLOCK, c % BLOCK);
            out[b * BLOCK_BYTES + within % 32] |= 1 << (2 * (within / 32));
        }
    }

    /// Row `r` of `m` (codes already checked) as [`Self::pack_row`] packs it, straight from
    /// the checkpoint's bytes: 32 output bytes from four runs of 32 input bytes at a time, a
    /// loop the compiler vectorizes (the load's repacking is this, at memory speed).
    fn pack_checkpoint_row(m: &TernaryMatrix, r: usize, out: &mut [u8]) {
        let r4 = m.rows / 4;
        let shift = 2 * (r / r4) as u32;
        let src = &m.packed.as_slice()[(r % r4) * m.cols..][..m.cols];
        let full = m.cols / BLOCK;
        for (o, s) in out
            .chunks_exact_mut(BLOCK_BYTES)
            .zip(src.chunks_exact(BLOCK))
        {
            let (s0, s1, s2, s3) = (&s[..32], &s[32..64], &s[64..96], &s[96..]);
            for j in 0..BLOCK_BYTES {
                o[j] = ((s0[j] >> shift) & 3)
                    | (((s1[j] >> shift) & 3) << 2)
                    | (((s2[j] >> shift) & 3) << 4)
                    | (((s3[j] >> shift) & 3) << 6);
            }
        }
        // The last, partial block and its padding: through the codes.
        if full * BLOCK_BYTES < out.len() {
            let codes: Vec<u8> = src[full * BLOCK..]
                .iter()
                .map(|b| (b >> shift) & 3)
                .collect();
            Self::pack_row(&codes, &mut out[full * BLOCK_BYTES..]);
        }
    }

    /// Interleaves four rows packed by [`Self::pack_row`] (`rows` holds them back to back)
    /// into one group of the kernel layout.
    pub fn interleave_group(rows: &[u8], out: &mut [u8]) {
        let rb = rows.len() / GROUP;
        for r in 0..GROUP {
            for b in 0..rb / BLOCK_BYTES {
                let src = &rows[r * rb + b * BLOCK_BYTES..][..BLOCK_BYTES];
                out[block_offset(rb, r, b)..][..BLOCK_BYTES].copy_from_slice(src);
            }
        }
    }

    /// Builds the kernel layout from per-row codes (`codes[r]` has `cols` entries).
    pub fn from_codes(codes: &[Vec<u8>], cols: usize, row_scale: Vec<f32>) -> Self {
        let rows = codes.len();
        assert!(
            rows.is_multiple_of(GROUP),
            "rows must be a multiple of {GROUP}"
        );
        let kpad = padded_cols(cols);
        let rb = kpad / 4;
        let mut data = vec![0u8; rows * rb];
        let mut tmp = vec![0u8; GROUP * rb];
        for (g, out) in data.chunks_exact_mut(GROUP * rb).enumerate() {
            for r in 0..GROUP {
                Self::pack_row(&codes[g * GROUP + r], &mut tmp[r * rb..(r + 1) * rb]);
            }
            Self::interleave_group(&tmp, out);
        }
        PackedTernary {
            rows,
            cols,
            kpad,
            data: Bytes::Owned(Arc::new(data)),
            row_scale,
        }
    }

    /// A matrix a converted checkpoint holds in this layout, mapped as it is (its size and
    /// row count are checked; its codes are the converter's).
    pub fn from_kernel(m: &KernelMatrix) -> Result<Self> {
        let kpad = padded_cols(m.cols);
        let want = m.rows * kpad / 4;
        if !m.rows.is_multiple_of(GROUP)
            || m.data.as_slice().len() != want
            || m.row_scale.len() != m.rows
        {
            return Err(Error::Format {
                path: m.name.clone().into(),
                msg: format!(
                    "{} bytes and {} row scales for {} rows of {} columns (expected {want} bytes)",
                    m.data.as_slice().len(),
                    m.row_scale.len(),
                    m.rows,
                    m.cols
                ),
            });
        }
        Ok(PackedTernary {
            rows: m.rows,
            cols: m.cols,
            kpad,
            // Streamed every token: moved into huge pages where the file is mapped.
            data: m.data.to_weight_buffer().unwrap_or_else(|| m.data.clone()),
            row_scale: m.row_scale.clone(),
        })
    }

    /// Stacks `mats` (all with the same column count) row-wise and repacks them.
    /// Validates every code; mapped source pages are released afterwards.
    pub fn from_matrices(mats: &[&TernaryMatrix]) -> Result<Self> {
        let cols = mats[0].cols;
        debug_assert!(mats.iter().all(|m| m.cols == cols));
        let rows: usize = mats.iter().map(|m| m.rows).sum();
        let kpad = padded_cols(cols);
        let rb = kpad / 4;
        let mut row_scale = Vec::with_capacity(rows);
        let data = weight_buffer(rows * rb, |data| -> Result<()> {
            let mut start = 0;
            for m in mats {
                let dst = &mut data[start * rb..(start + m.rows) * rb];
                crate::quant::check_codes(m)?;
                dst.par_chunks_mut(GROUP * rb).enumerate().for_each_init(
                    || vec![0u8; GROUP * rb],
                    |tmp, (g, out)| {
                        for r in 0..GROUP {
                            Self::pack_checkpoint_row(m, g * GROUP + r, &mut tmp[r * rb..][..rb]);
                        }
                        Self::interleave_group(tmp, out);
                    },
                );
                row_scale.extend(std::iter::repeat_n(m.scale, m.rows));
                start += m.rows;
                m.packed.release_pages();
            }
            Ok(())
        })?;
        Ok(PackedTernary {
            rows,
            cols,
            kpad,
            data,
            row_scale,
        })
    }

    /// The code (`w + 1`) at row `r`, column `c` (for tests and the scalar reference).
    pub fn code(&self, r: usize, c: usize) -> u8 {
        let (b, within) = (c / BLOCK, c % BLOCK);
        (self.data.as_slice()[block_offset(self.row_bytes(), r, b) + within % 32]
            >> (2 * (within / 32)))
            & 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::checkpoint_code;
    use rand::{Rng, SeedableRng};

    fn matrix(rows: usize, cols: usize, seed: u64) -> TernaryMatrix {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let packed: Vec<u8> = (0..rows / 4 * cols)
            .map(|_| (0..4).fold(0u8, |b, i| b | (rng.random_range(0..3u8) << (2 * i))))
            .collect();
        TernaryMatrix {
            name: format!("m{seed}"),
            rows,
            cols,
            packed: Bytes::Owned(Arc::new(packed)),
            scale: 0.5,
        }
    }

    #[test]
    fn repacking_a_checkpoint_equals_packing_its_codes() {
        for (i, (rows, cols)) in [(4, 1), (8, 127), (4, 128), (12, 300), (16, 2560), (8, 6913)]
            .into_iter()
            .enumerate()
        {
            let (a, b) = (
                matrix(rows, cols, i as u64),
                matrix(rows + 4, cols, 100 + i as u64),
            );
            let got = PackedTernary::from_matrices(&[&a, &b]).expect("valid codes");
            let codes: Vec<Vec<u8>> = [&a, &b]
                .iter()
                .flat_map(|m| {
                    (0..m.rows).map(|r| {
                        let p = m.packed.as_slice();
                        (0..cols)
                            .map(|c| checkpoint_code(p, m.rows, cols, r, c))
                            .collect()
                    })
                })
                .collect();
            let scales = vec![0.5; 2 * rows + 4];
            let want = PackedTernary::from_codes(&codes, cols, scales);
            assert_eq!(got.data.as_slice(), want.data.as_slice(), "{rows}x{cols}");
            assert_eq!(got.rows, 2 * rows + 4);
        }
    }

    #[test]
    fn repacking_refuses_a_code_3_naming_the_tensor() {
        let mut m = matrix(8, 130, 7);
        let mut bytes = m.packed.as_slice().to_vec();
        bytes[131] |= 0b11 << 4;
        m.packed = Bytes::Owned(Arc::new(bytes));
        let e = PackedTernary::from_matrices(&[&m]).unwrap_err().to_string();
        assert!(e.contains("m7") && e.contains("code 3"), "{e}");
    }
}

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
use crate::format::{Bytes, KernelMatrix, TernaryMatrix};

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
            data: m.data.clone(),
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
        let mut data = vec![0u8; rows * rb];
        let mut row_scale = Vec::with_capacity(rows);
        let mut start = 0;
        for m in mats {
            let dst = &mut data[start * rb..(start + m.rows) * rb];
            dst.par_chunks_mut(GROUP * rb)
                .enumerate()
                .try_for_each_init(
                    || (vec![0u8; cols], vec![0u8; GROUP * rb]),
                    |(codes, tmp), (g, out)| -> Result<()> {
                        for r in 0..GROUP {
                            m.row_codes(g * GROUP + r, codes)?;
                            Self::pack_row(codes, &mut tmp[r * rb..(r + 1) * rb]);
                        }
                        Self::interleave_group(tmp, out);
                        Ok(())
                    },
                )?;
            row_scale.extend(std::iter::repeat_n(m.scale, m.rows));
            start += m.rows;
            m.packed.release_pages();
        }
        Ok(PackedTernary {
            rows,
            cols,
            kpad,
            data: Bytes::Owned(Arc::new(data)),
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

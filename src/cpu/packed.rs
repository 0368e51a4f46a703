//! Ternary weights repacked at load into the CPU kernels' layout.
//!
//! Each row is padded to a multiple of [`BLOCK`] columns and stored as 32-byte blocks: byte `j`
//! of block `b` holds, in bit field `i`, the code (`w + 1`) of column `b*128 + i*32 + j`.
//! Unpacking a block with four shift-and-mask steps yields the codes of four consecutive
//! 32-column runs, which line up with four plain 32-byte loads of the int8 activations.

use rayon::prelude::*;

use crate::error::Result;
use crate::format::TernaryMatrix;

/// Columns per packed block.
pub const BLOCK: usize = 128;
/// Bytes per packed block.
pub const BLOCK_BYTES: usize = BLOCK / 4;

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
    /// `rows * kpad / 4` bytes.
    pub data: Vec<u8>,
    /// Scale of each row (its matrix's weight scale).
    pub row_scale: Vec<f32>,
}

impl PackedTernary {
    /// Bytes of one packed row.
    pub fn row_bytes(&self) -> usize {
        self.kpad / 4
    }

    /// Packs codes (`w + 1`) of one row into the kernel layout.
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
            dst.par_chunks_mut(rb).enumerate().try_for_each_init(
                || vec![0u8; cols],
                |codes, (r, out)| -> Result<()> {
                    m.row_codes(r, codes)?;
                    Self::pack_row(codes, out);
                    Ok(())
                },
            )?;
            row_scale.extend(std::iter::repeat_n(m.scale, m.rows));
            start += m.rows;
            m.packed.release_pages();
        }
        Ok(PackedTernary { rows, cols, kpad, data, row_scale })
    }

    /// The code (`w + 1`) at row `r`, column `c` (for tests and the scalar reference).
    pub fn code(&self, r: usize, c: usize) -> u8 {
        let (b, within) = (c / BLOCK, c % BLOCK);
        (self.data[r * self.row_bytes() + b * BLOCK_BYTES + within % 32] >> (2 * (within / 32))) & 3
    }
}

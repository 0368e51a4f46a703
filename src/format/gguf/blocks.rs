//! The ggml element types the loader reads, decoded from their block layouts: floats (F32,
//! F16, BF16) and the quantized head formats (Q8_0, Q6_K) to f32; the ternary formats
//! (llama.cpp's TQ1_0 and TQ2_0, bitnet.cpp's I2_S) to codes `w + 1` with their scales.

use half::f16;

use crate::format::FloatDtype;

/// Elements per block of the k-quant and ternary formats.
const QK_K: usize = 256;
/// Elements per Q8_0 block.
const QK8_0: usize = 32;
/// Elements per I2_S block (x86 layout: four 32-element groups in 32 bytes).
const QK_I2_S: usize = 128;
/// Bytes after the packed I2_S codes: the tensor's f32 scale, padded.
const I2_S_TAIL: u64 = 32;

/// A ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32 int8 with an f16 scale.
    Q8_0,
    /// 6-bit k-quant: 256 elements in 16 sub-blocks with int8 scales and an f16 scale.
    Q6K,
    /// Ternary, base-3 packed (5 and 4 trits per byte) with an f16 scale per 256 elements.
    TQ1_0,
    /// Ternary, 2 bits per element with an f16 scale per 256 elements.
    TQ2_0,
    /// bitnet.cpp's ternary: 2 bits per element, one f32 scale per tensor.
    I2S,
}

impl GgmlType {
    /// The type of a ggml type id (None: not read by this loader).
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            8 => GgmlType::Q8_0,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            34 => GgmlType::TQ1_0,
            35 => GgmlType::TQ2_0,
            36 => GgmlType::I2S,
            _ => return None,
        })
    }

    /// The ggml name.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q6K => "Q6_K",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::I2S => "I2_S",
        }
    }

    /// (elements, bytes) of one block.
    fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (QK8_0 as u64, 34),
            GgmlType::Q6K => (QK_K as u64, 210),
            GgmlType::TQ1_0 => (QK_K as u64, 54),
            GgmlType::TQ2_0 => (QK_K as u64, 66),
            GgmlType::I2S => (4, 1),
        }
    }

    /// Whether the type holds ternary codes.
    pub fn is_ternary(self) -> bool {
        matches!(self, GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2S)
    }

    /// Bytes of a tensor of `elements` with rows of `row` elements.
    pub fn bytes_for(self, row: u64, elements: u64) -> Result<u64, String> {
        let (be, bb) = self.block();
        let unit = if self == GgmlType::I2S {
            QK_I2_S as u64
        } else {
            be
        };
        if !row.is_multiple_of(unit) {
            return Err(format!(
                "rows of {row} elements are not whole blocks of {unit}"
            ));
        }
        let body = elements / be * bb;
        Ok(if self == GgmlType::I2S {
            body + I2_S_TAIL
        } else {
            body
        })
    }

    /// Bytes of one row of `row` elements (not for I2_S, whose scale follows all rows).
    pub fn row_bytes(self, row: usize) -> usize {
        let (be, bb) = self.block();
        row / be as usize * bb as usize
    }
}

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Decodes one row of a float or quantized head type into `out` (`raw` holds the row).
pub fn dequantize_row(ty: GgmlType, raw: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => FloatDtype::F32.decode(raw, out),
        GgmlType::F16 => FloatDtype::F16.decode(raw, out),
        GgmlType::BF16 => FloatDtype::BF16.decode(raw, out),
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK8_0).zip(raw.chunks_exact(34)) {
                let d = half(&b[..2]);
                for (v, &q) in o.iter_mut().zip(&b[2..]) {
                    *v = d * (q as i8) as f32;
                }
            }
        }
        GgmlType::Q6K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(raw.chunks_exact(210)) {
                q6k_block(b, o);
            }
        }
        GgmlType::TQ1_0 | GgmlType::TQ2_0 | GgmlType::I2S => {
            unreachable!("ternary types are decoded to codes")
        }
    }
}

/// One Q6_K block: `ql[128]` low nibbles, `qh[64]` high bit pairs, `scales[16]` int8, `d` f16.
/// Each 128-element half uses 64 bytes of ql, 32 of qh and 8 scales (one per 16 elements);
/// element `l + 32·j` of the half (l < 32) takes nibble `j / 2` of `ql[l + 32·(j % 2)]` and
/// bits `2j..2j+2` of `qh[l]`, minus 32.
fn q6k_block(b: &[u8], out: &mut [f32]) {
    let (ql, rest) = b.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (sc, d) = rest.split_at(16);
    let d = half(d);
    for half_i in 0..2 {
        let (ql, qh, sc) = (&ql[64 * half_i..], &qh[32 * half_i..], &sc[8 * half_i..]);
        let y = &mut out[128 * half_i..];
        for l in 0..32 {
            for j in 0..4 {
                let low = (ql[l + 32 * (j % 2)] >> (4 * (j / 2))) & 0xF;
                let high = (qh[l] >> (2 * j)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                y[l + 32 * j] = d * (sc[l / 16 + 2 * j] as i8) as f32 * q as f32;
            }
        }
    }
}

/// Decodes one row of a TQ1_0 or TQ2_0 tensor to codes `w + 1` (0, 1, 2) and the f16 scale of
/// each 256-element block (`scales` gets one per block).
pub fn ternary_row_tq(ty: GgmlType, raw: &[u8], codes: &mut [u8], scales: &mut Vec<u16>) {
    scales.clear();
    match ty {
        GgmlType::TQ2_0 => {
            for (o, b) in codes.chunks_exact_mut(QK_K).zip(raw.chunks_exact(66)) {
                // Two 128-element halves of 32 bytes: element 32·n + m of a half is bits
                // 2n..2n+2 of byte m.
                for (h, o) in o.chunks_exact_mut(128).enumerate() {
                    for n in 0..4 {
                        for m in 0..32 {
                            o[32 * n + m] = (b[32 * h + m] >> (2 * n)) & 3;
                        }
                    }
                }
                scales.push(u16::from_le_bytes([b[64], b[65]]));
            }
        }
        GgmlType::TQ1_0 => {
            for (o, b) in codes.chunks_exact_mut(QK_K).zip(raw.chunks_exact(54)) {
                let (qs, rest) = b.split_at(48);
                let (qh, d) = rest.split_at(4);
                let mut i = 0;
                // 32 bytes of 5 trits, then 16 bytes of 5, then the 4 bytes of qh with 4.
                for (bytes, trits) in [(&qs[..32], 5), (&qs[32..], 5), (qh, 4)] {
                    for n in 0..trits {
                        for &q in bytes {
                            o[i] = trit(q, n);
                            i += 1;
                        }
                    }
                }
                scales.push(u16::from_le_bytes([d[0], d[1]]));
            }
        }
        _ => unreachable!("not a TQ type"),
    }
}

/// Trit `n` (most significant first) of a byte holding a base-3 number scaled to 0..=255:
/// multiplying by 3^n wraps off the higher trits, and the top of `q · 3` is the next one.
fn trit(q: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let q = q.wrapping_mul(POW3[n]);
    ((q as u16 * 3) >> 8) as u8
}

/// The code (`w + 1`) of element `e` of an I2_S tensor's packed bytes: 128-element blocks of
/// 32 bytes, byte `j` holding elements `j`, `j + 32`, `j + 64`, `j + 96` of its block in bits
/// 7:6, 5:4, 3:2 and 1:0.
pub fn i2s_code(packed: &[u8], e: usize) -> u8 {
    let (block, pos) = (e / QK_I2_S, e % QK_I2_S);
    (packed[block * 32 + pos % 32] >> (6 - 2 * (pos / 32))) & 3
}

/// The f32 scale of an I2_S tensor of `elements` (after its packed codes).
pub fn i2s_scale(raw: &[u8], elements: usize) -> f32 {
    let at = elements / 4;
    f32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tq2_0_decodes_its_bit_layout() {
        let mut block = vec![0u8; 66];
        // element 32·n + m of the first half: byte m, bits 2n.
        block[5] = 0b10_01_00_10; // elements 5 (2), 37 (0), 69 (1), 101 (2)
        block[32 + 7] = 0b00_00_10_00; // second half: element 128 + 32 + 7 = 167 is 2
        block[64..66].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        let mut codes = vec![9u8; 256];
        let mut scales = Vec::new();
        ternary_row_tq(GgmlType::TQ2_0, &block, &mut codes, &mut scales);
        assert_eq!([codes[5], codes[37], codes[69], codes[101]], [2, 0, 1, 2]);
        assert_eq!(codes[167], 2);
        assert_eq!(codes[0], 0);
        assert_eq!(f16::from_bits(scales[0]).to_f32(), 0.5);
    }

    #[test]
    fn tq1_0_trits_round_trip_the_base3_packing() {
        // Pack 5 trits per byte as ggml does: the base-3 number, scaled by 256/243 rounding up.
        let pack = |trits: &[u8]| -> u8 {
            let v = trits.iter().fold(0u16, |a, &t| a * 3 + t as u16);
            ((v * 256).div_ceil(243)) as u8
        };
        for v in 0..243u16 {
            let trits: Vec<u8> = (0..5).map(|n| ((v / 3u16.pow(4 - n)) % 3) as u8).collect();
            let q = pack(&trits);
            let got: Vec<u8> = (0..5).map(|n| trit(q, n)).collect();
            assert_eq!(got, trits, "value {v}");
        }
    }

    #[test]
    fn i2s_reads_four_groups_per_byte() {
        let mut packed = vec![0u8; 64];
        packed[3] = 0b10_00_01_10; // elements 3 (2), 35 (0), 67 (1), 99 (2)
        packed[32] = 0b01_00_00_00; // element 128 is 1
        assert_eq!(
            [3, 35, 67, 99, 128].map(|e| i2s_code(&packed, e)),
            [2, 0, 1, 2, 1]
        );
    }

    #[test]
    fn q8_0_scales_int8() {
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = vec![0f32; 32];
        dequantize_row(GgmlType::Q8_0, &b, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 3.75);
    }

    #[test]
    fn sizes_follow_the_block_formats() {
        assert_eq!(GgmlType::TQ2_0.bytes_for(256, 512), Ok(132));
        assert_eq!(GgmlType::I2S.bytes_for(128, 256), Ok(64 + 32));
        assert!(GgmlType::Q6K.bytes_for(100, 100).is_err());
    }
}

//! The output head on the CPU: the checkpoint's own dtype, or int8 with per-row scales.

use rayon::prelude::*;

use super::kernels::Kernels;
use super::team::Team;
use super::SharedMut;
use crate::backend::HeadMode;
use crate::format::{FloatDtype, FloatTensor};
use crate::quant::quantize_activations;

thread_local! {
    /// A chunk's logits for every row of a batched head ([`Head::logits_batch`]).
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Head weights in a kernel-ready form.
#[derive(Debug)]
pub enum Head {
    /// bf16 bits, mapped or copied.
    Bf16 {
        tensor: FloatTensor,
        copy: Option<Vec<u16>>,
    },
    /// f32 rows (f16/f32 checkpoints).
    F32(Vec<f32>),
    /// int8 rows with scales (`w ≈ q · scale`).
    Int8 { q: Vec<i8>, scale: Vec<f32> },
}

impl Head {
    /// Prepares `t` (`[vocab, hidden]`) for `mode`.
    pub fn new(t: &FloatTensor, mode: HeadMode) -> Self {
        match (mode, t.dtype) {
            (HeadMode::Native, FloatDtype::BF16) => {
                // Streamed every token: moved into huge pages where the file is mapped.
                let t = &match t.bytes.to_weight_buffer() {
                    Some(bytes) => FloatTensor { bytes, ..t.clone() },
                    None => t.clone(),
                };
                let aligned = bytemuck::try_cast_slice::<u8, u16>(t.bytes.as_slice()).is_ok();
                let copy = (!aligned).then(|| {
                    t.bytes
                        .as_slice()
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect()
                });
                Head::Bf16 {
                    tensor: t.clone(),
                    copy,
                }
            }
            (HeadMode::Native, _) => Head::F32(t.to_f32()),
            (HeadMode::Int8, _) => {
                let cols = t.cols;
                let mut q = vec![0i8; t.rows * cols];
                let mut scale = vec![0f32; t.rows];
                // In slabs, dropping each slab's source pages as soon as it is quantized so the
                // bf16 and int8 copies never both stay resident.
                const SLAB: usize = 4096;
                for (si, (qs, ss)) in q
                    .chunks_mut(SLAB * cols)
                    .zip(scale.chunks_mut(SLAB))
                    .enumerate()
                {
                    let r0 = si * SLAB;
                    qs.par_chunks_mut(cols)
                        .zip(ss.par_iter_mut())
                        .enumerate()
                        .for_each_init(
                            || vec![0f32; cols],
                            |row, (i, (qr, s))| {
                                t.row_into(r0 + i, row);
                                *s = crate::quant::quantize_row_absmax(row, qr);
                            },
                        );
                    let es = t.dtype.size() * cols;
                    t.bytes.release_range(r0 * es, ss.len() * es);
                }
                Head::Int8 { q, scale }
            }
        }
    }

    /// The head's bf16 rows as a tensor, where the head keeps them whole (the embedding of a
    /// tied model reads its rows from this copy instead of faulting the file back in).
    pub fn bf16_tensor(&self) -> Option<&FloatTensor> {
        match self {
            Head::Bf16 { tensor, copy: None } => Some(tensor),
            _ => None,
        }
    }

    /// Bytes read per token.
    pub fn bytes(&self) -> u64 {
        match self {
            Head::Bf16 { tensor, .. } => (tensor.rows * tensor.cols * 2) as u64,
            Head::F32(v) => (v.len() * 4) as u64,
            Head::Int8 { q, scale } => (q.len() + 4 * scale.len()) as u64,
        }
    }

    /// `out[i * vocab + v] = head[v] · h_i` for the `n = h.len() / cols` rows `h_i` of `h` (one
    /// token's final hidden state each): each chunk of head rows is read once for all of them
    /// (a batched decode step, a verification step), and every row's logits are bit-identical
    /// to those of the row alone. `xq` and `xp` are scratch of `n × cols`.
    #[allow(clippy::too_many_arguments)]
    pub fn logits_batch(
        &self,
        team: &Team,
        k: Kernels,
        h: &[f32],
        cols: usize,
        xq: &mut [i8],
        xp: &mut [f32],
        out: &mut [f32],
    ) {
        let n = h.len() / cols;
        if n == 0 {
            return;
        }
        const CHUNK: usize = 256;
        let vocab = out.len() / n;
        let shared = SharedMut::new(out);
        let for_chunks = |f: &(dyn Fn(usize, usize, &mut [f32]) + Sync)| {
            team.run(vocab.div_ceil(CHUNK), &|c| {
                let r0 = c * CHUNK;
                let len = CHUNK.min(vocab - r0);
                for row in 0..n {
                    // SAFETY: chunk c owns output rows r0..r0 + len of every batch row.
                    f(row, r0, unsafe { shared.slice(row * vocab + r0, len) });
                }
            });
        };
        match self {
            Head::Bf16 { tensor, copy } => {
                let bits: &[u16] = match copy {
                    Some(c) => c,
                    None => bytemuck::cast_slice(tensor.bytes.as_slice()),
                };
                for (x, p) in h.chunks(cols).zip(xp.chunks_mut(cols)) {
                    k.prepare_bf16_activations(x, p);
                }
                let xp = &xp[..n * cols];
                team.run(vocab.div_ceil(CHUNK), &|c| {
                    let r0 = c * CHUNK;
                    let len = CHUNK.min(vocab - r0);
                    TILE.with_borrow_mut(|tile| {
                        tile.resize(n * len, 0.0);
                        let w = &bits[r0 * cols..(r0 + len) * cols];
                        k.head_bf16_multi(w, cols, xp, n, tile);
                        for (row, o) in tile.chunks_exact(len).enumerate() {
                            // SAFETY: chunk c owns output rows r0..r0 + len of every batch row.
                            unsafe { shared.slice(row * vocab + r0, len) }.copy_from_slice(o);
                        }
                    });
                });
            }
            Head::F32(w) => {
                for_chunks(&|row, r0, o| {
                    let x = &h[row * cols..(row + 1) * cols];
                    for (i, v) in o.iter_mut().enumerate() {
                        let r = r0 + i;
                        *v = w[r * cols..(r + 1) * cols]
                            .iter()
                            .zip(x)
                            .map(|(a, b)| a * b)
                            .sum();
                    }
                });
            }
            Head::Int8 { q, scale } => {
                let xs: Vec<f32> = h
                    .chunks(cols)
                    .zip(xq.chunks_mut(cols))
                    .map(|(x, q)| quantize_activations(x, q) / 127.0)
                    .collect();
                let xq = &*xq;
                for_chunks(&|row, r0, o| {
                    let x = &xq[row * cols..(row + 1) * cols];
                    for (i, v) in o.iter_mut().enumerate() {
                        let r = r0 + i;
                        *v = k.dot_i8(&q[r * cols..(r + 1) * cols], x) as f32 * xs[row] * scale[r];
                    }
                });
            }
        }
    }
}

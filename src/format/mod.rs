//! Checkpoint containers and the host-side [`Weights`] they load into.
//!
//! Parsers never trust the file: offsets, shapes and dtypes are checked and every error names
//! the file and tensor. Tensor data stays memory-mapped until a backend repacks it.

#[cfg(not(target_arch = "wasm32"))]
pub mod gguf;
pub mod safetensors;
pub mod synth;

use std::sync::Arc;

use half::f16;
use memmap2::Mmap;

use crate::config::ModelConfig;

/// Tensor bytes: a range of a memory-mapped file or an owned buffer.
#[derive(Debug, Clone)]
pub enum Bytes {
    /// `len` bytes at `start` of a mapped file.
    Mapped {
        /// The mapping.
        map: Arc<Mmap>,
        /// Offset of the first byte.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
    /// Bytes produced at load time (e.g. ternarized master weights).
    Owned(Arc<Vec<u8>>),
    /// Weights laid out at load time in an anonymous mapping backed by transparent huge pages
    /// where the OS offers them ([`weight_buffer`]).
    Anon(Arc<memmap2::MmapMut>),
    /// `len` bytes at `start` of a file held in memory (loaded from bytes, e.g. in a browser).
    Shared {
        /// The whole file.
        buf: Arc<Vec<u8>>,
        /// Offset of the first byte.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
}

impl Bytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            Bytes::Owned(v) => v,
            Bytes::Anon(map) => map,
            Bytes::Shared { buf, start, len } => &buf[*start..*start + *len],
        }
    }

    /// Drops the resident pages of a mapped range (they are re-read from the file if touched
    /// again), so data already repacked by a backend stops counting towards the process RSS.
    pub fn release_pages(&self) {
        self.release_range(0, usize::MAX);
    }

    /// [`Self::release_pages`] for bytes `offset..offset + len` of the range (clamped to it).
    #[cfg_attr(not(unix), allow(unused_variables))]
    pub fn release_range(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        if let Bytes::Mapped {
            map,
            start,
            len: total,
        } = self
        {
            const PAGE: usize = 4096;
            let a = start + offset.min(*total);
            let b = start + offset.saturating_add(len).min(*total);
            let lo = a.div_ceil(PAGE) * PAGE;
            let hi = b / PAGE * PAGE;
            if hi > lo {
                // SAFETY: the mapping is read-only and file-backed; DONTNEED only drops cached
                // pages, later reads fault them back in from the file with the same contents.
                unsafe {
                    let _ =
                        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo);
                }
            }
        }
    }
}

/// `len` bytes written once by `fill` (zeroed before), for weights the kernels stream every
/// token: on Linux an anonymous mapping advised to use transparent huge pages, so the decode
/// stream does not miss the TLB every 4 KiB; elsewhere an ordinary buffer.
pub fn weight_buffer<E>(
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<Bytes, E> {
    #[cfg(target_os = "linux")]
    if len > 0 {
        if let Ok(mut map) = memmap2::MmapMut::map_anon(len) {
            let _ = map.advise(memmap2::Advice::HugePage);
            fill(&mut map)?;
            return Ok(Bytes::Anon(Arc::new(map)));
        }
    }
    let mut v = vec![0u8; len];
    fill(&mut v)?;
    Ok(Bytes::Owned(Arc::new(v)))
}

impl Bytes {
    /// On Linux, a mapped file range copied into a [`weight_buffer`] (in parallel, each
    /// slab's file pages dropped once copied, so the process never holds both); `None` for
    /// bytes that are not mapped, or elsewhere. The kernels then stream huge pages instead
    /// of the page cache's 4 KiB ones.
    pub fn to_weight_buffer(&self) -> Option<Bytes> {
        #[cfg(target_os = "linux")]
        if let Bytes::Mapped { .. } = self {
            use rayon::prelude::*;
            const SLAB: usize = 4 << 20;
            let src = self.as_slice();
            let copied = weight_buffer(src.len(), |dst| -> Result<(), std::convert::Infallible> {
                dst.par_chunks_mut(SLAB).enumerate().for_each(|(i, d)| {
                    d.copy_from_slice(&src[i * SLAB..][..d.len()]);
                    self.release_range(i * SLAB, d.len());
                });
                Ok(())
            });
            return copied.ok();
        }
        None
    }
}

/// Element type of a floating-point tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatDtype {
    /// Decodes little-endian elements of this dtype from `raw` into `out`.
    pub fn decode(self, raw: &[u8], out: &mut [f32]) {
        match self {
            FloatDtype::F32 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            FloatDtype::F16 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            FloatDtype::BF16 => {
                // bf16 is the top half of an f32: a shift (vectorizes, unlike the half crate's
                // conversion).
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            _ => 2,
        }
    }
}

/// A floating-point tensor in its stored dtype, viewed as a `[rows, cols]` matrix.
#[derive(Debug, Clone)]
pub struct FloatTensor {
    /// Tensor name in the checkpoint.
    pub name: String,
    /// Stored dtype.
    pub dtype: FloatDtype,
    /// Rows (1 for vectors).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Raw little-endian data.
    pub bytes: Bytes,
}

impl FloatTensor {
    /// Converts row `r` to f32 into `out` (`out.len() == cols`).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let es = self.dtype.size();
        let raw = &self.bytes.as_slice()[r * self.cols * es..(r + 1) * self.cols * es];
        self.dtype.decode(raw, out);
    }

    /// The whole tensor as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.rows * self.cols];
        for (r, row) in v.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_into(r, row);
        }
        v
    }
}

/// A ternary matrix `[rows, cols]` in the checkpoint's packing (`[rows/4, cols]` bytes,
/// docs/NUMERICS.md §3) with its per-tensor scale, normalised to a multiplier.
#[derive(Debug, Clone)]
pub struct TernaryMatrix {
    /// Tensor name in the checkpoint.
    pub name: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Checkpoint-packed codes.
    pub packed: Bytes,
    /// Real weight = ternary × scale.
    pub scale: f32,
}

impl TernaryMatrix {
    /// Writes the codes (`w + 1`: 0, 1 or 2) of row `r` into `out` and reports a corrupt code 3.
    pub fn row_codes(&self, r: usize, out: &mut [u8]) -> crate::Result<()> {
        let packed = self.packed.as_slice();
        for (c, o) in out.iter_mut().enumerate().take(self.cols) {
            let code = crate::quant::checkpoint_code(packed, self.rows, self.cols, r, c);
            if code == 3 {
                return Err(crate::Error::Format {
                    path: self.name.clone().into(),
                    msg: format!("invalid 2-bit code 3 at row {r}, column {c} of packed weight"),
                });
            }
            *o = code;
        }
        Ok(())
    }
}

/// The weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// input_layernorm.
    pub input_norm: Vec<f32>,
    /// post_attention_layernorm.
    pub post_attention_norm: Vec<f32>,
    /// self_attn.attn_sub_norm (width hidden; empty in families without sub-norms).
    pub attn_sub_norm: Vec<f32>,
    /// mlp.ffn_sub_norm (width intermediate; empty in families without sub-norms). With
    /// `use_rms_norm` these two hold o_proj's and down_proj's own norms.
    pub ffn_sub_norm: Vec<f32>,
    /// The own input norms of q, k, v, gate and up (`use_rms_norm`; empty otherwise).
    pub linear_norms: Vec<Vec<f32>>,
    /// q_proj.
    pub q: TernaryMatrix,
    /// k_proj.
    pub k: TernaryMatrix,
    /// v_proj.
    pub v: TernaryMatrix,
    /// o_proj.
    pub o: TernaryMatrix,
    /// gate_proj.
    pub gate: TernaryMatrix,
    /// up_proj.
    pub up: TernaryMatrix,
    /// down_proj.
    pub down: TernaryMatrix,
}

/// The linears with their own input norms under `use_rms_norm`, in [`LayerWeights::linear_norms`]
/// order, with their checkpoint names.
pub const NORMED_PARTS: [(crate::arch::Linear, &str); 5] = [
    (crate::arch::Linear::Q, "self_attn.q_proj"),
    (crate::arch::Linear::K, "self_attn.k_proj"),
    (crate::arch::Linear::V, "self_attn.v_proj"),
    (crate::arch::Linear::Gate, "mlp.gate_proj"),
    (crate::arch::Linear::Up, "mlp.up_proj"),
];

impl LayerWeights {
    /// The seven ternary matrices, in checkpoint order.
    pub fn linears(&self) -> [&TernaryMatrix; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// A ternary matrix already in the CPU kernels' layout (`crate::cpu::packed`), as a converted
/// checkpoint stores it (`bitnet convert`): `rows × padded_cols/4` bytes and a scale per row.
#[derive(Debug, Clone)]
pub struct KernelMatrix {
    /// Tensor name in the checkpoint.
    pub name: String,
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// The packed rows (usually memory-mapped: faulted in on first use).
    pub data: Bytes,
    /// Scale of each row.
    pub row_scale: Vec<f32>,
}

/// The fused linears of a layer in the CPU kernels' layout.
#[derive(Debug, Clone)]
pub struct KernelLayer {
    /// q, k and v stacked.
    pub qkv: KernelMatrix,
    /// o_proj.
    pub o: KernelMatrix,
    /// gate and up stacked.
    pub gate_up: KernelMatrix,
    /// down_proj.
    pub down: KernelMatrix,
}

impl KernelLayer {
    /// The four matrices with their checkpoint names (`model.layers.N.cpu_v1.{name}`).
    pub fn named(&self) -> [(&'static str, &KernelMatrix); 4] {
        [
            ("qkv", &self.qkv),
            ("o", &self.o),
            ("gate_up", &self.gate_up),
            ("down", &self.down),
        ]
    }
}

/// A whole model on the host, in the checkpoint's layout (data mostly memory-mapped).
#[derive(Debug, Clone)]
pub struct Weights {
    /// Validated configuration.
    pub config: ModelConfig,
    /// model.embed_tokens.weight `[vocab, hidden]`.
    pub embed: FloatTensor,
    /// lm_head.weight when not tied to the embedding.
    pub lm_head: Option<FloatTensor>,
    /// model.norm.weight.
    pub final_norm: Vec<f32>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// The layers' linears in the CPU kernels' layout, when the checkpoint was converted with
    /// `bitnet convert` (the CPU backend then maps them instead of repacking).
    pub kernel_layout: Option<Vec<KernelLayer>>,
    /// Bytes of the checkpoint files.
    pub file_bytes: u64,
}

impl Weights {
    /// The output head: lm_head, or the embedding when tied.
    pub fn head(&self) -> &FloatTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

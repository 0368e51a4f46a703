//! Option types every backend understands.

use crate::error::{Error, Result};

/// Largest number of prompt tokens a step takes by default (a backend planned for larger
/// steps says so through [`super::Backend::prefill_chunk`]).
pub const PREFILL_CHUNK: usize = 256;

/// The element type of a KV cache (and of a serving pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// f32, as the CPU backend (exact against it).
    #[default]
    F32,
    /// Keys and values rounded to f16: the GPU stores them as f16 pairs in u32 words (half the
    /// memory and half the attention reads); the CPU only rounds them, to be compared with it.
    F16,
    /// int8 keys and values, each (position, KV head) row of `head_dim` values with its own
    /// f32 scale ([`crate::quant::quantize_row_absmax`]): a quarter of f32's memory plus the
    /// scales, and attention reads them directly. Per-position scales keep a cache's contents
    /// independent of how its positions were grouped into steps (prefill chunks, batches,
    /// speculative verification).
    Int8,
}

impl KvDtype {
    /// Parses `f32`, `f16` or `int8`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "int8" | "i8" => Ok(KvDtype::Int8),
            other => Err(Error::Config(format!(
                "unknown KV cache type `{other}` (expected f32, f16 or int8)"
            ))),
        }
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Int8 => "int8",
        }
    }

    /// Bytes one cached row of `head_dim` values takes where the type is stored natively
    /// (values and, for int8, the row's scale).
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * head_dim,
            KvDtype::F16 => 2 * head_dim,
            KvDtype::Int8 => head_dim + 4,
        }
    }
}

/// How a backend stores the output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadMode {
    /// The checkpoint's dtype (bf16 read in place; f16/f32 as f32).
    #[default]
    Native,
    /// int8 weights with one f32 scale per row; the final hidden state is quantized per token.
    Int8,
}

impl HeadMode {
    /// Parses `native`/`bf16` or `int8`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "native" | "bf16" => Ok(HeadMode::Native),
            "int8" => Ok(HeadMode::Int8),
            other => Err(Error::Config(format!(
                "unknown head mode `{other}` (expected native or int8)"
            ))),
        }
    }
}

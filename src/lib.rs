//! BitNet b1.58 inference: ternary weights, int8 activations, CPU SIMD kernels.

pub mod batch;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod format;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod quant;
#[cfg(feature = "server")]
pub mod serve;
pub mod tokenizer;

pub use error::{Error, Result};

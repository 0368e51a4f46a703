//! BitNet b1.58 inference: ternary weights, int8 activations, CPU SIMD kernels.

pub mod arch;
pub mod backend;
pub mod batch;
pub mod config;
#[cfg(not(target_arch = "wasm32"))]
pub mod convert;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod files;
pub mod format;
#[cfg(feature = "gpu")]
pub mod gpu;
#[cfg(feature = "cli")]
pub mod hub;
pub mod json;
pub mod load;
pub mod quant;
pub mod reference;
#[cfg(feature = "server")]
pub mod serve;
pub mod time;
pub mod tokenizer;
#[cfg(all(feature = "wasm", target_arch = "wasm32"))]
pub mod wasm;

pub use error::{Error, Result};

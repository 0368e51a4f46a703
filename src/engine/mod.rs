//! The engine: forward pass over a backend, KV cache, sampling and generation.

pub mod generate;
pub mod model;
pub mod sampler;

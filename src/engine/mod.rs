//! The engine: the forward pass over a backend, sampling, the generation state machine,
//! streaming text and the generator that drives them.

pub mod forward;
pub mod generate;
pub mod grammar;
pub mod sampler;
pub mod session;
pub mod speculative;
pub mod text;
pub mod window;

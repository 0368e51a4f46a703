//! Model architectures as data: a layer is a short sequence of [`LayerOp`]s, written once
//! here and run by every path (single-sequence decode and prefill, batched rows, the browser
//! build, the GPU's fused decode) through [`crate::engine::forward`]. A backend may fuse
//! consecutive ops ([`crate::backend::Backend::fuse`]); it never owns the order.
//!
//! Adding an architecture is a new description here (and any new op once per backend).

use crate::config::{Family, ModelConfig};

/// Where an RMSNorm + int8 quantization reads the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormSite {
    /// input_layernorm, feeding q/k/v.
    Input,
    /// post_attention_layernorm, feeding gate/up.
    PostAttention,
}

/// The fused ternary linears of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linear {
    /// q, k and v stacked: quantized normed input → q|k|v.
    Qkv,
    /// o_proj, added into the residual stream.
    O,
    /// gate and up stacked.
    GateUp,
    /// down_proj, added into the residual stream.
    Down,
    /// The q rows of `Qkv` alone (models whose linears each normalize their own input).
    Q,
    /// The k rows of `Qkv` alone.
    K,
    /// The v rows of `Qkv` alone.
    V,
    /// The gate rows of `GateUp` alone.
    Gate,
    /// The up rows of `GateUp` alone.
    Up,
}

impl Linear {
    /// For a part of a fused linear: the fused linear and the part's rows in it.
    pub fn part_of(self, cfg: &ModelConfig) -> Option<(Linear, std::ops::Range<usize>)> {
        let (q, kv, i) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        Some(match self {
            Linear::Q => (Linear::Qkv, 0..q),
            Linear::K => (Linear::Qkv, q..q + kv),
            Linear::V => (Linear::Qkv, q + kv..q + 2 * kv),
            Linear::Gate => (Linear::GateUp, 0..i),
            Linear::Up => (Linear::GateUp, i..2 * i),
            _ => return None,
        })
    }
}

/// The gating activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatedAct {
    /// `relu(gate)² · up` (BitNet b1.58 2B-4T).
    Relu2,
    /// `silu(gate) · up` (Llama-architecture BitNet).
    Silu,
}

/// One op of a layer, in the order of the layer's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOp {
    /// RMSNorm of the residual stream, then per-token int8 quantization.
    NormQuant(NormSite),
    /// RMSNorm of the residual stream at `site`, then the RMSNorm of `linear`'s own input
    /// (`use_rms_norm`), then int8 quantization for that linear.
    LinearNormQuant {
        /// Where the residual stream is normalized first.
        site: NormSite,
        /// The linear (a part of a fused one) whose norm follows.
        linear: Linear,
    },
    /// A ternary × int8 matmul of the quantized activations (`O`, `Down` add into the
    /// residual stream).
    Matmul(Linear),
    /// RoPE of the step's q and k, then k and v into the KV cache.
    RopeKvWrite,
    /// Causal GQA attention over the cache.
    Attention,
    /// The attention output, sub-normed or not, quantized for o_proj.
    AttnOutQuant {
        /// With attn_sub_norm.
        sub_norm: bool,
    },
    /// The gated activation of gate|up, sub-normed or not, quantized for down_proj.
    GatedActQuant {
        /// The activation.
        act: GatedAct,
        /// With ffn_sub_norm.
        sub_norm: bool,
    },
}

impl LayerOp {
    /// A short name for profiles.
    pub fn name(self) -> &'static str {
        match self {
            LayerOp::NormQuant(_) => "rmsnorm_quant",
            LayerOp::Matmul(Linear::Qkv) => "matmul_qkv",
            LayerOp::Matmul(Linear::O) => "matmul_o",
            LayerOp::Matmul(Linear::GateUp) => "matmul_gate_up",
            LayerOp::Matmul(Linear::Down) => "matmul_down",
            LayerOp::Matmul(_) => "matmul_part",
            LayerOp::LinearNormQuant { .. } => "linear_norm_quant",
            LayerOp::RopeKvWrite => "rope_kv_write",
            LayerOp::Attention => "attention",
            LayerOp::AttnOutQuant { .. } => "attn_out_quant",
            LayerOp::GatedActQuant { .. } => "gated_act_quant",
        }
    }
}

/// A BitNet b1.58 layer (microsoft/bitnet-b1.58-2B-4T): sub-norms before o_proj and
/// down_proj, relu² gating (docs/NUMERICS.md §6).
pub const BITNET_B158: &[LayerOp] = &[
    LayerOp::NormQuant(NormSite::Input),
    LayerOp::Matmul(Linear::Qkv),
    LayerOp::RopeKvWrite,
    LayerOp::Attention,
    LayerOp::AttnOutQuant { sub_norm: true },
    LayerOp::Matmul(Linear::O),
    LayerOp::NormQuant(NormSite::PostAttention),
    LayerOp::Matmul(Linear::GateUp),
    LayerOp::GatedActQuant {
        act: GatedAct::Relu2,
        sub_norm: true,
    },
    LayerOp::Matmul(Linear::Down),
];

/// A Llama-architecture BitNet layer (Falcon3-1.58bit, Llama3-8B-1.58): no sub-norms, SiLU
/// gating (../shared/LLAMA_BITNET.md §4).
pub const LLAMA_BITNET: &[LayerOp] = &[
    LayerOp::NormQuant(NormSite::Input),
    LayerOp::Matmul(Linear::Qkv),
    LayerOp::RopeKvWrite,
    LayerOp::Attention,
    LayerOp::AttnOutQuant { sub_norm: false },
    LayerOp::Matmul(Linear::O),
    LayerOp::NormQuant(NormSite::PostAttention),
    LayerOp::Matmul(Linear::GateUp),
    LayerOp::GatedActQuant {
        act: GatedAct::Silu,
        sub_norm: false,
    },
    LayerOp::Matmul(Linear::Down),
];

/// A Llama-architecture BitNet layer with `use_rms_norm`: every linear normalizes its own
/// input with its own weights (q, k, v, gate and up one by one; o and down through the
/// sub-norm ops, which then hold their weights), SiLU gating (../shared/LLAMA_BITNET.md §3.1).
pub const LLAMA_BITNET_LINEAR_NORMS: &[LayerOp] = &[
    LayerOp::LinearNormQuant {
        site: NormSite::Input,
        linear: Linear::Q,
    },
    LayerOp::Matmul(Linear::Q),
    LayerOp::LinearNormQuant {
        site: NormSite::Input,
        linear: Linear::K,
    },
    LayerOp::Matmul(Linear::K),
    LayerOp::LinearNormQuant {
        site: NormSite::Input,
        linear: Linear::V,
    },
    LayerOp::Matmul(Linear::V),
    LayerOp::RopeKvWrite,
    LayerOp::Attention,
    LayerOp::AttnOutQuant { sub_norm: true },
    LayerOp::Matmul(Linear::O),
    LayerOp::LinearNormQuant {
        site: NormSite::PostAttention,
        linear: Linear::Gate,
    },
    LayerOp::Matmul(Linear::Gate),
    LayerOp::LinearNormQuant {
        site: NormSite::PostAttention,
        linear: Linear::Up,
    },
    LayerOp::Matmul(Linear::Up),
    LayerOp::GatedActQuant {
        act: GatedAct::Silu,
        sub_norm: true,
    },
    LayerOp::Matmul(Linear::Down),
];

/// A 1bitLLM layer (bitnet_b1_58-large / -3B): the BitNet b1.58 sub-norms (`inner_attn_ln`,
/// `ffn_layernorm`) with SiLU gating.
pub const ONEBIT_LLM: &[LayerOp] = &[
    LayerOp::NormQuant(NormSite::Input),
    LayerOp::Matmul(Linear::Qkv),
    LayerOp::RopeKvWrite,
    LayerOp::Attention,
    LayerOp::AttnOutQuant { sub_norm: true },
    LayerOp::Matmul(Linear::O),
    LayerOp::NormQuant(NormSite::PostAttention),
    LayerOp::Matmul(Linear::GateUp),
    LayerOp::GatedActQuant {
        act: GatedAct::Silu,
        sub_norm: true,
    },
    LayerOp::Matmul(Linear::Down),
];

/// The layer description of a model.
pub fn layer_ops(cfg: &ModelConfig) -> &'static [LayerOp] {
    match cfg.family {
        Family::BitNet => BITNET_B158,
        Family::LlamaBitNet if cfg.linear_norm_eps.is_some() => LLAMA_BITNET_LINEAR_NORMS,
        Family::LlamaBitNet => LLAMA_BITNET,
        Family::OneBitLlm => ONEBIT_LLM,
    }
}

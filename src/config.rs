//! Model and generation configuration: `config.json` (transformers 4.x and 5.x key spellings),
//! `generation_config.json`, shape presets and validation.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::{files, json};

/// How a packed linear's `weight_scale` applies (docs/NUMERICS.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleConvention {
    /// `autobitlinear`: real weight = ternary × scale.
    Multiply,
    /// `bitlinear` or no `linear_class`: real weight = ternary / scale.
    Divide,
}

/// The model family `config.json` names: its layer description ([`crate::arch::layer_ops`]) and
/// the tensors its checkpoints hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `model_type: bitnet` (BitNet b1.58 2B-4T): sub-norms before o_proj and down_proj, relu².
    BitNet,
    /// `model_type: llama` with `quantization_config.quant_method: bitnet` (Falcon3-1.58bit,
    /// Llama3-8B-1.58): no sub-norms, SiLU.
    LlamaBitNet,
    /// `architectures: [BitnetForCausalLM]` (1bitLLM's bitnet_b1_58-large / -3B): Llama with
    /// sub-norms before o_proj and down_proj (`inner_attn_ln`, `ffn_layernorm`), SiLU, float
    /// master weights ternarized at load.
    OneBitLlm,
}

impl Family {
    /// The `model_type` of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::BitNet => "bitnet",
            Family::LlamaBitNet | Family::OneBitLlm => "llama",
        }
    }

    /// The `architectures` entry of config.json.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::BitNet => "BitNetForCausalLM",
            Family::LlamaBitNet => "LlamaForCausalLM",
            Family::OneBitLlm => ONEBIT_ARCHITECTURE,
        }
    }

    /// The `hidden_act` of config.json.
    pub fn hidden_act(self) -> &'static str {
        match self {
            Family::BitNet => "relu2",
            Family::LlamaBitNet | Family::OneBitLlm => "silu",
        }
    }

    /// The checkpoint names (under `model.layers.N.`) of the sub-norms before o_proj and
    /// down_proj; None for families without them.
    pub fn sub_norm_names(self) -> Option<(&'static str, &'static str)> {
        match self {
            Family::BitNet => Some(("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")),
            Family::LlamaBitNet => None,
            Family::OneBitLlm => Some(("self_attn.inner_attn_ln", "mlp.ffn_layernorm")),
        }
    }
}

/// The `architectures` entry of 1bitLLM's checkpoints (note the lower-case n; BitNet b1.58
/// 2B-4T spells it `BitNetForCausalLM`).
const ONEBIT_ARCHITECTURE: &str = "BitnetForCausalLM";

/// Model hyper-parameters, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The model family.
    pub family: Family,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Context window.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Whether the head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens from config.json.
    pub eos_token_ids: Vec<u32>,
    /// weight_scale convention chosen from `quantization_config.linear_class`.
    pub scale_convention: ScaleConvention,
    /// True when linears are stored unpacked and ternarized at load (`quantization_mode: online`).
    pub online_quant: bool,
    /// `quantization_config.use_rms_norm`: every linear normalizes its own input first, with
    /// its own weights and this epsilon (`quantization_config.rms_norm_eps`).
    pub linear_norm_eps: Option<f32>,
}

/// Named shapes for `bitnet synth` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// microsoft/bitnet-b1.58-2B-4T.
    B2b4t,
    /// The shape of the tiny test fixture.
    Tiny,
}

impl Preset {
    /// Parses `2b4t` or `tiny`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "2b4t" => Ok(Preset::B2b4t),
            "tiny" => Ok(Preset::Tiny),
            other => Err(Error::Config(format!(
                "unknown shape `{other}` (expected 2b4t or tiny)"
            ))),
        }
    }

    /// The configuration of this preset.
    pub fn config(self) -> ModelConfig {
        let base = ModelConfig {
            family: Family::BitNet,
            vocab_size: 128256,
            hidden_size: 2560,
            intermediate_size: 6912,
            num_layers: 30,
            num_heads: 20,
            num_kv_heads: 5,
            head_dim: 128,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            tie_word_embeddings: true,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001],
            scale_convention: ScaleConvention::Multiply,
            online_quant: false,
            linear_norm_eps: None,
        };
        match self {
            Preset::B2b4t => base,
            Preset::Tiny => ModelConfig {
                vocab_size: 300,
                hidden_size: 64,
                intermediate_size: 172,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                max_position_embeddings: 256,
                bos_token_id: Some(297),
                eos_token_ids: vec![298],
                ..base
            },
        }
    }
}

const MAX_DIM: usize = 1 << 20;
/// Widest input of a ternary matmul (see [`ModelConfig::validate`]).
const MAX_MATMUL_INPUT: usize = 1 << 18;

fn required(v: &Value, key: &str) -> Result<usize> {
    json::opt_usize(v, key, key)?.ok_or_else(|| Error::Config(format!("missing `{key}`")))
}

/// The only values a string field may take; an error names the field and lists them.
fn one_of(value: &str, name: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "`{name}` is `{value}`; supported: {}",
        allowed.join(", ")
    )))
}

/// What `quantization_config` says: the weight-scale convention, whether linears are
/// ternarized at load, and the epsilon of the per-linear norms when there are some.
type Quantization = (ScaleConvention, bool, Option<f32>);

/// `quantization_config` (absent: transformers' defaults, `bitlinear` and `offline`).
fn quantization(v: &Value) -> Result<Quantization> {
    let Some(q) = json::opt_object(v, "quantization_config", "quantization_config")? else {
        return Ok((ScaleConvention::Divide, false, None));
    };
    let name = "quantization_config.quant_method";
    if let Some(m) = json::opt_str(q, "quant_method", name)? {
        one_of(m, name, &["bitnet"])?;
    }
    let name = "quantization_config.linear_class";
    let scale = match json::opt_str(q, "linear_class", name)? {
        Some("autobitlinear") => ScaleConvention::Multiply,
        Some(other) => {
            one_of(other, name, &["bitlinear", "autobitlinear"])?;
            ScaleConvention::Divide
        }
        None => ScaleConvention::Divide,
    };
    let name = "quantization_config.quantization_mode";
    let online = match json::opt_str(q, "quantization_mode", name)? {
        Some(other) => {
            one_of(other, name, &["offline", "online"])?;
            other == "online"
        }
        None => false,
    };
    let name = "quantization_config.use_rms_norm";
    let linear_norm_eps = match json::opt_bool(q, "use_rms_norm", name)? {
        Some(true) => Some(
            json::opt_f32(q, "rms_norm_eps", "quantization_config.rms_norm_eps")?.unwrap_or(1e-6),
        ),
        _ => None,
    };
    Ok((scale, online, linear_norm_eps))
}

/// Whether config.json's `architectures` lists `name` (a malformed list names nothing).
fn names_architecture(v: &Value, name: &str) -> bool {
    v.get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(name)))
}

/// Whether `quantization_config.quant_method` is `bitnet`.
fn is_bitnet_quantized(v: &Value) -> Result<bool> {
    let Some(q) = json::opt_object(v, "quantization_config", "quantization_config")? else {
        return Ok(false);
    };
    let name = "quantization_config.quant_method";
    Ok(json::opt_str(q, "quant_method", name)? == Some("bitnet"))
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let bytes = files::read_limited(&path, files::JSON_LIMIT)?;
        let v = json::parse(&bytes).map_err(|e| Error::json(&path, e))?;
        Self::from_json(&v).map_err(|e| match e {
            Error::Config(msg) => Error::json(&path, msg),
            other => other,
        })
    }

    /// Parses a config.json value (4.x `rope_theta`/`torch_dtype` or 5.x `rope_parameters`/`dtype`).
    /// Every field the engine reads must have its type; values the engine does not implement
    /// (another architecture, activation, RoPE scaling, biases, quantization method) are errors.
    pub fn from_json(v: &Value) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::Config("config.json must be a JSON object".into()));
        }
        let family = match json::opt_str(v, "model_type", "model_type")? {
            _ if names_architecture(v, ONEBIT_ARCHITECTURE) => Family::OneBitLlm,
            Some("llama") => Family::LlamaBitNet,
            Some(mt) => {
                one_of(mt, "model_type", &["bitnet", "llama"])?;
                Family::BitNet
            }
            None => Family::BitNet,
        };
        if family == Family::OneBitLlm {
            for (key, bits) in [("weight_bits", 1), ("input_bits", 8)] {
                if let Some(b) = json::opt_usize(v, key, key)?.filter(|&b| b != bits) {
                    return Err(Error::Config(format!(
                        "`{key}` is {b}; {ONEBIT_ARCHITECTURE} checkpoints run with {bits}"
                    )));
                }
            }
        }
        if let Some(act) = json::opt_str(v, "hidden_act", "hidden_act")? {
            one_of(act, "hidden_act", &[family.hidden_act()])?;
        }
        if family == Family::LlamaBitNet && !is_bitnet_quantized(v)? {
            return Err(Error::Config(
                "`model_type: llama` without `quantization_config.quant_method: bitnet` is not a \
                 1.58-bit model"
                    .into(),
            ));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if json::opt_bool(v, key, key)? == Some(true) {
                return Err(Error::Config(format!("`{key}: true` is not supported")));
            }
        }
        if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
            return Err(Error::Config("`rope_scaling` is not supported".into()));
        }
        let hidden_size = required(v, "hidden_size")?;
        let num_heads = required(v, "num_attention_heads")?;
        let num_kv_heads =
            json::opt_usize(v, "num_key_value_heads", "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match json::opt_usize(v, "head_dim", "head_dim")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let rope_parameters = json::opt_object(v, "rope_parameters", "rope_parameters")?;
        let mut rope_theta = json::opt_f32(v, "rope_theta", "rope_theta")?;
        if let Some(p) = rope_parameters {
            let name = "rope_parameters.rope_type";
            if let Some(kind) = json::opt_str(p, "rope_type", name)? {
                one_of(kind, name, &["default"])?;
            }
            let theta = json::opt_f32(p, "rope_theta", "rope_parameters.rope_theta")?;
            rope_theta = rope_theta.or(theta);
        }
        let rope_theta = rope_theta.unwrap_or(500000.0);
        let (scale_convention, online_quant, linear_norm_eps) = match family {
            // Float master weights ternarized at load, as the modeling code does every forward.
            Family::OneBitLlm => (ScaleConvention::Multiply, true, None),
            _ => quantization(v)?,
        };
        if linear_norm_eps.is_some() && family != Family::LlamaBitNet {
            return Err(Error::Config(
                "`quantization_config.use_rms_norm` applies to `model_type: llama` only".into(),
            ));
        }
        let cfg = ModelConfig {
            family,
            vocab_size: required(v, "vocab_size")?,
            hidden_size,
            intermediate_size: required(v, "intermediate_size")?,
            num_layers: required(v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: json::opt_usize(
                v,
                "max_position_embeddings",
                "max_position_embeddings",
            )?
            .unwrap_or(2048),
            rms_norm_eps: json::opt_f32(v, "rms_norm_eps", "rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta,
            tie_word_embeddings: json::opt_bool(v, "tie_word_embeddings", "tie_word_embeddings")?
                .unwrap_or(false),
            bos_token_id: json::token_ids(v, "bos_token_id")?.first().copied(),
            eos_token_ids: json::token_ids(v, "eos_token_id")?,
            scale_convention,
            online_quant,
            linear_norm_eps,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the shapes are consistent and within sane bounds.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, d) in dims {
            if d == 0 || d > MAX_DIM {
                return Err(Error::Config(format!(
                    "`{name}` = {d} is out of range (1..={MAX_DIM})"
                )));
            }
        }
        // The CPU kernels sum a row's products in i32 with the bit fields pre-scaled by up to
        // 64 (`kernels::avx512`): exact for input widths up to MAX_MATMUL_INPUT.
        for (name, d) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            (
                "num_attention_heads × head_dim",
                self.num_heads.saturating_mul(self.head_dim),
            ),
        ] {
            if d > MAX_MATMUL_INPUT {
                return Err(Error::Config(format!(
                    "{name} = {d} is wider than the ternary kernels take ({MAX_MATMUL_INPUT})"
                )));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        for (name, d) in [
            ("q_proj rows", self.q_dim()),
            ("k/v_proj rows", self.kv_dim()),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
        ] {
            if d % 4 != 0 {
                return Err(Error::Config(format!(
                    "{name} = {d} is not a multiple of 4 (2-bit packing)"
                )));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::Config(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            )));
        }
        if let Some(e) = self
            .linear_norm_eps
            .filter(|e| !(e.is_finite() && *e > 0.0))
        {
            return Err(Error::Config(format!(
                "quantization_config.rms_norm_eps {e} must be positive"
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::Config(format!(
                "rope_theta {} must be positive",
                self.rope_theta
            )));
        }
        Ok(())
    }

    /// Rows of q_proj (= heads × head_dim).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Epsilon of the sub-norms before o_proj and down_proj (the per-linear norms' when the
    /// model has those, which take the sub-norms' place).
    pub fn sub_norm_eps(&self) -> f32 {
        self.linear_norm_eps.unwrap_or(self.rms_norm_eps)
    }

    /// Rows of k_proj and v_proj.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The config.json this configuration is written as (the release spelling of its family).
    pub fn to_json(&self) -> Value {
        let architecture = self.family.architecture();
        let linear_class = match self.scale_convention {
            ScaleConvention::Multiply => "autobitlinear",
            ScaleConvention::Divide => "bitlinear",
        };
        let mode = if self.online_quant {
            "online"
        } else {
            "offline"
        };
        let mut v = serde_json::json!({
            "architectures": [architecture],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.family.hidden_act(),
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "use_cache": true,
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": linear_class,
                "quantization_mode": mode
            }
        });
        if let Some(eps) = self.linear_norm_eps {
            v["quantization_config"]["use_rms_norm"] = true.into();
            v["quantization_config"]["rms_norm_eps"] = eps.into();
        }
        if self.family == Family::OneBitLlm {
            // Float master weights, ternarized by the modeling code: no quantizer config.
            let o = v.as_object_mut().expect("a JSON object");
            o.remove("quantization_config");
            o.insert("weight_bits".into(), 1.into());
            o.insert("input_bits".into(), 8.into());
            o.insert("torch_dtype".into(), "float16".into());
        }
        v
    }
}

/// Values from `generation_config.json` that the engine uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json` if present, falling back to the model config's ids.
    pub fn from_dir(dir: &Path, model: &ModelConfig) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Self::from_json_text(None, model);
        }
        let text = files::read_text_limited(&path, files::JSON_LIMIT)?;
        Self::from_json_text(Some(&text), model).map_err(|e| match e {
            Error::Json { msg, .. } => Error::json(&path, msg),
            other => other,
        })
    }

    /// Parses the text of `generation_config.json` (None: the model config's ids).
    pub fn from_json_text(text: Option<&str>, model: &ModelConfig) -> Result<Self> {
        let mut g = GenerationConfig {
            eos_token_ids: model.eos_token_ids.clone(),
            bos_token_id: model.bos_token_id,
        };
        let Some(text) = text else {
            return Ok(g);
        };
        let path = "generation_config.json";
        let in_file = |e: Error| match e {
            Error::Config(msg) => Error::json(path, msg),
            other => other,
        };
        let v = json::parse(text.as_bytes()).map_err(|e| Error::json(path, e))?;
        if !v.is_object() {
            return Err(Error::json(path, "must be a JSON object"));
        }
        let eos = json::token_ids(&v, "eos_token_id").map_err(in_file)?;
        if !eos.is_empty() {
            g.eos_token_ids = eos;
        }
        if let Some(b) = json::token_ids(&v, "bos_token_id")
            .map_err(in_file)?
            .first()
        {
            g.bos_token_id = Some(*b);
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_key_spellings() {
        let v4 = serde_json::json!({"vocab_size": 300, "hidden_size": 64, "intermediate_size": 172,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 10000.0, "torch_dtype": "bfloat16",
            "quantization_config": {"linear_class": "autobitlinear"}});
        let mut v5 = v4.clone();
        v5.as_object_mut().unwrap().remove("rope_theta");
        v5["rope_parameters"] = serde_json::json!({"rope_theta": 10000.0, "rope_type": "default"});
        let a = ModelConfig::from_json(&v4).unwrap();
        let b = ModelConfig::from_json(&v5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 10000.0);
        assert_eq!(a.head_dim, 16);
        assert_eq!(a.scale_convention, ScaleConvention::Multiply);
    }

    #[test]
    fn linear_class_picks_scale_convention() {
        let mut v = Preset::Tiny.config().to_json();
        assert_eq!(
            ModelConfig::from_json(&v).unwrap().scale_convention,
            ScaleConvention::Multiply
        );
        v["quantization_config"]["linear_class"] = "bitlinear".into();
        assert_eq!(
            ModelConfig::from_json(&v).unwrap().scale_convention,
            ScaleConvention::Divide
        );
        v.as_object_mut().unwrap().remove("quantization_config");
        assert_eq!(
            ModelConfig::from_json(&v).unwrap().scale_convention,
            ScaleConvention::Divide
        );
    }

    #[test]
    fn families_come_from_model_type_and_architectures() {
        let mut v = Preset::Tiny.config().to_json();
        assert_eq!(ModelConfig::from_json(&v).unwrap().family, Family::BitNet);
        v["model_type"] = "llama".into();
        v["hidden_act"] = "silu".into();
        assert_eq!(
            ModelConfig::from_json(&v).unwrap().family,
            Family::LlamaBitNet
        );
        v["architectures"] = serde_json::json!(["BitnetForCausalLM"]);
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.family, Family::OneBitLlm);
        assert_eq!(ModelConfig::from_json(&c.to_json()).unwrap(), c);
        v["weight_bits"] = 2.into();
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("`weight_bits` is 2"), "{e}");
        let mut v = c.to_json();
        v["hidden_act"] = "relu2".into();
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("`hidden_act` is `relu2`; supported: silu"),
            "{e}"
        );
        let mut v = Preset::Tiny.config().to_json();
        v["model_type"] = "llama".into();
        v["hidden_act"] = "silu".into();
        v.as_object_mut().unwrap().remove("quantization_config");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("not a 1.58-bit model"), "{e}");
    }

    #[test]
    fn rejects_bad_shapes() {
        let mut v = Preset::Tiny.config().to_json();
        v["num_key_value_heads"] = 3.into();
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut v = Preset::Tiny.config().to_json();
        v["hidden_size"] = "64".into();
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
        let mut v = Preset::Tiny.config().to_json();
        v["intermediate_size"] = 170.into();
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("multiple of 4"));
    }

    #[test]
    fn presets_round_trip_through_json() {
        for p in [Preset::Tiny, Preset::B2b4t] {
            let c = p.config();
            assert_eq!(ModelConfig::from_json(&c.to_json()).unwrap(), c);
        }
    }

    #[test]
    fn wrongly_typed_or_unknown_values_are_errors_naming_the_field() {
        let base = Preset::Tiny.config().to_json();
        let cases: [(&str, Value, &str); 14] = [
            ("model_type", 3.into(), "`model_type` must be a string"),
            (
                "model_type",
                "gpt2".into(),
                "`model_type` is `gpt2`; supported: bitnet, llama",
            ),
            ("hidden_act", 1.into(), "`hidden_act` must be a string"),
            (
                "quantization_config",
                serde_json::json!([1, 2]),
                "must be an object",
            ),
            (
                "quantization_config",
                Value::Null,
                "must be an object, got null",
            ),
            ("quantization_config", 7.into(), "must be an object"),
            (
                "tie_word_embeddings",
                "yes".into(),
                "`tie_word_embeddings` must be true or false",
            ),
            (
                "rope_scaling",
                serde_json::json!({"type": "linear"}),
                "rope_scaling",
            ),
            ("attention_bias", true.into(), "attention_bias"),
            (
                "eos_token_id",
                "x".into(),
                "`eos_token_id` must be a token id",
            ),
            ("bos_token_id", (-1).into(), "`bos_token_id`"),
            (
                "rope_parameters",
                "x".into(),
                "`rope_parameters` must be an object",
            ),
            (
                "hidden_size",
                64.5.into(),
                "`hidden_size` must be a non-negative integer",
            ),
            (
                "num_hidden_layers",
                Value::Null,
                "missing `num_hidden_layers`",
            ),
        ];
        for (key, value, want) in cases {
            let mut v = base.clone();
            v[key] = value;
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
        for (key, value, want) in [
            (
                "linear_class",
                Value::from(-1),
                "`quantization_config.linear_class` must be a string",
            ),
            (
                "linear_class",
                "fastlinear".into(),
                "supported: bitlinear, autobitlinear",
            ),
            (
                "quantization_mode",
                2.into(),
                "`quantization_config.quantization_mode` must be",
            ),
            (
                "quant_method",
                "gptq".into(),
                "`quantization_config.quant_method` is `gptq`",
            ),
            ("use_rms_norm", 1.into(), "use_rms_norm"),
        ] {
            let mut v = base.clone();
            v["quantization_config"][key] = value;
            let e = ModelConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
        let mut v = base.clone();
        v["head_dim"] = Value::Null;
        v["rope_scaling"] = Value::Null;
        assert_eq!(ModelConfig::from_json(&v).unwrap(), Preset::Tiny.config());
    }
}

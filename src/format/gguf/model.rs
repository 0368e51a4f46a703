//! A model from a GGUF file: the configuration from its metadata, the family from
//! `general.architecture`, the weights from its tensors (ternary formats to the checkpoint
//! packing, floats mapped, quantized heads dequantized to f32).

use std::path::Path;
use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use super::blocks::{dequantize_row, i2s_code, i2s_scale, ternary_row_tq, GgmlType};
use super::{GgufFile, TensorInfo};
use crate::config::{Family, GenerationConfig, ModelConfig, ScaleConvention};
use crate::error::{Error, Result};
use crate::format::{Bytes, FloatDtype, FloatTensor, LayerWeights, TernaryMatrix, Weights};
use crate::quant::pack_checkpoint;

/// `general.architecture` values and their families.
const ARCHITECTURES: [(&str, Family); 4] = [
    ("bitnet-b1.58", Family::BitNet),
    ("bitnet-25", Family::BitNet),
    ("bitnet", Family::OneBitLlm),
    ("llama", Family::LlamaBitNet),
];

/// What a GGUF file holds besides its weights.
pub struct ModelParts {
    /// The weights.
    pub weights: Weights,
    /// EOS and BOS ids from the tokenizer metadata.
    pub generation: GenerationConfig,
    /// The file, for the tokenizer ([`super::vocab`]).
    pub file: GgufFile,
}

/// Loads the model in the GGUF file `path`.
pub fn load(path: &Path) -> Result<ModelParts> {
    let file = GgufFile::open(path)?;
    let config = config(&file)?;
    let weights = weights(config, &file)?;
    let generation = generation(&file, &weights.config)?;
    Ok(ModelParts {
        weights,
        generation,
        file,
    })
}

/// The model configuration of the file's metadata.
pub fn config(f: &GgufFile) -> Result<ModelConfig> {
    let arch = f.str("general.architecture")?;
    let family = ARCHITECTURES
        .iter()
        .find(|(name, _)| *name == arch)
        .map(|(_, fam)| *fam)
        .ok_or_else(|| {
            let names: Vec<&str> = ARCHITECTURES.iter().map(|(n, _)| *n).collect();
            Error::format(
                &f.path,
                format!(
                    "general.architecture `{arch}` is not supported; supported: {}",
                    names.join(", ")
                ),
            )
        })?;
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = f.usize(&key("embedding_length"))?;
    let num_heads = f.usize(&key("attention.head_count"))?;
    let num_kv_heads = f
        .opt_u64(&key("attention.head_count_kv"))?
        .map_or(num_heads, |v| v as usize);
    let head_dim = match f.opt_u64(&key("attention.key_length"))? {
        Some(d) => d as usize,
        None if num_heads > 0 => hidden_size / num_heads,
        None => 0,
    };
    if let Some(rot) = f.opt_u64(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            return Err(Error::format(
                &f.path,
                format!("{arch}.rope.dimension_count {rot} != head_dim {head_dim} (partial RoPE is not supported)"),
            ));
        }
    }
    let embed = f.tensor("token_embd.weight")?;
    let vocab_size = match f.opt_u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => embed.dims.get(1).copied().unwrap_or(0) as usize,
    };
    let ids =
        |k: &str| -> Result<Vec<u32>> { Ok(f.opt_u64(k)?.map(|v| v as u32).into_iter().collect()) };
    let config = ModelConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: f.usize(&key("feed_forward_length"))?,
        num_layers: f.usize(&key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        max_position_embeddings: f.opt_u64(&key("context_length"))?.unwrap_or(2048) as usize,
        rms_norm_eps: f
            .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f32,
        rope_theta: f.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
        tie_word_embeddings: !f.tensors.contains_key("output.weight"),
        bos_token_id: ids("tokenizer.ggml.bos_token_id")?.first().copied(),
        eos_token_ids: ids("tokenizer.ggml.eos_token_id")?,
        scale_convention: ScaleConvention::Multiply,
        online_quant: false,
        linear_norm_eps: None,
    };
    config.validate().map_err(|e| match e {
        Error::Config(msg) => Error::format(&f.path, msg),
        other => other,
    })?;
    Ok(config)
}

/// EOS ids (the EOS and end-of-turn tokens) and BOS of the tokenizer metadata.
fn generation(f: &GgufFile, config: &ModelConfig) -> Result<GenerationConfig> {
    let mut eos = config.eos_token_ids.clone();
    if let Some(eot) = f.opt_u64("tokenizer.ggml.eot_token_id")? {
        if !eos.contains(&(eot as u32)) {
            eos.push(eot as u32);
        }
    }
    Ok(GenerationConfig {
        eos_token_ids: eos,
        bos_token_id: config.bos_token_id,
    })
}

/// A tensor's `[rows, cols]`, checked against what the model needs.
fn matrix_shape(f: &GgufFile, name: &str, t: &TensorInfo, rows: usize, cols: usize) -> Result<()> {
    let want = if rows == 1 {
        vec![cols as u64]
    } else {
        vec![cols as u64, rows as u64]
    };
    if t.dims != want && !(rows == 1 && t.dims == [cols as u64, 1]) {
        return Err(Error::format(
            &f.path,
            format!(
                "tensor `{name}` has dimensions {:?}, expected {want:?}",
                t.dims
            ),
        ));
    }
    Ok(())
}

/// A float tensor `[rows, cols]`: F32/F16/BF16 mapped as stored, Q8_0/Q6_K dequantized to f32.
fn float_tensor(f: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<FloatTensor> {
    let t = f.tensor(name)?;
    matrix_shape(f, name, t, rows, cols)?;
    let (dtype, bytes) = match t.ty {
        GgmlType::F32 => (FloatDtype::F32, f.bytes(t)),
        GgmlType::F16 => (FloatDtype::F16, f.bytes(t)),
        GgmlType::BF16 => (FloatDtype::BF16, f.bytes(t)),
        GgmlType::Q8_0 | GgmlType::Q6K => {
            let raw = f.data(t);
            let rb = t.ty.row_bytes(cols);
            let mut out = vec![0u8; rows * cols * 4];
            out.par_chunks_mut(cols * 4)
                .zip(raw.par_chunks(rb))
                .for_each_init(
                    || vec![0f32; cols],
                    |row, (o, r)| {
                        dequantize_row(t.ty, r, row);
                        for (b, v) in o.chunks_exact_mut(4).zip(row.iter()) {
                            b.copy_from_slice(&v.to_le_bytes());
                        }
                    },
                );
            (FloatDtype::F32, Bytes::Owned(Arc::new(out)))
        }
        other => {
            return Err(Error::format(
                &f.path,
                format!(
                    "tensor `{name}` is {}; expected F32, F16, BF16, Q8_0 or Q6_K",
                    other.name()
                ),
            ))
        }
    };
    Ok(FloatTensor {
        name: name.into(),
        dtype,
        rows,
        cols,
        bytes,
    })
}

fn vector(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>> {
    Ok(float_tensor(f, name, 1, n)?.to_f32())
}

/// How rows of a q or k projection were reordered by the converter: llama.cpp writes Llama
/// checkpoints' q and k with the two halves of every head interleaved (its RoPE rotates
/// adjacent pairs); the BitNet architectures keep transformers' order.
#[derive(Clone, Copy)]
enum RowOrder {
    AsStored,
    /// Un-interleave heads of this width.
    Interleaved(usize),
}

impl RowOrder {
    /// The stored row that holds transformers' row `r`.
    fn stored(self, r: usize) -> usize {
        match self {
            RowOrder::AsStored => r,
            RowOrder::Interleaved(hd) => {
                let (head, i) = (r / hd, r % hd);
                let half = hd / 2;
                head * hd + 2 * (i % half) + i / half
            }
        }
    }
}

/// A ternary linear `[rows, cols]` from a ternary type (its block scales must agree: one scale
/// per tensor) or from a float tensor that holds ternary values (`{-s, 0, s}`), times the
/// optional `{name}.scale` tensor llama.cpp writes for BitNet models.
fn ternary(
    f: &GgufFile,
    base: &str,
    rows: usize,
    cols: usize,
    order: RowOrder,
) -> Result<TernaryMatrix> {
    let name = format!("{base}.weight");
    let t = f.tensor(&name)?;
    matrix_shape(f, &name, t, rows, cols)?;
    let raw = f.data(t);
    let bad = |msg: String| Error::format(&f.path, format!("tensor `{name}`: {msg}"));
    // Values -1/0/1 of every row in transformers' order.
    let mut values = vec![0i8; rows * cols];
    let scale = match t.ty {
        GgmlType::TQ1_0 | GgmlType::TQ2_0 => {
            let rb = t.ty.row_bytes(cols);
            let block_scales: Vec<Result<Option<u16>>> = values
                .par_chunks_mut(cols)
                .enumerate()
                .map_init(
                    || (vec![0u8; cols], Vec::new()),
                    |(codes, scales), (r, out)| {
                        let s = order.stored(r);
                        ternary_row_tq(t.ty, &raw[s * rb..(s + 1) * rb], codes, scales);
                        row_values(codes, out).map_err(|m| bad(format!("row {s}: {m}")))?;
                        one_scale(codes, scales).map_err(|m| bad(format!("row {s}: {m}")))
                    },
                )
                .collect();
            let mut tensor_scale = None;
            for s in block_scales {
                if let Some(s) = s? {
                    if tensor_scale.is_some_and(|t| t != s) {
                        return Err(bad(
                            "rows have different scales (not one ternary scale per tensor)".into(),
                        ));
                    }
                    tensor_scale = Some(s);
                }
            }
            tensor_scale.map_or(0.0, |s| f16::from_bits(s).to_f32())
        }
        GgmlType::I2S => {
            values
                .par_chunks_mut(cols)
                .enumerate()
                .try_for_each(|(r, out)| {
                    let s = order.stored(r);
                    for (c, v) in out.iter_mut().enumerate() {
                        let code = i2s_code(raw, s * cols + c);
                        if code == 3 {
                            return Err(bad(format!("invalid code 3 at row {s}, column {c}")));
                        }
                        *v = code as i8 - 1;
                    }
                    Ok(())
                })?;
            i2s_scale(raw, rows * cols)
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let w = float_tensor(f, &name, rows, cols)?.to_f32();
            let s = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (r, out) in values.chunks_exact_mut(cols).enumerate() {
                let row = &w[order.stored(r) * cols..][..cols];
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = if x == s {
                        1
                    } else if x == -s {
                        -1
                    } else if x == 0.0 {
                        0
                    } else {
                        return Err(bad(format!(
                            "{} values are not ternary ({x} is none of 0 and ±{s}); GGUF \
                             files must hold 1.58-bit weights",
                            t.ty.name()
                        )));
                    };
                }
            }
            s
        }
        other => {
            return Err(bad(format!(
                "{} is not a ternary format (expected TQ1_0, TQ2_0, I2_S or ternary floats)",
                other.name()
            )))
        }
    };
    let extra = match f.tensors.get(&format!("{base}.scale")) {
        Some(_) => vector(f, &format!("{base}.scale"), 1)?[0],
        None => 1.0,
    };
    let scale = scale * extra;
    if !scale.is_finite() {
        return Err(bad(format!("scale {scale} is not finite")));
    }
    Ok(TernaryMatrix {
        name,
        rows,
        cols,
        packed: Bytes::Owned(Arc::new(pack_checkpoint(&values, rows, cols))),
        scale,
    })
}

/// Codes `w + 1` to values, refusing code 3.
fn row_values(codes: &[u8], out: &mut [i8]) -> std::result::Result<(), String> {
    for (c, (o, &code)) in out.iter_mut().zip(codes).enumerate() {
        if code > 2 {
            return Err(format!("invalid code {code} at column {c}"));
        }
        *o = code as i8 - 1;
    }
    Ok(())
}

/// The one scale of a row's blocks (blocks of zeros may have any); None for an all-zero row.
fn one_scale(codes: &[u8], scales: &[u16]) -> std::result::Result<Option<u16>, String> {
    let mut found = None;
    for (b, (&s, block)) in scales.iter().zip(codes.chunks(256)).enumerate() {
        if block.iter().all(|&c| c == 1) {
            continue;
        }
        match found {
            Some(f) if f != s => {
                return Err(format!(
                    "block {b} has scale {} but an earlier block {} (not one ternary scale per \
                     tensor)",
                    f16::from_bits(s),
                    f16::from_bits(f)
                ))
            }
            _ => found = Some(s),
        }
    }
    Ok(found)
}

/// Host weights from the tensors of `f` (llama.cpp's tensor names).
pub fn weights(config: ModelConfig, f: &GgufFile) -> Result<Weights> {
    let c = &config;
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let embed = float_tensor(f, "token_embd.weight", c.vocab_size, h)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(float_tensor(f, "output.weight", c.vocab_size, h)?)
    };
    let qk_order = match c.family {
        Family::LlamaBitNet => RowOrder::Interleaved(c.head_dim),
        _ => RowOrder::AsStored,
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("blk.{l}");
        let (attn_sub_norm, ffn_sub_norm) = match c.family.sub_norm_names() {
            Some(_) => (
                vector(f, &format!("{p}.attn_sub_norm.weight"), q)?,
                vector(f, &format!("{p}.ffn_sub_norm.weight"), i)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        let lin =
            |name: &str, rows, cols, order| ternary(f, &format!("{p}.{name}"), rows, cols, order);
        layers.push(LayerWeights {
            input_norm: vector(f, &format!("{p}.attn_norm.weight"), h)?,
            post_attention_norm: vector(f, &format!("{p}.ffn_norm.weight"), h)?,
            attn_sub_norm,
            ffn_sub_norm,
            linear_norms: Vec::new(),
            q: lin("attn_q", q, h, qk_order)?,
            k: lin("attn_k", kv, h, qk_order)?,
            v: lin("attn_v", kv, h, RowOrder::AsStored)?,
            o: lin("attn_output", h, q, RowOrder::AsStored)?,
            gate: lin("ffn_gate", i, h, RowOrder::AsStored)?,
            up: lin("ffn_up", i, h, RowOrder::AsStored)?,
            down: lin("ffn_down", h, i, RowOrder::AsStored)?,
        });
    }
    Ok(Weights {
        embed,
        lm_head,
        final_norm: vector(f, "output_norm.weight", h)?,
        layers,
        kernel_layout: None,
        file_bytes: f.file_bytes(),
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_rows_undo_llama_cpp_permutation() {
        // llama.cpp's permute: within a head of 4 rows [a0 a1 b0 b1] -> [a0 b0 a1 b1].
        let o = RowOrder::Interleaved(4);
        assert_eq!(
            (0..8).map(|r| o.stored(r)).collect::<Vec<_>>(),
            [0, 2, 1, 3, 4, 6, 5, 7]
        );
    }
}

//! `bitnet convert`: a model from any container rewritten as a directory whose one
//! `model.safetensors` also holds the CPU kernels' layout of every linear
//! (`model.layers.N.cpu_v1.*`), so loading it maps the file and repacks nothing; the config,
//! generation config and tokenizer files go beside it.

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::config::ScaleConvention;
use crate::cpu::packed::PackedTernary;
use crate::error::{Error, Result};
use crate::format::safetensors::kernel_name;
use crate::format::{FloatDtype, FloatTensor, Weights, NORMED_PARTS};
use crate::load::ModelFiles;

/// Tokenizer files copied from a source directory.
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// One tensor to write: name, dtype, shape and bytes.
struct Out {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn float(t: &FloatTensor, name: &str) -> Out {
    let dtype = match t.dtype {
        FloatDtype::F32 => Dtype::F32,
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::BF16 => Dtype::BF16,
    };
    Out {
        name: name.into(),
        dtype,
        shape: vec![t.rows, t.cols],
        data: t.bytes.as_slice().to_vec(),
    }
}

fn f32s(name: String, v: &[f32]) -> Out {
    Out {
        name,
        dtype: Dtype::F32,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The tensors of the converted checkpoint: the weights in the safetensors layout the loader
/// reads (packed linears with multiplying scales), plus the kernel layout.
fn tensors(w: &Weights) -> Result<Vec<Out>> {
    let c = &w.config;
    let mut out = vec![
        float(&w.embed, "model.embed_tokens.weight"),
        f32s("model.norm.weight".into(), &w.final_norm),
    ];
    if let Some(h) = &w.lm_head {
        out.push(float(h, "lm_head.weight"));
    }
    for (l, lw) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        out.push(f32s(format!("{p}.input_layernorm.weight"), &lw.input_norm));
        out.push(f32s(
            format!("{p}.post_attention_layernorm.weight"),
            &lw.post_attention_norm,
        ));
        if let Some((attn, ffn)) = c.family.sub_norm_names() {
            out.push(f32s(format!("{p}.{attn}.weight"), &lw.attn_sub_norm));
            out.push(f32s(format!("{p}.{ffn}.weight"), &lw.ffn_sub_norm));
        }
        if c.linear_norm_eps.is_some() {
            let own = |name: &str, w: &[f32]| f32s(format!("{p}.{name}.rms_norm.weight"), w);
            out.push(own("self_attn.o_proj", &lw.attn_sub_norm));
            out.push(own("mlp.down_proj", &lw.ffn_sub_norm));
            for ((_, name), w) in NORMED_PARTS.iter().zip(&lw.linear_norms) {
                out.push(own(name, w));
            }
        }
        let names = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ];
        for (name, m) in names.iter().zip(lw.linears()) {
            out.push(Out {
                name: format!("{p}.{name}.weight"),
                dtype: Dtype::U8,
                shape: vec![m.rows / 4, m.cols],
                data: m.packed.as_slice().to_vec(),
            });
            out.push(f32s(format!("{p}.{name}.weight_scale"), &[m.scale]));
        }
        let fused = [
            ("qkv", PackedTernary::from_matrices(&[&lw.q, &lw.k, &lw.v])?),
            ("o", PackedTernary::from_matrices(&[&lw.o])?),
            (
                "gate_up",
                PackedTernary::from_matrices(&[&lw.gate, &lw.up])?,
            ),
            ("down", PackedTernary::from_matrices(&[&lw.down])?),
        ];
        for (part, k) in fused {
            out.push(Out {
                name: kernel_name(l, part, "codes"),
                dtype: Dtype::U8,
                shape: vec![k.rows, k.row_bytes()],
                data: k.data.as_slice().to_vec(),
            });
            out.push(f32s(kernel_name(l, part, "row_scale"), &k.row_scale));
        }
    }
    Ok(out)
}

/// Converts the model at `src` (a directory or a GGUF file) into the directory `out`.
pub fn convert(src: &Path, out: &Path) -> Result<()> {
    let files = ModelFiles::from_path(src)?;
    let mut w = files.weights;
    // The scales are written as multipliers whatever the source convention was.
    w.config.scale_convention = ScaleConvention::Multiply;
    w.config.online_quant = false;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors = tensors(&w)?;
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::Backend(format!("{}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = [
        ("format".to_string(), "pt".to_string()),
        ("bitnet.layout".to_string(), "cpu-v1".to_string()),
    ]
    .into_iter()
    .collect();
    let path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &path)
        .map_err(|e| Error::format(&path, e.to_string()))?;
    let write = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON serializes");
    write("config.json", &json(&w.config.to_json()))?;
    let g = &files.generation;
    write(
        "generation_config.json",
        &json(
            &serde_json::json!({"bos_token_id": g.bos_token_id, "eos_token_id": g.eos_token_ids}),
        ),
    )?;
    if crate::format::gguf::is_gguf(src) {
        let f = crate::format::gguf::GgufFile::open(src)?;
        if let Some((tokenizer, config)) = crate::format::gguf::vocab::tokenizer_files(&f)? {
            write("tokenizer.json", &tokenizer)?;
            write("tokenizer_config.json", config.as_bytes())?;
        }
    }
    let dir = if src.is_dir() {
        Some(src)
    } else {
        src.parent()
    };
    for name in TOKENIZER_FILES {
        if let Some(from) = dir.map(|d| d.join(name)).filter(|p| p.is_file()) {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(())
}

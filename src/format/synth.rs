//! Random BitNet checkpoints of any shape in the release's packed safetensors layout, streamed
//! to disk (for tests and benchmarks).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

enum Fill {
    /// bf16 uniform in `[center - spread, center + spread]`.
    Bf16 { center: f32, spread: f32 },
    /// Packed ternary bytes (no code 3).
    Ternary,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    fill: Fill,
}

impl Spec {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        match self.fill {
            Fill::Bf16 { .. } => 2 * n,
            Fill::Ternary => n,
        }
    }
}

fn specs(c: &ModelConfig) -> Vec<Spec> {
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let bf = |name: String, shape: Vec<usize>, center: f32, spread: f32| Spec {
        name,
        shape,
        fill: Fill::Bf16 { center, spread },
    };
    let mut v = vec![
        bf(
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, h],
            0.0,
            0.05,
        ),
        bf("model.norm.weight".into(), vec![h], 1.0, 0.1),
    ];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        v.push(bf(format!("{p}.input_layernorm.weight"), vec![h], 1.0, 0.1));
        v.push(bf(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            1.0,
            0.1,
        ));
        if let Some((attn, ffn)) = c.family.sub_norm_names() {
            v.push(bf(format!("{p}.{attn}.weight"), vec![q], 1.0, 0.1));
            v.push(bf(format!("{p}.{ffn}.weight"), vec![i], 1.0, 0.1));
        }
        let lin = [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ];
        for (name, rows, cols) in lin {
            v.push(bf(format!("{p}.{name}.weight_scale"), vec![1], 0.5, 0.4));
            v.push(Spec {
                name: format!("{p}.{name}.weight"),
                shape: vec![rows / 4, cols],
                fill: Fill::Ternary,
            });
        }
    }
    // The release's order: BF16 tensors first, then U8, each group sorted by name.
    v.sort_by(|a, b| {
        (matches!(a.fill, Fill::Ternary), &a.name).cmp(&(matches!(b.fill, Fill::Ternary), &b.name))
    });
    v
}

/// Writes `config.json`, `generation_config.json` and a random `model.safetensors` for `config`
/// into `dir`. `progress(done, total)` is called as bytes are written.
pub fn write_model(
    dir: &Path,
    config: &ModelConfig,
    seed: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    config.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write_json = |name: &str, v: serde_json::Value| {
        let path = dir.join(name);
        let text =
            serde_json::to_string_pretty(&v).map_err(|e| Error::json(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    write_json("config.json", config.to_json())?;
    write_json(
        "generation_config.json",
        serde_json::json!({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids, "do_sample": false}),
    )?;

    let specs = specs(config);
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in &specs {
        let dtype = if matches!(s.fill, Fill::Ternary) {
            "U8"
        } else {
            "BF16"
        };
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": s.shape, "data_offsets": [offset, offset + s.bytes()]}),
        );
        offset += s.bytes();
    }
    let mut head = serde_json::to_string(&header)
        .map_err(|e| Error::Config(e.to_string()))?
        .into_bytes();
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let io = |e| Error::io(&path, e);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&path).map_err(io)?);
    out.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&head).map_err(io)?;

    // Bytes whose four 2-bit fields are all valid codes (0, 1, 2).
    let valid: Vec<u8> = (0..=255u8)
        .filter(|b| (0..4).all(|i| (b >> (2 * i)) & 3 != 3))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let total = offset as u64;
    let mut done = 0u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for s in &specs {
        let mut left = s.bytes();
        while left > 0 {
            let n = left.min(1 << 20);
            buf.clear();
            match s.fill {
                Fill::Bf16 { center, spread } => {
                    for _ in 0..n / 2 {
                        let u = rng.random::<f32>() * 2.0 - 1.0;
                        buf.extend_from_slice(&bf16::from_f32(center + spread * u).to_le_bytes());
                    }
                }
                Fill::Ternary => {
                    for _ in 0..n {
                        buf.push(valid[rng.random_range(0..valid.len())]);
                    }
                }
            }
            out.write_all(&buf).map_err(io)?;
            left -= n;
            done += n as u64;
            progress(done, total);
        }
    }
    out.flush().map_err(io)?;
    Ok(())
}

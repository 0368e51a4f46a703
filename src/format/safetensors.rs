//! Hugging Face safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped and validated tensor by tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};

use super::{Bytes, FloatDtype, FloatTensor, LayerWeights, TernaryMatrix, Weights};
use crate::config::{ModelConfig, ScaleConvention};
use crate::error::{Error, Result};
use crate::quant::{pack_checkpoint, ternarize_absmean};

/// A checkpoint file's bytes: mapped from disk, or held in memory.
#[derive(Debug, Clone)]
enum Backing {
    Map(Arc<Mmap>),
    Mem(Arc<Vec<u8>>),
}

impl Backing {
    fn as_slice(&self) -> &[u8] {
        match self {
            Backing::Map(m) => m,
            Backing::Mem(v) => v,
        }
    }
}

/// One tensor's location.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    map: Backing,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    len: usize,
}

/// The tensors of a checkpoint directory, across all its files.
#[derive(Debug)]
pub struct Checkpoint {
    tensors: HashMap<String, Entry>,
    file_bytes: u64,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; the engine assumes checkpoints are not modified
    // while loaded (the usual contract of memory-mapped model loaders).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards of `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_files(&index, dir)?
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in the model directory",
            ));
        };
        let mut ck = Checkpoint {
            tensors: HashMap::new(),
            file_bytes: 0,
        };
        for path in files {
            ck.add_file(&path)?;
        }
        Ok(ck)
    }

    /// The tensors of safetensors files held in memory, as (file name, bytes): a single
    /// `model.safetensors` or every shard of an index (the name is used in errors).
    pub fn from_buffers(files: Vec<(String, Arc<Vec<u8>>)>) -> Result<Self> {
        let mut ck = Checkpoint {
            tensors: HashMap::new(),
            file_bytes: 0,
        };
        for (name, buf) in files {
            ck.add_backing(Path::new(&name), Backing::Mem(buf))?;
        }
        Ok(ck)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        self.add_backing(path, Backing::Map(Arc::new(map_file(path)?)))
    }

    fn add_backing(&mut self, path: &Path, map: Backing) -> Result<()> {
        let bytes = map.as_slice();
        self.file_bytes += bytes.len() as u64;
        let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
            let which = inconsistent_tensor(bytes)
                .map(|t| format!(" ({t})"))
                .unwrap_or_default();
            Error::format(path, format!("invalid safetensors file: {e}{which}"))
        })?;
        let data_start = 8 + header_len;
        for (name, info) in meta.tensors() {
            let (a, b) = info.data_offsets;
            let entry = Entry {
                path: path.to_path_buf(),
                map: map.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + a,
                len: b - a,
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` appears in more than one file"),
                ));
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    fn bytes(e: &Entry) -> Bytes {
        match &e.map {
            Backing::Map(map) => Bytes::Mapped {
                map: map.clone(),
                start: e.start,
                len: e.len,
            },
            Backing::Mem(buf) => Bytes::Shared {
                buf: buf.clone(),
                start: e.start,
                len: e.len,
            },
        }
    }

    fn float_dtype(e: &Entry, name: &str) -> Result<FloatDtype> {
        match e.dtype {
            Dtype::F32 => Ok(FloatDtype::F32),
            Dtype::F16 => Ok(FloatDtype::F16),
            Dtype::BF16 => Ok(FloatDtype::BF16),
            other => Err(Error::format(
                &e.path,
                format!("tensor `{name}` has dtype {other:?}, expected BF16, F16 or F32"),
            )),
        }
    }

    /// A float matrix of exactly `[rows, cols]`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<FloatTensor> {
        let e = self.get(name)?;
        let dtype = Self::float_dtype(e, name)?;
        if e.shape != [rows, cols] {
            return Err(Error::format(
                &e.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected [{rows}, {cols}]",
                    e.shape
                ),
            ));
        }
        Ok(FloatTensor {
            name: name.to_string(),
            dtype,
            rows,
            cols,
            bytes: Self::bytes(e),
        })
    }

    /// A float vector of exactly `len` elements, as f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let e = self.get(name)?;
        let dtype = Self::float_dtype(e, name)?;
        if e.shape != [len] {
            return Err(Error::format(
                &e.path,
                format!("tensor `{name}` has shape {:?}, expected [{len}]", e.shape),
            ));
        }
        let v = FloatTensor {
            name: name.to_string(),
            dtype,
            rows: 1,
            cols: len,
            bytes: Self::bytes(e),
        }
        .to_f32();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::format(
                &e.path,
                format!("tensor `{name}` has a non-finite value at index {i}"),
            ));
        }
        Ok(v)
    }

    fn scalar(&self, name: &str) -> Result<f32> {
        let e = self.get(name)?;
        let dtype = Self::float_dtype(e, name)?;
        if e.shape.iter().product::<usize>() != 1 {
            return Err(Error::format(
                &e.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected one element",
                    e.shape
                ),
            ));
        }
        Ok(FloatTensor {
            name: name.to_string(),
            dtype,
            rows: 1,
            cols: 1,
            bytes: Self::bytes(e),
        }
        .to_f32()[0])
    }

    /// A ternary linear `[rows, cols]`: packed uint8 `[rows/4, cols]` with a `weight_scale`, or an
    /// unpacked float master weight ternarized here with absmean.
    pub fn ternary(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
        cfg: &ModelConfig,
    ) -> Result<TernaryMatrix> {
        let name = format!("{prefix}.weight");
        let e = self.get(&name)?;
        if e.dtype == Dtype::U8 {
            if e.shape != [rows / 4, cols] {
                return Err(Error::format(
                    &e.path,
                    format!("packed tensor `{name}` has shape {:?}, expected [{}, {cols}] (= [{rows}/4, {cols}])", e.shape, rows / 4),
                ));
            }
            let scale_name = format!("{prefix}.weight_scale");
            let ws = self.scalar(&scale_name)?;
            if !ws.is_finite() || ws == 0.0 {
                return Err(Error::format(
                    &e.path,
                    format!("tensor `{scale_name}` = {ws} is not a usable scale"),
                ));
            }
            let scale = match cfg.scale_convention {
                ScaleConvention::Multiply => ws,
                ScaleConvention::Divide => 1.0 / ws,
            };
            return Ok(TernaryMatrix {
                name,
                rows,
                cols,
                packed: Self::bytes(e),
                scale,
            });
        }
        let master = self.matrix(&name, rows, cols).map_err(|err| match err {
            Error::Format { path, msg } => Error::Format {
                path,
                msg: format!(
                    "{msg} (expected packed U8 [{}, {cols}] or a float master weight)",
                    rows / 4
                ),
            },
            other => other,
        })?;
        let w = master.to_f32();
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            return Err(Error::format(
                &e.path,
                format!("tensor `{name}` has a non-finite value at index {i}"),
            ));
        }
        let (codes, scale) = ternarize_absmean(&w);
        let packed = pack_checkpoint(&codes, rows, cols);
        Ok(TernaryMatrix {
            name,
            rows,
            cols,
            packed: Bytes::Owned(Arc::new(packed)),
            scale,
        })
    }
}

/// Names the first tensor (by name) whose dtype and shape disagree with its data offsets, for
/// the header errors of the safetensors crate that do not say which tensor is wrong.
fn inconsistent_tensor(buf: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(buf.get(8..n.checked_add(8)?)?).ok()?;
    header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .find_map(|(name, v)| {
            let info: TensorInfo = serde_json::from_value(v).ok()?;
            let (a, b) = info.data_offsets;
            let bytes = info
                .shape
                .iter()
                .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
                .map(|bits| (bits / 8, bits % 8));
            match bytes {
                Some((len, 0)) if b.checked_sub(a) == Some(len) => None,
                _ => Some(format!(
                    "tensor `{name}`: dtype {:?}, shape {:?}, data_offsets [{a}, {b}]",
                    info.dtype, info.shape
                )),
            }
        })
}

fn shard_files(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::json(index, e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::json(index, "missing object `weight_map`"))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, f) in map {
        let f = f.as_str().ok_or_else(|| {
            Error::json(index, format!("weight_map[`{tensor}`] is not a file name"))
        })?;
        let plain = Path::new(f).components().count() == 1 && !f.contains("..") && !f.is_empty();
        if !plain {
            return Err(Error::json(
                index,
                format!("weight_map[`{tensor}`] = `{f}` is not a file name in the model directory"),
            ));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Loads a checkpoint directory (config.json + safetensors) into host [`Weights`].
pub fn load(dir: &Path) -> Result<Weights> {
    let config = ModelConfig::from_dir(dir)?;
    let ck = Checkpoint::open(dir)?;
    weights(config, &ck)
}

/// Builds host [`Weights`] for `config` from the tensors of `ck` (validating every one).
pub fn weights(config: ModelConfig, ck: &Checkpoint) -> Result<Weights> {
    let c = &config;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let embed = ck.matrix("model.embed_tokens.weight", c.vocab_size, h)?;
    let lm_head = if ck.tensors.contains_key("lm_head.weight") && !c.tie_word_embeddings {
        Some(ck.matrix("lm_head.weight", c.vocab_size, h)?)
    } else if !c.tie_word_embeddings {
        return Err(Error::MissingTensor(
            "lm_head.weight (tie_word_embeddings is false)".into(),
        ));
    } else {
        None
    };
    let final_norm = ck.vector("model.norm.weight", h)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let (q, kv) = (c.q_dim(), c.kv_dim());
        layers.push(LayerWeights {
            input_norm: ck.vector(&format!("{p}.input_layernorm.weight"), h)?,
            post_attention_norm: ck.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            attn_sub_norm: ck.vector(&format!("{p}.self_attn.attn_sub_norm.weight"), q)?,
            ffn_sub_norm: ck.vector(&format!("{p}.mlp.ffn_sub_norm.weight"), i)?,
            q: ck.ternary(&format!("{p}.self_attn.q_proj"), q, h, c)?,
            k: ck.ternary(&format!("{p}.self_attn.k_proj"), kv, h, c)?,
            v: ck.ternary(&format!("{p}.self_attn.v_proj"), kv, h, c)?,
            o: ck.ternary(&format!("{p}.self_attn.o_proj"), h, q, c)?,
            gate: ck.ternary(&format!("{p}.mlp.gate_proj"), i, h, c)?,
            up: ck.ternary(&format!("{p}.mlp.up_proj"), i, h, c)?,
            down: ck.ternary(&format!("{p}.mlp.down_proj"), h, i, c)?,
        });
    }
    Ok(Weights {
        config,
        embed,
        lm_head,
        final_norm,
        layers,
        file_bytes: ck.file_bytes,
    })
}

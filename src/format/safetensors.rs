//! Hugging Face safetensors checkpoints: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped and validated tensor by tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
#[cfg(not(target_pointer_width = "32"))]
use safetensors::tensor::SafeTensors;
use safetensors::tensor::{Dtype, TensorInfo};

use super::{
    Bytes, FloatDtype, FloatTensor, KernelLayer, KernelMatrix, LayerWeights, TernaryMatrix,
    Weights, NORMED_PARTS,
};
use crate::config::{ModelConfig, ScaleConvention};
use crate::error::{Error, Result};
use crate::quant::{pack_checkpoint, ternarize_absmean};
use crate::{files, json};

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
    files::regular_file_len(path)?;
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
        let (data_start, infos) = tensor_infos(bytes).map_err(|e| Error::format(path, e))?;
        for (name, info) in infos {
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

/// The tensors of a safetensors file, with the offset where its data starts. On 64-bit
/// targets this is the `safetensors` crate's validated parse.
#[cfg(not(target_pointer_width = "32"))]
fn tensor_infos(bytes: &[u8]) -> std::result::Result<(usize, Vec<(String, TensorInfo)>), String> {
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        let which = inconsistent_tensor(bytes)
            .map(|t| format!(" ({t})"))
            .unwrap_or_default();
        format!("invalid safetensors file: {e}{which}")
    })?;
    // The crate keeps the last of two entries with the same name; refuse them.
    json::parse(&bytes[8..8 + header_len])
        .map_err(|e| format!("invalid safetensors header: {e}"))?;
    let infos = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    Ok((8 + header_len, infos))
}

/// On 32-bit targets (wasm32) the crate computes tensor sizes in bits in a `usize` and rejects
/// any tensor over 512 MiB (the 2B4T embedding is 657 MB), so the header is checked here in
/// u64 with the same rules.
#[cfg(target_pointer_width = "32")]
fn tensor_infos(bytes: &[u8]) -> std::result::Result<(usize, Vec<(String, TensorInfo)>), String> {
    parse_header_u64(bytes).map_err(|e| format!("invalid safetensors file: {e}"))
}

/// Parses and validates a safetensors header with 64-bit size arithmetic: the header length
/// fits the file, every tensor's dtype × shape equals its byte range, and the ranges tile the
/// data section exactly (in offset order, no gaps or overlaps, up to the end of the file).
#[cfg_attr(not(target_pointer_width = "32"), allow(dead_code))]
fn parse_header_u64(
    bytes: &[u8],
) -> std::result::Result<(usize, Vec<(String, TensorInfo)>), String> {
    /// The safetensors crate's limit on the header size.
    const MAX_HEADER: u64 = 100_000_000;
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or("the file is shorter than its 8-byte header length")?
            .try_into()
            .map_err(|_| "header length")?,
    );
    if n > MAX_HEADER {
        return Err(format!("header length {n} exceeds {MAX_HEADER} bytes"));
    }
    let end = 8 + n as usize;
    let header = bytes
        .get(8..end)
        .ok_or_else(|| format!("header length {n} runs past the end of the file"))?;
    let text = std::str::from_utf8(header).map_err(|e| format!("header is not UTF-8: {e}"))?;
    let serde_json::Value::Object(map) =
        json::parse(text.as_bytes()).map_err(|e| format!("invalid safetensors header: {e}"))?
    else {
        return Err("the header is not a JSON object".into());
    };
    let mut infos = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo =
            serde_json::from_value(v).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
            .ok_or_else(|| format!("tensor `{name}`: size overflows"))?;
        let (a, b) = info.data_offsets;
        if bits % 8 != 0 || b < a || (b - a) as u64 != bits / 8 {
            return Err(format!(
                "tensor `{name}`: dtype {:?}, shape {:?}, data_offsets [{a}, {b}] disagree",
                info.dtype, info.shape
            ));
        }
        infos.push((name, info));
    }
    infos.sort_by_key(|(_, i)| i.data_offsets);
    let mut at = 0usize;
    for (name, i) in &infos {
        if i.data_offsets.0 != at {
            return Err(format!(
                "tensor `{name}` starts at {} but the previous data ends at {at}",
                i.data_offsets.0
            ));
        }
        at = i.data_offsets.1;
    }
    if end as u64 + at as u64 != bytes.len() as u64 {
        return Err(format!(
            "the tensors cover {at} data bytes but the file holds {}",
            bytes.len() - end
        ));
    }
    Ok((end, infos))
}

#[cfg(not(target_pointer_width = "32"))]
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
    let bytes = files::read_limited(index, files::JSON_LIMIT)?;
    let v = json::parse(&bytes).map_err(|e| Error::json(index, e))?;
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
        // An empty vector: the family's layers have no sub-norms. With `use_rms_norm` the
        // sub-norm slots hold o_proj's and down_proj's own norms.
        let (attn_sub, ffn_sub) = match c.family.sub_norm_names() {
            Some((a, f)) => (
                ck.vector(&format!("{p}.{a}.weight"), q)?,
                ck.vector(&format!("{p}.{f}.weight"), i)?,
            ),
            None if c.linear_norm_eps.is_some() => (
                ck.vector(&format!("{p}.self_attn.o_proj.rms_norm.weight"), q)?,
                ck.vector(&format!("{p}.mlp.down_proj.rms_norm.weight"), i)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        let linear_norms = match c.linear_norm_eps {
            Some(_) => NORMED_PARTS
                .iter()
                .map(|(_, name)| ck.vector(&format!("{p}.{name}.rms_norm.weight"), h))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        layers.push(LayerWeights {
            input_norm: ck.vector(&format!("{p}.input_layernorm.weight"), h)?,
            post_attention_norm: ck.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            attn_sub_norm: attn_sub,
            ffn_sub_norm: ffn_sub,
            linear_norms,
            q: ck.ternary(&format!("{p}.self_attn.q_proj"), q, h, c)?,
            k: ck.ternary(&format!("{p}.self_attn.k_proj"), kv, h, c)?,
            v: ck.ternary(&format!("{p}.self_attn.v_proj"), kv, h, c)?,
            o: ck.ternary(&format!("{p}.self_attn.o_proj"), h, q, c)?,
            gate: ck.ternary(&format!("{p}.mlp.gate_proj"), i, h, c)?,
            up: ck.ternary(&format!("{p}.mlp.up_proj"), i, h, c)?,
            down: ck.ternary(&format!("{p}.mlp.down_proj"), h, i, c)?,
        });
    }
    let kernel_layout = kernel_layout(ck, c)?;
    Ok(Weights {
        config,
        embed,
        lm_head,
        final_norm,
        layers,
        kernel_layout,
        file_bytes: ck.file_bytes,
    })
}

/// The CPU kernels' layout of a converted checkpoint (`model.layers.N.cpu_v1.{qkv,o,gate_up,
/// down}.{codes,row_scale}`), when the checkpoint has it: all layers or none.
fn kernel_layout(ck: &Checkpoint, c: &ModelConfig) -> Result<Option<Vec<KernelLayer>>> {
    if !ck.tensors.contains_key(&kernel_name(0, "qkv", "codes")) {
        return Ok(None);
    }
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let matrix = |l: usize, part: &str, rows: usize, cols: usize| -> Result<KernelMatrix> {
        let name = kernel_name(l, part, "codes");
        let e = ck.get(&name)?;
        if e.dtype != Dtype::U8 || e.shape.len() != 2 || e.shape[0] != rows {
            return Err(Error::format(
                &e.path,
                format!(
                    "tensor `{name}` has {:?} {:?}, expected U8 [{rows}, _]",
                    e.dtype, e.shape
                ),
            ));
        }
        Ok(KernelMatrix {
            rows,
            cols,
            data: Checkpoint::bytes(e),
            row_scale: ck.vector(&kernel_name(l, part, "row_scale"), rows)?,
            name,
        })
    };
    (0..c.num_layers)
        .map(|l| {
            Ok(KernelLayer {
                qkv: matrix(l, "qkv", q + 2 * kv, h)?,
                o: matrix(l, "o", h, q)?,
                gate_up: matrix(l, "gate_up", 2 * i, h)?,
                down: matrix(l, "down", h, i)?,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The name of a converted checkpoint's kernel-layout tensor.
pub fn kernel_name(layer: usize, part: &str, what: &str) -> String {
    format!("model.layers.{layer}.cpu_v1.{part}.{what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn u64_header_parser_agrees_with_the_crate_on_the_fixture() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/model.safetensors");
        let bytes = std::fs::read(path).unwrap();
        let (start, mut ours) = parse_header_u64(&bytes).unwrap();
        let (n, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(start, 8 + n);
        let mut theirs: Vec<_> = meta.tensors().into_iter().collect();
        assert_eq!(ours.len(), theirs.len());
        ours.sort_by(|a, b| a.0.cmp(&b.0));
        theirs.sort_by(|a, b| a.0.cmp(&b.0));
        for ((a, ia), (b, ib)) in ours.iter().zip(&theirs) {
            assert_eq!(a, b);
            assert_eq!(
                (ia.dtype, &ia.shape, ia.data_offsets),
                (ib.dtype, &ib.shape, ib.data_offsets)
            );
        }
    }

    #[test]
    fn u64_header_parser_rejects_inconsistent_files() {
        let ok = r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"U8","shape":[4],"data_offsets":[12,16]}}"#;
        assert!(parse_header_u64(&file(ok, 16)).is_ok());
        let cases = [
            (ok, 15, "cover 16 data bytes"),
            (ok, 17, "cover 16 data bytes"),
            (
                r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}}"#,
                10,
                "disagree",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6,
                "starts at 2",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6,
                "starts at 2",
            ),
            // Sizes beyond 32 bits are computed exactly (and here disagree with the file).
            (
                r#"{"a":{"dtype":"BF16","shape":[1048576,1048576],"data_offsets":[0,2199023255552]}}"#,
                8,
                "cover 2199023255552",
            ),
            (
                r#"{"a":{"dtype":"BF16","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}"#,
                8,
                "overflows",
            ),
            (r#"[1,2]"#, 0, "JSON object"),
        ];
        for (h, data, want) in cases {
            let e = parse_header_u64(&file(h, data)).unwrap_err();
            assert!(e.contains(want), "{h}: {e}");
        }
        let mut short = file(ok, 16);
        short.truncate(20);
        assert!(parse_header_u64(&short).unwrap_err().contains("runs past"));
        assert!(parse_header_u64(&[1, 2, 3]).is_err());
    }
}

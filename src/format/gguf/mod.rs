//! GGUF files (llama.cpp's and bitnet.cpp's container): the header, metadata and tensor table
//! read over a memory map, every count, length and offset checked against the file. The
//! model built from them is in [`model`], the block formats in [`blocks`], the tokenizer
//! in [`vocab`].

pub mod blocks;
pub mod model;
pub mod vocab;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::files;

pub use blocks::GgmlType;
pub use model::{load, ModelParts};

/// The four bytes every GGUF file starts with.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U(u64),
    /// Any signed integer type.
    I(i64),
    /// f32 or f64.
    F(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U(v) => Some(v),
            Value::I(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::U(v) => Some(v as f64),
            Value::I(v) => Some(v as f64),
            Value::F(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions, fastest first (`[cols, rows]` for a matrix).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the data in the file.
    pub start: usize,
    /// Bytes of the data.
    pub len: usize,
}

impl TensorInfo {
    /// Elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor table over the mapped bytes.
pub struct GgufFile {
    /// The file.
    pub path: PathBuf,
    map: Arc<Mmap>,
    /// Metadata by key.
    pub meta: HashMap<String, Value>,
    /// Tensors by name.
    pub tensors: HashMap<String, TensorInfo>,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if n > self.buf.len() - self.pos {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} of {}",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A count of items of at least `min_size` bytes each that must fit in the rest of the file.
    fn count(&mut self, min_size: usize, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(format!(
                "{what} = {n} does not fit in the {left} bytes left in the file"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> std::result::Result<Value, String> {
        let v = match ty {
            0 => Value::U(self.take(1, key)?[0] as u64),
            1 => Value::I(self.take(1, key)?[0] as i8 as i64),
            2 => {
                let b = self.take(2, key)?;
                Value::U(u16::from_le_bytes([b[0], b[1]]) as u64)
            }
            3 => {
                let b = self.take(2, key)?;
                Value::I(i16::from_le_bytes([b[0], b[1]]) as i64)
            }
            4 => Value::U(self.u32(key)? as u64),
            5 => Value::I(self.u32(key)? as i32 as i64),
            6 => Value::F(f32::from_bits(self.u32(key)?) as f64),
            7 => match self.take(1, key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("`{key}`: invalid bool byte {b}")),
            },
            8 => Value::Str(self.string(key)?),
            9 if depth == 0 => {
                let elem = self.u32(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("`{key}`: unknown array element type {t}")),
                };
                let n = self.count(min, key)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            9 => return Err(format!("`{key}`: arrays nested deeper than two levels")),
            10 => Value::U(self.u64(key)?),
            11 => Value::I(self.u64(key)? as i64),
            12 => Value::F(f64::from_bits(self.u64(key)?)),
            t => return Err(format!("`{key}`: unknown metadata type {t}")),
        };
        Ok(v)
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        files::regular_file_len(path)?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: opened read-only; model files are not modified while loaded (the usual
        // contract of memory-mapped loaders).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<Self> {
        let bad = |msg: String| Error::format(path, msg);
        let mut r = Reader { buf: &map, pos: 0 };
        if r.take(4, "magic").map_err(bad)? != MAGIC {
            return Err(bad("not a GGUF file (no `GGUF` magic)".into()));
        }
        let version = r.u32("version").map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} is not supported (2 or 3)"
            )));
        }
        let n_tensors = r.count(24, "tensor count").map_err(bad)?;
        let n_kv = r.count(13, "metadata count").map_err(bad)?;
        let mut meta = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string("metadata key").map_err(bad)?;
            let ty = r.u32(&key).map_err(bad)?;
            let v = r.value(ty, &key, 0).map_err(bad)?;
            meta.insert(key, v);
        }
        let mut table = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string("tensor name").map_err(bad)?;
            let n_dims = r.u32(&name).map_err(bad)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&name).map_err(bad)?);
            }
            let id = r.u32(&name).map_err(bad)?;
            let ty = GgmlType::from_id(id)
                .ok_or_else(|| bad(format!("tensor `{name}` has unsupported type {id}")))?;
            let offset = r.u64(&name).map_err(bad)?;
            table.push((name, dims, ty, offset));
        }
        let alignment = match meta.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(bad(format!(
                        "general.alignment {v:?} is not a power of two"
                    )))
                }
            },
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        let mut tensors = HashMap::with_capacity(table.len());
        for (name, dims, ty, offset) in table {
            if dims.iter().any(|&d| d == 0 || d > 1 << 32) {
                return Err(bad(format!("tensor `{name}` has dimensions {dims:?}")));
            }
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor `{name}` {dims:?} is too large")))?;
            let len = ty
                .bytes_for(dims[0], elements)
                .map_err(|e| bad(format!("tensor `{name}` ({}): {e}", ty.name())))?;
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(len).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor `{name}` ({} bytes at offset {offset}) runs past the end of the \
                         file ({file_len} bytes; truncated?)",
                        len
                    ))
                })?;
            let info = TensorInfo {
                dims,
                ty,
                start: start as usize,
                len: len as usize,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(bad(format!("tensor `{name}` appears twice")));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            meta,
            tensors,
        })
    }

    /// The bytes of a tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.start + t.len]
    }

    /// The bytes of a tensor as [`crate::format::Bytes`] over the mapping.
    pub fn bytes(&self, t: &TensorInfo) -> crate::format::Bytes {
        crate::format::Bytes::Mapped {
            map: self.map.clone(),
            start: t.start,
            len: t.len,
        }
    }

    /// Size of the file.
    pub fn file_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// A tensor by name, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("missing tensor `{name}`")))
    }

    /// A required metadata value.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.meta
            .get(key)
            .ok_or_else(|| Error::format(&self.path, format!("missing metadata `{key}`")))
    }

    /// A metadata string.
    pub fn str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::Str(s) => Ok(s),
            v => Err(self.wrong(key, "a string", v)),
        }
    }

    /// An optional non-negative integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    /// A required non-negative integer that fits a `usize`.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_u64(key)?
            .map(|v| v as usize)
            .ok_or_else(|| Error::format(&self.path, format!("missing metadata `{key}`")))
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    /// An optional array.
    pub fn opt_array(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "an array", v)),
        }
    }

    fn wrong(&self, key: &str, want: &str, got: &Value) -> Error {
        let got = match got {
            Value::Array(a) => format!("an array of {}", a.len()),
            other => format!("{other:?}"),
        };
        Error::format(
            &self.path,
            format!("metadata `{key}` must be {want}, got {got}"),
        )
    }
}

/// Whether `path` is a GGUF file (a regular file starting with the magic).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file with the given metadata section bytes and no tensors.
    fn file_with(n_kv: u64, kv: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b.extend(kv);
        b
    }

    fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        let dir = std::env::temp_dir().join(format!("gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.gguf", bytes.len()));
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path)
    }

    fn kv_string(key: &str, value: &str) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key.as_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((value.len() as u64).to_le_bytes());
        b.extend(value.as_bytes());
        b
    }

    #[test]
    fn reads_metadata_and_rejects_malformed_headers() {
        let f = parse(file_with(1, &kv_string("general.architecture", "llama"))).unwrap();
        assert_eq!(f.str("general.architecture").unwrap(), "llama");
        let e = f.usize("llama.block_count").unwrap_err().to_string();
        assert!(e.contains("missing metadata `llama.block_count`"), "{e}");
        let mut kv = kv_string("general.architecture", "llama");
        kv.truncate(kv.len() - 2);
        let e = parse(file_with(1, &kv)).err().unwrap().to_string();
        assert!(e.contains("does not fit") || e.contains("truncated"), "{e}");
        let e = parse(file_with(u64::MAX, &[])).err().unwrap().to_string();
        assert!(e.contains("metadata count"), "{e}");
        let e = parse(b"GGML\x03\0\0\0".to_vec()).err().unwrap().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");
        let mut v1 = file_with(0, &[]);
        v1[4] = 1;
        let e = parse(v1).err().unwrap().to_string();
        assert!(e.contains("version 1"), "{e}");
        let mut bad_type = kv_string("k", "v");
        bad_type[9..13].copy_from_slice(&77u32.to_le_bytes());
        let e = parse(file_with(1, &bad_type)).err().unwrap().to_string();
        assert!(e.contains("unknown metadata type 77"), "{e}");
    }
}

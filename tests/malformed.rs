//! Malformed checkpoints: every one gives a clear error that names the file, tensor or field
//! and the problem, never a panic. Each case copies the tiny fixture into a fresh temporary
//! directory and corrupts one thing.

use std::path::Path;
use std::process::{Command, Output};

use bitnet_inference::cpu::CpuBackend;
use bitnet_inference::engine::generate::Generator;
use bitnet_inference::format::safetensors::load;
use serde_json::{json, Value};

mod common;
use common::{fixture, TempDir};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A fresh copy of the fixture's config.json, generation_config.json and model.safetensors.
fn copy_fixture(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    dir
}

/// One tensor of a safetensors file.
#[derive(Clone)]
struct Tensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A whole safetensors file: optional `__metadata__` and the tensors in data order.
struct SafeTensorsFile {
    metadata: Option<Value>,
    tensors: Vec<Tensor>,
}

impl SafeTensorsFile {
    fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut metadata = None;
        let mut tensors = Vec::new();
        for (name, info) in header {
            if name == "__metadata__" {
                metadata = Some(info);
                continue;
            }
            let offs: Vec<usize> = serde_json::from_value(info["data_offsets"].clone()).unwrap();
            tensors.push((
                offs[0],
                Tensor {
                    name,
                    dtype: info["dtype"].as_str().unwrap().to_string(),
                    shape: serde_json::from_value(info["shape"].clone()).unwrap(),
                    data: data[offs[0]..offs[1]].to_vec(),
                },
            ));
        }
        tensors.sort_by_key(|(start, _)| *start);
        SafeTensorsFile {
            metadata,
            tensors: tensors.into_iter().map(|(_, t)| t).collect(),
        }
    }

    /// Serializes header and data with offsets recomputed from the tensors' data.
    fn to_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut offset = 0;
        for t in &self.tensors {
            let end = offset + t.data.len();
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut head = serde_json::to_vec(&header).unwrap();
        while !head.len().is_multiple_of(8) {
            head.push(b' ');
        }
        let mut out = (head.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&head);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
        }
        out
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).unwrap();
    }

    fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }
}

/// Rewrites `dir/model.safetensors` after `edit`.
fn edit_model(dir: &TempDir, edit: impl FnOnce(&mut SafeTensorsFile)) {
    let path = dir.join("model.safetensors");
    let mut st = SafeTensorsFile::read(&path);
    edit(&mut st);
    st.write(&path);
}

/// Rewrites `dir/config.json` after `edit`.
fn edit_config(dir: &TempDir, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Loads `dir` up to a ready CPU backend and returns the error text; fails if it loads.
fn load_error(dir: &Path) -> String {
    let weights = match load(dir) {
        Ok(w) => w,
        Err(e) => return e.to_string(),
    };
    match CpuBackend::load(&weights, &Default::default()) {
        Ok(_) => panic!("{} loaded, but it is malformed", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Asserts that loading `dir` fails with a message containing every one of `needles`.
fn assert_load_error(dir: &Path, needles: &[&str]) -> String {
    let msg = load_error(dir);
    eprintln!("{}: {msg}", dir.file_name().unwrap().to_string_lossy());
    for n in needles {
        assert!(
            msg.contains(n),
            "error for {} should mention `{n}`, got: {msg}",
            dir.display()
        );
    }
    msg
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .args(args)
        .output()
        .expect("run bitnet")
}

/// Runs `bitnet logits --model DIR --tokens TOKENS` and checks it fails cleanly, with every one
/// of `needles` on stderr.
fn assert_cli_fails(dir: &Path, tokens: &str, needles: &[&str]) {
    let out = bitnet(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        tokens,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("bitnet logits --tokens {:.20}: {stderr}", tokens);
    assert!(
        !out.status.success(),
        "bitnet logits on {} should fail; stderr: {stderr}",
        dir.display()
    );
    assert!(
        !stderr.contains("panicked"),
        "bitnet panicked on {}: {stderr}",
        dir.display()
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr for {} should mention `{n}`, got: {stderr}",
            dir.display()
        );
    }
    assert!(
        out.stdout.is_empty(),
        "nothing should be printed to stdout on failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

const MISSING: &str = "model.layers.1.mlp.down_proj.weight";
const PACKED: &str = "model.layers.0.self_attn.q_proj.weight";

// The bad checkpoints, shared by the library and CLI tests.

fn truncated_in_header() -> TempDir {
    let dir = copy_fixture("trunc-header");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    std::fs::write(&path, &bytes[..8 + n / 2]).unwrap();
    dir
}

fn truncated_in_data() -> TempDir {
    let dir = copy_fixture("trunc-data");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    dir
}

fn missing_tensor() -> TempDir {
    let dir = copy_fixture("missing-tensor");
    edit_model(&dir, |st| {
        let before = st.tensors.len();
        st.tensors.retain(|t| t.name != MISSING);
        assert_eq!(st.tensors.len(), before - 1);
    });
    dir
}

fn code_three() -> TempDir {
    let dir = copy_fixture("code3");
    edit_model(&dir, |st| {
        let t = st.tensor_mut(PACKED);
        assert_eq!(t.dtype, "U8");
        t.data[0] = 0xFF;
    });
    dir
}

fn config_without_hidden_size() -> TempDir {
    let dir = copy_fixture("no-hidden-size");
    edit_config(&dir, |c| {
        c.remove("hidden_size");
    });
    dir
}

fn index_escaping_dir() -> TempDir {
    let dir = copy_fixture("escape");
    let st = SafeTensorsFile::read(&dir.join("model.safetensors"));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut map = serde_json::Map::new();
    for t in &st.tensors {
        map.insert(t.name.clone(), json!("../escape.safetensors"));
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Library: the safetensors file
// ---------------------------------------------------------------------------------------------

#[test]
fn fixture_copy_loads() {
    // The harness itself: a copy, and a copy rewritten through the header helper, both load.
    let dir = copy_fixture("ok");
    let w = load(dir.path()).unwrap();
    CpuBackend::load(&w, &Default::default()).unwrap();
    edit_model(&dir, |_| {});
    let w = load(dir.path()).unwrap();
    CpuBackend::load(&w, &Default::default()).unwrap();
}

#[test]
fn truncated_in_the_header() {
    let dir = truncated_in_header();
    assert_load_error(dir.path(), &["model.safetensors", "header"]);
}

#[test]
fn truncated_to_a_few_bytes() {
    let dir = copy_fixture("trunc-len");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_load_error(dir.path(), &["model.safetensors", "header"]);
    std::fs::write(&path, b"").unwrap();
    assert_load_error(dir.path(), &["model.safetensors", "header"]);
}

#[test]
fn truncated_in_the_data() {
    let dir = truncated_in_data();
    assert_load_error(dir.path(), &["model.safetensors", "not fully covered"]);
}

#[test]
fn trailing_garbage_after_the_data() {
    let dir = copy_fixture("trailing");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&path, &bytes).unwrap();
    assert_load_error(dir.path(), &["model.safetensors", "not fully covered"]);
}

#[test]
fn header_length_larger_than_the_file() {
    let dir = copy_fixture("bad-len");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let too_long = bytes.len() as u64 + 1;
    bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_load_error(dir.path(), &["model.safetensors", "invalid header length"]);
    // Absurdly large (over the 100 MB header limit, and over usize on 32-bit).
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_load_error(dir.path(), &["model.safetensors", "header too large"]);
}

#[test]
fn header_not_json() {
    let dir = copy_fixture("not-json");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Same length, so only the JSON is wrong.
    for b in &mut bytes[8..8 + n] {
        *b = b'x';
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_load_error(dir.path(), &["model.safetensors", "invalid JSON in header"]);
    // Not UTF-8 either.
    for b in &mut bytes[8..8 + n] {
        *b = 0xFF;
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_load_error(dir.path(), &["model.safetensors", "UTF-8"]);
}

#[test]
fn header_offsets_inconsistent_with_shape() {
    let dir = copy_fixture("bad-offsets");
    let path = dir.join("model.safetensors");
    let st = SafeTensorsFile::read(&path);
    // Hand-written header in which model.norm.weight claims one element more than its bytes.
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for t in &st.tensors {
        let mut shape = t.shape.clone();
        if t.name == "model.norm.weight" {
            shape[0] += 1;
        }
        header.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": shape, "data_offsets": [offset, offset + t.data.len()]}));
        offset += t.data.len();
    }
    let head = serde_json::to_vec(&header).unwrap();
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&head);
    for t in &st.tensors {
        bytes.extend_from_slice(&t.data);
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_load_error(
        dir.path(),
        &[
            "model.safetensors",
            "invalid shape, data type, or offset",
            "model.norm.weight",
            "[65]",
        ],
    );

    // An element count whose byte size overflows.
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + head.len()]).unwrap();
    header["model.norm.weight"]["shape"] = json!([usize::MAX, 2]);
    let head = serde_json::to_vec(&header).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut patched = (head.len() as u64).to_le_bytes().to_vec();
    patched.extend_from_slice(&head);
    patched.extend_from_slice(&bytes[data_start..]);
    std::fs::write(&path, &patched).unwrap();
    assert_load_error(
        dir.path(),
        &["model.safetensors", "overflow", "model.norm.weight"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = missing_tensor();
    assert_load_error(dir.path(), &["missing tensor", MISSING]);
}

#[test]
fn missing_weight_scale_is_named() {
    let dir = copy_fixture("missing-scale");
    let name = "model.layers.0.mlp.gate_proj.weight_scale";
    edit_model(&dir, |st| st.tensors.retain(|t| t.name != name));
    assert_load_error(dir.path(), &["missing tensor", name]);
}

#[test]
fn wrong_dtype_for_a_norm() {
    // Same shape and byte size, integer dtype.
    let dir = copy_fixture("norm-i16");
    edit_model(&dir, |st| {
        st.tensor_mut("model.norm.weight").dtype = "I16".into()
    });
    assert_load_error(
        dir.path(),
        &[
            "model.safetensors",
            "model.norm.weight",
            "I16",
            "expected BF16, F16 or F32",
        ],
    );

    // U8 with the same bytes (so twice the elements).
    let dir = copy_fixture("norm-u8");
    edit_model(&dir, |st| {
        let t = st.tensor_mut("model.layers.1.input_layernorm.weight");
        t.dtype = "U8".into();
        t.shape = vec![t.data.len()];
    });
    assert_load_error(
        dir.path(),
        &[
            "model.safetensors",
            "model.layers.1.input_layernorm.weight",
            "U8",
        ],
    );
}

#[test]
fn wrong_shape_for_a_norm() {
    let dir = copy_fixture("norm-shape");
    let name = "model.layers.0.mlp.ffn_sub_norm.weight";
    edit_model(&dir, |st| {
        let t = st.tensor_mut(name);
        t.data.truncate(t.data.len() - 8);
        t.shape = vec![t.data.len() / 2];
    });
    assert_load_error(
        dir.path(),
        &["model.safetensors", name, "shape [168]", "expected [172]"],
    );
}

#[test]
fn non_finite_norm_value() {
    let dir = copy_fixture("norm-nan");
    let name = "model.layers.1.post_attention_layernorm.weight";
    edit_model(&dir, |st| {
        let t = st.tensor_mut(name);
        assert_eq!(t.dtype, "BF16");
        t.data[6..8].copy_from_slice(&[0xC0, 0x7F]); // bf16 NaN at index 3
    });
    assert_load_error(
        dir.path(),
        &["model.safetensors", name, "non-finite", "index 3"],
    );
}

#[test]
fn wrong_shape_for_a_packed_weight() {
    // [16, 64] -> [64, 16]: the same bytes, transposed shape.
    let dir = copy_fixture("packed-shape");
    edit_model(&dir, |st| {
        let t = st.tensor_mut(PACKED);
        assert_eq!(t.shape, [16, 64]);
        t.shape = vec![64, 16];
    });
    assert_load_error(
        dir.path(),
        &["model.safetensors", PACKED, "[64, 16]", "expected [16, 64]"],
    );

    // Unpacked row count stored as U8: [64, 64] bytes.
    let dir = copy_fixture("packed-unpacked-rows");
    let name = "model.layers.1.mlp.down_proj.weight";
    edit_model(&dir, |st| {
        let t = st.tensor_mut(name);
        assert_eq!(t.shape, [16, 172]);
        t.data = vec![0x55; 64 * 172];
        t.shape = vec![64, 172];
    });
    assert_load_error(
        dir.path(),
        &["model.safetensors", name, "[64, 172]", "expected [16, 172]"],
    );
}

#[test]
fn wrong_dtype_for_a_packed_weight() {
    let dir = copy_fixture("packed-i8");
    edit_model(&dir, |st| st.tensor_mut(PACKED).dtype = "I8".into());
    assert_load_error(dir.path(), &["model.safetensors", PACKED, "I8"]);
}

#[test]
fn bad_weight_scale() {
    let dir = copy_fixture("scale-zero");
    let name = "model.layers.1.self_attn.o_proj.weight_scale";
    edit_model(&dir, |st| {
        let t = st.tensor_mut(name);
        assert_eq!(t.dtype, "BF16");
        t.data = vec![0, 0];
    });
    assert_load_error(dir.path(), &[name, "not a usable scale"]);

    let dir = copy_fixture("scale-shape");
    edit_model(&dir, |st| {
        let t = st.tensor_mut(name);
        t.data = vec![0x80, 0x3F, 0x80, 0x3F];
        t.shape = vec![2];
    });
    assert_load_error(dir.path(), &["model.safetensors", name, "one element"]);
}

#[test]
fn code_three_in_a_packed_weight() {
    let dir = code_three();
    // Parsing accepts the bytes; the backend's repacking rejects the code.
    let weights = load(dir.path()).expect("the header is valid");
    let msg = match CpuBackend::load(&weights, &Default::default()) {
        Ok(_) => panic!("code 3 was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(PACKED) && msg.contains("code 3"), "{msg}");
    assert!(msg.contains("row 0, column 0"), "{msg}");

    // A code 3 in the last byte, in bit field 3 only: packed row R-1 = 15 of bit field 3 holds
    // unpacked row 3R + 15 = 63; last column.
    let dir = copy_fixture("code3-last");
    edit_model(&dir, |st| {
        let t = st.tensor_mut(PACKED);
        let last = t.data.len() - 1;
        t.data[last] = (t.data[last] & 0x3F) | 0xC0;
    });
    assert_load_error(dir.path(), &[PACKED, "code 3", "row 63, column 63"]);
}

// ---------------------------------------------------------------------------------------------
// Library: config.json
// ---------------------------------------------------------------------------------------------

#[test]
fn intermediate_size_not_a_multiple_of_four() {
    let dir = copy_fixture("inter-170");
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), json!(170));
    });
    assert_load_error(
        dir.path(),
        &["config.json", "intermediate_size", "170", "multiple of 4"],
    );
}

#[test]
fn config_invalid_json() {
    let dir = copy_fixture("config-json");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert_load_error(dir.path(), &["config.json"]);
    std::fs::write(&path, "[1, 2]").unwrap();
    assert_load_error(dir.path(), &["config.json", "JSON object"]);
}

#[test]
fn config_missing_hidden_size() {
    let dir = config_without_hidden_size();
    assert_load_error(dir.path(), &["config.json", "missing `hidden_size`"]);
}

#[test]
fn config_field_of_wrong_type() {
    let dir = copy_fixture("config-type");
    edit_config(&dir, |c| {
        c.insert("num_attention_heads".into(), json!("4"));
    });
    assert_load_error(dir.path(), &["config.json", "num_attention_heads"]);
}

#[test]
fn config_shapes_disagree_with_the_tensors() {
    // A valid config whose hidden_size doesn't match the checkpoint.
    let dir = copy_fixture("config-hidden");
    edit_config(&dir, |c| {
        c.insert("hidden_size".into(), json!(128));
        c.insert("head_dim".into(), json!(16));
    });
    assert_load_error(
        dir.path(),
        &[
            "model.safetensors",
            "model.embed_tokens.weight",
            "expected [300, 128]",
        ],
    );
}

#[test]
fn no_config_file() {
    let dir = copy_fixture("no-config");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_load_error(dir.path(), &["config.json"]);
}

#[test]
fn no_model_file() {
    let dir = copy_fixture("no-model");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_load_error(
        dir.path(),
        &["model.safetensors", "model.safetensors.index.json"],
    );
}

// ---------------------------------------------------------------------------------------------
// Library: sharded checkpoints
// ---------------------------------------------------------------------------------------------

/// Splits `dir/model.safetensors` into two shards listed by an index; returns the shard names.
fn shard(dir: &TempDir) -> [String; 2] {
    let path = dir.join("model.safetensors");
    let st = SafeTensorsFile::read(&path);
    std::fs::remove_file(&path).unwrap();
    let names = [
        "model-00001-of-00002.safetensors".to_string(),
        "model-00002-of-00002.safetensors".to_string(),
    ];
    let half = st.tensors.len() / 2;
    let parts = [st.tensors[..half].to_vec(), st.tensors[half..].to_vec()];
    let mut map = serde_json::Map::new();
    let mut total = 0;
    for (file, tensors) in names.iter().zip(parts) {
        for t in &tensors {
            map.insert(t.name.clone(), json!(file));
            total += t.data.len();
        }
        SafeTensorsFile {
            metadata: st.metadata.clone(),
            tensors,
        }
        .write(&dir.join(file));
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    names
}

/// Last-position and all-position logits of a fixed prompt.
fn fixture_logits(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let weights = load(dir).unwrap();
    let backend = CpuBackend::load(&weights, &Default::default()).unwrap();
    let mut gen = Generator::new(backend).unwrap();
    let last = gen.logits(&[297, 251, 21], false).unwrap();
    let all = gen.logits(&[297, 251, 21], true).unwrap();
    (last, all)
}

#[test]
fn sharded_checkpoint_matches_single_file() {
    let dir = copy_fixture("sharded");
    shard(&dir);
    assert!(!dir.join("model.safetensors").exists());
    let (single_last, single_all) = fixture_logits(&fixture());
    let (sharded_last, sharded_all) = fixture_logits(dir.path());
    assert_eq!(single_last.len(), 300);
    assert_eq!(single_all.len(), 3 * 300);
    assert_eq!(
        single_last,
        single_all[600..],
        "last-position logits differ from the last row of --all"
    );
    assert_eq!(
        single_last, sharded_last,
        "sharded checkpoint gives different logits"
    );
    assert_eq!(
        single_all, sharded_all,
        "sharded checkpoint gives different logits"
    );
    let w = load(dir.path()).unwrap();
    let shard_bytes: u64 = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    .iter()
    .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
    .sum();
    assert_eq!(w.file_bytes, shard_bytes);
}

#[test]
fn index_escaping_the_model_directory() {
    // The model directory is a child of a temp dir that really holds `escape.safetensors`, so
    // following the weight map would load a complete, valid checkpoint: it must be refused.
    let outer = TempDir::new("escape-outer");
    let model = outer.join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(fixture().join(f), model.join(f)).unwrap();
    }
    std::fs::copy(
        fixture().join("model.safetensors"),
        outer.join("escape.safetensors"),
    )
    .unwrap();
    let st = SafeTensorsFile::read(&outer.join("escape.safetensors"));
    let map: serde_json::Map<String, Value> = st
        .tensors
        .iter()
        .map(|t| (t.name.clone(), json!("../escape.safetensors")))
        .collect();
    std::fs::write(
        model.join("model.safetensors.index.json"),
        json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    assert_load_error(
        &model,
        &[
            "model.safetensors.index.json",
            "../escape.safetensors",
            "not a file name",
        ],
    );

    let dir = index_escaping_dir();
    assert_load_error(
        dir.path(),
        &[
            "model.safetensors.index.json",
            "../escape.safetensors",
            "not a file name",
        ],
    );

    // Absolute paths are rejected too.
    let dir = copy_fixture("absolute");
    shard(&dir);
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let abs = dir
        .join("model-00001-of-00002.safetensors")
        .to_str()
        .unwrap()
        .to_string();
    index["weight_map"]["model.norm.weight"] = json!(abs);
    std::fs::write(&index_path, index.to_string()).unwrap();
    assert_load_error(
        dir.path(),
        &[
            "model.safetensors.index.json",
            "model.norm.weight",
            "not a file name",
        ],
    );
}

#[test]
fn index_pointing_to_a_missing_shard() {
    let dir = copy_fixture("missing-shard");
    let [_, second] = shard(&dir);
    std::fs::remove_file(dir.join(&second)).unwrap();
    assert_load_error(dir.path(), &[&second]);
}

#[test]
fn malformed_index() {
    let dir = copy_fixture("bad-index");
    shard(&dir);
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(&index_path, "{\"weight_map\": ").unwrap();
    assert_load_error(dir.path(), &["model.safetensors.index.json"]);
    std::fs::write(&index_path, "{\"metadata\": {}}").unwrap();
    assert_load_error(dir.path(), &["model.safetensors.index.json", "weight_map"]);
    std::fs::write(&index_path, "{\"weight_map\": {\"model.norm.weight\": 3}}").unwrap();
    assert_load_error(
        dir.path(),
        &["model.safetensors.index.json", "model.norm.weight"],
    );
}

#[test]
fn tensor_in_two_shards() {
    let dir = copy_fixture("dup-shard");
    let [first, second] = shard(&dir);
    // Copy one tensor of the first shard into the second as well.
    let a = SafeTensorsFile::read(&dir.join(&first));
    let mut b = SafeTensorsFile::read(&dir.join(&second));
    let dup = a.tensors[0].clone();
    let name = dup.name.clone();
    b.tensors.push(dup);
    b.write(&dir.join(&second));
    assert_load_error(dir.path(), &[&name, "more than one file"]);
}

#[test]
fn shard_missing_a_tensor() {
    let dir = copy_fixture("shard-missing-tensor");
    let [_, second] = shard(&dir);
    let mut b = SafeTensorsFile::read(&dir.join(&second));
    let name = b.tensors[0].name.clone();
    b.tensors.remove(0);
    b.write(&dir.join(&second));
    assert_load_error(dir.path(), &["missing tensor", &name]);
}

// ---------------------------------------------------------------------------------------------
// CLI: bad checkpoints and bad requests fail cleanly
// ---------------------------------------------------------------------------------------------

#[test]
fn cli_rejects_malformed_checkpoints() {
    let cases: Vec<(TempDir, Vec<&str>)> = vec![
        (truncated_in_header(), vec!["model.safetensors", "header"]),
        (
            truncated_in_data(),
            vec!["model.safetensors", "not fully covered"],
        ),
        (missing_tensor(), vec![MISSING]),
        (code_three(), vec![PACKED, "code 3"]),
        (
            config_without_hidden_size(),
            vec!["config.json", "hidden_size"],
        ),
        (
            index_escaping_dir(),
            vec!["model.safetensors.index.json", "../escape.safetensors"],
        ),
    ];
    for (dir, needles) in &cases {
        assert_cli_fails(dir.path(), "1,2", needles);
    }
    let empty = TempDir::new("empty");
    assert_cli_fails(empty.path(), "1,2", &["config.json"]);
}

#[test]
fn cli_rejects_bad_token_lists() {
    let tiny = fixture();
    let tiny = tiny.to_str().unwrap();
    assert_cli_fails(
        Path::new(tiny),
        "1,x",
        &["--tokens", "`x` is not a token id"],
    );
    assert_cli_fails(Path::new(tiny), "1,,2", &["--tokens", "is not a token id"]);
    assert_cli_fails(Path::new(tiny), "1,-2", &["--tokens", "`-2`"]);
    assert_cli_fails(
        Path::new(tiny),
        "1,300",
        &["token id 300", "vocab_size 300"],
    );
    assert_cli_fails(Path::new(tiny), "4294967295", &["token id 4294967295"]);
    assert_cli_fails(Path::new(tiny), "4294967296", &["--tokens", "`4294967296`"]);
    let long = vec!["5"; 300].join(",");
    assert_cli_fails(Path::new(tiny), &long, &["300 tokens", "256"]);

    // The same through generate.
    let out = bitnet(&[
        "generate",
        "--model",
        tiny,
        "--tokens",
        &long,
        "--max-tokens",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("panicked") && stderr.contains("300 tokens"),
        "{stderr}"
    );
    let out = bitnet(&[
        "generate",
        "--model",
        tiny,
        "--tokens",
        "7,299,300",
        "--max-tokens",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !stderr.contains("panicked") && stderr.contains("token id 300"),
        "{stderr}"
    );
}

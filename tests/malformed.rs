//! Malformed checkpoints: every one gives a clear error that names the file, tensor or field
//! and the problem, never a panic. Each case copies the tiny fixture into a fresh temporary
//! directory and corrupts one thing.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

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
    edit_json(&dir.join("config.json"), |v| {
        edit(v.as_object_mut().unwrap())
    });
}

/// Rewrites the JSON file `path` after `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
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

// ---------------------------------------------------------------------------------------------
// Seeded mutation fuzzing: the whole model directory through `bitnet chat`
// ---------------------------------------------------------------------------------------------

/// What a mutation must lead to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// A clean error (exit 1, a message, no panic).
    Reject,
    /// A normal chat turn (exit 0).
    Accept,
    /// Either of the two (a flipped byte may or may not break the file).
    Either,
}

/// One mutated model directory and what loading and chatting with it must do.
struct Mutant {
    what: String,
    expect: Expect,
}

const ALL_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// The header of `st` as a JSON map with offsets recomputed, and the data after it.
fn header_and_data(st: &SafeTensorsFile) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = st.to_bytes();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

/// A safetensors file from header text and data (no padding, no checks).
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn dtype_size(d: &str) -> usize {
    match d {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// A JSON value of a type other than `like`'s (numbers: never another number).
fn wrong_type(rng: &mut impl rand::Rng, like: &Value) -> Value {
    loop {
        let v = match rng.random_range(0..7) {
            0 => json!("sixty-four"),
            1 => json!(["x", 1]),
            2 => json!({"a": 1}),
            3 => json!(true),
            4 => json!(-3),
            5 => json!(64.5),
            _ => json!("bitnet"),
        };
        let same = match (like, &v) {
            (Value::Number(a), Value::Number(b)) => {
                // A float where a float is expected is not a type change.
                !(a.is_u64() && (b.is_f64() || b.is_i64()))
            }
            (Value::String(_), Value::String(_)) => true,
            (Value::Bool(_), Value::Bool(_)) => true,
            (Value::Object(_), Value::Object(_)) => true,
            (Value::Array(_), Value::Array(_)) => true,
            _ => false,
        };
        if !same {
            return v;
        }
    }
}

/// Applies mutation number `case` (its kind is `case` modulo the number of kinds; its details
/// come from `rng`) to the fixture copy in `dir`.
fn mutate(dir: &Path, case: usize, rng: &mut impl rand::Rng) -> Mutant {
    use rand::seq::IndexedRandom;
    use Expect::*;
    let st_path = dir.join("model.safetensors");
    let cfg_path = dir.join("config.json");
    let read_cfg = || -> serde_json::Map<String, Value> {
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap()
    };
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    let m = |what: String, expect| Mutant { what, expect };
    const KINDS: usize = 24;
    match case % KINDS {
        0 => {
            let mut b = std::fs::read(&st_path).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let at = rng.random_range(8..8 + n);
            b[at] ^= 1 << rng.random_range(0..8);
            write("model.safetensors", &b);
            m(format!("safetensors header byte {at} flipped"), Either)
        }
        1 => {
            let mut b = std::fs::read(&st_path).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let at = rng.random_range(8 + n..b.len());
            b[at] ^= 1 << rng.random_range(0..8);
            write("model.safetensors", &b);
            m(format!("safetensors data byte {at} flipped"), Either)
        }
        2 => {
            let b = std::fs::read(&st_path).unwrap();
            let len = rng.random_range(0..b.len());
            write("model.safetensors", &b[..len]);
            m(format!("safetensors truncated to {len} bytes"), Reject)
        }
        3 => {
            let mut b = std::fs::read(&st_path).unwrap();
            let extra = rng.random_range(1..64);
            b.extend((0..extra).map(|_| rng.random::<u8>()));
            write("model.safetensors", &b);
            m(format!("{extra} bytes appended to the safetensors"), Reject)
        }
        4 => {
            let mut b = std::fs::read(&st_path).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap());
            let new = match rng.random_range(0..3) {
                0 => n + rng.random_range(1..16),
                1 => n - rng.random_range(1..16),
                _ => rng.random::<u64>() | 1 << 40,
            };
            b[..8].copy_from_slice(&new.to_le_bytes());
            write("model.safetensors", &b);
            m(format!("header length {n} -> {new}"), Reject)
        }
        k @ 5..=9 => {
            let st = SafeTensorsFile::read(&st_path);
            let (mut header, data) = header_and_data(&st);
            let names: Vec<String> = st.tensors.iter().map(|t| t.name.clone()).collect();
            let name = names.choose(rng).unwrap().clone();
            let what;
            match k {
                5 => {
                    let e = header.get_mut(&name).unwrap();
                    let i = rng.random_range(0..2);
                    let old = e["data_offsets"][i].as_u64().unwrap();
                    let new = if old == 0 { 1 } else { old - 1 };
                    e["data_offsets"][i] = json!(new);
                    what = format!("`{name}` data_offsets[{i}] {old} -> {new}");
                }
                6 => {
                    let e = header.get_mut(&name).unwrap();
                    let old = e["dtype"].as_str().unwrap().to_string();
                    let other: Vec<&str> = ["F32", "F16", "BF16", "U8", "I8", "I32", "F64", "BOOL"]
                        .into_iter()
                        .filter(|d| dtype_size(d) != dtype_size(&old))
                        .collect();
                    let new = *other.choose(rng).unwrap();
                    e["dtype"] = json!(new);
                    what = format!("`{name}` dtype {old} -> {new}");
                }
                7 => {
                    let e = header.get_mut(&name).unwrap();
                    let mut shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
                    let old = shape.clone();
                    if shape.len() == 2 && shape[0] != shape[1] && rng.random_bool(0.5) {
                        shape.swap(0, 1);
                    } else {
                        let i = rng.random_range(0..shape.len());
                        shape[i] += 1;
                    }
                    e["shape"] = json!(shape);
                    what = format!("`{name}` shape {old:?} -> {shape:?}");
                }
                8 => {
                    let e = header.remove(&name).unwrap();
                    header.insert(format!("{name}.renamed"), e);
                    what = format!("`{name}` renamed");
                }
                _ => {
                    let e = header.remove(&name).unwrap();
                    let mut text = serde_json::to_string(&header).unwrap();
                    let entry = format!("{}:{}", json!(name), e);
                    text.insert_str(1, &format!("{entry},{entry},"));
                    write("model.safetensors", &raw_safetensors(&text, &data));
                    return m(format!("`{name}` listed twice"), Reject);
                }
            }
            let text = serde_json::to_string(&header).unwrap();
            write("model.safetensors", &raw_safetensors(&text, &data));
            m(what, Reject)
        }
        10 => {
            // Deleting a field: an error exactly when the engine has no default for it (or its
            // default disagrees with the tensors).
            let mut c = read_cfg();
            let keys: Vec<String> = c.keys().cloned().collect();
            let key = keys.choose(rng).unwrap().clone();
            c.remove(&key);
            write("config.json", &serde_json::to_vec(&c).unwrap());
            let must = [
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "tie_word_embeddings",
            ];
            let e = if must.contains(&key.as_str()) {
                Reject
            } else {
                Accept
            };
            m(format!("config `{key}` deleted"), e)
        }
        11 | 12 => {
            let mut c = read_cfg();
            let ignored = [
                "architectures",
                "initializer_range",
                "torch_dtype",
                "use_cache",
            ];
            let keys: Vec<String> = c.keys().cloned().collect();
            let key = keys.choose(rng).unwrap().clone();
            let new = wrong_type(rng, &c[&key]);
            c.insert(key.clone(), new.clone());
            write("config.json", &serde_json::to_vec(&c).unwrap());
            let e = if ignored.contains(&key.as_str()) {
                Accept
            } else {
                Reject
            };
            m(format!("config `{key}` = {new}"), e)
        }
        13 => {
            let mut c = read_cfg();
            let (key, value) = [
                ("model_type", json!("llama")),
                ("hidden_act", json!("silu")),
                ("vocab_size", json!(0)),
                ("hidden_size", json!(1 << 21)),
                ("num_attention_heads", json!(3)),
                ("intermediate_size", json!(170)),
                ("rms_norm_eps", json!(-1.0)),
                ("rope_theta", json!(0)),
                ("rope_scaling", json!({"type": "linear", "factor": 2.0})),
                ("quantization_config", Value::Null),
            ]
            .choose(rng)
            .unwrap()
            .clone();
            c.insert(key.into(), value.clone());
            write("config.json", &serde_json::to_vec(&c).unwrap());
            m(format!("config `{key}` = {value}"), Reject)
        }
        14 => {
            let mut c = read_cfg();
            let key = *["quant_method", "linear_class", "quantization_mode"]
                .choose(rng)
                .unwrap();
            let q = c["quantization_config"].as_object_mut().unwrap();
            let new = if rng.random_bool(0.5) {
                wrong_type(rng, &json!("x"))
            } else {
                json!("fastlinear")
            };
            q.insert(key.into(), new.clone());
            write("config.json", &serde_json::to_vec(&c).unwrap());
            m(format!("quantization_config `{key}` = {new}"), Reject)
        }
        15 => {
            let text = std::fs::read_to_string(&cfg_path).unwrap();
            let c = read_cfg();
            let keys: Vec<&String> = c.keys().collect();
            let key = keys.choose(rng).unwrap();
            let dup = format!("{{{}: {},", json!(key), c[*key]);
            write("config.json", text.replacen('{', &dup, 1).as_bytes());
            m(format!("config `{key}` given twice"), Reject)
        }
        16 => {
            let name = *[
                "config.json",
                "generation_config.json",
                "tokenizer_config.json",
            ]
            .choose(rng)
            .unwrap();
            truncate(dir, name, rng)
        }
        17 => truncate(dir, "tokenizer.json", rng),
        18 => {
            let name = *[
                "tokenizer.json",
                "chat_template.jinja",
                "generation_config.json",
            ]
            .choose(rng)
            .unwrap();
            let mut b = std::fs::read(dir.join(name)).unwrap();
            let at = rng.random_range(0..b.len());
            b[at] ^= 1 << rng.random_range(0..8);
            write(name, &b);
            m(format!("{name} byte {at} flipped"), Either)
        }
        19 => {
            let key = *["bos_token", "eos_token", "chat_template"]
                .choose(rng)
                .unwrap();
            let new = wrong_type(rng, &json!("x"));
            edit_json(&dir.join("tokenizer_config.json"), |c| c[key] = new.clone());
            m(format!("tokenizer_config `{key}` = {new}"), Reject)
        }
        20 => {
            let new = [
                json!("x"),
                json!({"a": 1}),
                json!(true),
                json!(-3),
                json!(2.5),
                json!([1, "x"]),
            ]
            .choose(rng)
            .unwrap()
            .clone();
            edit_json(&dir.join("generation_config.json"), |c| {
                c["eos_token_id"] = new.clone()
            });
            m(format!("generation_config `eos_token_id` = {new}"), Reject)
        }
        21 => {
            let tpl = *[
                "{% for m in messages %}{{ m.content }}",
                "{{ 'x' * 10**8 }}",
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                "{{ raise_exception('no') }}",
                "{% set l = [] %}{% for i in range(10**9) %}{% set l = l + [i] %}{% endfor %}",
            ]
            .choose(rng)
            .unwrap();
            write("chat_template.jinja", tpl.as_bytes());
            m(format!("chat template `{tpl}`"), Reject)
        }
        22 => {
            #[cfg(unix)]
            {
                let name = *["config.json", "tokenizer.json", "chat_template.jinja"]
                    .choose(rng)
                    .unwrap();
                std::fs::remove_file(dir.join(name)).unwrap();
                let target = *["/dev/zero", "/dev/urandom", "/"].choose(rng).unwrap();
                std::os::unix::fs::symlink(target, dir.join(name)).unwrap();
                m(format!("{name} -> {target}"), Reject)
            }
            #[cfg(not(unix))]
            m("nothing".into(), Accept)
        }
        _ => {
            let name = *["config.json", "tokenizer_config.json", "model.safetensors"]
                .choose(rng)
                .unwrap();
            std::fs::remove_file(dir.join(name)).unwrap();
            let made = Command::new("mkfifo").arg(dir.join(name)).status();
            assert!(made.is_ok_and(|s| s.success()), "mkfifo");
            m(format!("{name} is a FIFO"), Reject)
        }
    }
}

/// `dir/name` cut short at a random length: a must-reject mutation.
fn truncate(dir: &Path, name: &str, rng: &mut impl rand::Rng) -> Mutant {
    let b = std::fs::read(dir.join(name)).unwrap();
    let len = rng.random_range(0..b.len() - 1);
    std::fs::write(dir.join(name), &b[..len]).unwrap();
    Mutant {
        what: format!("{name} truncated to {len} bytes"),
        expect: Expect::Reject,
    }
}

/// What one run of `bitnet chat` did.
enum Outcome {
    Ok,
    CleanError(String),
    Broken(String),
}

/// One chat turn with the model in `dir`, with at most `max_mib` MiB of address space and
/// `secs` seconds.
fn chat_once(dir: &Path, max_mib: u64, secs: u64) -> Outcome {
    use std::io::Write;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {}; exec \"$0\" \"$@\"", max_mib * 1024))
        .arg(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "chat",
            "--backend",
            "cpu",
            "--threads",
            "1",
            "--max-tokens",
            "2",
        ])
        .args(["--temperature", "0", "--model"])
        .arg(dir)
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(b"hello\n");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            return match status.code() {
                Some(0) => Outcome::Ok,
                Some(1) if !err.contains("panicked") && err.contains("rror") => {
                    Outcome::CleanError(err)
                }
                _ => Outcome::Broken(format!("{status}: {err}")),
            };
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Broken(format!("no answer within {secs} s"));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn seeded_mutations_of_the_model_directory_never_crash_hang_or_pass_silently() {
    use rand::SeedableRng;
    let cases: usize = std::env::var("BITNET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let seed: u64 = std::env::var("BITNET_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(14);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base = TempDir::new("fuzz-base");
    for f in ALL_FILES {
        std::fs::copy(fixture().join(f), base.join(f)).unwrap();
    }
    assert!(matches!(chat_once(base.path(), 2048, 60), Outcome::Ok));
    let mut failures = Vec::new();
    let (mut accepted, mut rejected) = (0, 0);
    for case in 0..cases {
        let dir = TempDir::new("fuzz");
        for f in ALL_FILES {
            std::fs::copy(base.join(f), dir.join(f)).unwrap();
        }
        let m = mutate(dir.path(), case, &mut rng);
        let outcome = chat_once(dir.path(), 2048, 60);
        let bad = match (&outcome, m.expect) {
            (Outcome::Broken(why), _) => Some(format!("crashed or hung: {why}")),
            (Outcome::Ok, Expect::Reject) => Some("accepted, but it must be refused".into()),
            (Outcome::CleanError(e), Expect::Accept) => Some(format!("refused: {e}")),
            _ => None,
        };
        match outcome {
            Outcome::Ok => accepted += 1,
            Outcome::CleanError(_) => rejected += 1,
            Outcome::Broken(_) => {}
        }
        if let Some(why) = bad {
            failures.push(format!("case {case} ({}): {why}", m.what));
        }
    }
    eprintln!("{cases} mutations (seed {seed}): {accepted} accepted, {rejected} refused cleanly");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The in-process parsers (safetensors header and tensors, config.json, the strict JSON
/// reader) on thousands of byte-level mutations: every one returns, none panics.
#[test]
fn parsers_survive_random_byte_mutations() {
    use bitnet_inference::config::ModelConfig;
    use bitnet_inference::format::safetensors::{weights, Checkpoint};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(1414);
    let model = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let config = std::fs::read(fixture().join("config.json")).unwrap();
    let header_end = 8 + u64::from_le_bytes(model[..8].try_into().unwrap()) as usize;
    let good = ModelConfig::from_dir(&fixture()).unwrap();
    let (mut loaded, mut parsed) = (0, 0);
    for case in 0..4000 {
        let mut m = model.clone();
        let mut c = config.clone();
        for _ in 0..rng.random_range(1..4) {
            if case % 2 == 0 {
                let at = rng.random_range(0..header_end);
                m[at] = rng.random();
            } else {
                let at = rng.random_range(0..c.len());
                c[at] = rng.random();
            }
        }
        if rng.random_bool(0.1) {
            let len = rng.random_range(0..m.len());
            m.truncate(len);
        }
        if let Ok(v) = bitnet_inference::json::parse(&c) {
            if let Ok(cfg) = ModelConfig::from_json(&v) {
                parsed += 1;
                let _ = cfg.validate();
            }
        }
        let ck = Checkpoint::from_buffers(vec![("model.safetensors".into(), Arc::new(m))]);
        if let Ok(ck) = ck {
            if weights(good.clone(), &ck).is_ok() {
                loaded += 1;
            }
        }
    }
    eprintln!("4000 byte mutations: {loaded} checkpoints and {parsed} configs still loaded");
}

//! The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`: tokens, token types,
//! merges, special ids, pre-tokenizer name, chat template), rebuilt as the `tokenizer.json` and
//! `tokenizer_config.json` the engine's [`Tokenizer`] reads. Byte-level BPE (`gpt2`) only.

use serde_json::{json, Map, Value as Json};

use super::{GgufFile, Value};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Llama 3's split (also Falcon3's).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's split.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values: (name, split regex, merges ignored for whole-word tokens).
const PRE_TOKENIZERS: [(&str, &str, bool); 5] = [
    ("llama-bpe", LLAMA3_SPLIT, true),
    ("llama3", LLAMA3_SPLIT, true),
    ("falcon3", LLAMA3_SPLIT, true),
    ("default", GPT2_SPLIT, false),
    ("gpt2", GPT2_SPLIT, false),
];

/// Token type of control tokens (special, never split) and user-defined added tokens.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

fn strings<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let Some(items) = f.opt_array(key)? else {
        return Err(Error::format(&f.path, format!("missing metadata `{key}`")));
    };
    items
        .iter()
        .map(|v| match v {
            Value::Str(s) => Ok(s.as_str()),
            _ => Err(Error::format(&f.path, format!("`{key}` must hold strings"))),
        })
        .collect()
}

/// The tokenizer in `f`'s metadata (None when the file has none).
pub fn tokenizer(f: &GgufFile) -> Result<Option<Tokenizer>> {
    let Some((tokenizer_json, config)) = tokenizer_files(f)? else {
        return Ok(None);
    };
    Tokenizer::from_parts(&tokenizer_json, Some(&config), None)
        .map(Some)
        .map_err(|e| Error::format(&f.path, format!("tokenizer metadata: {e}")))
}

/// The contents of the `tokenizer.json` and `tokenizer_config.json` that `f`'s metadata
/// describes (None when the file has no tokenizer).
pub fn tokenizer_files(f: &GgufFile) -> Result<Option<(Vec<u8>, String)>> {
    let model = match f.meta.get("tokenizer.ggml.model") {
        None => return Ok(None),
        Some(_) => f.str("tokenizer.ggml.model")?,
    };
    if model != "gpt2" {
        return Err(Error::format(
            &f.path,
            format!(
                "tokenizer.ggml.model `{model}` is not supported (byte-level BPE `gpt2` is); \
                 put the model's tokenizer.json beside the GGUF file"
            ),
        ));
    }
    let pre_name = match f.meta.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => f.str("tokenizer.ggml.pre")?,
    };
    let (_, split, ignore_merges) = PRE_TOKENIZERS
        .iter()
        .find(|(n, _, _)| *n == pre_name)
        .ok_or_else(|| {
            let names: Vec<&str> = PRE_TOKENIZERS.iter().map(|p| p.0).collect();
            Error::format(
                &f.path,
                format!(
                    "tokenizer.ggml.pre `{pre_name}` is not supported; supported: {}",
                    names.join(", ")
                ),
            )
        })?;
    let tokens = strings(f, "tokenizer.ggml.tokens")?;
    let merges = strings(f, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match f.opt_array("tokenizer.ggml.token_type")? {
        Some(t) => t.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if !vocab.contains_key(*tok) {
            vocab.insert(tok.to_string(), id.into());
        }
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({"id": id, "content": tok, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false,
                "special": ty == CONTROL}));
        }
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(Error::format(
                &f.path,
                format!("tokenizer.ggml.merges entry `{m}` is not two tokens"),
            )),
        })
        .collect::<Result<_>>()?;
    // A special token's id and text (None when the id is absent or out of the vocabulary).
    let special = |key: &str| -> Result<Option<(u64, &str)>> {
        Ok(f.opt_u64(key)?
            .and_then(|id| Some((id, *tokens.get(id as usize)?))))
    };
    let bos = special("tokenizer.ggml.bos_token_id")?;
    let add_bos = !matches!(
        f.meta.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(false))
    );
    let post_processor = match (bos, add_bos) {
        (Some((id, b)), true) => {
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [id], "tokens": [b]}}})
        }
        _ => Json::Null,
    };
    let tokenizer_json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges},
    });
    let mut cfg = Map::new();
    if let Some((_, b)) = bos {
        cfg.insert("bos_token".into(), b.into());
    }
    if let Some((_, e)) = special("tokenizer.ggml.eos_token_id")? {
        cfg.insert("eos_token".into(), e.into());
    }
    if f.meta.contains_key("tokenizer.chat_template") {
        cfg.insert(
            "chat_template".into(),
            f.str("tokenizer.chat_template")?.into(),
        );
    }
    let bytes = serde_json::to_vec(&tokenizer_json).expect("JSON values serialize");
    Ok(Some((bytes, Json::Object(cfg).to_string())))
}

//! The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`: tokens, token types,
//! merges, special ids, pre-tokenizer name, chat template), rebuilt as the `tokenizer.json` and
//! `tokenizer_config.json` the engine's [`Tokenizer`] reads: byte-level BPE (`gpt2`) and
//! SentencePiece BPE (`llama`).

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

/// Token types: normal, unknown, control (special, never split), user-defined (added).
const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
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
    let tokens = strings(f, "tokenizer.ggml.tokens")?;
    let types: Vec<u64> = match f.opt_array("tokenizer.ggml.token_type")? {
        Some(t) => t.iter().map(|v| v.as_u64().unwrap_or(NORMAL)).collect(),
        None => vec![NORMAL; tokens.len()],
    };
    let type_of = |id: usize| types.get(id).copied().unwrap_or(NORMAL);
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if !vocab.contains_key(*tok) {
            vocab.insert(tok.to_string(), id.into());
        }
        let ty = type_of(id);
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({"id": id, "content": tok, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false,
                "special": ty == CONTROL}));
        }
    }
    let (normalizer, pre_tokenizer, decoder, model) = match model {
        "gpt2" => byte_level_bpe(f, vocab)?,
        "llama" => sentencepiece_bpe(f, &tokens, &type_of, vocab)?,
        other => {
            return Err(Error::format(
                &f.path,
                format!(
                    "tokenizer.ggml.model `{other}` is not supported (byte-level BPE `gpt2` and \
                     SentencePiece BPE `llama` are); put the model's tokenizer.json beside the \
                     GGUF file"
                ),
            ))
        }
    };
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
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
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

/// The normalizer, pre-tokenizer, decoder and model of a tokenizer.json.
type Parts = (Json, Json, Json, Json);

/// Byte-level BPE (`gpt2`): the merges from the metadata, the split of `tokenizer.ggml.pre`.
fn byte_level_bpe(f: &GgufFile, vocab: Map<String, Json>) -> Result<Parts> {
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
    let merges: Vec<Json> = strings(f, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(Error::format(
                &f.path,
                format!("tokenizer.ggml.merges entry `{m}` is not two tokens"),
            )),
        })
        .collect::<Result<_>>()?;
    Ok((
        Json::Null,
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges}),
    ))
}

/// SentencePiece BPE (`llama`): `▁` for spaces and before the text, `<0xXX>` byte fallback, and
/// merges rebuilt from the scores: every split of a piece into two pieces of the vocabulary is
/// a merge, ranked by the merged piece's score (highest first), as SentencePiece applies them.
fn sentencepiece_bpe(
    f: &GgufFile,
    tokens: &[&str],
    type_of: &dyn Fn(usize) -> u64,
    vocab: Map<String, Json>,
) -> Result<Parts> {
    let scores: Vec<f64> = match f.opt_array("tokenizer.ggml.scores")? {
        Some(s) if s.len() == tokens.len() => s.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        Some(s) => {
            return Err(Error::format(
                &f.path,
                format!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    s.len(),
                    tokens.len()
                ),
            ))
        }
        None => {
            return Err(Error::format(
                &f.path,
                "missing metadata `tokenizer.ggml.scores` (a SentencePiece vocabulary needs it)",
            ))
        }
    };
    let id_of = |piece: &str| vocab.get(piece).and_then(Json::as_u64);
    // (score of the merged piece, ids of the two halves, the halves).
    let mut merges: Vec<(f64, u64, u64, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if type_of(id) != NORMAL {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(a), Some(b)) = (id_of(l), id_of(r)) {
                merges.push((scores[id], a, b, l, r));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let merges: Vec<Json> = merges.iter().map(|m| json!([m.3, m.4])).collect();
    let unk = (0..tokens.len())
        .find(|&id| type_of(id) == UNKNOWN)
        .map(|id| tokens[id]);
    Ok((
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
        Json::Null,
        json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        json!({"type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges}),
    ))
}

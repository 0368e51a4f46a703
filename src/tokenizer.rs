//! Text ↔ token ids: `tokenizer.json` through the `tokenizers` crate, chat templates from
//! `tokenizer_config.json` or `chat_template.jinja` rendered with minijinja, and BOS handling
//! that never doubles the BOS (docs/NUMERICS.md §9).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::{files, json};

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    /// The text.
    pub content: String,
    /// An assistant's tool calls (OpenAI's `tool_calls`), for templates that render them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// Instruction budget of one chat-template render (minijinja fuel): a real template spends a
/// few thousand on a long conversation; a runaway loop stops here with an error.
pub const TEMPLATE_FUEL: u64 = 1_000_000;
/// Largest rendered chat prompt in bytes (far above any context window's worth of text).
pub const TEMPLATE_MAX_OUTPUT: usize = 4 << 20;

/// A chat template and the file it came from (named in its errors).
#[derive(Clone)]
struct ChatTemplate {
    source: String,
    origin: &'static str,
}

/// A tokenizer with its chat template and special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const CONFIG: &str = "tokenizer_config.json";

/// A special token given as text or as an `AddedToken` object (`{"content": ...}`).
fn special_token_text(cfg: &Value, key: &str) -> Result<Option<String>> {
    let bad = || {
        Error::json(
            CONFIG,
            format!("`{key}` must be a string or {{\"content\": string}}"),
        )
    };
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(o @ Value::Object(_)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of named templates (the one
/// named `default` is used).
fn config_template(cfg: &Value) -> Result<Option<String>> {
    let bad = |what: &str| Error::json(CONFIG, format!("`chat_template` {what}"));
    match cfg.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            for t in list {
                match (t.get("name"), t.get("template")) {
                    (Some(Value::String(n)), Some(Value::String(src))) => {
                        if n == "default" {
                            return Ok(Some(src.clone()));
                        }
                    }
                    _ => {
                        return Err(bad(
                            "entries must be {\"name\": string, \"template\": string}",
                        ))
                    }
                }
            }
            Ok(None)
        }
        Some(_) => Err(bad("must be a string or a list of named templates")),
    }
}

/// A writer that keeps at most `limit` bytes and fails (remembering why) past it.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    fn error(&self, what: impl std::fmt::Display) -> Error {
        Error::Tokenizer(format!("chat template ({}): {what}", self.origin))
    }

    /// An environment with the template compiled, the Python-compatible methods templates
    /// use, `raise_exception`, and the instruction budget.
    fn environment(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template("chat", &self.source)
            .map_err(|e| self.error(e))?;
        Ok(env)
    }

    /// Renders with the budget and the output cap; either being exceeded is an error naming
    /// the template, never an abort or a hang.
    fn render(&self, ctx: minijinja::Value) -> Result<String> {
        let env = self.environment()?;
        let tpl = env.get_template("chat").map_err(|e| self.error(e))?;
        let mut out = Capped {
            buf: Vec::new(),
            limit: TEMPLATE_MAX_OUTPUT,
            overflowed: false,
        };
        if let Err(e) = tpl.render_captured_to(ctx, &mut out) {
            return Err(if out.overflowed {
                self.error(format!(
                    "the rendered prompt is over the {TEMPLATE_MAX_OUTPUT}-byte limit"
                ))
            } else if e.kind() == minijinja::ErrorKind::OutOfFuel {
                self.error(format!(
                    "rendering took more than its budget of {TEMPLATE_FUEL} template steps"
                ))
            } else {
                self.error(e)
            });
        }
        String::from_utf8(out.buf).map_err(|e| self.error(e))
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`), or returns
    /// `None` when the directory has no tokenizer. Every file is size-checked before reading.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let bytes = files::read_limited(&path, files::TOKENIZER_LIMIT)?;
        let cfg_path = dir.join(CONFIG);
        let cfg = if cfg_path.exists() {
            Some(files::read_text_limited(&cfg_path, files::JSON_LIMIT)?)
        } else {
            None
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(files::read_text_limited(&jinja, files::TEMPLATE_LIMIT)?)
        } else {
            None
        };
        Self::from_parts(&bytes, cfg.as_deref(), chat_template).map(Some)
    }

    /// A tokenizer from the contents of `tokenizer.json`, `tokenizer_config.json` (optional) and
    /// `chat_template.jinja` (optional; it wins over the config's `chat_template`). The chat
    /// template is compiled here, so a broken one fails the load, not the first chat.
    pub fn from_parts(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&str>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        // Checked first: the tokenizers crate panics on some malformed JSON (a truncated
        // decoder section) instead of returning its error.
        json::parse(tokenizer_json).map_err(|e| Error::json("tokenizer.json", e))?;
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::json("tokenizer.json", e.to_string()))?;
        let cfg = match tokenizer_config {
            Some(text) => json::parse(text.as_bytes()).map_err(|e| Error::json(CONFIG, e))?,
            None => Value::Object(Default::default()),
        };
        if !cfg.is_object() {
            return Err(Error::json(CONFIG, "must be a JSON object"));
        }
        let in_config = config_template(&cfg)?;
        let chat_template = match chat_template {
            Some(source) => Some(ChatTemplate {
                source,
                origin: "chat_template.jinja",
            }),
            None => in_config.map(|source| ChatTemplate {
                source,
                origin: "tokenizer_config.json",
            }),
        };
        if let Some(t) = &chat_template {
            t.environment()?;
        }
        Ok(Tokenizer {
            eos_token: special_token_text(&cfg, "eos_token")?,
            bos_token: special_token_text(&cfg, "bos_token")?,
            chat_template,
            inner,
        })
    }

    /// Encodes `text`. With `add_special`, the tokenizer's post-processor adds BOS, except when
    /// the text already starts with it (no double BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let starts_with_bos = self
            .bos_token
            .as_deref()
            .is_some_and(|b| text.starts_with(b));
        let enc = self
            .inner
            .encode(text, add_special && !starts_with_bos)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids` to text.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Every token's bytes as it adds them to a text (what constrained decoding matches
    /// against), `vocab` entries: byte-level BPE symbols mapped back to their bytes,
    /// SentencePiece byte tokens (`<0xNN>`) to their byte and `▁` to a space; special tokens
    /// as `marker` followed by their name; ids the tokenizer lacks are empty.
    pub fn token_bytes(&self, vocab: usize, marker: u8) -> Result<Vec<Vec<u8>>> {
        let decoder = self
            .inner
            .get_decoder()
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .unwrap_or(Value::Null);
        let byte_level = has_decoder(&decoder, "ByteLevel");
        let byte_fallback = has_decoder(&decoder, "ByteFallback");
        let unicode_to_byte = byte_level_chars();
        let specials: std::collections::HashMap<u32, String> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        let bytes_of = |id: u32| -> Vec<u8> {
            if let Some(name) = specials.get(&id) {
                let mut b = vec![marker];
                b.extend_from_slice(name.as_bytes());
                return b;
            }
            let Some(piece) = self.inner.id_to_token(id) else {
                return Vec::new();
            };
            if byte_fallback {
                let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    return vec![b];
                }
            }
            if byte_level {
                let mapped: Option<Vec<u8>> = piece
                    .chars()
                    .map(|c| unicode_to_byte.get(&c).copied())
                    .collect();
                if let Some(b) = mapped {
                    return b;
                }
            }
            piece.replace('\u{2581}', " ").into_bytes()
        };
        Ok((0..vocab as u32).map(bytes_of).collect())
    }

    /// Whether a chat template is available.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages` (within [`TEMPLATE_FUEL`] steps and
    /// [`TEMPLATE_MAX_OUTPUT`] bytes).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.apply_chat_template_with_tools(messages, &[], add_generation_prompt)
    }

    /// [`Self::apply_chat_template`] with function definitions in the template's `tools`
    /// (none when `tools` is empty), as transformers passes them.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Tokenizer("the model has no chat template".into()))?;
        tpl.render(minijinja::context! {
            messages => messages,
            tools => (!tools.is_empty()).then_some(tools),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
    }

    /// Whether the chat template renders function definitions (mentions `tools`).
    pub fn chat_template_takes_tools(&self) -> bool {
        self.chat_template
            .as_ref()
            .is_some_and(|t| t.source.contains("tools"))
    }

    /// Renders and encodes a chat prompt (BOS added only if the template does not emit it).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode_chat_with_tools(messages, &[])
    }

    /// [`Self::encode_chat`] with function definitions for the template.
    pub fn encode_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[Value],
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template_with_tools(messages, tools, true)?;
        self.encode(&text, true)
    }
}

/// Whether a decoder (or one of a sequence's) is of `kind`.
fn has_decoder(d: &Value, kind: &str) -> bool {
    d["type"] == kind
        || d["decoders"]
            .as_array()
            .is_some_and(|ds| ds.iter().any(|d| has_decoder(d, kind)))
}

/// Byte-level BPE's alphabet inverted: the printable character each byte is written as.
/// Printable Latin-1 bytes stand for themselves; the others take the code points from 256 on,
/// in byte order.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).unwrap_or('\u{FFFD}'), b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer_json() -> Vec<u8> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        std::fs::read(dir.join("tokenizer.json")).unwrap()
    }

    fn with_template(tpl: &str) -> Result<Tokenizer> {
        Tokenizer::from_parts(&fixture_tokenizer_json(), None, Some(tpl.into()))
    }

    fn chat(t: &Tokenizer) -> Result<String> {
        t.apply_chat_template(&[ChatMessage::new("user", "hi")], true)
    }

    #[test]
    fn template_bombs_are_clean_errors_naming_the_template() {
        let big = with_template("{{ 'x' * 10**8 }}").unwrap();
        let e = chat(&big).unwrap_err().to_string();
        assert!(
            e.contains("chat_template.jinja") && e.contains("byte limit"),
            "{e}"
        );
        let slow = with_template(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        let e = chat(&slow).unwrap_err().to_string();
        assert!(e.contains("budget"), "{e}");
        assert!(
            t0.elapsed().as_secs() < 30,
            "the budget did not stop the loops"
        );
        let ok = with_template("{% for m in messages %}{{ m.role }}={{ m.content }}{% endfor %}")
            .unwrap();
        assert_eq!(chat(&ok).unwrap(), "user=hi");
    }

    #[test]
    fn a_broken_template_or_config_fails_the_load() {
        let e = with_template("{% for m in messages %}")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("chat template (chat_template.jinja)"), "{e}");
        let json = fixture_tokenizer_json();
        for (cfg, field) in [
            (r#"{"bos_token": 5}"#, "bos_token"),
            (r#"{"eos_token": {"content": 1}}"#, "eos_token"),
            (r#"{"chat_template": 3}"#, "chat_template"),
            (
                r#"{"chat_template": [{"name": "default"}]}"#,
                "chat_template",
            ),
            (r#"{"bos_token": "a", "bos_token": "b"}"#, "duplicate key"),
            ("[]", "JSON object"),
        ] {
            let e = Tokenizer::from_parts(&json, Some(cfg), None)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(CONFIG) && e.contains(field), "{cfg}: {e}");
        }
        let named = r#"{"chat_template": [{"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D{{ messages | length }}"}]}"#;
        let t = Tokenizer::from_parts(&json, Some(named), None).unwrap();
        assert_eq!(chat(&t).unwrap(), "D1");
    }
}

//! Text ↔ token ids: `tokenizer.json` through the `tokenizers` crate, chat templates from
//! `tokenizer_config.json` or `chat_template.jinja` rendered with minijinja, and BOS handling
//! that never doubles the BOS (docs/NUMERICS.md §9).

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with its chat template and special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn special_token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`), or returns
    /// `None` when the directory has no tokenizer.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            Some(std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?)
        } else {
            None
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            None
        };
        Self::from_parts(&bytes, cfg.as_deref(), chat_template).map(Some)
    }

    /// A tokenizer from the contents of `tokenizer.json`, `tokenizer_config.json` (optional) and
    /// `chat_template.jinja` (optional; it wins over the config's `chat_template`).
    pub fn from_parts(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&str>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| Error::json("tokenizer.json", e.to_string()))?;
        let cfg: Value = match tokenizer_config {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| Error::json("tokenizer_config.json", e.to_string()))?,
            None => Value::Null,
        };
        let chat_template = chat_template.or_else(|| {
            cfg.get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        let bos_token = special_token_text(cfg.get("bos_token"));
        Ok(Tokenizer {
            eos_token: special_token_text(cfg.get("eos_token")),
            bos_token,
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

    /// Whether a chat template is available.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("the model has no chat template".into()))?;
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
        env.add_template("chat", tpl)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                })
            })
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }

    /// Renders and encodes a chat prompt (BOS added only if the template does not emit it).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, true)?;
        self.encode(&text, true)
    }
}

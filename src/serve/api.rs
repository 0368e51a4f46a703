//! OpenAI-shaped request and response bodies, and the JSON error every failure returns.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error response: status and an OpenAI-style `{"error": {...}}` body.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, ...).
    pub kind: &'static str,
    /// The offending request field, if any.
    pub param: Option<&'static str>,
    /// Seconds the client should wait (429).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 400 for a bad request field.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            retry_after: None,
        }
    }

    /// Any status with a message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.as_u16(),
            }
        });
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completion prompt: text, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text (or a one-element list of text).
    Text(OneOrMany),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// Sampling and limit fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    /// Model id (must be the served one when given).
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k cut (extension).
    pub top_k: Option<u32>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Stream as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    pub stream_options: Option<StreamOptions>,
    /// Completions per prompt (choices; they share the prompt's KV blocks).
    pub n: Option<u32>,
    /// Log-probabilities of the generated tokens: `true` on chat (with `top_logprobs`
    /// alternatives), the number of alternatives on completions.
    pub logprobs: Option<Value>,
    /// Alternatives per token with chat's `logprobs` (0–20).
    pub top_logprobs: Option<u32>,
    /// Token id (as a string) → bias added to its logit, −100..100.
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// Penalty for tokens already generated (−2..2).
    pub presence_penalty: Option<f32>,
    /// Penalty per time a token was generated (−2..2).
    pub frequency_penalty: Option<f32>,
    /// Completions: the prompt's text before the completion's.
    pub echo: Option<bool>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
    pub response_format: Option<Value>,
    /// A Lark grammar the output must follow (extension).
    pub grammar: Option<String>,
    /// A regular expression the output must match (extension).
    pub regex: Option<String>,
    /// Scheduling priority (extension; higher first).
    pub priority: Option<i32>,
    /// Generate past the context with a sliding window of this many recent positions
    /// (extension; attention sinks + window, as `bitnet generate --window`).
    pub window: Option<usize>,
    /// Attention sinks kept with `window` (extension; default 4).
    pub sinks: Option<usize>,
    /// OpenAI fields this server does not implement: refused with a 400 naming the field
    /// when set to anything but their default, never silently ignored.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

/// Request fields that change what an OpenAI server returns and that this server does not
/// implement (yet).
#[derive(Debug, Deserialize, Default)]
pub struct Unsupported {
    suffix: Option<Value>,
    best_of: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
}

/// Whether `v` is a field's "unset" value: null, false, zero, or empty.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(true) => false,
    }
}

impl Common {
    /// A 400 naming the first unsupported field that is set to something other than its
    /// default.
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let u = &self.unsupported;
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !is_unset(v));
        let named = [
            ("suffix", set(&u.suffix)),
            (
                "best_of",
                set(&u.best_of) && u.best_of != Some(Value::from(1)),
            ),
            ("tools", set(&u.tools)),
            ("functions", set(&u.functions)),
            (
                "tool_choice",
                set(&u.tool_choice)
                    && !matches!(
                        u.tool_choice.as_ref().and_then(Value::as_str),
                        Some("none" | "auto")
                    ),
            ),
            (
                "function_call",
                set(&u.function_call)
                    && !matches!(
                        u.function_call.as_ref().and_then(Value::as_str),
                        Some("none" | "auto")
                    ),
            ),
        ];
        match named.iter().find(|(_, on)| *on) {
            Some((field @ ("tools" | "tool_choice"), _)) => Err(ApiError::invalid(
                Some(field),
                format!("`{field}` belongs to /v1/chat/completions"),
            )),
            Some((field, _)) => Err(ApiError::invalid(
                Some(field),
                format!("`{field}` is not supported by this server; leave it unset"),
            )),
            None => Ok(()),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its text (null only for an assistant message with tool calls).
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant message's tool calls.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// The call a `tool` message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// Message content: a string or a list of text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}]`.
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct Part {
    /// Part type (only `text`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    pub text: Option<String>,
}

impl Content {
    /// The text, or an error for non-text parts.
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Parts(p) => p
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    _ => Err(ApiError::invalid(
                        Some("messages"),
                        format!("content part type `{}` is not supported", p.kind),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Functions the model may call.
    #[serde(default)]
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether a response may hold several calls (default true; false keeps the first).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Everything else.
    #[serde(flatten)]
    pub common: Common,
}

/// `POST /admin/load`.
#[derive(Debug, Deserialize)]
pub struct LoadRequest {
    /// A model directory inside the server's `--models-dir` (a relative path).
    pub model: String,
}

/// Parses a JSON body, turning any failure into a 400 that says what is wrong.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::invalid(None, format!("{what}: {e}"))
    })
}

/// `usage` of a response.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

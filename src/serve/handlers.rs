//! Route handlers and the middleware that authenticates, counts and logs every request.

use std::convert::Infallible;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, MatchedPath, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::api::{self, ApiError, ChatRequest, Common, CompletionRequest, LoadRequest, Prompt};
use super::generate::{Job, Logprob, Piece, Run};
use super::keys::{key_matches, Key, Limited};
use super::tools::{self, Tools};
use super::{load_model, AppState, LoadedModel};
use crate::engine::grammar::GrammarSpec;
use crate::engine::sampler::{SamplingParams, MAX_TOP_LOGPROBS};
use crate::engine::window::SinkWindow;
use crate::tokenizer::ChatMessage;

type AppResult<T> = Result<T, ApiError>;

/// A request body read whole within `--max-body-bytes` and `--body-timeout`.
pub struct Body(pub(super) Bytes);

impl FromRequest<Arc<AppState>> for Body {
    type Rejection = ApiError;

    async fn from_request(req: HttpRequest, state: &Arc<AppState>) -> AppResult<Self> {
        let secs = state.opts.body_timeout;
        match tokio::time::timeout(Duration::from_secs(secs), Bytes::from_request(req, state)).await
        {
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {secs} s"),
            )),
            Ok(Err(e)) => {
                let status = e.status();
                let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "the request body is larger than the server accepts".to_string()
                } else {
                    e.body_text()
                };
                Err(ApiError::new(status, "invalid_request_error", msg))
            }
            Ok(Ok(b)) => Ok(Body(b)),
        }
    }
}

fn ready(state: &AppState) -> AppResult<Arc<LoadedModel>> {
    state.model().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model is still loading",
        )
    })
}

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: u32 = 16;

/// The request's shared fields checked against the model and the server's limits.
struct Plan {
    /// One job per choice (`n`), the same prompt, seeds `seed + i`.
    jobs: Vec<Job>,
    stream: bool,
    include_usage: bool,
    /// Log-probabilities were asked for: shown in every choice.
    logprobs: bool,
    /// Completions' `echo`: the prompt's text, shown before each choice's.
    echo: Option<String>,
    /// Structured output: what every choice's text must match.
    grammar: Option<GrammarSpec>,
    /// The functions the model may call (chat).
    tools: Option<Tools>,
}

/// How many alternatives per token the request's `logprobs` / `top_logprobs` ask for (None:
/// no log-probabilities), read as `kind`'s endpoint defines them.
fn logprobs_wanted(kind: Kind, c: &Common) -> AppResult<Option<usize>> {
    let most = MAX_TOP_LOGPROBS as u64;
    let n = match (kind, &c.logprobs) {
        (_, None | Some(Value::Null) | Some(Value::Bool(false))) => {
            if c.top_logprobs.is_some_and(|n| n > 0) {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    "top_logprobs needs logprobs: true",
                ));
            }
            return Ok(None);
        }
        (Kind::Chat, Some(Value::Bool(true))) => c.top_logprobs.unwrap_or(0) as u64,
        (Kind::Text, Some(Value::Number(n))) if c.top_logprobs.is_none() => {
            n.as_u64().ok_or_else(|| {
                ApiError::invalid(Some("logprobs"), "logprobs must be an integer >= 0")
            })?
        }
        (Kind::Chat, _) => {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs must be true or false (alternatives go in top_logprobs)",
            ))
        }
        (Kind::Text, _) => {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "completions take logprobs as the number of alternatives (no top_logprobs)",
            ))
        }
    };
    if n > most {
        let field = if kind == Kind::Chat {
            "top_logprobs"
        } else {
            "logprobs"
        };
        return Err(ApiError::invalid(
            Some(field),
            format!("{field} must be at most {most}"),
        ));
    }
    Ok(Some(n as usize))
}

/// `logit_bias` as (token id, bias) pairs: ids within the vocabulary, biases in −100..100.
fn logit_bias(c: &Common, vocab: usize) -> AppResult<Vec<(u32, f32)>> {
    let Some(map) = &c.logit_bias else {
        return Ok(Vec::new());
    };
    let bad = |m: String| ApiError::invalid(Some("logit_bias"), m);
    let mut out = Vec::with_capacity(map.len());
    for (k, &b) in map {
        let id: u32 = k
            .parse()
            .map_err(|_| bad(format!("`{k}` is not a token id")))?;
        if id as usize >= vocab {
            return Err(bad(format!(
                "token id {id} is out of range (vocab_size {vocab})"
            )));
        }
        if !(-100.0..=100.0).contains(&b) {
            return Err(bad(format!(
                "the bias of token {id} must be in [-100, 100]"
            )));
        }
        out.push((id, b));
    }
    out.sort_by_key(|p| p.0);
    Ok(out)
}

/// The structured-output request: `response_format` (json_object, json_schema), `grammar`
/// (Lark) or `regex`, at most one of them.
fn grammar_spec(c: &Common) -> AppResult<Option<GrammarSpec>> {
    let bad = |m: &str| ApiError::invalid(Some("response_format"), m.to_string());
    let format = match &c.response_format {
        None | Some(Value::Null) => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(GrammarSpec::JsonObject),
            Some("json_schema") => {
                let schema = f
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| s.is_object() || s.is_boolean())
                    .ok_or_else(|| {
                        bad("json_schema needs {\"json_schema\": {\"schema\": {...}}}")
                    })?;
                Some(GrammarSpec::JsonSchema(schema.clone()))
            }
            _ => return Err(bad("type must be text, json_object or json_schema")),
        },
    };
    let specs: Vec<GrammarSpec> = [
        format,
        c.grammar.clone().map(GrammarSpec::Lark),
        c.regex.clone().map(GrammarSpec::Regex),
    ]
    .into_iter()
    .flatten()
    .collect();
    if specs.len() > 1 {
        return Err(bad(
            "use one of response_format (json), grammar and regex at a time",
        ));
    }
    Ok(specs.into_iter().next())
}

/// Compiles the plan's grammar for its model (on the blocking pool, one per core at a time,
/// like tokenizing) and gives every choice its own copy of the constraint.
async fn attach_grammar(state: &AppState, plan: &mut Plan) -> AppResult<()> {
    let Some(spec) = plan.grammar.take() else {
        return Ok(());
    };
    let Some(model) = plan.jobs.first().map(|j| j.model.clone()) else {
        return Ok(());
    };
    let compiled = on_cpu_pool(state, move || {
        let grammars = model.grammars()?;
        grammars.constraint(&spec).map_err(|e| e.to_string())
    })
    .await?
    .map_err(|e| ApiError::invalid(Some("response_format"), e))?;
    for job in &mut plan.jobs {
        job.constraint = Some(compiled.fork());
    }
    Ok(())
}

fn plan(
    state: &AppState,
    model: Arc<LoadedModel>,
    prompt: Vec<u32>,
    c: Common,
    kind: Kind,
) -> AppResult<Plan> {
    if let Some(m) = &c.model {
        if *m != model.id {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                param: Some("model"),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "the model `{m}` does not exist (this server serves `{}`)",
                        model.id
                    ),
                )
            });
        }
    }
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ApiError::invalid(
            Some("n"),
            format!("n must be in [1, {MAX_CHOICES}]"),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    let logprobs = logprobs_wanted(kind, &c)?;
    let grammar = grammar_spec(&c)?;
    let echo = c.echo.unwrap_or(false);
    if echo && kind == Kind::Chat {
        return Err(ApiError::invalid(
            Some("echo"),
            "echo is a completions field",
        ));
    }
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            Some("echo"),
            "echo with logprobs (the prompt's log-probabilities) is not supported; \
             `bitnet logits --all` gives them",
        ));
    }
    let echo = match (echo, &model.tokenizer) {
        (false, _) => None,
        (true, Some(tok)) => Some(
            tok.decode(&prompt, true)
                .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?,
        ),
        (true, None) => Some(String::new()),
    };
    let logit_bias = logit_bias(&c, model.vocab())?;
    let opts = &state.opts;
    let sink_window = match (c.window, c.sinks) {
        (Some(window), sinks) => {
            let w = SinkWindow {
                sinks: sinks.unwrap_or(4),
                window,
            };
            w.validate(model.context)
                .map_err(|e| ApiError::invalid(Some("window"), e.to_string()))?;
            Some(w)
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                Some("sinks"),
                "sinks needs window (the number of recent positions kept)",
            ))
        }
        (None, None) => None,
    };
    // Under a sink window the prompt runs through the window: up to the server's prompt
    // limit, or 16 contexts.
    let context_limit = match sink_window {
        Some(_) => 16 * model.context,
        None => model.context - 1,
    };
    let max_prompt = if opts.max_prompt_tokens == 0 {
        context_limit
    } else {
        opts.max_prompt_tokens.min(context_limit)
    };
    if prompt.len() > max_prompt {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "the prompt has {} tokens; this server accepts at most {max_prompt}",
                prompt.len()
            ),
        ));
    }
    let room = match sink_window {
        Some(_) => usize::MAX,
        None => model.context - prompt.len(),
    };
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "max_tokens must be at least 1",
            ))
        }
        Some(n) if n as usize > opts.max_tokens_limit => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "max_tokens {n} exceeds this server's limit {}",
                    opts.max_tokens_limit
                ),
            ))
        }
        Some(n) => (n as usize).min(room),
        None => opts.max_tokens_limit.min(room),
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            "temperature must be in [0, 2]",
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), "top_p must be in (0, 1]"));
    }
    let penalty = |v: Option<f32>, name: &'static str| match v.unwrap_or(0.0) {
        p if (-2.0..=2.0).contains(&p) => Ok(p),
        _ => Err(ApiError::invalid(
            Some(name),
            format!("{name} must be in [-2, 2]"),
        )),
    };
    let sampling = SamplingParams {
        temperature,
        top_p,
        top_k: c.top_k.unwrap_or(0) as usize,
        seed: c.seed,
        logit_bias,
        presence_penalty: penalty(c.presence_penalty, "presence_penalty")?,
        frequency_penalty: penalty(c.frequency_penalty, "frequency_penalty")?,
        logprobs,
        ..Default::default()
    };
    let stops = c.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            Some("stop"),
            "stop strings must not be empty",
        ));
    }
    // Every choice on one worker: the later ones share the first one's prompt blocks.
    let worker = model.route();
    let jobs = (0..n as u64)
        .map(|i| Job {
            worker,
            model: model.clone(),
            prompt: prompt.clone(),
            max_tokens,
            sampling: SamplingParams {
                seed: sampling.seed.map(|s| s.wrapping_add(i)),
                ..sampling.clone()
            },
            stops: stops.clone(),
            priority: c.priority.unwrap_or(0),
            sink_window,
            constraint: None,
        })
        .collect();
    Ok(Plan {
        grammar,
        tools: None,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        logprobs: logprobs.is_some(),
        echo,
        jobs,
    })
}

/// What a request's prompt is made from.
enum PromptInput {
    Tokens(Vec<u32>),
    Text(String),
    /// A conversation and the tools it may call.
    Chat(Vec<ChatMessage>, Option<Tools>),
}

fn completion_input(p: Prompt) -> AppResult<PromptInput> {
    match p {
        Prompt::Tokens(ids) => Ok(PromptInput::Tokens(ids)),
        Prompt::Text(t) => {
            let mut v = t.into_vec();
            match (v.pop(), v.is_empty()) {
                (Some(text), true) => Ok(PromptInput::Text(text)),
                _ => Err(ApiError::invalid(
                    Some("prompt"),
                    "send exactly one prompt per request",
                )),
            }
        }
    }
}

fn chat_input(req: &ChatRequest) -> AppResult<PromptInput> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages must not be empty",
        ));
    }
    let tools = tools::parse(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::invalid(
                Some("messages"),
                format!("unknown role `{}`", m.role),
            ));
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        let calls = m.tool_calls.clone().filter(|c| !c.is_null());
        let content = match (&m.content, &calls) {
            (Some(c), _) => c.text()?,
            (None, Some(_)) if role == "assistant" => String::new(),
            (None, _) => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("messages[{i}].content is required"),
                ))
            }
        };
        if calls.is_some() && role != "assistant" {
            return Err(ApiError::invalid(
                Some("messages"),
                format!("messages[{i}]: only assistant messages have tool_calls"),
            ));
        }
        msgs.push(ChatMessage {
            tool_calls: calls,
            tool_call_id: m.tool_call_id.clone(),
            ..ChatMessage::new(role, &content)
        });
    }
    Ok(PromptInput::Chat(msgs, tools))
}

/// Runs CPU-heavy request work (tokenizing, template rendering, grammar compiles) on the
/// blocking pool, at most one per core at a time. The turn moves into the task: a client that
/// hangs up does not free it while the work still runs.
async fn on_cpu_pool<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> T + Send + 'static,
) -> AppResult<T> {
    let turn = state
        .cpu_work
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| engine_error(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        work()
    })
    .await
    .map_err(|e| engine_error(e.to_string()))
}

/// The prompt's token ids. Rendering the chat template and tokenizing run on the blocking
/// pool, at most one per core at a time, so long prompts never hold up the async workers.
async fn prompt_tokens(
    state: &AppState,
    model: &Arc<LoadedModel>,
    input: PromptInput,
) -> AppResult<Vec<u32>> {
    let (text, param) = match input {
        PromptInput::Tokens(ids) => return Ok(ids),
        PromptInput::Text(t) => (Ok(t), "prompt"),
        PromptInput::Chat(m, tools) => (Err((m, tools)), "messages"),
    };
    let tok = model.tokenizer.clone().ok_or_else(|| {
        ApiError::invalid(
            Some("prompt"),
            "this model has no tokenizer.json: send the prompt as token ids",
        )
    })?;
    on_cpu_pool(state, move || match text {
        Ok(t) => tok.encode(&t, true),
        Err((mut messages, tools)) => {
            let native = tok.chat_template_takes_tools();
            tools::prepare(&mut messages, tools.as_ref(), native);
            let defs = match &tools {
                Some(t) if native && t.active() => t.defs.as_slice(),
                _ => &[],
            };
            tok.encode_chat_with_tools(&messages, defs)
        }
    })
    .await?
    .map_err(|e| ApiError::invalid(Some(param), e.to_string()))
}

/// Chat or text completion chunk/response bodies.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Kind {
    Text,
    Chat,
}

struct Shape {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
}

/// One choice's tokens' log-probabilities as the endpoint shows them; `offset` is the
/// completion text's length in characters before these tokens (completions' `text_offset`).
fn logprobs_json(kind: Kind, lps: &[Logprob], offset: &mut usize) -> Value {
    let bytes = |t: &str| t.as_bytes().to_vec();
    match kind {
        Kind::Chat => json!({
            "content": lps.iter().map(|l| json!({
                "token": l.token,
                "logprob": l.logprob,
                "bytes": bytes(&l.token),
                "top_logprobs": l.top.iter().map(|(t, lp)| json!({
                    "token": t, "logprob": lp, "bytes": bytes(t),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "refusal": null,
        }),
        Kind::Text => {
            let mut offsets = Vec::with_capacity(lps.len());
            for l in lps {
                offsets.push(*offset);
                *offset += l.token.chars().count();
            }
            json!({
                "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                // Tokens whose texts are equal keep the likelier one's entry.
                "top_logprobs": lps.iter().map(|l| {
                    let mut m = serde_json::Map::new();
                    for (t, lp) in &l.top {
                        m.entry(t.clone()).or_insert(json!(lp));
                    }
                    m
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// What one chunk of a stream says about one choice.
struct Delta<'a> {
    index: usize,
    text: Option<&'a str>,
    finish: Option<&'a str>,
    /// The chat stream's first chunk of this choice (it carries the role).
    first: bool,
    logprobs: Option<Value>,
}

impl Shape {
    fn object(&self, whole: bool) -> &'static str {
        match (self.kind, whole) {
            (Kind::Chat, true) => "chat.completion",
            (Kind::Chat, false) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn chunk(&self, d: Delta) -> Value {
        let lp = d.logprobs.unwrap_or(Value::Null);
        let choice = match self.kind {
            Kind::Text => json!({
                "index": d.index, "text": d.text.unwrap_or(""), "logprobs": lp, "finish_reason": d.finish,
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if d.first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = d.text {
                    delta.insert("content".into(), json!(t));
                }
                json!({ "index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })
    }

    fn choice(&self, index: usize, c: &Choice, logprobs: bool, tools: Option<&Tools>) -> Value {
        let lp = if logprobs {
            logprobs_json(self.kind, &c.logprobs, &mut 0)
        } else {
            Value::Null
        };
        match (self.kind, tools) {
            (Kind::Text, _) => json!({
                "index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish,
            }),
            (Kind::Chat, None) => json!({
                "index": index,
                "message": { "role": "assistant", "content": c.text },
                "logprobs": lp,
                "finish_reason": c.finish,
            }),
            (Kind::Chat, Some(t)) => {
                let (content, calls) = t.read_calls(&c.text);
                let mut message = json!({ "role": "assistant", "content": content });
                let mut finish = c.finish;
                if !calls.is_empty() {
                    message["tool_calls"] = tools::calls_json(&self.id, index, &calls);
                    finish = "tool_calls";
                }
                json!({ "index": index, "message": message, "logprobs": lp, "finish_reason": finish })
            }
        }
    }

    /// A streamed choice's text read for tool calls at its end: one chunk with its content
    /// and calls (the finish chunk follows).
    fn tool_chunk(
        &self,
        index: usize,
        text: &str,
        tools: &Tools,
        logprobs: Option<Value>,
    ) -> (Value, &'static str) {
        let (content, calls) = tools.read_calls(text);
        let mut delta = serde_json::Map::new();
        if let Some(c) = content {
            delta.insert("content".into(), json!(c));
        }
        if !calls.is_empty() {
            delta.insert(
                "tool_calls".into(),
                tools::calls_json(&self.id, index, &calls),
            );
        }
        let choice =
            json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": null });
        let chunk = json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        (chunk, if calls.is_empty() { "" } else { "tool_calls" })
    }

    fn whole(
        &self,
        choices: &[Choice],
        logprobs: bool,
        tools: Option<&Tools>,
        usage: Value,
    ) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices.iter().enumerate().map(|(i, c)| self.choice(i, c, logprobs, tools)).collect::<Vec<_>>(),
            "usage": usage,
        })
    }
}

/// One choice of a whole (not streamed) response.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<Logprob>,
    finish: &'static str,
}

fn engine_error(e: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e)
}

/// Starts every choice's job: all are queued before any runs far (the later ones reuse the
/// first one's prompt blocks), and dropping the runs cancels them.
fn start_runs(state: &Arc<AppState>, jobs: Vec<Job>) -> AppResult<Vec<Run>> {
    jobs.into_iter().map(|j| Run::start(state, j)).collect()
}

/// The pieces of all `runs` as they come, tagged with their choice's index.
fn merged(
    runs: Vec<Run>,
) -> impl futures_util::Stream<Item = (usize, Result<Piece, String>)> + Send + Unpin {
    futures_util::stream::select_all(runs.into_iter().enumerate().map(|(i, run)| {
        Box::pin(futures_util::stream::unfold(run, move |mut r| async move {
            r.next().await.map(|p| ((i, p), r))
        }))
    }))
}

/// The API key a `/v1/*` request authenticated with (put in its extensions by [`observe`]).
#[derive(Clone)]
pub struct KeyRef(Arc<Key>);

impl KeyRef {
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.0.spec.name
    }
}

/// A request's tokens charged to its key's tokens-per-minute limit: its prompt and every
/// choice's `max_tokens` up front; what the choices did not generate is given back when the
/// request ends, however it ends, and the tokens it used are counted in the key's metrics.
pub(super) struct TokenCharge {
    key: Arc<Key>,
    used: prometheus::IntCounter,
    prompt: u64,
    budget: u64,
    completion: u64,
}

impl TokenCharge {
    pub(super) fn generated(&mut self, n: usize) {
        self.completion += n as u64;
    }
}

impl Drop for TokenCharge {
    fn drop(&mut self) {
        self.key
            .give_back_tokens(self.budget.saturating_sub(self.completion));
        self.used.inc_by(self.prompt + self.completion);
    }
}

/// A 429 (or, for a request larger than the key's whole minute, a 400) for `key`'s limit.
fn limited(state: &AppState, key: &Key, l: Limited) -> ApiError {
    let name = &key.spec.name;
    let (limit, retry, message) = match l {
        Limited::Requests(s) => (
            "requests",
            s,
            format!(
                "API key `{name}` is over its limit of {} requests per minute",
                key.spec.requests_per_minute.unwrap_or(0)
            ),
        ),
        Limited::Tokens(s) => (
            "tokens",
            s,
            format!(
                "API key `{name}` is over its limit of {} tokens per minute",
                key.spec.tokens_per_minute.unwrap_or(0)
            ),
        ),
        Limited::TooLarge { need, limit } => {
            return ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "the request needs {need} tokens (prompt + max_tokens × n) but API key \
                     `{name}` may use {limit} per minute"
                ),
            )
        }
    };
    state
        .metrics
        .rate_limited
        .with_label_values(&[name.as_str(), limit])
        .inc();
    ApiError {
        retry_after: Some(retry),
        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
    }
}

/// Lets a planned request run, or refuses it: the breaker sheds it while the engine is behind
/// (503), its key's tokens-per-minute limit may refuse it (429).
fn admit(state: &AppState, key: Option<&KeyRef>, plan: &Plan) -> AppResult<Option<TokenCharge>> {
    let Some(job) = plan.jobs.first() else {
        return Ok(None);
    };
    if let Err(shed) = state.breaker.admit(&job.model.stats()) {
        state.metrics.shed.inc();
        return Err(ApiError {
            retry_after: Some(shed.retry_after),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("the server is overloaded ({}); retry later", shed.reason),
            )
        });
    }
    let Some(KeyRef(key)) = key else {
        return Ok(None);
    };
    let prompt = job.prompt.len() as u64;
    let budget = job.max_tokens as u64 * plan.jobs.len() as u64;
    key.take_tokens(prompt + budget)
        .map_err(|l| limited(state, key, l))?;
    Ok(Some(TokenCharge {
        key: key.clone(),
        used: state
            .metrics
            .key_tokens
            .with_label_values(&[key.spec.name.as_str()]),
        prompt,
        budget,
        completion: 0,
    }))
}

/// The response shape of a `kind` request on `plan`'s model.
fn shape(state: &AppState, kind: Kind, plan: &Plan) -> AppResult<Shape> {
    let Some(model) = plan.jobs.first().map(|j| j.model.id.clone()) else {
        return Err(engine_error("a request without choices".into()));
    };
    Ok(Shape {
        kind,
        id: state.new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model,
        created: super::now_s(),
    })
}

/// Runs `plan` to its end and answers with the whole response body.
async fn whole(
    state: &Arc<AppState>,
    kind: Kind,
    plan: Plan,
    mut charge: Option<TokenCharge>,
) -> AppResult<Value> {
    use futures_util::StreamExt;
    let shape = shape(state, kind, &plan)?;
    let echo = plan.echo.unwrap_or_default();
    let mut choices: Vec<Choice> = (0..plan.jobs.len())
        .map(|_| Choice {
            text: echo.clone(),
            ..Default::default()
        })
        .collect();
    let mut pieces = merged(start_runs(state, plan.jobs)?);
    let (mut prompt, mut completion) = (0, 0);
    while let Some((i, p)) = pieces.next().await {
        match p.map_err(engine_error)? {
            Piece::Text(t, lps) => {
                choices[i].text.push_str(&t);
                choices[i].logprobs.extend(lps);
            }
            Piece::End {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                choices[i].finish = finish;
                prompt = prompt_tokens;
                completion += completion_tokens;
                if let Some(c) = &mut charge {
                    c.generated(completion_tokens);
                }
            }
        }
    }
    if choices.iter().any(|c| c.finish.is_empty()) {
        return Err(engine_error("generation ended without a result".into()));
    }
    let usage = api::usage(prompt, completion);
    Ok(shape.whole(&choices, plan.logprobs, plan.tools.as_ref(), usage))
}

async fn respond(
    state: Arc<AppState>,
    kind: Kind,
    plan: Plan,
    mut charge: Option<TokenCharge>,
) -> AppResult<Response> {
    use futures_util::StreamExt;
    if !plan.stream {
        return Ok(Json(whole(&state, kind, plan, charge).await?).into_response());
    }
    let shape = shape(&state, kind, &plan)?;
    let n = plan.jobs.len();
    let echo = plan.echo.unwrap_or_default();
    let mut pieces = merged(start_runs(&state, plan.jobs)?);
    let (mut prompt, mut completion) = (0, 0);
    let (include_usage, logprobs) = (plan.include_usage, plan.logprobs);
    let tools = plan.tools;
    // With tools, each choice's text is held until its end and read for calls.
    let mut held: Vec<(String, Vec<Logprob>)> = vec![Default::default(); n];
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        // Every choice opens with its role (chat) or the echoed prompt (completions).
        for index in 0..n {
            let opening = match kind {
                Kind::Chat => Some(""),
                Kind::Text => Some(echo.as_str()).filter(|e| !e.is_empty()),
            };
            let Some(text) = opening else { continue };
            let d = Delta {
                index,
                text: Some(text),
                finish: None,
                first: true,
                logprobs: None,
            };
            if tx.send(send(shape.chunk(d))).await.is_err() {
                return;
            }
        }
        let mut offsets = vec![echo.chars().count(); n];
        loop {
            let p = tokio::select! {
                p = pieces.next() => p,
                _ = tx.closed() => return,
            };
            let ev = match p {
                None => break,
                Some((index, Ok(Piece::Text(t, lps)))) if tools.is_some() => {
                    held[index].0.push_str(&t);
                    held[index].1.extend(lps);
                    continue;
                }
                Some((index, Ok(Piece::Text(t, lps)))) => send(shape.chunk(Delta {
                    index,
                    text: Some(&t),
                    finish: None,
                    first: false,
                    logprobs: logprobs.then(|| logprobs_json(kind, &lps, &mut offsets[index])),
                })),
                Some((
                    index,
                    Ok(Piece::End {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    }),
                )) => {
                    prompt = prompt_tokens;
                    completion += completion_tokens;
                    if let Some(c) = &mut charge {
                        c.generated(completion_tokens);
                    }
                    let mut finish = finish;
                    if let Some(t) = &tools {
                        let (text, lps) = std::mem::take(&mut held[index]);
                        let lp = logprobs.then(|| logprobs_json(kind, &lps, &mut 0));
                        let (chunk, called) = shape.tool_chunk(index, &text, t, lp);
                        if tx.send(send(chunk)).await.is_err() {
                            return;
                        }
                        if !called.is_empty() {
                            finish = called;
                        }
                    }
                    send(shape.chunk(Delta {
                        index,
                        text: None,
                        finish: Some(finish),
                        first: false,
                        logprobs: None,
                    }))
                }
                Some((_, Err(e))) => {
                    send(json!({ "error": { "message": e, "type": "server_error" } }))
                }
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        if include_usage {
            let usage = shape.usage_chunk(api::usage(prompt, completion));
            if tx.send(send(usage)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A completions (`Kind::Text`) or chat request body: its prompt input and shared fields.
fn parse_request(kind: Kind, body: &[u8]) -> AppResult<(PromptInput, Common)> {
    match kind {
        Kind::Text => {
            let req: CompletionRequest = api::parse(body)?;
            Ok((completion_input(req.prompt)?, req.common))
        }
        Kind::Chat => {
            let mut req: ChatRequest = api::parse(body)?;
            let input = chat_input(&req)?;
            Ok((input, std::mem::take(&mut req.common)))
        }
    }
}

/// A parsed request checked and planned against the serving model: the one path of HTTP,
/// WebSocket and batch requests.
async fn planned(
    state: &Arc<AppState>,
    kind: Kind,
    input: PromptInput,
    common: Common,
) -> AppResult<Plan> {
    common.refuse_unsupported()?;
    let model = ready(state)?;
    let tools = match &input {
        PromptInput::Chat(_, t) => t.clone().filter(Tools::active),
        _ => None,
    };
    let prompt = prompt_tokens(state, &model, input).await?;
    let mut p = plan(state, model, prompt, common, kind)?;
    if let Some(g) = tools.as_ref().and_then(Tools::grammar) {
        if p.grammar.is_some() {
            return Err(ApiError::invalid(
                Some("tool_choice"),
                "a forced tool call and response_format, grammar or regex cannot be combined",
            ));
        }
        p.grammar = Some(g);
    }
    p.tools = tools;
    attach_grammar(state, &mut p).await?;
    Ok(p)
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    Body(b): Body,
) -> AppResult<Response> {
    let (input, common) = parse_request(Kind::Text, &b)?;
    let p = planned(&state, Kind::Text, input, common).await?;
    let charge = admit(&state, key.as_deref(), &p)?;
    respond(state, Kind::Text, p, charge).await
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    Body(b): Body,
) -> AppResult<Response> {
    let (input, common) = parse_request(Kind::Chat, &b)?;
    let p = planned(&state, Kind::Chat, input, common).await?;
    let charge = admit(&state, key.as_deref(), &p)?;
    respond(state, Kind::Chat, p, charge).await
}

/// A request another front end (gRPC) started.
pub(super) struct Started {
    /// The response id.
    pub id: String,
    /// The model's id.
    pub model: String,
    /// The pieces of its one choice.
    pub pieces: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Piece, String>> + Send>>,
    /// Its tokens charged to its key.
    pub charge: Option<TokenCharge>,
}

/// A request of another front end (gRPC) with bearer token `bearer`: `body` as `kind`'s HTTP
/// endpoint reads it, authenticated, checked, planned and admitted exactly as over HTTP, and
/// started (one choice).
pub(super) async fn start_request(
    state: &Arc<AppState>,
    kind: Kind,
    body: &[u8],
    bearer: &str,
) -> AppResult<Started> {
    use futures_util::StreamExt;
    let key = authenticate(state, bearer)?;
    let (input, common) = parse_request(kind, body)?;
    let p = planned(state, kind, input, common).await?;
    let charge = admit(state, key.as_ref(), &p)?;
    let shape = shape(state, kind, &p)?;
    let pieces = merged(start_runs(state, p.jobs)?).map(|(_, p)| p);
    Ok(Started {
        id: shape.id,
        model: shape.model,
        pieces: Box::pin(pieces),
        charge,
    })
}

/// The API key `bearer` names (None when the server has no keys), its requests-per-minute
/// limit taken; 401 for a missing or wrong key.
fn authenticate(state: &AppState, bearer: &str) -> AppResult<Option<KeyRef>> {
    if state.keys.is_empty() {
        return Ok(None);
    }
    let key = find_key(&state.keys, bearer).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key (authorization: Bearer KEY)",
        )
    })?;
    key.take_request().map_err(|l| limited(state, &key, l))?;
    Ok(Some(KeyRef(key)))
}

/// One request of a batch (`/v1/batches`): `body` for `kind`'s endpoint, run whole at
/// `priority` (below interactive requests), its tokens charged to the batch owner's key (429
/// while over its limit: the runner retries); the response body as that endpoint would
/// answer it.
pub(super) async fn batch_request(
    state: &Arc<AppState>,
    kind: Kind,
    body: &[u8],
    priority: i32,
    owner: Option<&str>,
) -> AppResult<Value> {
    let (input, common) = parse_request(kind, body)?;
    if common.stream == Some(true) {
        return Err(ApiError::invalid(
            Some("stream"),
            "a batch request cannot stream",
        ));
    }
    let mut p = planned(state, kind, input, common).await?;
    for j in &mut p.jobs {
        j.priority = priority;
    }
    let key = owner.and_then(|name| state.keys.iter().find(|k| k.spec.name == name));
    let charge = admit(state, key.cloned().map(KeyRef).as_ref(), &p)?;
    whole(state, kind, p, charge).await
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> AppResult<Json<Value>> {
    let m = ready(&state)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{ "id": m.id, "object": "model", "created": m.created, "owned_by": "bitnet-inference" }],
    })))
}

/// `GET /health`: 200 when serving, 503 while loading or draining.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
            .into_response();
    }
    match state.model() {
        Some(m) => Json(json!({ "status": "ok", "model": m.id })).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "loading" })),
        )
            .into_response(),
    }
}

/// `GET /metrics` (Prometheus text format).
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = state.model();
    // The accept loop holds one permit while it waits for the next client.
    let open = (state.connection_cap - state.connections.available_permits()).saturating_sub(1);
    state.metrics.connections_open.set(open as i64);
    state
        .metrics
        .connections_limit
        .set(state.connection_cap as i64);
    state
        .metrics
        .breaker_open
        .set(state.breaker.is_open() as i64);
    let stats = m.as_ref().map(|m| m.stats());
    let workers: Vec<(&str, &crate::batch::scheduler::SchedulerStats)> = m
        .iter()
        .flat_map(|m| m.workers.iter())
        .map(|w| (w.name.as_str(), &**w.sched.stats()))
        .collect();
    let text = state.metrics.render(stats.as_ref(), &workers);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /openapi.json`.
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// The model directory `name` inside the models root, or a 404 that reads the same whether
/// the name is outside the root, absent, or not a directory (nothing is revealed about paths
/// outside it).
fn model_in_root(root: &Path, name: &str) -> AppResult<PathBuf> {
    let not_found = || ApiError {
        param: Some("model"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no model `{name}` in the server's models directory"),
        )
    };
    let rel = Path::new(name);
    let plain = !name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(not_found());
    }
    let dir = root.join(rel).canonicalize().map_err(|_| not_found())?;
    if !dir.starts_with(root) || !dir.is_dir() {
        return Err(not_found());
    }
    Ok(dir)
}

/// Clears the one-load-at-a-time flag when a load ends, however it ends.
struct LoadTurn(Arc<AppState>);

impl Drop for LoadTurn {
    fn drop(&mut self) {
        self.0.loading.store(false, Ordering::Release);
    }
}

/// `POST /admin/load` `{"model": NAME}` (admin key only): loads the directory NAME of the
/// models directory and switches new requests to it once ready; in-flight requests finish on
/// the old model; a failed load leaves the old one serving. One load runs at a time, to its
/// end even when the client hangs up.
pub async fn admin_load(
    State(state): State<Arc<AppState>>,
    Body(b): Body,
) -> AppResult<Json<Value>> {
    let req: LoadRequest = api::parse(&b)?;
    let root = state.models_root.clone().ok_or_else(admin_disabled)?;
    let dir = model_in_root(&root, &req.model)?;
    if state.loading.swap(true, Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "another model load is in progress",
        ));
    }
    let turn = LoadTurn(state.clone());
    let id = tokio::task::spawn_blocking(move || {
        let st = &turn.0;
        let loaded = load_model(&dir, &st.opts)?;
        let id = loaded.id.clone();
        tracing::info!(model = %id, "model swapped in");
        st.set_model(Arc::new(loaded));
        Ok::<_, crate::error::Error>(id)
    })
    .await
    .map_err(|e| engine_error(e.to_string()))?
    .map_err(|e| ApiError::invalid(Some("model"), e.to_string()))?;
    Ok(Json(json!({ "status": "ok", "model": id })))
}

fn admin_disabled() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_error",
        "the admin endpoints are disabled (the operator starts the server with --admin-key and --models-dir)",
    )
}

/// Unknown routes: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
    )
}

/// `GET /v1/ws`: send a chat (`messages`) or completion (`prompt`) request as a text frame;
/// the reply is the same chunks as SSE streaming, one per frame, then
/// `{"done": true, "finish_reason", "usage"}`. Requests on one socket run one after another.
pub async fn websocket(
    State(state): State<Arc<AppState>>,
    key: Option<Extension<KeyRef>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> AppResult<Response> {
    let key = key.map(|Extension(k)| k);
    let ws = ws.map_err(|e| ApiError::new(e.status(), "invalid_request_error", e.body_text()))?;
    // The socket outlives its HTTP connection: it holds a connection permit of its own.
    let permit = state
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server has reached its connection limit",
            )
        })?;
    let most = state.opts.max_body_bytes;
    let ws = ws.max_message_size(most).max_frame_size(most);
    Ok(ws.on_upgrade(move |socket| async move {
        ws_session(state, socket, key).await;
        drop(permit);
    }))
}

async fn ws_request(state: &Arc<AppState>, text: &str) -> AppResult<(Kind, Plan)> {
    let v: Value = api::parse(text.as_bytes())?;
    let kind = if v.get("messages").is_some() {
        Kind::Chat
    } else {
        Kind::Text
    };
    let (input, common) = parse_request(kind, text.as_bytes())?;
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            Some("n"),
            "a WebSocket request streams one choice (n = 1); use HTTP for more",
        ));
    }
    let p = planned(state, kind, input, common).await?;
    if p.tools.is_some() {
        return Err(ApiError::invalid(
            Some("tools"),
            "tool calls are answered over HTTP, not the WebSocket",
        ));
    }
    Ok((kind, p))
}

/// Serves requests on one socket until it closes, errs, or stays silent for
/// `--ws-idle-timeout` seconds between requests.
async fn ws_session(state: Arc<AppState>, mut socket: WebSocket, key: Option<KeyRef>) {
    let idle = Duration::from_secs(state.opts.ws_idle_timeout.max(1));
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(idle, socket.recv()).await {
        let text = match msg {
            WsMessage::Text(t) => t.to_string(),
            WsMessage::Close(_) => break,
            _ => continue,
        };
        let frame = |v: Value| WsMessage::Text(v.to_string().into());
        let err = |e: ApiError| json!({ "error": { "message": e.message, "type": e.kind, "code": e.status.as_u16() } });
        let started = ws_request(&state, &text)
            .await
            .and_then(|(kind, mut plan)| {
                let charge = admit(&state, key.as_ref(), &plan)?;
                let job = plan
                    .jobs
                    .pop()
                    .ok_or_else(|| engine_error("no choice".into()))?;
                let shape = Shape {
                    kind,
                    id: state.new_id("ws"),
                    model: job.model.id.clone(),
                    created: super::now_s(),
                };
                let run = Run::start(&state, job)?;
                Ok((shape, plan.logprobs, plan.echo, run, charge))
            });
        let (shape, logprobs, echo, mut run, mut charge) = match started {
            Ok(x) => x,
            Err(e) => {
                if socket.send(frame(err(e))).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut first = true;
        let mut echo = echo.unwrap_or_default();
        let mut offset = echo.chars().count();
        while let Some(p) = run.next().await {
            let v = match p {
                Ok(Piece::Text(t, lps)) => {
                    let text = std::mem::take(&mut echo) + &t;
                    let c = shape.chunk(Delta {
                        index: 0,
                        text: Some(&text),
                        finish: None,
                        first,
                        logprobs: logprobs.then(|| logprobs_json(shape.kind, &lps, &mut offset)),
                    });
                    first = false;
                    c
                }
                Ok(Piece::End {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    if let Some(c) = &mut charge {
                        c.generated(completion_tokens);
                    }
                    json!({
                    "done": true,
                    "finish_reason": finish,
                    "usage": api::usage(prompt_tokens, completion_tokens),
                    })
                }
                Err(e) => json!({ "error": { "message": e, "type": "server_error" } }),
            };
            if socket.send(frame(v)).await.is_err() {
                return;
            }
        }
    }
}

fn bearer(req: &HttpRequest) -> &str {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// Gives an error response that has no JSON body (axum's 405, a WebSocket handshake
/// rejection, ...) the OpenAI-style JSON error body every other error has.
fn json_error_body(resp: Response, method: &axum::http::Method, path: &str) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        format!("method {method} is not allowed on {path}")
    } else {
        status.canonical_reason().unwrap_or("error").to_string()
    };
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let mut out = ApiError::new(status, kind, message).into_response();
    if let Some(allow) = resp.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// The key among `keys` that `given` is, comparing with every key in constant time (how long
/// it takes says nothing about which matched, or how much of one).
fn find_key<'a>(keys: &'a [Arc<Key>], given: &str) -> Option<&'a Arc<Key>> {
    let mut found = None;
    for k in keys {
        if key_matches(given.as_bytes(), k.spec.key.as_bytes()) {
            found = Some(k);
        }
    }
    found
}

/// The request's id: the client's `x-request-id` when it is 1–64 of `[A-Za-z0-9._-]`, else a
/// fresh one.
fn request_id(state: &AppState, req: &HttpRequest) -> String {
    let given = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    match given {
        Some(id) => id.to_string(),
        None => state.new_id("req"),
    }
}

/// Authenticates `/v1/*` (with one of the API keys, when any is set; the key's
/// requests-per-minute limit applies) and `/admin/*` (always, with the admin key; without one
/// the admin endpoints are off), then counts the request by endpoint, status and key, tags the
/// response with its `x-request-id`, and writes its access-log line.
pub async fn observe(
    State(state): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    mut req: HttpRequest,
    next: Next,
) -> Response {
    let t0 = Instant::now();
    let endpoint = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let id = request_id(&state, &req);
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key (Authorization: Bearer KEY)",
        )
        .into_response()
    };
    let mut key_name = None;
    let resp = if path.starts_with("/admin/") {
        match state.opts.admin_key.as_deref() {
            None => admin_disabled().into_response(),
            Some(k) if key_matches(bearer(&req).as_bytes(), k.as_bytes()) => next.run(req).await,
            Some(_) => unauthorized(),
        }
    } else if path.starts_with("/v1/") && !state.keys.is_empty() {
        match find_key(&state.keys, bearer(&req)).cloned() {
            None => unauthorized(),
            Some(key) => {
                key_name = Some(key.spec.name.clone());
                match key.take_request() {
                    Err(l) => limited(&state, &key, l).into_response(),
                    Ok(()) => {
                        req.extensions_mut().insert(KeyRef(key));
                        next.run(req).await
                    }
                }
            }
        }
    } else {
        next.run(req).await
    };
    let mut resp = json_error_body(resp, &method, &path);
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status();
    let m = &state.metrics;
    m.requests
        .with_label_values(&[endpoint.as_str(), status.as_str()])
        .inc();
    if let Some(k) = &key_name {
        m.key_requests
            .with_label_values(&[k.as_str(), status.as_str()])
            .inc();
    }
    tracing::info!(
        request_id = %id,
        key = key_name.as_deref().unwrap_or("-"),
        %method,
        path,
        status = status.as_u16(),
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    resp
}

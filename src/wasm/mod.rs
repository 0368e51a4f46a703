//! The WebAssembly API (feature `wasm`, target wasm32-unknown-unknown) behind the npm package
//! `bitnet-inference` (`npm/`): load a checkpoint from bytes, then generate token by token.
//!
//! The JS wrapper in `npm/src` is the public API; this layer is deliberately small and
//! string/array typed: options and results cross as JSON text. Every fallible call returns
//! an error (a rejected promise or a thrown `Error` with a clear message) instead of
//! panicking; a panic that still happens is recorded by the hook installed at start-up and
//! can be read with `takePanicMessage()`.
//!
//! Generation is a state machine driven from JS: `start(prompt, options)` then `step()` until
//! `done`. Each `step()` returns a promise, so the WebGPU backend can await its readback
//! (`mapAsync`) and the JS side can stop, abort or yield to the event loop between tokens.

mod selftest;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use wasm_bindgen::prelude::*;

#[cfg(feature = "gpu")]
use crate::backend::DeviceSteps;
use crate::backend::{Backend, LogitRows, PREFILL_CHUNK};
use crate::config::{GenerationConfig, ModelConfig};
use crate::cpu::{CpuBackend, CpuCache, CpuOptions};
#[cfg(feature = "gpu")]
use crate::engine::forward::queue_greedy_step_with;
use crate::engine::forward::{forward, forward_argmax};
use crate::engine::grammar::{Constraint, GrammarSpec, Grammars};
use crate::engine::sampler::SamplingParams;
use crate::engine::session::{check_prompt, GenerateOptions, Session, Want};
use crate::engine::window::{SinkWindow, Sliding};
use crate::error::{Error, Result};
#[cfg(feature = "gpu")]
use crate::gpu::{GpuBackend, GpuCache, GpuContext, GpuOptions};
use crate::load::{InMemoryFiles, ModelFiles};
use crate::time::Instant;
use crate::tokenizer::{ChatMessage, Tokenizer};

pub use selftest::kernel_self_test;
/// `initThreadPool(n)` (threaded module): starts the Web Worker pool the CPU team runs on.
#[cfg(feature = "wasm-threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Installs the panic hook (runs when the module is instantiated).
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        // One line: "bitnet-inference: panicked at <file:line:col>: <message>".
        let msg = format!("bitnet-inference: {}", info.to_string().replace('\n', " "));
        if let Ok(mut p) = PANIC.lock() {
            *p = Some(msg);
        }
    }));
    // llguidance wraps its work in a panic hook of its own, installed on first use. Here a
    // panic aborts without unwinding, so the thread counts as panicking ever after, and
    // installing a hook then panics: install it now, on top of ours, while nothing has.
    let _ = llguidance::panic_utils::catch_unwind(|| Ok(()));
}

/// The message of the last panic (then cleared), if any: the wrapper turns the trap that
/// follows a panic into an error carrying this text.
#[wasm_bindgen(js_name = takePanicMessage)]
pub fn take_panic_message() -> Option<String> {
    PANIC.lock().ok()?.take()
}

/// Panics on purpose (tests check that a panic reaches JS as an Error with its message).
#[doc(hidden)]
#[wasm_bindgen(js_name = __panicForTests)]
pub fn panic_for_tests() {
    panic!("test panic");
}

/// The engine's version.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Whether this build includes the WebGPU backend.
#[wasm_bindgen(js_name = hasWebGpuBackend)]
pub fn has_webgpu_backend() -> bool {
    cfg!(feature = "gpu")
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn req(msg: impl Into<String>) -> Error {
    Error::Request(msg.into())
}

/// Whether `navigator.gpu` exists (false under Node, where wgpu's web backend would trap).
#[cfg(feature = "gpu")]
fn navigator_has_gpu() -> bool {
    let g = js_sys::global();
    js_sys::Reflect::get(&g, &"navigator".into())
        .ok()
        .filter(|n| n.is_object())
        .and_then(|n| js_sys::Reflect::get(&n, &"gpu".into()).ok())
        .is_some_and(|gpu| gpu.is_object())
}

/// Collects the files of a checkpoint, then builds a [`Model`] on a backend.
#[wasm_bindgen]
#[derive(Default)]
pub struct ModelBuilder {
    files: InMemoryFiles,
}

fn utf8(name: &str, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|_| Error::json(name, "the file is not UTF-8 text"))
}

#[wasm_bindgen]
impl ModelBuilder {
    /// An empty builder.
    #[wasm_bindgen(constructor)]
    pub fn new() -> ModelBuilder {
        ModelBuilder::default()
    }

    /// Adds one file of the checkpoint by its name: `config.json`, `tokenizer.json`,
    /// `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`, or a
    /// `*.safetensors` file (all shards of a sharded checkpoint). Other names are an error.
    #[wasm_bindgen(js_name = addFile)]
    pub fn add_file(&mut self, name: &str, bytes: Vec<u8>) -> std::result::Result<(), JsError> {
        let base = name.rsplit('/').next().unwrap_or(name);
        let f = &mut self.files;
        match base {
            "config.json" => f.config = Some(utf8(base, bytes).map_err(js_err)?),
            "tokenizer.json" => f.tokenizer = Some(bytes),
            "tokenizer_config.json" => {
                f.tokenizer_config = Some(utf8(base, bytes).map_err(js_err)?)
            }
            "chat_template.jinja" => f.chat_template = Some(utf8(base, bytes).map_err(js_err)?),
            "generation_config.json" => {
                f.generation_config = Some(utf8(base, bytes).map_err(js_err)?)
            }
            n if n.ends_with(".safetensors") => {
                f.safetensors.push((n.to_string(), Arc::new(bytes)))
            }
            other => {
                return Err(js_err(format!(
                    "unexpected model file `{other}` (expected config.json, tokenizer.json, \
                     tokenizer_config.json, chat_template.jinja, generation_config.json or \
                     *.safetensors)"
                )))
            }
        }
        Ok(())
    }

    /// Builds the model (a promise of [`Model`]). `options` is JSON:
    /// `{"backend": "auto"|"webgpu"|"cpu", "contextLength": n, "subgroups": bool,
    /// "kernels": "auto"|"simd128"|"scalar", "maxBindingBytes": n}` (kernels: the CPU path's;
    /// maxBindingBytes caps WebGPU embedding/head shards below the device limit, for tests).
    /// `auto` tries WebGPU where `navigator.gpu` exists and falls back to the CPU, saying why
    /// in the model's info (`fallbackReason`). The builder is emptied.
    pub fn build(&mut self, options: &str) -> js_sys::Promise {
        let parts = std::mem::take(self);
        let options = options.to_string();
        wasm_bindgen_futures::future_to_promise(async move {
            match build(parts, &options).await {
                Ok(m) => Ok(JsValue::from(m)),
                Err(e) => Err(js_err(e).into()),
            }
        })
    }
}

enum Engine {
    Cpu {
        b: Box<CpuBackend>,
        cache: CpuCache,
    },
    #[cfg(feature = "gpu")]
    Gpu {
        b: Box<GpuBackend>,
        cache: GpuCache,
    },
}

/// What a step must produce.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Produce {
    Nothing,
    Argmax,
    Logits,
}

impl Engine {
    fn config(&self) -> &ModelConfig {
        match self {
            Engine::Cpu { b, .. } => b.config(),
            #[cfg(feature = "gpu")]
            Engine::Gpu { b, .. } => b.config(),
        }
    }

    /// Runs `tokens` at `pos..`; returns the argmax (Produce::Argmax) or fills `logits` with the
    /// last position's logits (Produce::Logits).
    async fn step(
        &mut self,
        tokens: &[u32],
        pos: usize,
        want: Produce,
        logits: &mut Vec<f32>,
    ) -> Result<Option<u32>> {
        match self {
            Engine::Cpu { b, cache } => match want {
                Produce::Nothing => {
                    forward(&mut **b, cache, tokens, pos, LogitRows::None, logits, None)?;
                    Ok(None)
                }
                Produce::Argmax => Ok(Some(forward_argmax(
                    &mut **b, cache, tokens, pos, logits, None,
                )?)),
                Produce::Logits => {
                    forward(&mut **b, cache, tokens, pos, LogitRows::Last, logits, None)?;
                    Ok(None)
                }
            },
            #[cfg(feature = "gpu")]
            Engine::Gpu { b, cache } => {
                crate::engine::forward::layers(&mut **b, cache, tokens, pos, None)?;
                match want {
                    Produce::Nothing => {
                        b.submit_web()?;
                        Ok(None)
                    }
                    Produce::Argmax => Ok(Some(b.argmax_last_async().await?)),
                    Produce::Logits => {
                        b.logits_last_async(logits).await?;
                        Ok(None)
                    }
                }
            }
        }
    }

    /// The cache slot of a step of `t` tokens from context token `i`, making room for it under
    /// a sink window.
    fn slot(&mut self, slide: &mut Option<Sliding>, i: usize, t: usize) -> Result<usize> {
        let Some(sl) = slide else {
            return Ok(i);
        };
        match self {
            Engine::Cpu { b, cache } => sl.make_room(&mut **b, cache, &[0], i, t),
            #[cfg(feature = "gpu")]
            Engine::Gpu { b, cache } => sl.make_room(&mut **b, cache, &[0], i, t),
        }
    }

    /// A greedy decode step for `token` at context token `i`: its argmax and whether the step after it is
    /// queued. On WebGPU the step (unless `queued` already) and, with `room`, the next one,
    /// fed on the device by this one's argmax, are submitted before this one's token is read,
    /// so the device never waits for the readback; the CPU just runs it.
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
    async fn greedy(
        &mut self,
        token: u32,
        i: usize,
        queued: bool,
        room: bool,
        slide: &mut Option<Sliding>,
        scratch: &mut Vec<f32>,
    ) -> Result<(u32, bool)> {
        #[cfg(feature = "gpu")]
        if matches!(self, Engine::Gpu { .. }) {
            if !queued {
                let pos = self.slot(slide, i, 1)?;
                if let Engine::Gpu { b, cache } = self {
                    queue_greedy_step_with(
                        &mut **b,
                        cache,
                        (Some(token), &[]),
                        pos,
                        None,
                        web_steps,
                    )?;
                }
            }
            let next_pos = if room {
                Some(self.slot(slide, i + 1, 1)?)
            } else {
                None
            };
            if let Engine::Gpu { b, cache } = self {
                let next = match next_pos {
                    Some(pos) => {
                        queue_greedy_step_with(&mut **b, cache, (None, &[]), pos, None, web_steps)?
                    }
                    None => false,
                };
                return Ok((b.read_queued_argmax_async().await?, next));
            }
        }
        let pos = self.slot(slide, i, 1)?;
        let t = self.step(&[token], pos, Produce::Argmax, scratch).await?;
        Ok((
            t.ok_or_else(|| Error::Backend("the step gave no argmax".into()))?,
            false,
        ))
    }

    /// Runs a whole prompt from position 0 in chunks (evicting under a sink window); the last
    /// chunk produces `want`.
    async fn prefill(
        &mut self,
        prompt: &[u32],
        want: Produce,
        slide: &mut Option<Sliding>,
        logits: &mut Vec<f32>,
    ) -> Result<Option<u32>> {
        let n = prompt.len();
        let step = slide
            .as_ref()
            .map_or(PREFILL_CHUNK, |sl| PREFILL_CHUNK.min(sl.spec().max_step()));
        let mut r = None;
        for (i, chunk) in prompt.chunks(step).enumerate() {
            let last = (i + 1) * step >= n;
            let w = if last { want } else { Produce::Nothing };
            let pos = self.slot(slide, i * step, chunk.len())?;
            r = self.step(chunk, pos, w, logits).await?;
        }
        Ok(r)
    }
}

/// A generation in progress and its timing.
struct Run {
    s: Session,
    /// The sink window's state (None without one).
    slide: Option<Sliding>,
    /// Whether the device step for the token about to be emitted is already queued (greedy
    /// decoding on WebGPU queues the next step before reading this one's token).
    queued: bool,
    started: Instant,
    decode_started: Option<Instant>,
    prefill_s: f64,
}

struct Inner {
    engine: Engine,
    tokenizer: Option<Rc<Tokenizer>>,
    /// The structured-output grammar compiler, built on first use.
    grammars: Option<Grammars>,
    gen: GenerationConfig,
    context: usize,
    session: Option<Run>,
    logits: Vec<f32>,
}

/// A loaded model on one backend, with its KV cache and at most one generation in progress.
/// The tokenizer and the info live outside the engine's cell: text calls never wait for (or
/// fail on) a step in flight.
#[wasm_bindgen]
pub struct Model {
    inner: Rc<RefCell<Inner>>,
    tokenizer: Option<Rc<Tokenizer>>,
    info: String,
}

/// The CPU team's size from the `threads` load option: 1 in the single-threaded module; in the
/// threaded one at most the Web Worker pool that `initThreadPool` started (the team keeps
/// `threads - 1` of its workers, and the loading needs one more).
fn cpu_threads(opts: &Value) -> Result<usize> {
    let want = match &opts["threads"] {
        Value::Null => 1,
        v => v
            .as_u64()
            .filter(|&n| (1..=256).contains(&n))
            .ok_or_else(|| req(format!("load option `threads`: expected 1 to 256, got {v}")))?
            as usize,
    };
    #[cfg(feature = "wasm-threads")]
    let pool = rayon::current_num_threads();
    #[cfg(not(feature = "wasm-threads"))]
    let pool = 1;
    if want > pool {
        return Err(req(format!(
            "load option `threads`: {want} asked, but this module has {pool} (the threaded \
             module needs a cross-origin-isolated page and a Web Worker)"
        )));
    }
    Ok(want)
}

async fn build(p: ModelBuilder, options: &str) -> Result<Model> {
    let opts: Value = if options.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(options).map_err(|e| req(format!("load options: {e}")))?
    };
    let backend = opts["backend"].as_str().unwrap_or("auto").to_string();
    if !["auto", "webgpu", "cpu"].contains(&backend.as_str()) {
        return Err(req(format!(
            "unknown backend `{backend}` (expected auto, webgpu or cpu)"
        )));
    }
    let file_bytes: usize = p.files.safetensors.iter().map(|f| f.1.len()).sum();
    let mut phases = crate::time::Phases::new();
    let ModelFiles {
        weights: w,
        tokenizer,
        generation: gen,
    } = ModelFiles::from_buffers(p.files)?;
    phases.mark("parse files");
    let config = w.config.clone();
    let context = match opts["contextLength"].as_u64() {
        Some(0) => return Err(req("contextLength must be at least 1")),
        Some(n) => (n as usize).min(config.max_position_embeddings),
        None => config.max_position_embeddings.min(2048),
    };

    let mut fallback: Option<String> = None;
    #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
    let mut engine: Option<Engine> = None;
    if backend != "cpu" {
        #[cfg(feature = "gpu")]
        {
            let r: Result<Engine> = async {
                if !navigator_has_gpu() {
                    return Err(Error::Backend(
                        "WebGPU is not available here (no navigator.gpu)".into(),
                    ));
                }
                let ctx = GpuContext::new_web(opts["subgroups"].as_bool().unwrap_or(true)).await?;
                let gopts = GpuOptions {
                    max_step: PREFILL_CHUNK,
                    subgroups: ctx.desc.subgroup_size.is_some(),
                    max_binding_bytes: opts["maxBindingBytes"].as_u64(),
                    ..GpuOptions::default()
                };
                phases.mark("webgpu device");
                let b = GpuBackend::load_web(ctx, &w, &gopts).await?;
                phases.mark("webgpu backend (errors checked)");
                let cache = b.new_cache(context)?;
                phases.mark("kv cache");
                Ok(Engine::Gpu {
                    b: Box::new(b),
                    cache,
                })
            }
            .await;
            match r {
                Ok(e) => engine = Some(e),
                Err(e) if backend == "auto" => fallback = Some(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            let msg = "this build has no WebGPU backend".to_string();
            if backend == "webgpu" {
                return Err(Error::Backend(msg));
            }
            fallback = Some(msg);
        }
    }
    let engine = match engine {
        Some(e) => e,
        None => {
            check_wasm_memory(&w, context)?;
            let kernels = match opts["kernels"].as_str() {
                Some(name) => Some(crate::cpu::kernels::Kernels::by_name(name)?),
                None => None,
            };
            let b = CpuBackend::load(
                &w,
                &CpuOptions {
                    threads: cpu_threads(&opts)?,
                    kernels,
                    ..Default::default()
                },
            )?;
            let cache = b.new_cache(context)?;
            Engine::Cpu {
                b: Box::new(b),
                cache,
            }
        }
    };
    drop(w);
    let c = engine.config();
    let (name, device, kernels, threads, decode_bytes) = match &engine {
        Engine::Cpu { b, .. } => (
            "cpu",
            b.describe(),
            Some(b.kernels().name()),
            Some(b.threads()),
            b.decode_bytes_per_token(),
        ),
        #[cfg(feature = "gpu")]
        Engine::Gpu { b, .. } => (
            "webgpu",
            b.adapter().to_string(),
            None,
            None,
            b.decode_bytes_per_token(),
        ),
    };
    let info = json!({
        "backend": name,
        "device": device,
        "kernels": kernels,
        "threads": threads,
        "fallbackReason": fallback,
        "contextLength": context,
        "fileBytes": file_bytes,
        "decodeBytesPerToken": decode_bytes,
        "hasTokenizer": tokenizer.is_some(),
        "hasChatTemplate": tokenizer.as_ref().is_some_and(|t| t.has_chat_template()),
        "eosTokenIds": gen.eos_token_ids,
        "bosTokenId": gen.bos_token_id,
        "config": c.to_json(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let tokenizer = tokenizer.map(Rc::new);
    Ok(Model {
        inner: Rc::new(RefCell::new(Inner {
            engine,
            tokenizer: tokenizer.clone(),
            grammars: None,
            gen,
            context,
            session: None,
            logits: Vec::new(),
        })),
        tokenizer,
        info: info.to_string(),
    })
}

/// Fails with a clear message when the CPU path's repacked weights and KV cache cannot fit
/// in what is left of wasm32's 4 GiB of memory (the checkpoint's bytes are already in it).
fn check_wasm_memory(w: &crate::format::Weights, context: usize) -> Result<()> {
    use crate::cpu::packed::padded_cols;
    let c = &w.config;
    let ternary: u64 = w
        .layers
        .iter()
        .flat_map(|l| l.linears())
        .map(|m| (m.rows * padded_cols(m.cols) / 4) as u64)
        .sum();
    let kv = 2 * (c.num_layers * c.kv_dim() * context * 4) as u64;
    let need = ternary + kv;
    let used = (core::arch::wasm32::memory_size(0) as u64) << 16;
    let left = (4u64 << 30).saturating_sub(used);
    if need > left {
        return Err(Error::Backend(format!(
            "the model does not fit in WebAssembly memory: the CPU backend needs {} MB more \
             (repacked weights {} MB + KV cache {} MB for {context} positions) but only {} MB \
             remain of the 4 GiB limit ({} MB hold the checkpoint); use WebGPU, a shorter \
             contextLength or a smaller model",
            need >> 20,
            ternary >> 20,
            kv >> 20,
            left >> 20,
            used >> 20
        )));
    }
    Ok(())
}

fn busy() -> Error {
    req("the model is busy with another call (await the previous step first)")
}

impl Inner {
    /// The constraint of a `jsonSchema` (object), `grammar` (Lark) or `regex` option, if any.
    fn constraint(&mut self, o: &Value, eos: &[u32]) -> Result<Option<Constraint>> {
        let spec = match (&o["jsonSchema"], &o["grammar"], &o["regex"]) {
            (Value::Null, Value::Null, Value::Null) => return Ok(None),
            (s @ Value::Object(_), Value::Null, Value::Null) => GrammarSpec::JsonSchema(s.clone()),
            (Value::Null, Value::String(g), Value::Null) => GrammarSpec::Lark(g.clone()),
            (Value::Null, Value::Null, Value::String(r)) => GrammarSpec::Regex(r.clone()),
            _ => {
                return Err(req(
                    "use one of jsonSchema (an object), grammar (Lark text) and regex (text)",
                ))
            }
        };
        if self.grammars.is_none() {
            let tok = self
                .tokenizer
                .as_deref()
                .ok_or_else(|| req("structured output needs the model's tokenizer.json"))?;
            let eos = *eos
                .first()
                .ok_or_else(|| req("structured output needs an end-of-sequence token"))?;
            let vocab = self.engine.config().vocab_size;
            self.grammars = Some(Grammars::new(Arc::new(tok.clone()), vocab, eos)?);
        }
        match &self.grammars {
            Some(g) => g.constraint(&spec).map(Some),
            None => Ok(None),
        }
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        check_prompt(prompt, self.context, self.engine.config().vocab_size)
    }

    fn start(&mut self, prompt: Vec<u32>, options: &str) -> Result<()> {
        self.check_prompt(&prompt)?;
        let o: Value = if options.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(options).map_err(|e| req(format!("generate options: {e}")))?
        };
        let f32_of = |k: &str, d: f32| o[k].as_f64().map_or(d, |v| v as f32);
        let sampling = SamplingParams {
            temperature: f32_of("temperature", 0.0),
            top_k: o["topK"].as_u64().unwrap_or(0) as usize,
            top_p: f32_of("topP", 1.0),
            min_p: f32_of("minP", 0.0),
            repetition_penalty: f32_of("repetitionPenalty", 1.0),
            seed: o["seed"].as_u64(),
            presence_penalty: f32_of("presencePenalty", 0.0),
            frequency_penalty: f32_of("frequencyPenalty", 0.0),
            logit_bias: match &o["logitBias"] {
                Value::Null => Vec::new(),
                Value::Object(m) => m
                    .iter()
                    .map(|(k, v)| match (k.parse::<u32>(), v.as_f64()) {
                        (Ok(id), Some(b)) => Ok((id, b as f32)),
                        _ => Err(req(format!(
                            "logitBias: `{k}` must be a token id with a numeric bias"
                        ))),
                    })
                    .collect::<Result<_>>()?,
                _ => return Err(req("logitBias must be an object of token id -> bias")),
            },
            ..Default::default()
        };
        let stop_strings = match &o["stop"] {
            Value::Null => vec![],
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| req("stop must be a string or an array of strings"))
                })
                .collect::<Result<_>>()?,
            _ => return Err(req("stop must be a string or an array of strings")),
        };
        let eos_token_ids = match o["eosTokenIds"].as_array() {
            Some(a) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| req("eosTokenIds must be token ids"))?,
            None => self.gen.eos_token_ids.clone(),
        };
        let eos_for_grammar = eos_token_ids.clone();
        let sink_window = match (o["window"].as_u64(), &o["sinks"]) {
            (Some(window), sinks) => Some(SinkWindow {
                window: window as usize,
                sinks: match sinks {
                    Value::Null => 4,
                    v => v
                        .as_u64()
                        .ok_or_else(|| req("sinks must be a number of positions"))?
                        as usize,
                },
            }),
            (None, Value::Null) => None,
            (None, _) => return Err(req("sinks needs window (a number of positions)")),
        };
        let opts = GenerateOptions {
            max_tokens: o["maxTokens"].as_u64().unwrap_or(128) as usize,
            sampling,
            eos_token_ids,
            ignore_eos: o["ignoreEos"].as_bool().unwrap_or(false),
            stop_strings,
            sink_window,
            constraint: self.constraint(&o, &eos_for_grammar)?,
        };
        let vocab = self.engine.config().vocab_size;
        // Under a sink window only the token limit ends a generation.
        let context = match sink_window {
            Some(w) => {
                w.validate(self.context)?;
                usize::MAX
            }
            None => self.context,
        };
        self.session = Some(Run {
            slide: sink_window.map(Sliding::new),
            s: Session::new(&prompt, &opts, context, vocab)?,
            queued: false,
            started: Instant::now(),
            decode_started: None,
            prefill_s: 0.0,
        });
        Ok(())
    }

    async fn step(&mut self) -> Result<Value> {
        let Inner {
            engine,
            tokenizer,
            session,
            logits,
            ..
        } = self;
        let r = session
            .as_mut()
            .ok_or_else(|| req("no generation in progress (call start first)"))?;
        if r.s.finish().is_some() {
            return Ok(step_result(r, None, ""));
        }
        // Top-k candidates are selected from the logits here (the browser reads them back).
        let want = match r.s.want() {
            Want::Argmax => Produce::Argmax,
            Want::TopK(..) | Want::Logits => Produce::Logits,
        };
        // The prompt runs first; decoding starts once it has.
        let next = if r.decode_started.is_none() {
            let out = engine
                .prefill(r.s.context(), want, &mut r.slide, logits)
                .await?;
            r.prefill_s = r.started.elapsed().as_secs_f64();
            r.decode_started = Some(Instant::now());
            out
        } else {
            let ctx = r.s.context();
            let (last, i) = (ctx[ctx.len() - 1], ctx.len() - 1);
            match want {
                Produce::Argmax => {
                    let (queued, room) = (r.queued, r.s.room_for(1));
                    let (tok, next_queued) = engine
                        .greedy(last, i, queued, room, &mut r.slide, logits)
                        .await?;
                    r.queued = next_queued;
                    Some(tok)
                }
                _ => {
                    let pos = engine.slot(&mut r.slide, i, 1)?;
                    engine.step(&[last], pos, want, logits).await?
                }
            }
        };
        let tok = match next {
            Some(t) => t,
            None => r.s.pick(logits),
        };
        let e = r.s.accept(tok, tokenizer.as_deref())?;
        Ok(step_result(r, e.token, &e.text))
    }
}

/// The WebGPU backend's device steps (it offers none through [`Backend::device`], which
/// promises blocking reads; queuing steps needs none).
#[cfg(feature = "gpu")]
fn web_steps(b: &mut GpuBackend) -> Option<&mut dyn DeviceSteps> {
    Some(b)
}

fn step_result(r: &Run, token: Option<u32>, text: &str) -> Value {
    let decode_s = r.decode_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let s = &r.s;
    json!({
        "token": token,
        "text": text,
        "done": s.finish().is_some(),
        "finishReason": s.finish().map(|f| f.as_str()),
        "promptTokens": s.prompt_len(),
        "completionTokens": s.tokens().len(),
        "prefillSeconds": r.prefill_s,
        "decodeSeconds": decode_s,
    })
}

// The step futures hold the model's RefCell borrow across their awaits on purpose: a second
// call meanwhile gets a "busy" error from `try_borrow*` (never a panic), and the JS wrapper
// queues its calls so that this does not happen.
#[allow(clippy::await_holding_refcell_ref)]
#[wasm_bindgen]
impl Model {
    /// The backend, device, configuration and tokens of the model, as JSON.
    pub fn info(&self) -> String {
        self.info.clone()
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_deref()
            .ok_or_else(|| req("the model was loaded without tokenizer.json"))
    }

    /// Encodes text (with BOS etc. when `add_special`, never doubling a BOS in the text).
    pub fn encode(&self, text: &str, add_special: bool) -> std::result::Result<Vec<u32>, JsError> {
        self.tokenizer()
            .and_then(|t| t.encode(text, add_special))
            .map_err(js_err)
    }

    /// Decodes token ids to text.
    pub fn decode(
        &self,
        ids: Vec<u32>,
        skip_special: bool,
    ) -> std::result::Result<String, JsError> {
        self.tokenizer()
            .and_then(|t| t.decode(&ids, skip_special))
            .map_err(js_err)
    }

    /// Renders the chat template for `messages` (JSON `[{role, content}]`).
    #[wasm_bindgen(js_name = applyChatTemplate)]
    pub fn apply_chat_template(
        &self,
        messages: &str,
        add_generation_prompt: bool,
    ) -> std::result::Result<String, JsError> {
        let m = parse_messages(messages).map_err(js_err)?;
        self.tokenizer()
            .and_then(|t| t.apply_chat_template(&m, add_generation_prompt))
            .map_err(js_err)
    }

    /// Renders and encodes a chat prompt (`messages` as JSON `[{role, content}]`).
    #[wasm_bindgen(js_name = encodeChat)]
    pub fn encode_chat(&self, messages: &str) -> std::result::Result<Vec<u32>, JsError> {
        let m = parse_messages(messages).map_err(js_err)?;
        self.tokenizer()
            .and_then(|t| t.encode_chat(&m))
            .map_err(js_err)
    }

    /// Starts a generation from `prompt` (token ids), replacing any unfinished one. `options`
    /// is JSON: `maxTokens`, `temperature`, `topK`, `topP`, `minP`, `repetitionPenalty`,
    /// `seed`, `stop` (string or strings), `ignoreEos`, `eosTokenIds`.
    pub fn start(&self, prompt: Vec<u32>, options: &str) -> std::result::Result<(), JsError> {
        let mut i = self.inner.try_borrow_mut().map_err(|_| js_err(busy()))?;
        i.start(prompt, options).map_err(js_err)
    }

    /// Produces the next token: a promise of JSON `{token, text, done, finishReason,
    /// promptTokens, completionTokens, prefillSeconds, decodeSeconds}`. `token` is null when
    /// the step ended the generation without a token (EOS).
    pub fn step(&self) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut i = inner.try_borrow_mut().map_err(|_| js_err(busy()))?;
            match i.step().await {
                Ok(v) => Ok(JsValue::from_str(&v.to_string())),
                Err(e) => {
                    i.session = None;
                    Err(js_err(e).into())
                }
            }
        })
    }

    /// Ends the generation in progress (if any) as cancelled.
    pub fn cancel(&self) -> std::result::Result<(), JsError> {
        let mut i = self.inner.try_borrow_mut().map_err(|_| js_err(busy()))?;
        if let Some(r) = i.session.as_mut() {
            r.s.cancel();
        }
        Ok(())
    }

    /// The logits of the last position of `prompt` run from position 0 (a promise of a
    /// Float32Array of vocab_size values). Ends any generation in progress.
    #[wasm_bindgen(js_name = promptLogits)]
    pub fn prompt_logits(&self, prompt: Vec<u32>) -> js_sys::Promise {
        let inner = self.inner.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let mut i = inner.try_borrow_mut().map_err(|_| js_err(busy()))?;
            i.check_prompt(&prompt).map_err(js_err)?;
            i.session = None;
            let Inner { engine, logits, .. } = &mut *i;
            engine
                .prefill(&prompt, Produce::Logits, &mut None, logits)
                .await
                .map_err(js_err)?;
            Ok(js_sys::Float32Array::from(&logits[..]).into())
        })
    }
}

fn parse_messages(text: &str) -> Result<Vec<ChatMessage>> {
    let v: Value = serde_json::from_str(text).map_err(|e| req(format!("messages: {e}")))?;
    let a = v
        .as_array()
        .ok_or_else(|| req("messages must be an array of {role, content}"))?;
    a.iter()
        .enumerate()
        .map(|(n, m)| {
            let role = m["role"].as_str();
            let content = match &m["content"] {
                Value::String(s) => Some(s.clone()),
                // OpenAI content parts: the text parts, concatenated.
                Value::Array(parts) => Some(
                    parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .collect::<Vec<_>>()
                        .join(""),
                ),
                _ => None,
            };
            match (role, content) {
                (Some(r), Some(c)) => Ok(ChatMessage::new(r, &c)),
                _ => Err(req(format!(
                    "messages[{n}] needs a string `role` and a string `content`"
                ))),
            }
        })
        .collect()
}

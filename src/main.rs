//! The `bitnet` command-line tool: generate, chat, logits, perplexity, bench, synth and serve.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use bitnet_inference::config::{GenerationConfig, Preset};
use bitnet_inference::cpu::head::HeadMode;
use bitnet_inference::cpu::kernels::Kernels;
use bitnet_inference::cpu::{CpuBackend, CpuOptions};
use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::engine::model::{Backend, KvDtype};
use bitnet_inference::engine::sampler::SamplingParams;
use bitnet_inference::format;
use bitnet_inference::tokenizer::{ChatMessage, Tokenizer};

/// BitNet b1.58 inference engine.
#[derive(Parser)]
#[command(name = "bitnet", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Chat interactively using the model's chat template.
    Chat(ChatArgs),
    /// Print the logits of a token sequence as JSON.
    Logits(LogitsArgs),
    /// Perplexity of a text file, scored in windows of the model's context.
    Perplexity(PerplexityArgs),
    /// Measure load time, prefill and decode speed, bandwidth and memory.
    Bench(BenchArgs),
    /// Write a random model of a preset shape in the HF packed format.
    Synth(SynthArgs),
    /// Serve the model over an OpenAI-compatible HTTP API with continuous batching (CPU).
    #[cfg(feature = "server")]
    Serve(ServeArgs),
    /// Load-test a server: requests/s, tokens/s, TTFT and per-token latency per concurrency.
    #[cfg(feature = "server")]
    BenchServe(BenchServeArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BackendKind {
    Auto,
    Cpu,
    Gpu,
}

impl BackendKind {
    /// The command-line spelling.
    fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        }
    }
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = "models/kjv-fortunes")]
    model: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// CPU kernel set: auto, or one of scalar, avx2, avx512vnni, neon.
    #[arg(long, default_value = "auto")]
    kernels: String,
    /// Head storage: native (checkpoint dtype) or int8 (per-row scales).
    #[arg(long, default_value = "native")]
    head: String,
    /// KV cache element type: f32, or f16 (GPU backend: half the cache memory and reads).
    #[arg(long, default_value = "f32")]
    kv: String,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long)]
    tokens: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Do not stop at EOS tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Top-p.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long)]
    tokens: String,
    /// Logits of every position instead of the last.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text file to score (tokenized with BOS, like a prompt).
    #[arg(long)]
    file: PathBuf,
    /// Tokens per window (0 = the model's context, max_position_embeddings).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Distance between window starts (0 = the window: non-overlapping windows).
    #[arg(long, default_value_t = 0)]
    stride: usize,
    /// Score only the first N tokens of the file (0 = all).
    #[arg(long, default_value_t = 0)]
    max_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also measure the memory read bandwidth (machine_gb_s): the host's, or on the GPU backend
    /// the device's, with its copy bandwidth and the ternary GEMV's (gpu_bandwidth).
    #[arg(long)]
    membw: bool,
    /// Report the time per op of the decode steps.
    #[arg(long)]
    profile: bool,
    /// Also measure batched decode: this many sequences of --prompt-len tokens decoding
    /// --gen tokens together over a paged KV cache (reported as batch_decode_tok_s).
    #[arg(long, default_value_t = 0)]
    batch: usize,
}

#[derive(Args)]
struct SynthArgs {
    /// Shape: 2b4t or tiny.
    #[arg(long)]
    shape: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[cfg(feature = "server")]
#[derive(Args)]
struct ServeArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = "models/kjv-fortunes")]
    model: PathBuf,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed as `listening on http://...`).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* and /admin/*.
    #[arg(long, env = "BITNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allowed CORS origin (repeat; `*` for any).
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Backend: auto takes a real GPU when wgpu finds one, else the CPU.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Head storage: native (exact) or int8 (per-row scales; faster for large batches).
    #[arg(long, default_value = "native")]
    head: String,
    /// KV pool element type: f32, or f16 (GPU backend: twice the positions per MiB).
    #[arg(long, default_value = "f32")]
    kv: String,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Most requests waiting; beyond it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Most token rows per step (decode rows plus prompt chunks).
    #[arg(long, default_value_t = 256)]
    step_tokens: usize,
    /// KV cache pool size in MiB (paged in blocks shared by all sequences).
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: usize,
    /// Positions per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Largest max_tokens a request may ask for (also the default).
    #[arg(long, default_value_t = 4096)]
    max_tokens_limit: usize,
    /// Longest prompt in tokens (0 = the model's context).
    #[arg(long, default_value_t = 0)]
    max_prompt_tokens: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

#[cfg(feature = "server")]
#[derive(Args)]
struct BenchServeArgs {
    /// A running server (`http://host:port`); without it a server is started on --model.
    #[arg(long)]
    url: Option<String>,
    /// Model directory for the server started here.
    #[arg(long, default_value = "models/kjv-fortunes")]
    model: PathBuf,
    /// Backend of the server started here.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Worker threads of the server started here (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Head storage of the server started here: native or int8.
    #[arg(long, default_value = "native")]
    head: String,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests: usize,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "server")]
fn bench_serve(a: BenchServeArgs) -> Result<()> {
    use bitnet_inference::serve::bench::run_level;
    use std::io::BufRead;
    let mut child = None;
    let base = match &a.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let most = a.clients.iter().copied().max().unwrap_or(1);
            let mut c = std::process::Command::new(std::env::current_exe()?)
                .args(["serve", "--port", "0", "--max-batch", &most.to_string()])
                .args(["--max-queue", &(most * 2).to_string(), "--head", &a.head])
                .args(["--threads", &a.threads.to_string()])
                .args(["--backend", a.backend.name()])
                .arg("--model")
                .arg(&a.model)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let mut line = String::new();
            if let Some(out) = c.stdout.take() {
                std::io::BufReader::new(out).read_line(&mut line)?;
            }
            let base = line
                .trim()
                .strip_prefix("listening on ")
                .context("the server did not start")?
                .to_string();
            child = Some(c);
            let t0 = std::time::Instant::now();
            while ureq::get(&format!("{base}/health")).call().is_err() {
                if t0.elapsed() > Duration::from_secs(300) {
                    bail!("the server did not become ready");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            base
        }
    };
    let mut results = Vec::new();
    for &c in &a.clients {
        let r = run_level(&base, c, a.requests, a.prompt_len, a.max_tokens)?;
        if !a.json {
            println!(
                "clients {:>3}: {:>6.2} req/s  {:>8.1} tok/s  TTFT p50 {:>8.1} ms p99 {:>8.1} ms  \
                 per-token p50 {:>7.1} ms p99 {:>7.1} ms",
                r.clients,
                r.requests_per_s,
                r.tokens_per_s,
                r.ttft_ms_p50,
                r.ttft_ms_p99,
                r.tpot_ms_p50,
                r.tpot_ms_p99
            );
        }
        results.push(r);
    }
    if a.json {
        println!("{}", serde_json::json!({ "levels": results }));
    }
    if let Some(mut c) = child {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    Ok(())
}

#[cfg(feature = "server")]
fn serve(a: ServeArgs) -> Result<()> {
    use bitnet_inference::batch::scheduler::SchedulerConfig;
    use bitnet_inference::serve::{run, ServeOptions};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match a.log_format.as_str() {
        "json" => fmt.json().init(),
        "text" => fmt.init(),
        other => bail!("--log-format {other}: use text or json"),
    }
    if !a.model.join("config.json").exists() {
        bail!(
            "{}: no config.json (is --model a model directory?)",
            a.model.display()
        );
    }
    run(ServeOptions {
        model: a.model,
        host: a.host,
        port: a.port,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        cors_origins: a.cors_origins,
        gpu: choose_gpu(a.backend)?,
        threads: a.threads,
        head: bitnet_inference::cpu::head::HeadMode::parse(&a.head)?,
        kv: KvDtype::parse(&a.kv)?,
        scheduler: SchedulerConfig {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            step_tokens: a.step_tokens,
            block_size: a.block_size,
            ..Default::default()
        },
        kv_cache_mb: a.kv_cache_mb,
        max_tokens_limit: a.max_tokens_limit,
        max_prompt_tokens: a.max_prompt_tokens,
        max_body_bytes: a.max_body_bytes,
        shutdown_timeout: a.shutdown_timeout,
    })?;
    Ok(())
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner().with_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A generator on whichever backend was chosen.
enum Engine {
    Cpu(Box<Generator<CpuBackend>>),
    #[cfg(feature = "gpu")]
    Gpu(Box<Generator<bitnet_inference::gpu::GpuBackend>>),
}

/// Evaluates `$body` with `$g` bound to the engine's generator, whatever its backend.
macro_rules! with_gen {
    ($engine:expr, $g:ident => $body:expr) => {
        match $engine {
            Engine::Cpu($g) => $body,
            #[cfg(feature = "gpu")]
            Engine::Gpu($g) => $body,
        }
    };
}

/// What the command bodies need besides the generator.
struct Ctx {
    tokenizer: Option<Tokenizer>,
    gen_cfg: GenerationConfig,
    load_s: f64,
    threads: usize,
}

struct Loaded {
    gen: Engine,
    ctx: Ctx,
}

/// Picks the backend: `auto` takes a real GPU when wgpu finds one, else the CPU.
fn choose_gpu(kind: BackendKind) -> Result<bool> {
    match kind {
        BackendKind::Cpu => Ok(false),
        #[cfg(feature = "gpu")]
        BackendKind::Gpu => Ok(true),
        #[cfg(feature = "gpu")]
        BackendKind::Auto => match bitnet_inference::gpu::probe() {
            Some(a) if !a.is_cpu => Ok(true),
            Some(a) => {
                eprintln!("backend: cpu (the only GPU adapter is a software one: {a})");
                Ok(false)
            }
            None => {
                eprintln!("backend: cpu (no GPU adapter found)");
                Ok(false)
            }
        },
        #[cfg(not(feature = "gpu"))]
        BackendKind::Gpu => {
            bail!("this build has no GPU backend (built without the `gpu` feature)")
        }
        #[cfg(not(feature = "gpu"))]
        BackendKind::Auto => Ok(false),
    }
}

fn load(args: &ModelArgs) -> Result<Loaded> {
    let head = HeadMode::parse(&args.head)?;
    let gpu = choose_gpu(args.backend)?;
    let t0 = Instant::now();
    let pb = spinner(&format!("loading {}", args.model.display()));
    let weights = format::safetensors::load(&args.model)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    let gen_cfg = GenerationConfig::from_dir(&args.model, &weights.config)?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let kv = KvDtype::parse(&args.kv)?;
    if kv != KvDtype::F32 && !gpu {
        bail!(
            "--kv {} needs the GPU backend (the CPU's KV cache is f32)",
            args.kv
        );
    }
    let gen = if gpu {
        #[cfg(feature = "gpu")]
        {
            let opts = bitnet_inference::gpu::GpuOptions {
                head,
                kv,
                ..Default::default()
            };
            let backend = bitnet_inference::gpu::load(&weights, &opts)?;
            Engine::Gpu(Box::new(Generator::new(backend)?))
        }
        #[cfg(not(feature = "gpu"))]
        unreachable!("choose_gpu never picks the GPU without the feature")
    } else {
        let opts = CpuOptions {
            threads,
            head,
            kernels: Some(Kernels::by_name(&args.kernels)?),
            kv,
        };
        Engine::Cpu(Box::new(Generator::new(CpuBackend::load(
            &weights, &opts,
        )?)?))
    };
    drop(weights);
    pb.finish_and_clear();
    let load_s = t0.elapsed().as_secs_f64();
    if args.backend == BackendKind::Auto {
        eprintln!("backend: {}", with_gen!(&gen, g => g.backend().describe()));
    }
    Ok(Loaded {
        gen,
        ctx: Ctx {
            tokenizer,
            gen_cfg,
            load_s,
            threads,
        },
    })
}

fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .with_context(|| format!("--tokens: `{t}` is not a token id"))
        })
        .collect()
}

fn generate(a: GenerateArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    with_gen!(&mut gen, g => generate_on(g, ctx, &a))
}

fn generate_on<B: Backend>(gen: &mut Generator<B>, ctx: Ctx, a: &GenerateArgs) -> Result<()> {
    let Ctx {
        tokenizer, gen_cfg, ..
    } = ctx;
    let prompt = match (&a.prompt, &a.tokens) {
        (_, Some(t)) => parse_tokens(t)?,
        (Some(p), None) => tokenizer
            .as_ref()
            .context("the model has no tokenizer.json; pass --tokens instead of --prompt")?
            .encode(p, true)?,
        (None, None) => bail!("pass --prompt TEXT or --tokens 1,2,3"),
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        eos_token_ids: gen_cfg.eos_token_ids.clone(),
        ignore_eos: a.ignore_eos,
        stop_strings: a.stop.clone(),
    };
    let stream = !a.json;
    let mut stdout = std::io::stdout().lock();
    let out = gen.generate(&prompt, &opts, tokenizer.as_ref(), |_, piece| {
        if stream && !piece.is_empty() {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if a.json {
        let v = serde_json::json!({
            "tokens": out.tokens,
            "text": out.text,
            "prompt_tokens": out.prompt_tokens,
            "decode_tok_s": out.decode_tok_s(),
            "prefill_tok_s": out.prompt_tokens as f64 / out.prefill_s.max(1e-9),
            "finish_reason": out.finish.as_str(),
        });
        writeln!(stdout, "{v}")?;
    } else {
        if tokenizer.is_none() {
            write!(
                stdout,
                "{}",
                out.tokens
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )?;
        }
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1} tok/s]",
            out.prompt_tokens,
            out.tokens.len(),
            out.decode_tok_s()
        );
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    with_gen!(&mut gen, g => chat_on(g, ctx, &a))
}

fn chat_on<B: Backend>(gen: &mut Generator<B>, ctx: Ctx, a: &ChatArgs) -> Result<()> {
    let Ctx {
        tokenizer, gen_cfg, ..
    } = ctx;
    let tok = tokenizer.context("the model has no tokenizer.json")?;
    if !tok.has_chat_template() {
        bail!(
            "{}: the model has no chat template",
            a.model.model.display()
        );
    }
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::new("system", s));
    }
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            ..Default::default()
        },
        eos_token_ids: gen_cfg.eos_token_ids.clone(),
        ..Default::default()
    };
    eprintln!(
        "chat with {} — empty line or Ctrl-D to quit",
        a.model.model.display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(ChatMessage::new("user", line.trim()));
        let prompt = tok.encode_chat(&messages)?;
        let mut stdout = std::io::stdout().lock();
        let out = gen.generate(&prompt, &opts, Some(&tok), |_, piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            true
        })?;
        writeln!(stdout)?;
        messages.push(ChatMessage::new("assistant", &out.text));
    }
    Ok(())
}

fn logits(a: LogitsArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    with_gen!(&mut gen, g => logits_on(g, ctx, &a))
}

fn logits_on<B: Backend>(gen: &mut Generator<B>, ctx: Ctx, a: &LogitsArgs) -> Result<()> {
    let _ = ctx;
    let toks = parse_tokens(&a.tokens)?;
    let vocab = gen.backend().config().vocab_size;
    let l = gen.logits(&toks, a.all)?;
    let v = if a.all {
        serde_json::json!({ "logits": l.chunks(vocab).collect::<Vec<_>>() })
    } else {
        serde_json::json!({ "logits": l })
    };
    println!("{v}");
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    with_gen!(&mut gen, g => perplexity_on(g, ctx, &a))
}

fn perplexity_on<B: Backend>(gen: &mut Generator<B>, ctx: Ctx, a: &PerplexityArgs) -> Result<()> {
    let tok = ctx.tokenizer.context("the model has no tokenizer.json")?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let mut ids = tok.encode(&text, true)?;
    if a.max_tokens > 0 {
        ids.truncate(a.max_tokens);
    }
    let window = if a.window == 0 {
        gen.context()
    } else {
        a.window
    };
    let stride = if a.stride == 0 { window } else { a.stride };
    let pb = spinner(&format!("scoring {} tokens", ids.len()));
    let t0 = Instant::now();
    let r = gen.perplexity(&ids, window, stride)?;
    let secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let backend = gen.backend().describe();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "ppl": r.ppl(), "mean_nll": r.mean_nll(), "nll": r.nll, "tokens": r.tokens,
                "scored": r.scored, "window": r.window, "stride": r.stride,
                "seconds": secs, "backend": backend,
            })
        );
    } else {
        println!("perplexity     {:.4}", r.ppl());
        println!(
            "nll            {:.5} nats/token ({:.2} in all)",
            r.mean_nll(),
            r.nll
        );
        println!(
            "tokens         {} ({} scored; window {}, stride {})",
            r.tokens, r.scored, r.window, r.stride
        );
        println!("time           {secs:.2} s ({backend})");
    }
    Ok(())
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn bench(a: BenchArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    let device = if a.membw {
        device_bandwidth(&mut gen)
    } else {
        None
    };
    with_gen!(&mut gen, g => bench_on(g, ctx, &a, device))
}

/// `bench --membw` on the GPU backend: the device's copy/read bandwidth and the ternary GEMV's
/// weight bandwidth (see `gpu::bandwidth`) as JSON, None on the CPU backend.
fn device_bandwidth(gen: &mut Engine) -> Option<serde_json::Value> {
    match gen {
        #[cfg(feature = "gpu")]
        Engine::Gpu(g) => serde_json::to_value(g.backend_mut().bandwidth(5)).ok(),
        _ => None,
    }
}

/// `bench --batch`: batched decode tok/s and the share of step time in `forward_rows`.
fn bench_batch<B: bitnet_inference::batch::BatchBackend>(
    b: &mut B,
    a: &BenchArgs,
) -> Result<Option<(f64, f64)>> {
    if a.batch == 0 {
        return Ok(None);
    }
    let (tok_s, forward_s) =
        bitnet_inference::batch::decode_throughput(b, a.batch, a.prompt_len, a.gen)?;
    let steps_s = (a.batch * a.gen) as f64 / tok_s;
    Ok(Some((tok_s, forward_s / steps_s)))
}

fn bench_on<B: bitnet_inference::batch::BatchBackend>(
    gen: &mut Generator<B>,
    ctx: Ctx,
    a: &BenchArgs,
    device: Option<serde_json::Value>,
) -> Result<()> {
    let Ctx {
        load_s, threads, ..
    } = ctx;
    let cfg = gen.backend().config().clone();
    if a.prompt_len + a.gen > gen.context() {
        bail!(
            "--prompt-len + --gen = {} exceeds the context window ({})",
            a.prompt_len + a.gen,
            gen.context()
        );
    }
    // A deterministic prompt of ordinary token ids.
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let opts = GenerateOptions {
        max_tokens: a.gen,
        ignore_eos: true,
        ..Default::default()
    };
    let pb = spinner("warming up");
    gen.generate(
        &prompt[..prompt.len().min(8)],
        &GenerateOptions {
            max_tokens: 4,
            ..opts.clone()
        },
        None,
        |_, _| true,
    )?;
    pb.set_message(format!("prefill {} + decode {}", a.prompt_len, a.gen));
    let out = gen.generate(&prompt, &opts, None, |_, _| true)?;
    let profile = if a.profile {
        // A separate decode-only run: one prompt token, then `gen` steps.
        gen.generate(
            &prompt[..1],
            &GenerateOptions {
                max_tokens: 2,
                ..opts.clone()
            },
            None,
            |_, _| true,
        )?;
        gen.start_profile();
        gen.generate(&prompt[..1], &opts, None, |_, _| true)?;
        gen.take_profile()
    } else {
        None
    };
    pb.set_message(format!("batched decode of {} sequences", a.batch));
    let batch = bench_batch(gen.backend_mut(), a)?;
    pb.finish_and_clear();
    let prefill = a.prompt_len as f64 / out.prefill_s;
    let decode = out.decode_tok_s();
    let bytes = gen.backend().decode_bytes_per_token();
    let gb_s = bytes as f64 * decode / 1e9;
    let rss = peak_rss_mb();
    let backend = gen.backend().describe();

    // The GPU's read bandwidth where measured, else the host's.
    let gb = |k: &str| device.as_ref().and_then(|d| d[k].as_f64()).map(|v| v / 1e9);
    let machine = match gb("read") {
        Some(read) => Some(read),
        None => a
            .membw
            .then(|| bitnet_inference::cpu::membw::read_bandwidth_gb_s(1 << 30, threads, 5)),
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode,
                "decode_bytes_per_token": bytes, "decode_gb_s": gb_s, "peak_rss_mb": rss,
                "backend": backend, "prompt_len": a.prompt_len, "gen": a.gen,
                "machine_gb_s": machine, "gpu_bandwidth": device,
                "batch": a.batch, "batch_decode_tok_s": batch.map(|b| b.0),
                "batch_forward_share": batch.map(|b| b.1),
                "profile_ms_per_step": profile.as_ref().map(|p| p.entries.iter().map(|e| (e.0.to_string(), serde_json::json!(e.1 * 1e3 / a.gen as f64))).collect::<serde_json::Map<_, _>>()),
            })
        );
    } else {
        println!("backend        {backend}");
        println!("load           {:.2} s", load_s);
        println!(
            "prefill        {:.1} tok/s ({} tokens)",
            prefill, a.prompt_len
        );
        println!("decode         {:.2} tok/s ({} tokens)", decode, a.gen);
        println!("bytes/token    {:.1} MB", bytes as f64 / 1e6);
        println!("bandwidth      {:.2} GB/s", gb_s);
        println!("peak RSS       {:.0} MB", rss);
        if let Some((tok_s, share)) = batch {
            println!(
                "batch decode   {tok_s:.1} tok/s ({} sequences; {:.0}% of the time in the \
                 steps incl. reading the logits back, the rest in argmax)",
                a.batch,
                100.0 * share
            );
        }
        if let (Some(copy), Some(serial), Some(indep)) =
            (gb("copy"), gb("gemv_serial"), gb("gemv_independent"))
        {
            println!("gpu copy       {copy:.1} GB/s (read + write)");
            println!(
                "ternary gemv   {serial:.1} GB/s back to back as in decode ({:.0}% of copy), \
                 {indep:.1} GB/s independent ({:.0}%)",
                100.0 * serial / copy,
                100.0 * indep / copy
            );
        }
        if let Some(mb) = machine {
            println!(
                "machine read   {:.2} GB/s ({:.0}% used by decode)",
                mb,
                100.0 * gb_s / mb
            );
        }
        if let Some(p) = &profile {
            let total: f64 = p.entries.iter().map(|e| e.1).sum();
            println!("decode profile (wall time per step over {} steps)", a.gen);
            for (name, secs, calls) in &p.entries {
                let per = secs * 1e3 / a.gen as f64;
                println!(
                    "  {name:<22} {per:>8.3} ms {:>5.1}%  ({calls} calls)",
                    100.0 * secs / total
                );
            }
        }
    }
    Ok(())
}

fn synth(a: SynthArgs) -> Result<()> {
    let cfg = Preset::parse(&a.shape)?.config();
    let pb = ProgressBar::new(0);
    pb.set_style(ProgressStyle::with_template(
        "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
    )?);
    pb.set_message(format!("writing {}", a.out.display()));
    format::synth::write_model(&a.out, &cfg, a.seed, |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    eprintln!("wrote {} ({} shape)", Path::new(&a.out).display(), a.shape);
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Logits(a) => logits(a),
        Cmd::Perplexity(a) => perplexity(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Synth(a) => synth(a),
        #[cfg(feature = "server")]
        Cmd::Serve(a) => serve(a),
        #[cfg(feature = "server")]
        Cmd::BenchServe(a) => bench_serve(a),
    }
}

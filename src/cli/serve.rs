//! `bitnet serve` and `bitnet bench-serve`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::ModelArgs;
use bitnet_inference::backend::{HeadMode, KvDtype};
use bitnet_inference::cpu::kernels::Kernels;
use bitnet_inference::serve::WorkerSpec;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port (0 picks a free one; the address is printed as `listening on http://...`).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "BITNET_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Named API keys with rate limits: a JSON file `[{"name", "key", "requests_per_minute"?,
    /// "tokens_per_minute"?}]` (the names show in metrics and access logs; with --api-key too,
    /// that one is named `default`).
    #[arg(long, env = "BITNET_API_KEYS")]
    pub(crate) api_keys: Option<std::path::PathBuf>,
    /// Shed new generation requests (503 + Retry-After) while the oldest waiting request has
    /// waited longer than this many milliseconds (0 = off).
    #[arg(long, default_value_t = 0)]
    pub(crate) shed_queue_wait_ms: u64,
    /// Shed new generation requests while a batched step takes longer than this many
    /// milliseconds (0 = off).
    #[arg(long, default_value_t = 0)]
    pub(crate) shed_step_ms: u64,
    /// Seconds the load-shedding breaker stays open before it lets requests in again.
    #[arg(long, default_value_t = 5)]
    pub(crate) shed_cooldown: u64,
    /// Turn on /admin/* (hot model swap), with `Authorization: Bearer KEY`; without it they
    /// answer 403.
    #[arg(long, env = "BITNET_ADMIN_KEY", hide_env_values = true)]
    pub(crate) admin_key: Option<String>,
    /// The only directory /admin/load loads models from (required with --admin-key).
    #[arg(long)]
    pub(crate) models_dir: Option<std::path::PathBuf>,
    /// Allowed CORS origin (repeat; `*` for any).
    #[arg(long = "cors-origin")]
    pub(crate) cors_origins: Vec<String>,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_batch: usize,
    /// Most requests waiting; beyond it requests get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_queue: usize,
    /// Most token rows per step (decode rows plus prompt chunks).
    #[arg(long, default_value_t = 256)]
    pub(crate) step_tokens: usize,
    /// KV cache pool size in MiB (paged in blocks shared by all sequences), or `auto`: what
    /// --max-batch sequences at the full context need, within half the host memory available
    /// (CPU) or the device memory left after loading, less a tenth, and its largest binding
    /// (GPU). The size is logged at start.
    #[arg(long, default_value = "auto")]
    pub(crate) kv_cache_mb: String,
    /// Positions per KV block.
    #[arg(long, default_value_t = 16)]
    pub(crate) block_size: usize,
    /// Largest max_tokens a request may ask for (also the default).
    #[arg(long, default_value_t = 4096)]
    pub(crate) max_tokens_limit: usize,
    /// Longest prompt in tokens (0 = the model's context).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_prompt_tokens: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub(crate) max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub(crate) shutdown_timeout: u64,
    /// Most open connections (lowered to fit the open-file limit); more clients wait.
    #[arg(long, default_value_t = 1024)]
    pub(crate) max_connections: usize,
    /// Seconds a connection gets to send a request header; idle keep-alive connections are
    /// closed after as long.
    #[arg(long, default_value_t = 10)]
    pub(crate) idle_timeout: u64,
    /// Seconds a request body gets to arrive whole (408 after).
    #[arg(long, default_value_t = 30)]
    pub(crate) body_timeout: u64,
    /// Seconds a WebSocket may sit between requests before it is closed.
    #[arg(long, default_value_t = 300)]
    pub(crate) ws_idle_timeout: u64,
    /// The Batch API's directory (`/v1/files`, `/v1/batches`): uploaded files, results and
    /// the batch queue, resumed after a restart. Without it the Batch API is off.
    #[arg(long)]
    pub(crate) batch_dir: Option<std::path::PathBuf>,
    /// Largest file `/v1/files` accepts, in MiB.
    #[arg(long, default_value_t = 100)]
    pub(crate) max_file_mb: usize,
    /// Engine workers behind the one front end, each with its own batch, requests routed to
    /// the least loaded: a comma list of cpu, gpu, gpu:N (the N-th adapter) and auto, e.g.
    /// `gpu:0,gpu:1` or `gpu,cpu` (default: one on --backend).
    #[arg(long, value_delimiter = ',', conflicts_with = "replicas")]
    pub(crate) workers: Vec<String>,
    /// Runs N workers on --backend (shorthand for --workers repeated N times).
    #[arg(long)]
    pub(crate) replicas: Option<usize>,
    /// Also serve gRPC (`proto/bitnet.proto`, with reflection) on this port (0 picks one;
    /// its address is printed after the HTTP one).
    #[arg(long)]
    pub(crate) grpc_port: Option<u16>,
    /// PEM certificate chain for TLS on the gRPC port (with --grpc-tls-key).
    #[arg(long, requires = "grpc_tls_key")]
    pub(crate) grpc_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for TLS on the gRPC port (with --grpc-tls-cert).
    #[arg(long, requires = "grpc_tls_cert")]
    pub(crate) grpc_tls_key: Option<std::path::PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub(crate) log_format: String,
    /// Speculative decoding in the batch: `ngram` (prompt lookup per sequence).
    #[arg(long)]
    pub(crate) speculative: Option<String>,
    /// Most tokens drafted per sequence and step.
    #[arg(long, default_value_t = 4)]
    pub(crate) draft_tokens: usize,
}

#[derive(Args)]
pub(crate) struct BenchServeArgs {
    /// A running server (`http://host:port`); without it a server is started on --model.
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// The model and backend of the server started here.
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub(crate) clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    pub(crate) requests: usize,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 32)]
    pub(crate) prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_tokens: usize,
    /// Constrain every response to this JSON schema (a file): structured output's cost.
    #[arg(long)]
    pub(crate) json_schema: Option<std::path::PathBuf>,
    /// Seed of the random prompts (default: from the clock, so that runs against one server
    /// do not repeat prompts its prefix cache holds); levels never share prompts.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `bitnet bench-serve`: load levels against a running server or one started here.
pub(crate) fn bench_serve(a: BenchServeArgs) -> Result<()> {
    use bitnet_inference::serve::bench::run_level;
    use std::io::BufRead;
    let extra = match &a.json_schema {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("--json-schema {}", f.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--json-schema {}: not JSON", f.display()))?;
            serde_json::json!({ "response_format": {
                "type": "json_schema", "json_schema": { "name": "bench", "schema": schema },
            } })
        }
        None => serde_json::json!({}),
    };
    let mut child = None;
    let base = match &a.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let most = a.clients.iter().copied().max().unwrap_or(1);
            let m = &a.model;
            let mut c = std::process::Command::new(std::env::current_exe()?)
                .args(["serve", "--port", "0", "--max-batch", &most.to_string()])
                .args(["--max-queue", &(most * 2).to_string()])
                .args(["--head", &m.head, "--kv", &m.kv, "--kernels", &m.kernels])
                .args(["--prefetch", &m.prefetch])
                .args(["--threads", &m.threads.to_string()])
                .args(["--backend", m.backend.name()])
                .arg("--model")
                .arg(&m.model)
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
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut results = Vec::new();
    for (i, &c) in a.clients.iter().enumerate() {
        // Each level's clients start 2^32 seeds after the previous level's.
        let level_seed = seed.wrapping_add((i as u64) << 32);
        let r = run_level(
            &base,
            c,
            a.requests,
            a.prompt_len,
            a.max_tokens,
            &extra,
            level_seed,
        )?;
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
        println!("{}", serde_json::json!({ "levels": results, "seed": seed }));
    }
    if let Some(mut c) = child {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    Ok(())
}

/// `bitnet serve`: the HTTP server until SIGTERM.
pub(crate) fn serve(a: ServeArgs) -> Result<()> {
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
    let mut m = a.model;
    m.model = bitnet_inference::hub::resolve(&m.model)?;
    if !m.model.join("config.json").exists() && !bitnet_inference::format::gguf::is_gguf(&m.model) {
        bail!(
            "{}: neither a GGUF file nor a directory with config.json",
            m.model.display()
        );
    }
    run(ServeOptions {
        kernels: Some(Kernels::by_name(&m.kernels)?),
        prefetch: super::engine::parse_prefetch(&m.prefetch)?,
        head: HeadMode::parse(&m.head)?,
        kv: KvDtype::parse(&m.kv)?,
        backend: m.backend,
        threads: m.threads,
        model: m.model,
        host: a.host,
        port: a.port,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        api_keys: match &a.api_keys {
            Some(f) => bitnet_inference::serve::keys::read_keys(f)?,
            None => Vec::new(),
        },
        breaker: bitnet_inference::serve::breaker::BreakerLimits {
            queue_wait: (a.shed_queue_wait_ms > 0)
                .then(|| Duration::from_millis(a.shed_queue_wait_ms)),
            step: (a.shed_step_ms > 0).then(|| Duration::from_millis(a.shed_step_ms)),
            cooldown: Duration::from_secs(a.shed_cooldown.max(1)),
        },
        admin_key: a.admin_key.filter(|k| !k.is_empty()),
        models_dir: a.models_dir,
        cors_origins: a.cors_origins,
        scheduler: SchedulerConfig {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            step_tokens: a.step_tokens,
            block_size: a.block_size,
            draft_tokens: serve_draft_tokens(a.speculative.as_deref(), a.draft_tokens)?,
            ..Default::default()
        },
        kv_cache_mb: match a.kv_cache_mb.as_str() {
            "auto" => None,
            n => Some(n.parse().with_context(|| {
                format!("--kv-cache-mb: `{n}` is neither `auto` nor a number of MiB")
            })?),
        },
        max_tokens_limit: a.max_tokens_limit,
        max_prompt_tokens: a.max_prompt_tokens,
        max_body_bytes: a.max_body_bytes,
        shutdown_timeout: a.shutdown_timeout,
        max_connections: a.max_connections.max(1),
        idle_timeout: a.idle_timeout,
        body_timeout: a.body_timeout.max(1),
        ws_idle_timeout: a.ws_idle_timeout,
        batch_dir: a.batch_dir,
        max_file_bytes: a.max_file_mb.saturating_mul(1 << 20),
        workers: match a.replicas {
            Some(0) => bail!("--replicas must be at least 1"),
            Some(n) => vec![
                WorkerSpec {
                    backend: m.backend,
                    adapter: 0
                };
                n
            ],
            None => a
                .workers
                .iter()
                .map(|w| WorkerSpec::parse(w))
                .collect::<std::result::Result<_, _>>()?,
        },
        grpc_port: a.grpc_port,
        grpc_tls: match (a.grpc_tls_cert, a.grpc_tls_key) {
            (Some(cert), Some(key)) => Some(bitnet_inference::serve::grpc::GrpcTls { cert, key }),
            _ => None,
        },
    })?;
    Ok(())
}

/// The scheduler's prompt-lookup draft length for `--speculative` (0 when off).
fn serve_draft_tokens(method: Option<&str>, k: usize) -> Result<usize> {
    use bitnet_inference::engine::speculative::MAX_DRAFT_TOKENS;
    use bitnet_inference::load::SpecMethod;
    let Some(m) = method else { return Ok(0) };
    match SpecMethod::parse(m)? {
        SpecMethod::Ngram if (1..=MAX_DRAFT_TOKENS).contains(&k) => Ok(k),
        SpecMethod::Ngram => bail!("--draft-tokens must be 1..={MAX_DRAFT_TOKENS}, not {k}"),
        SpecMethod::Draft(_) => bail!(
            "--speculative draft:DIR is not offered by the server yet (its batch drafts by \
             prompt lookup: --speculative ngram)"
        ),
    }
}

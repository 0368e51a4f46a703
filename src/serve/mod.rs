//! `bitnet serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (JSON or SSE streaming),
//! `GET /v1/models`, `GET /v1/ws` (WebSocket streaming), `GET /health`, `GET /metrics`
//! (Prometheus), `GET /openapi.json`, `POST /admin/load` (hot model swap from the operator's
//! models directory, only with the admin key). Connections are capped and timed out
//! (`listen`); tokenizing and template rendering run on the blocking pool. Graceful shutdown on
//! SIGTERM/SIGINT: stop accepting, finish in-flight requests up to a timeout, exit 0.

pub mod api;
pub mod batches;
pub mod bench;
pub mod breaker;
pub mod files;
mod generate;
pub mod grpc;
mod handlers;
pub mod keys;
pub mod listen;
pub mod metrics;
pub mod tools;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::backend::{BatchBackend, HeadMode, KvDtype};
use crate::batch::scheduler::{Scheduler, SchedulerConfig, SchedulerStats};
use crate::engine::grammar::Grammars;
use crate::error::{Error, Result};
use crate::load::{choose_gpu, load_backend, BackendKind, Engine, LoadOptions, ModelFiles};
use crate::tokenizer::Tokenizer;

/// Everything `bitnet serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Model directory served at start.
    pub model: PathBuf,
    /// Address to bind (127.0.0.1 unless told otherwise).
    pub host: String,
    /// Port (0 picks a free one; the chosen address is printed).
    pub port: u16,
    /// Bearer token required on `/v1/*` when set (the key named `default`, no limits).
    pub api_key: Option<String>,
    /// Named API keys with rate limits (`--api-keys FILE`); with these or `api_key` every
    /// `/v1/*` request needs one of them.
    pub api_keys: Vec<keys::KeySpec>,
    /// When the load-shedding breaker opens (`--shed-*`).
    pub breaker: breaker::BreakerLimits,
    /// Bearer token of `/admin/*`; without it the admin endpoints answer 403.
    pub admin_key: Option<String>,
    /// The only directory `/admin/load` loads models from (required with `admin_key`).
    pub models_dir: Option<PathBuf>,
    /// Allowed CORS origins (`*` for any); none disables CORS headers.
    pub cors_origins: Vec<String>,
    /// The backend (auto: a real GPU when there is one).
    pub backend: BackendKind,
    /// CPU worker threads (0 = one per core).
    pub threads: usize,
    /// CPU kernel set (None = the fastest detected).
    pub kernels: Option<crate::cpu::kernels::Kernels>,
    /// Bytes the CPU kernels prefetch ahead (None = measured at load).
    pub prefetch: Option<usize>,
    /// Head storage (int8 halves the head's reads and speeds up large batches).
    pub head: HeadMode,
    /// KV pool element type (f16 on the GPU backend only).
    pub kv: KvDtype,
    /// Batching limits (kv_blocks is derived from `kv_cache_mb` at load).
    pub scheduler: SchedulerConfig,
    /// KV pool size in MiB (None: sized from the memory available and `max_batch`
    /// sequences at the full context, see [`crate::batch::sizing`]).
    pub kv_cache_mb: Option<usize>,
    /// Largest `max_tokens` a request may ask for (and the default when it asks none).
    pub max_tokens_limit: usize,
    /// Longest prompt in tokens (0 = the context).
    pub max_prompt_tokens: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Most open connections (lowered to fit the open-file limit).
    pub max_connections: usize,
    /// Seconds a connection gets to send a request header; idle keep-alive connections close
    /// after as long.
    pub idle_timeout: u64,
    /// Seconds a request body gets to arrive whole.
    pub body_timeout: u64,
    /// Seconds a WebSocket may wait for its next request before it is closed.
    pub ws_idle_timeout: u64,
    /// Seconds in-flight requests get after SIGTERM.
    pub shutdown_timeout: u64,
    /// Where the Batch API keeps its files and batches (None: `/v1/files` and `/v1/batches`
    /// are off).
    pub batch_dir: Option<PathBuf>,
    /// Largest file `/v1/files` accepts, in bytes.
    pub max_file_bytes: usize,
    /// The gRPC port (None: no gRPC; 0 picks a free one).
    pub grpc_port: Option<u16>,
    /// TLS for the gRPC port.
    pub grpc_tls: Option<grpc::GrpcTls>,
    /// Engine workers behind the one front end, each with its own batch (empty: one on
    /// `backend`).
    pub workers: Vec<WorkerSpec>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model: PathBuf::from("models/kjv-fortunes"),
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            api_keys: Vec::new(),
            breaker: breaker::BreakerLimits {
                queue_wait: None,
                step: None,
                cooldown: Duration::from_secs(5),
            },
            admin_key: None,
            models_dir: None,
            cors_origins: Vec::new(),
            backend: BackendKind::Cpu,
            threads: 0,
            kernels: None,
            prefetch: None,
            head: HeadMode::default(),
            kv: KvDtype::F32,
            scheduler: SchedulerConfig::default(),
            kv_cache_mb: None,
            max_tokens_limit: 4096,
            max_prompt_tokens: 0,
            max_body_bytes: 1 << 20,
            max_connections: 1024,
            idle_timeout: 10,
            body_timeout: 30,
            ws_idle_timeout: 300,
            shutdown_timeout: 30,
            batch_dir: None,
            max_file_bytes: 100 << 20,
            grpc_port: None,
            grpc_tls: None,
            workers: Vec::new(),
        }
    }
}

/// One engine worker: a backend with its own scheduler and batch.
pub struct Worker {
    /// Its name in the metrics (`cpu-0`, `gpu-1`, ...).
    pub name: String,
    /// Its scheduler.
    pub sched: Scheduler,
}

/// Which backend an engine worker runs on (`--workers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSpec {
    /// The backend.
    pub backend: BackendKind,
    /// The GPU adapter (0: the best wgpu finds).
    pub adapter: usize,
}

impl WorkerSpec {
    /// Parses `cpu`, `gpu`, `gpu:N` (the N-th adapter) or `auto`.
    pub fn parse(s: &str) -> Result<Self> {
        let (kind, adapter) = match s.split_once(':') {
            Some(("gpu", n)) => (
                BackendKind::Gpu,
                n.parse()
                    .map_err(|_| Error::Request(format!("--workers: `{s}`: bad adapter index")))?,
            ),
            Some(_) => {
                return Err(Error::Request(format!(
                    "--workers: `{s}`: only gpu takes an index"
                )))
            }
            None => (
                match s {
                    "cpu" => BackendKind::Cpu,
                    "gpu" => BackendKind::Gpu,
                    "auto" => BackendKind::Auto,
                    _ => {
                        return Err(Error::Request(format!(
                            "--workers: `{s}` is not cpu, gpu, gpu:N or auto"
                        )))
                    }
                },
                0,
            ),
        };
        Ok(WorkerSpec {
            backend: kind,
            adapter,
        })
    }
}

/// A model ready to serve.
pub struct LoadedModel {
    /// Its id (the directory name).
    pub id: String,
    /// Its engine workers (at least one), each with its own batch.
    pub workers: Vec<Worker>,
    /// Its tokenizer (None: token-id prompts only, and streamed chunks carry no text).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Token ids that end generation.
    pub eos: Vec<u32>,
    /// Positions per sequence.
    pub context: usize,
    /// Seconds since the epoch at load.
    pub created: u64,
    /// The grammar compiler of structured output, built on first use.
    grammars: std::sync::OnceLock<std::result::Result<Grammars, String>>,
    /// Where [`LoadedModel::route`] starts looking among equally loaded workers.
    next_worker: std::sync::atomic::AtomicUsize,
}

/// The counters of several schedulers together (sums; the longest wait and step).
fn combined(parts: &[&SchedulerStats]) -> SchedulerStats {
    let s = SchedulerStats::default();
    for p in parts {
        for (into, from) in [
            (&s.queued, &p.queued),
            (&s.running, &p.running),
            (&s.kv_used, &p.kv_used),
            (&s.kv_cached, &p.kv_cached),
            (&s.kv_shared, &p.kv_shared),
            (&s.kv_total, &p.kv_total),
        ] {
            into.fetch_add(from.load(Relaxed), Relaxed);
        }
        for (into, from) in [
            (&s.prompt_tokens, &p.prompt_tokens),
            (&s.prefix_hit_tokens, &p.prefix_hit_tokens),
            (&s.generated_tokens, &p.generated_tokens),
            (&s.steps, &p.steps),
            (&s.preemptions, &p.preemptions),
            (&s.drafted_tokens, &p.drafted_tokens),
            (&s.accepted_tokens, &p.accepted_tokens),
        ] {
            into.fetch_add(from.load(Relaxed), Relaxed);
        }
        s.oldest_wait_ms
            .fetch_max(p.oldest_wait_ms.load(Relaxed), Relaxed);
        s.step_ms.fetch_max(p.step_ms.load(Relaxed), Relaxed);
    }
    s
}

impl LoadedModel {
    /// Stops its workers, ending the requests they still hold, and waits for each thread to
    /// end (and drop its backend).
    pub fn stop_workers(&self) {
        for w in &self.workers {
            w.sched.stop_now();
        }
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.workers[0].sched.vocab()
    }

    /// Sequences all workers run at once.
    pub fn max_batch(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.sched.config().max_batch)
            .sum()
    }

    /// The worker a new request goes to: the least loaded (running and waiting sequences for
    /// each slot of its batch); among equals, in turn (so requests that arrive one after
    /// another, each finished before the next, still reach every worker).
    pub fn route(&self) -> usize {
        let load = |w: &Worker| {
            let s = w.sched.stats();
            let busy = s.running.load(Relaxed) + s.queued.load(Relaxed);
            busy as f64 / w.sched.config().max_batch.max(1) as f64
        };
        let n = self.workers.len();
        let start = self.next_worker.load(Relaxed);
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .min_by(|&a, &b| load(&self.workers[a]).total_cmp(&load(&self.workers[b])))
            .unwrap_or(0);
        self.next_worker.store(pick + 1, Relaxed);
        pick
    }

    /// The workers' counters together.
    pub fn stats(&self) -> SchedulerStats {
        let parts: Vec<&SchedulerStats> = self.workers.iter().map(|w| &**w.sched.stats()).collect();
        combined(&parts)
    }

    /// The grammar compiler (built on the first call: the vocabulary's trie and token
    /// classes); an error says why this model cannot do structured output.
    pub fn grammars(&self) -> std::result::Result<&Grammars, String> {
        self.grammars
            .get_or_init(|| {
                let tok = self
                    .tokenizer
                    .clone()
                    .ok_or("structured output needs the model's tokenizer.json".to_string())?;
                let eos = *self.eos.first().ok_or(
                    "structured output needs an end-of-sequence token (generation_config.json)"
                        .to_string(),
                )?;
                Grammars::new(tok, self.vocab(), eos).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Shared server state.
pub struct AppState {
    model: RwLock<Option<Arc<LoadedModel>>>,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Options.
    pub opts: ServeOptions,
    draining: AtomicBool,
    next_id: AtomicU64,
    /// Open connections (HTTP and WebSocket) against `connection_cap`.
    connections: Arc<Semaphore>,
    /// `max_connections`, lowered to fit the open-file limit.
    connection_cap: usize,
    /// Tokenizing and template rendering running at once on the blocking pool (one per core).
    cpu_work: Arc<Semaphore>,
    /// The canonical models directory of `/admin/load`.
    models_root: Option<PathBuf>,
    /// Set while `/admin/load` is loading (one load at a time).
    loading: AtomicBool,
    /// The API keys (empty: `/v1/*` is open).
    keys: Vec<Arc<keys::Key>>,
    /// The load-shedding breaker.
    breaker: breaker::Breaker,
    /// The Batch API's store (with `--batch-dir`).
    batches: Option<Arc<batches::Batches>>,
}

impl AppState {
    /// The serving model, if loaded.
    pub fn model(&self) -> Option<Arc<LoadedModel>> {
        self.model.read().ok().and_then(|m| m.clone())
    }

    fn set_model(&self, m: Arc<LoadedModel>) {
        if let Ok(mut g) = self.model.write() {
            *g = Some(m);
        }
    }

    /// A fresh response id with `prefix`.
    pub fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Relaxed))
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Loads `dir` on each configured worker's backend and starts their schedulers.
pub fn load_model(dir: &Path, opts: &ServeOptions) -> Result<LoadedModel> {
    let files = ModelFiles::from_path(dir)?;
    let mut sc = opts.scheduler.clone();
    sc.max_context = files.config().max_position_embeddings;
    let context = sc.max_context;
    let specs = if opts.workers.is_empty() {
        vec![WorkerSpec {
            backend: opts.backend,
            adapter: 0,
        }]
    } else {
        opts.workers.clone()
    };
    let mut workers = Vec::with_capacity(specs.len());
    // CPU workers after the first share its prepared weights.
    let mut cpu_weights: Option<crate::cpu::CpuShared> = None;
    for (i, spec) in specs.iter().enumerate() {
        let load = LoadOptions {
            backend: spec.backend,
            threads: opts.threads,
            head: opts.head,
            kv: opts.kv,
            kernels: opts.kernels,
            prefetch: opts.prefetch,
            max_step: Some(sc.step_tokens),
            adapter: spec.adapter,
        };
        let (engine, fallback) = match &cpu_weights {
            Some(shared) if !choose_gpu(spec.backend)?.0 => {
                let b = crate::cpu::CpuBackend::on_shared(&files.weights, shared, &load.cpu());
                (Engine::Cpu(Box::new(b)), None)
            }
            _ => load_backend(&files.weights, &load)?,
        };
        if let (Engine::Cpu(b), None) = (&engine, &cpu_weights) {
            cpu_weights = Some(b.shared());
        }
        if let Some(why) = fallback {
            tracing::info!(worker = i, reason = %why, "serving on the CPU backend");
        }
        let (name, sched) = match engine {
            Engine::Cpu(b) => (
                format!("cpu-{i}"),
                start(*b, opts, sc.clone(), usize::MAX, host_pool_budget())?,
            ),
            #[cfg(feature = "gpu")]
            Engine::Gpu(b) => {
                tracing::info!(worker = i, adapter = %b.adapter(), "serving on the GPU backend");
                let max_blocks = b.max_pool_blocks(sc.block_size);
                let budget = b.pool_memory_budget().unwrap_or(usize::MAX);
                (
                    format!("gpu-{i}"),
                    start(*b, opts, sc.clone(), max_blocks, budget)?,
                )
            }
        };
        workers.push(Worker { name, sched });
    }
    let ModelFiles {
        weights,
        tokenizer,
        generation,
    } = files;
    drop(weights);
    let id = dir
        .canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    Ok(LoadedModel {
        id,
        workers,
        tokenizer: tokenizer.map(Arc::new),
        eos: generation.eos_token_ids,
        context,
        created: now_s(),
        grammars: std::sync::OnceLock::new(),
        next_worker: Default::default(),
    })
}

/// The automatic pool budget of a CPU worker: half the host memory available (1 GiB where
/// unknown).
fn host_pool_budget() -> usize {
    crate::batch::sizing::host_available_bytes().map_or(1 << 30, |b| b / 2)
}

/// Sizes the KV pool ([`crate::batch::sizing::size_pool`]: `--kv-cache-mb`, or at most `auto`
/// bytes — half the host memory available for the CPU backend, the device memory left after
/// loading for the GPU's — and no more than `max_batch` full-context sequences need or
/// `max_blocks` allow), reports it, and starts the scheduler thread on `backend`.
fn start<B: BatchBackend + Send + 'static>(
    backend: B,
    opts: &ServeOptions,
    mut sc: SchedulerConfig,
    max_blocks: usize,
    auto: usize,
) -> Result<Scheduler> {
    use crate::batch::sizing::{size_pool, PoolBudget};
    let budget = match opts.kv_cache_mb {
        Some(mb) => PoolBudget::Bytes(mb << 20),
        None => PoolBudget::Auto(auto),
    };
    let block = backend.block_bytes(sc.block_size);
    let size = size_pool(
        block,
        sc.block_size,
        sc.max_batch,
        sc.max_context,
        budget,
        max_blocks,
    );
    sc.kv_blocks = size.blocks;
    tracing::info!(
        blocks = size.blocks,
        block_size = sc.block_size,
        mib = size.bytes >> 20,
        full_context_sequences = size.full_sequences,
        reason = %size.reason,
        "KV cache pool"
    );
    Scheduler::spawn(backend, sc)
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let mut app = Router::new()
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/models", get(handlers::models))
        .route("/v1/ws", get(handlers::websocket))
        .route(
            "/v1/files",
            post(batches::upload_file)
                .layer(DefaultBodyLimit::max(
                    state.opts.max_file_bytes.saturating_add(1 << 16),
                ))
                .get(batches::list_files),
        )
        .route(
            "/v1/files/{id}",
            get(batches::get_file).delete(batches::delete_file),
        )
        .route("/v1/files/{id}/content", get(batches::file_content))
        .route(
            "/v1/batches",
            post(batches::create_batch).get(batches::list_batches),
        )
        .route("/v1/batches/{id}", get(batches::get_batch))
        .route("/v1/batches/{id}/cancel", post(batches::cancel_batch))
        .route("/admin/load", post(handlers::admin_load))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::observe,
        ))
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes));
    let origins = &state.opts.cors_origins;
    if !origins.is_empty() {
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods(Any)
                .allow_headers(Any),
        );
    }
    app.with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the server until SIGTERM/SIGINT (then drains and returns).
pub fn run(opts: ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Backend(format!("tokio runtime: {e}")))?;
    rt.block_on(serve(opts))
}

/// The API keys: `--api-key` (named `default`, unlimited) and `--api-keys`' named ones.
fn api_keys(opts: &ServeOptions) -> Result<Vec<Arc<keys::Key>>> {
    let mut specs = opts.api_keys.clone();
    if let Some(k) = &opts.api_key {
        if specs.iter().any(|s| s.name == "default" || s.key == *k) {
            return Err(Error::Request(
                "--api-key duplicates a key (or the name `default`) of --api-keys".into(),
            ));
        }
        specs.push(keys::KeySpec {
            name: "default".into(),
            key: k.clone(),
            requests_per_minute: None,
            tokens_per_minute: None,
        });
    }
    Ok(specs
        .into_iter()
        .map(|s| Arc::new(keys::Key::new(s)))
        .collect())
}

/// Checks the admin options: a key needs a models directory that exists (returned canonical).
fn models_root(opts: &ServeOptions) -> Result<Option<PathBuf>> {
    match (&opts.admin_key, &opts.models_dir) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Error::Request(
            "--models-dir is only used by /admin/load, which needs --admin-key".into(),
        )),
        (Some(_), None) => Err(Error::Request(
            "--admin-key needs --models-dir: the only directory /admin/load may load from".into(),
        )),
        (Some(_), Some(dir)) => dir
            .canonicalize()
            .ok()
            .filter(|d| d.is_dir())
            .map(Some)
            .ok_or_else(|| {
                Error::Request(format!("--models-dir {}: not a directory", dir.display()))
            }),
    }
}

async fn serve(opts: ServeOptions) -> Result<()> {
    let models_root = models_root(&opts)?;
    let addr: SocketAddr = format!("{}:{}", opts.host, opts.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (opts.host.as_str(), opts.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| Error::Request(format!("--host {}: not an address", opts.host)))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Request(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Backend(e.to_string()))?;
    let connection_cap = listen::connection_cap(opts.max_connections);
    let state = Arc::new(AppState {
        model: RwLock::new(None),
        metrics: metrics::Metrics::new(),
        opts: opts.clone(),
        draining: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
        connections: Arc::new(Semaphore::new(connection_cap)),
        connection_cap,
        cpu_work: Arc::new(Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )),
        models_root,
        loading: AtomicBool::new(false),
        keys: api_keys(&opts)?,
        breaker: breaker::Breaker::new(opts.breaker),
        batches: match &opts.batch_dir {
            None => None,
            Some(dir) => Some(Arc::new(
                batches::Batches::open(dir.clone(), opts.max_file_bytes)
                    .map_err(|e| Error::Request(format!("--batch-dir {}: {e}", dir.display())))?,
            )),
        },
    });
    if let Some(b) = &state.batches {
        tokio::spawn(batches::runner(state.clone(), b.clone()));
    }
    println!("listening on http://{local}");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(port) = opts.grpc_port {
        let (listener, at) = grpc::bind(&opts.host, port).await?;
        let scheme = if opts.grpc_tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!("grpc listening on {scheme}://{at}");
        let mut stopped = stopped.clone();
        let grpc = grpc::serve(state.clone(), listener, opts.grpc_tls.clone(), async move {
            let _ = stopped.changed().await;
        });
        tokio::spawn(async move {
            if let Err(e) = grpc.await {
                tracing::error!(error = %e, "gRPC server failed");
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        });
    }
    tracing::info!(%local, model = %opts.model.display(), "listening; loading the model");
    let loader = state.clone();
    tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        match load_model(&loader.opts.model, &loader.opts) {
            Ok(m) => {
                tracing::info!(model = %m.id, secs = t0.elapsed().as_secs_f64(), "model ready");
                loader.set_model(Arc::new(m));
            }
            Err(e) => {
                tracing::error!(error = %e, "model load failed");
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    });
    let app = router(state.clone());
    let drain = state.clone();
    let timeout = opts.shutdown_timeout;
    let limits = listen::ConnLimits {
        permits: state.connections.clone(),
        header_timeout: Duration::from_secs(opts.idle_timeout.max(1)),
    };
    listen::serve(listener, app, limits, async move {
        shutdown_signal().await;
        drain.draining.store(true, Relaxed);
        let _ = stop.send(true);
        tracing::info!(timeout, "shutting down: draining in-flight requests");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(timeout)).await;
            tracing::warn!("drain timeout reached; ending the requests still running");
            let _ = tokio::task::spawn_blocking(move || stop_workers(&drain)).await;
            // The ended requests' streams are still being written: the server returns once
            // their connections close, unless a client does not read its end.
            tracing::info!("workers stopped; waiting for the connections to close");
            tokio::time::sleep(Duration::from_secs(CLOSE_GRACE_SECS)).await;
            tracing::warn!("connections still open; exiting");
            std::process::exit(0);
        });
    })
    .await;
    tokio::task::spawn_blocking(move || stop_workers(&state))
        .await
        .map_err(|e| Error::Backend(format!("stopping the workers: {e}")))?;
    tracing::info!("drained; bye");
    Ok(())
}

/// Seconds the connections get to close after the drain timeout has ended their requests.
const CLOSE_GRACE_SECS: u64 = 5;

/// Stops the loaded model's workers and joins their threads: they own the backends (GPU
/// devices among them), and a GPU driver's exit-time teardown under a live device crashed the
/// process (NVIDIA, Vulkan). Requests they still hold end with an error.
fn stop_workers(state: &AppState) {
    let model = state.model.read().ok().and_then(|m| m.clone());
    if let Some(m) = model {
        m.stop_workers();
    }
}

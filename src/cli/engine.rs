//! The CLI's loading: the library's one loader, then a generator on the chosen backend.

use std::time::Instant;

use anyhow::{Context, Result};

use super::{spinner, ModelArgs};
use bitnet_inference::backend::{Backend, HeadMode, KvDtype};
use bitnet_inference::config::GenerationConfig;
use bitnet_inference::cpu::kernels::Kernels;
use bitnet_inference::engine::generate::Generator;
use bitnet_inference::engine::window::SinkWindow;
use bitnet_inference::load::{
    load_backend, load_speculation, BackendKind, LoadOptions, ModelFiles, SpecMethod,
};
use bitnet_inference::tokenizer::Tokenizer;

/// Speculative decoding options (generate, bench).
#[derive(clap::Args)]
pub(crate) struct SpecArgs {
    /// Speculative decoding: `ngram` (prompt lookup: drafts from earlier text) or `draft:DIR`
    /// (a smaller model with the same tokenizer drafting greedily).
    #[arg(long)]
    pub(crate) speculative: Option<String>,
    /// Most tokens drafted per step (1..=32).
    #[arg(long, default_value_t = 4)]
    pub(crate) draft_tokens: usize,
    /// Where a draft model runs (default: the target's backend; `cpu` can pay off beside a
    /// GPU target, whose steps cost the same for a small model).
    #[arg(long, value_enum)]
    pub(crate) draft_backend: Option<BackendKind>,
}

/// Attention sinks and a sliding window: generation past the context window.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct WindowArgs {
    /// Keep generating past the KV cache with a sliding window of this many recent positions
    /// (StreamingLLM; evicted positions move out `window / 8` at a time).
    #[arg(long)]
    pub(crate) window: Option<usize>,
    /// Attention sinks: the first positions, kept for good (with --window).
    #[arg(long, requires = "window", default_value_t = 4)]
    pub(crate) sinks: usize,
}

impl WindowArgs {
    /// The sink window asked for (None without --window).
    pub(crate) fn sink_window(&self) -> Option<SinkWindow> {
        self.window.map(|window| SinkWindow {
            sinks: self.sinks,
            window,
        })
    }
}

/// Turns on the speculation of `spec` (if any) for `gen`, a draft model loaded as `args`
/// says on the backend the target runs on.
pub(crate) fn attach_speculation(
    gen: &mut Engine,
    args: &ModelArgs,
    spec: &SpecArgs,
) -> Result<()> {
    let Some(method) = &spec.speculative else {
        return Ok(());
    };
    let method = SpecMethod::parse(method)?;
    let mut opts = load_options(args)?;
    let (cpu, vocab) = match &*gen {
        Engine::Cpu(g) => (Some(g.backend()), g.backend().config().vocab_size),
        #[cfg(feature = "gpu")]
        Engine::Gpu(g) => (None, g.backend().config().vocab_size),
    };
    opts.backend = match (spec.draft_backend, cpu.is_some()) {
        (Some(b), _) => b,
        (None, true) => BackendKind::Cpu,
        (None, false) => BackendKind::Gpu,
    };
    let s = load_speculation(&method, spec.draft_tokens, &opts, vocab, cpu)?;
    match gen {
        Engine::Cpu(g) => g.set_speculation(Some(s)),
        #[cfg(feature = "gpu")]
        Engine::Gpu(g) => g.set_speculation(Some(s)),
    }
    Ok(())
}

/// `--prefetch`: auto (None: measured), off (0) or a distance in bytes.
pub(crate) fn parse_prefetch(s: &str) -> Result<Option<usize>> {
    match s {
        "auto" => Ok(None),
        "off" => Ok(Some(0)),
        n => match n.parse::<usize>() {
            Ok(b) if b <= 1 << 20 => Ok(Some(b)),
            _ => anyhow::bail!(
                "--prefetch {n}: expected auto, off or a distance in bytes up to 1048576"
            ),
        },
    }
}

fn load_options(args: &ModelArgs) -> Result<LoadOptions> {
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    Ok(LoadOptions {
        backend: args.backend,
        threads,
        head: HeadMode::parse(&args.head)?,
        kv: KvDtype::parse(&args.kv)?,
        kernels: Some(Kernels::by_name(&args.kernels)?),
        prefetch: parse_prefetch(&args.prefetch)?,
        max_step: None,
        adapter: 0,
    })
}

/// A generator on whichever backend was chosen.
pub(crate) enum Engine {
    /// On the CPU.
    Cpu(Box<Generator<bitnet_inference::cpu::CpuBackend>>),
    /// On the GPU.
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
pub(crate) struct Ctx {
    pub(crate) tokenizer: Option<Tokenizer>,
    pub(crate) gen_cfg: GenerationConfig,
    pub(crate) load_s: f64,
    pub(crate) threads: usize,
}

/// A loaded model: its generator and the rest.
pub(crate) struct Loaded {
    pub(crate) gen: Engine,
    pub(crate) ctx: Ctx,
}

/// Loads the model of `args` onto its backend with a generator for its whole context.
pub(crate) fn load(args: &ModelArgs) -> Result<Loaded> {
    let t0 = Instant::now();
    let pb = spinner(&format!("loading {}", args.model.display()));
    let model = bitnet_inference::hub::resolve(&args.model)?;
    let files = ModelFiles::from_path(&model)
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    let opts = load_options(args)?;
    let threads = opts.threads;
    let (engine, fallback) = load_backend(&files.weights, &opts)?;
    if let Some(why) = fallback {
        eprintln!("backend: cpu ({why})");
    }
    let gen = match engine {
        bitnet_inference::load::Engine::Cpu(b) => Engine::Cpu(Box::new(Generator::new(*b)?)),
        #[cfg(feature = "gpu")]
        bitnet_inference::load::Engine::Gpu(b) => Engine::Gpu(Box::new(Generator::new(*b)?)),
    };
    let ModelFiles {
        tokenizer,
        generation,
        ..
    } = files;
    pb.finish_and_clear();
    let load_s = t0.elapsed().as_secs_f64();
    if args.backend == BackendKind::Auto {
        eprintln!("backend: {}", with_gen!(&gen, g => g.backend().describe()));
    }
    Ok(Loaded {
        gen,
        ctx: Ctx {
            tokenizer,
            gen_cfg: generation,
            load_s,
            threads,
        },
    })
}

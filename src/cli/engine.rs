//! The CLI's loading: the library's one loader, then a generator on the chosen backend.

use std::time::Instant;

use anyhow::{Context, Result};

use super::{spinner, ModelArgs};
use bitnet_inference::backend::{Backend, HeadMode, KvDtype};
use bitnet_inference::config::GenerationConfig;
use bitnet_inference::cpu::kernels::Kernels;
use bitnet_inference::engine::generate::Generator;
use bitnet_inference::load::{load_backend, BackendKind, LoadOptions, ModelFiles};
use bitnet_inference::tokenizer::Tokenizer;

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
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let opts = LoadOptions {
        backend: args.backend,
        threads,
        head: HeadMode::parse(&args.head)?,
        kv: KvDtype::parse(&args.kv)?,
        kernels: Some(Kernels::by_name(&args.kernels)?),
        max_step: None,
    };
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

//! The one loader every front end uses: a model's files (from a directory, or from bytes in
//! the browser) into weights, tokenizer and generation config, then onto the chosen backend.

use std::path::Path;
#[cfg(target_arch = "wasm32")]
use std::sync::Arc;

use crate::backend::{HeadMode, KvDtype};
use crate::config::{GenerationConfig, ModelConfig};
use crate::cpu::kernels::Kernels;
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::format::{safetensors, Weights};
use crate::tokenizer::Tokenizer;

/// A model's files, parsed and checked.
pub struct ModelFiles {
    /// The weights (mmap-backed when read from a directory).
    pub weights: Weights,
    /// The tokenizer, when the model has one.
    pub tokenizer: Option<Tokenizer>,
    /// EOS and BOS ids for generation.
    pub generation: GenerationConfig,
}

impl ModelFiles {
    /// Reads a model from `path`: a GGUF file, or a directory of config.json, *.safetensors and
    /// tokenizer files.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_path(path: &Path) -> Result<Self> {
        if crate::format::gguf::is_gguf(path) {
            Self::from_gguf(path)
        } else {
            Self::from_dir(path)
        }
    }

    /// Reads a GGUF file; the tokenizer is `tokenizer.json` beside it when there is one, else
    /// the file's own tokenizer metadata.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_gguf(path: &Path) -> Result<Self> {
        use crate::format::gguf;
        let parts = gguf::load(path)?;
        let beside = path.parent().filter(|d| d.join("tokenizer.json").exists());
        let tokenizer = match beside {
            Some(dir) => Tokenizer::from_dir(dir)?,
            None => gguf::vocab::tokenizer(&parts.file)?,
        };
        Ok(ModelFiles {
            weights: parts.weights,
            tokenizer,
            generation: parts.generation,
        })
    }

    /// Reads a model directory (config.json, *.safetensors, tokenizer files).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.join("config.json").exists() {
            return Err(Error::Config(format!(
                "{}: no config.json (is this a model directory?)",
                dir.display()
            )));
        }
        let weights = safetensors::load(dir)?;
        let generation = GenerationConfig::from_dir(dir, &weights.config)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        Ok(ModelFiles {
            weights,
            tokenizer,
            generation,
        })
    }

    /// Builds a model from files held in memory (the browser build).
    #[cfg(target_arch = "wasm32")]
    pub fn from_buffers(files: InMemoryFiles) -> Result<Self> {
        let config_text = files
            .config
            .ok_or_else(|| Error::Request("the model has no config.json".into()))?;
        if files.safetensors.is_empty() {
            return Err(Error::Request("the model has no *.safetensors file".into()));
        }
        let cv = crate::json::parse(config_text.as_bytes())
            .map_err(|e| Error::json("config.json", e))?;
        let config = ModelConfig::from_json(&cv).map_err(|e| match e {
            Error::Config(msg) => Error::json("config.json", msg),
            other => other,
        })?;
        let generation =
            GenerationConfig::from_json_text(files.generation_config.as_deref(), &config)?;
        let tokenizer = match &files.tokenizer {
            Some(t) => Some(Tokenizer::from_parts(
                t,
                files.tokenizer_config.as_deref(),
                files.chat_template.clone(),
            )?),
            None => None,
        };
        let ck = safetensors::Checkpoint::from_buffers(files.safetensors)?;
        let weights = safetensors::weights(config, &ck)?;
        Ok(ModelFiles {
            weights,
            tokenizer,
            generation,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }
}

/// A model's files held in memory, by role.
#[cfg(target_arch = "wasm32")]
#[derive(Default)]
pub struct InMemoryFiles {
    /// The safetensors files (all shards), by name.
    pub safetensors: Vec<(String, Arc<Vec<u8>>)>,
    /// config.json.
    pub config: Option<String>,
    /// tokenizer.json.
    pub tokenizer: Option<Vec<u8>>,
    /// tokenizer_config.json.
    pub tokenizer_config: Option<String>,
    /// chat_template.jinja.
    pub chat_template: Option<String>,
    /// generation_config.json.
    pub generation_config: Option<String>,
}

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum BackendKind {
    /// A real GPU when wgpu finds one, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// The GPU backend.
    Gpu,
}

impl BackendKind {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        }
    }
}

/// How to load a model onto a backend.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Which backend.
    pub backend: BackendKind,
    /// CPU worker threads (0 = one per core).
    pub threads: usize,
    /// Head storage.
    pub head: HeadMode,
    /// KV cache element type (f16 on the GPU backend only).
    pub kv: KvDtype,
    /// CPU kernel set (None = the fastest detected).
    pub kernels: Option<Kernels>,
    /// Bytes the CPU kernels prefetch ahead (None = measured, see `CpuBackend::on_shared`).
    pub prefetch: Option<usize>,
    /// Most tokens in one GPU step (None = the backend's default).
    pub max_step: Option<usize>,
    /// Which GPU adapter (0: the best wgpu finds; see `gpu::probe`).
    pub adapter: usize,
}

/// A model on the backend that was chosen.
pub enum Engine {
    /// On the CPU.
    Cpu(Box<CpuBackend>),
    /// On the GPU.
    #[cfg(feature = "gpu")]
    Gpu(Box<crate::gpu::GpuBackend>),
}

/// Whether `kind` means the GPU here, and why not when `Auto` falls back to the CPU.
pub fn choose_gpu(kind: BackendKind) -> Result<(bool, Option<String>)> {
    match kind {
        BackendKind::Cpu => Ok((false, None)),
        #[cfg(all(feature = "gpu", not(target_arch = "wasm32")))]
        BackendKind::Gpu => Ok((true, None)),
        #[cfg(all(feature = "gpu", not(target_arch = "wasm32")))]
        BackendKind::Auto => Ok(match crate::gpu::probe() {
            Some(a) if !a.is_cpu => (true, None),
            Some(a) => (
                false,
                Some(format!("the only GPU adapter is a software one: {a}")),
            ),
            None => (false, Some("no GPU adapter found".into())),
        }),
        #[cfg(not(all(feature = "gpu", not(target_arch = "wasm32"))))]
        BackendKind::Gpu => Err(Error::Backend(
            "this build has no GPU backend (built without the `gpu` feature)".into(),
        )),
        #[cfg(not(all(feature = "gpu", not(target_arch = "wasm32"))))]
        BackendKind::Auto => Ok((false, None)),
    }
}

impl LoadOptions {
    /// The CPU backend's share of these options.
    pub fn cpu(&self) -> crate::cpu::CpuOptions {
        crate::cpu::CpuOptions {
            threads: self.threads,
            head: self.head,
            kernels: self.kernels,
            kv: self.kv,
            prefetch: self.prefetch,
        }
    }
}

/// Loads `weights` onto the backend `opts` asks for (native builds; the browser creates its
/// WebGPU device asynchronously, see `wasm/`). With `Auto`, the reason for falling back to
/// the CPU comes back too.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_backend(weights: &Weights, opts: &LoadOptions) -> Result<(Engine, Option<String>)> {
    let (gpu, why) = choose_gpu(opts.backend)?;
    if gpu {
        #[cfg(feature = "gpu")]
        {
            let mut g = crate::gpu::GpuOptions {
                head: opts.head,
                kv: opts.kv,
                // Prefill matmuls on cooperative matrices where the adapter has them, unless
                // BITNET_GPU_TENSOR_CORES=0.
                tensor_cores: std::env::var_os("BITNET_GPU_TENSOR_CORES").is_none_or(|v| v != "0"),
                adapter: opts.adapter,
                ..Default::default()
            };
            if let Some(s) = opts.max_step {
                g.max_step = s;
            }
            let b = crate::gpu::GpuBackend::load(weights, &g)?;
            return Ok((Engine::Gpu(Box::new(b)), why));
        }
    }
    if opts.kv == KvDtype::F16 {
        return Err(Error::Config(
            "an f16 KV cache needs the GPU backend (the CPU's KV cache is f32 or int8)".into(),
        ));
    }
    let b = CpuBackend::load(weights, &opts.cpu())?;
    Ok((Engine::Cpu(Box::new(b)), why))
}

/// How a front end asked for speculative decoding: `ngram` (prompt lookup) or `draft:DIR`
/// (a smaller model with the same tokenizer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup.
    Ngram,
    /// A draft model at this path.
    Draft(std::path::PathBuf),
}

impl SpecMethod {
    /// Parses `ngram` or `draft:DIR`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "ngram" => Ok(SpecMethod::Ngram),
            Some(("draft", dir)) if !dir.is_empty() => Ok(SpecMethod::Draft(dir.into())),
            _ => Err(Error::Request(format!(
                "speculative method `{s}`: use `ngram` or `draft:DIR`"
            ))),
        }
    }
}

/// The speculation `method` drafting `draft_tokens` at a time for a target of `target_vocab`
/// ids: a draft model is loaded as `opts` says (the backend the target runs on); on the CPU
/// it shares `target_cpu`'s threads when given.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_speculation(
    method: &SpecMethod,
    draft_tokens: usize,
    opts: &LoadOptions,
    target_vocab: usize,
    target_cpu: Option<&CpuBackend>,
) -> Result<crate::engine::speculative::Speculation> {
    use crate::engine::speculative::{Drafter, ModelDrafter, Speculation};
    let dir = match method {
        SpecMethod::Ngram => return Speculation::ngram(draft_tokens),
        SpecMethod::Draft(dir) => dir,
    };
    let files = ModelFiles::from_path(dir)
        .map_err(|e| Error::Config(format!("draft model {}: {e}", dir.display())))?;
    let drafter: Box<dyn Drafter> = match load_backend(&files.weights, opts)?.0 {
        Engine::Cpu(mut b) => {
            if let Some(t) = target_cpu {
                b.share_threads(t);
            }
            Box::new(ModelDrafter::new(*b, target_vocab)?)
        }
        #[cfg(feature = "gpu")]
        Engine::Gpu(b) => Box::new(ModelDrafter::new(*b, target_vocab)?),
    };
    Speculation::new(drafter, draft_tokens)
}

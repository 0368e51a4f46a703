//! The `bitnet` command-line tool: one file per command over a shared loader.

#[macro_use]
mod engine;
mod bench;
mod chat;
mod convert;
mod generate;
mod logits;
mod perplexity;
#[cfg(feature = "server")]
mod serve;
mod synth;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use indicatif::ProgressBar;

use bitnet_inference::load::BackendKind;

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
    Generate(generate::GenerateArgs),
    /// Chat interactively using the model's chat template.
    Chat(chat::ChatArgs),
    /// Print the logits of a token sequence as JSON.
    Logits(logits::LogitsArgs),
    /// Perplexity of a text file, scored in windows of the model's context.
    Perplexity(perplexity::PerplexityArgs),
    /// Measure load time, prefill and decode speed, bandwidth and memory.
    Bench(bench::BenchArgs),
    /// Write a random model of a preset shape in the HF packed format.
    Synth(synth::SynthArgs),
    /// Rewrite a model (directory or GGUF) with the CPU kernels' layout, to load as a mmap.
    Convert(convert::ConvertArgs),
    /// Serve the model over an OpenAI-compatible HTTP API with continuous batching (CPU).
    #[cfg(feature = "server")]
    Serve(serve::ServeArgs),
    /// Load-test a server: requests/s, tokens/s, TTFT and per-token latency per concurrency.
    #[cfg(feature = "server")]
    BenchServe(serve::BenchServeArgs),
}

/// Where the model comes from and how it runs (shared by the commands that load one).
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Model: a directory (config.json, model.safetensors, tokenizer.json) or a GGUF file.
    #[arg(long, default_value = "models/kjv-fortunes")]
    pub(crate) model: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) backend: BackendKind,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// CPU kernel set: auto, or one of scalar, avx2, avx512vnni, amx, neon.
    #[arg(long, default_value = "auto")]
    pub(crate) kernels: String,
    /// CPU weight streams' software prefetch: auto (measured at load), off, or a distance in
    /// bytes.
    #[arg(long, default_value = "auto")]
    pub(crate) prefetch: String,
    /// Head storage: native (checkpoint dtype) or int8 (per-row scales).
    #[arg(long, default_value = "native")]
    pub(crate) head: String,
    /// KV cache element type: f32; f16 (GPU backend: half the cache memory and reads); int8
    /// (rows of int8 with a scale each: about a quarter of f32's memory).
    #[arg(long, default_value = "f32")]
    pub(crate) kv: String,
}

/// A spinner on stderr while `msg` runs.
pub(crate) fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner().with_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Parses the command line and runs the command.
pub fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Generate(a) => generate::generate(a),
        Cmd::Chat(a) => chat::chat(a),
        Cmd::Logits(a) => logits::logits(a),
        Cmd::Perplexity(a) => perplexity::perplexity(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Synth(a) => synth::synth(a),
        Cmd::Convert(a) => convert::convert(a),
        #[cfg(feature = "server")]
        Cmd::Serve(a) => serve::serve(a),
        #[cfg(feature = "server")]
        Cmd::BenchServe(a) => serve::bench_serve(a),
    }
}

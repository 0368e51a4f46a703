//! `bitnet perplexity`: perplexity of a text file in windows of the context.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use super::engine::{load, Ctx, Engine, Loaded};
use super::{spinner, ModelArgs};
use bitnet_inference::backend::Backend;
use bitnet_inference::engine::generate::Generator;
use bitnet_inference::engine::window::SinkWindow;

#[derive(Args)]
pub(crate) struct PerplexityArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// UTF-8 text file to score (tokenized with BOS, like a prompt).
    #[arg(long)]
    pub(crate) file: PathBuf,
    /// Tokens per window (0 = the model's context, max_position_embeddings).
    #[arg(long, default_value_t = 0)]
    pub(crate) window: usize,
    /// Distance between window starts (0 = the window: non-overlapping windows).
    #[arg(long, default_value_t = 0)]
    pub(crate) stride: usize,
    /// Score the text as one stream with this many attention sinks and a sliding cache of
    /// --window recent positions (what generation past the context sees) instead of
    /// independent windows.
    #[arg(long)]
    pub(crate) sinks: Option<usize>,
    /// Score only the first N tokens of the file (0 = all).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn perplexity(a: PerplexityArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    with_gen!(&mut gen, g => perplexity_on(g, ctx, &a))
}

pub(crate) fn perplexity_on<B: Backend>(
    gen: &mut Generator<B>,
    ctx: Ctx,
    a: &PerplexityArgs,
) -> Result<()> {
    let tok = ctx.tokenizer.context("the model has no tokenizer.json")?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let mut ids = tok.encode(&text, true)?;
    if a.max_tokens > 0 {
        ids.truncate(a.max_tokens);
    }
    let window = match (a.window, a.sinks) {
        (0, Some(sinks)) => gen.context().saturating_sub(sinks),
        (0, None) => gen.context(),
        (w, _) => w,
    };
    let stride = if a.stride == 0 { window } else { a.stride };
    let pb = spinner(&format!("scoring {} tokens", ids.len()));
    let t0 = Instant::now();
    let r = match a.sinks {
        Some(sinks) => gen.perplexity_streaming(&ids, SinkWindow { sinks, window })?,
        None => gen.perplexity(&ids, window, stride)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let backend = gen.backend().describe();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "ppl": r.ppl(), "mean_nll": r.mean_nll(), "nll": r.nll, "tokens": r.tokens,
                "scored": r.scored, "window": r.window, "stride": r.stride, "sinks": r.sinks,
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

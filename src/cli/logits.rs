//! `bitnet logits`: the logits of a token sequence as JSON.

use anyhow::Result;
use clap::Args;

use super::engine::{load, Ctx, Engine, Loaded};
use super::generate::parse_tokens;
use super::ModelArgs;
use bitnet_inference::backend::Backend;
use bitnet_inference::engine::generate::Generator;

#[derive(Args)]
pub(crate) struct LogitsArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long)]
    pub(crate) tokens: String,
    /// Logits of every position instead of the last.
    #[arg(long)]
    pub(crate) all: bool,
}

pub(crate) fn logits(a: LogitsArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    with_gen!(&mut gen, g => logits_on(g, ctx, &a))
}

pub(crate) fn logits_on<B: Backend>(
    gen: &mut Generator<B>,
    ctx: Ctx,
    a: &LogitsArgs,
) -> Result<()> {
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

//! `bitnet generate`: text (or tokens) from a prompt, streamed to stdout or as one JSON object.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::engine::{attach_speculation, load, Ctx, Engine, Loaded, SpecArgs, WindowArgs};
use super::ModelArgs;
use bitnet_inference::backend::Backend;
use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::engine::grammar::{Constraint, GrammarSpec, Grammars};
use bitnet_inference::engine::sampler::SamplingParams;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "tokens")]
    pub(crate) prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long)]
    pub(crate) tokens: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub(crate) max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repetition_penalty: f32,
    /// Presence penalty (OpenAI's: subtracted once from generated tokens' logits; 0 = off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub(crate) presence_penalty: f32,
    /// Frequency penalty (OpenAI's: subtracted per time a token was generated; 0 = off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub(crate) frequency_penalty: f32,
    /// Bias a token's logit: ID=BIAS, −100..100 (repeatable).
    #[arg(long = "logit-bias", value_parser = parse_bias, allow_hyphen_values = true)]
    pub(crate) logit_bias: Vec<(u32, f32)>,
    /// Report each generated token's log-probability and this many alternatives in the JSON
    /// output (`logprobs`).
    #[arg(long)]
    pub(crate) logprobs: Option<usize>,
    /// Random seed.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Constrain the output to JSON valid against this schema (a file).
    #[arg(long, conflicts_with_all = ["grammar", "regex"])]
    pub(crate) json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to this Lark grammar (a file).
    #[arg(long, conflicts_with = "regex")]
    pub(crate) grammar: Option<std::path::PathBuf>,
    /// Constrain the output to match this regular expression.
    #[arg(long)]
    pub(crate) regex: Option<String>,
    /// Stop string (repeatable).
    #[arg(long = "stop")]
    pub(crate) stop: Vec<String>,
    /// Do not stop at EOS tokens.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) spec: SpecArgs,
    #[command(flatten)]
    pub(crate) window: WindowArgs,
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected ID=BIAS"))?;
    let id = id
        .trim()
        .parse()
        .map_err(|_| format!("`{id}` is not a token id"))?;
    let bias = bias
        .trim()
        .parse()
        .map_err(|_| format!("`{bias}` is not a number"))?;
    Ok((id, bias))
}

/// The structured-output constraint of `--json-schema`, `--grammar` or `--regex`, if any.
fn constraint(
    a: &GenerateArgs,
    tokenizer: Option<&bitnet_inference::tokenizer::Tokenizer>,
    eos: &[u32],
    vocab: usize,
) -> Result<Option<Constraint>> {
    let read = |f: &std::path::Path| {
        std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))
    };
    let spec = match (&a.json_schema, &a.grammar, &a.regex) {
        (Some(f), _, _) => GrammarSpec::JsonSchema(
            serde_json::from_str(&read(f)?)
                .with_context(|| format!("--json-schema {}: not JSON", f.display()))?,
        ),
        (_, Some(f), _) => GrammarSpec::Lark(read(f)?),
        (_, _, Some(r)) => GrammarSpec::Regex(r.clone()),
        _ => return Ok(None),
    };
    let tok = tokenizer.context("structured output needs the model's tokenizer.json")?;
    let eos = *eos
        .first()
        .context("structured output needs an end-of-sequence token (generation_config.json)")?;
    let grammars = Grammars::new(std::sync::Arc::new(tok.clone()), vocab, eos)?;
    Ok(Some(grammars.constraint(&spec)?))
}

pub(crate) fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .with_context(|| format!("--tokens: `{t}` is not a token id"))
        })
        .collect()
}

pub(crate) fn generate(a: GenerateArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    attach_speculation(&mut gen, &a.model, &a.spec)?;
    with_gen!(&mut gen, g => generate_on(g, ctx, &a))
}

pub(crate) fn generate_on<B: Backend>(
    gen: &mut Generator<B>,
    ctx: Ctx,
    a: &GenerateArgs,
) -> Result<()> {
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
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            logit_bias: a.logit_bias.clone(),
            logprobs: a.logprobs,
        },
        eos_token_ids: gen_cfg.eos_token_ids.clone(),
        ignore_eos: a.ignore_eos,
        stop_strings: a.stop.clone(),
        sink_window: a.window.sink_window(),
        constraint: constraint(
            a,
            tokenizer.as_ref(),
            &gen_cfg.eos_token_ids,
            gen.backend().config().vocab_size,
        )?,
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
        let mut v = serde_json::json!({
            "tokens": out.tokens,
            "text": out.text,
            "prompt_tokens": out.prompt_tokens,
            "decode_tok_s": out.decode_tok_s(),
            "prefill_tok_s": out.prompt_tokens as f64 / out.prefill_s.max(1e-9),
            "finish_reason": out.finish.as_str(),
            "speculative": spec_json(gen, &out),
            "sink_window": opts.sink_window.map(|w| serde_json::json!({
                "sinks": w.sinks,
                "window": w.window,
                "evicted": out.evicted,
            })),
        });
        if a.logprobs.is_some() {
            v["logprobs"] = out
                .logprobs
                .iter()
                .map(
                    |l| serde_json::json!({ "token": l.token, "logprob": l.logprob, "top": l.top }),
                )
                .collect();
        }
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
        let accepted = out.speculative.map_or(String::new(), |s| {
            format!(
                ", {:.0}% of {} drafted tokens accepted",
                s.acceptance_rate() * 100.0,
                s.drafted
            )
        });
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1} tok/s{accepted}]",
            out.prompt_tokens,
            out.tokens.len(),
            out.decode_tok_s()
        );
    }
    Ok(())
}

/// The speculative decoding report of a generation (null when it was off).
pub(crate) fn spec_json<B: Backend>(
    gen: &Generator<B>,
    out: &bitnet_inference::engine::generate::Generation,
) -> serde_json::Value {
    match (gen.speculation(), out.speculative) {
        (Some(sp), Some(s)) => serde_json::json!({
            "method": sp.drafter.name(),
            "draft_tokens": sp.draft_tokens,
            "steps": s.steps,
            "drafted": s.drafted,
            "accepted": s.accepted,
            "acceptance_rate": s.acceptance_rate(),
            "wasted": s.wasted,
            "draft_acceptance_rate": s.draft_acceptance_rate(),
        }),
        _ => serde_json::Value::Null,
    }
}

//! `bitnet chat`: an interactive chat through the model's chat template.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::engine::{load, Ctx, Engine, Loaded};
use super::ModelArgs;
use bitnet_inference::backend::Backend;
use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::engine::sampler::SamplingParams;
use bitnet_inference::tokenizer::ChatMessage;

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// System prompt.
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub(crate) temperature: f32,
    /// Top-p.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) top_p: f32,
    /// Random seed.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    #[command(flatten)]
    pub(crate) window: super::engine::WindowArgs,
}

pub(crate) fn chat(a: ChatArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    with_gen!(&mut gen, g => chat_on(g, ctx, &a))
}

pub(crate) fn chat_on<B: Backend>(gen: &mut Generator<B>, ctx: Ctx, a: &ChatArgs) -> Result<()> {
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
        sink_window: a.window.sink_window(),
        ..Default::default()
    };
    eprintln!(
        "chat with {} — empty line or Ctrl-D to quit",
        a.model.model.display()
    );
    let stdin = std::io::stdin();
    let mut failed = 0;
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(ChatMessage::new("user", line.trim()));
        let mut stdout = std::io::stdout().lock();
        // A turn that cannot run (the template refuses, the prompt outgrows the context) is
        // reported and dropped; the conversation so far stays.
        let reply = tok.encode_chat(&messages).and_then(|prompt| {
            gen.generate(&prompt, &opts, Some(&tok), |_, piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
                true
            })
        });
        match reply {
            Ok(out) => {
                writeln!(stdout)?;
                messages.push(ChatMessage::new("assistant", &out.text));
            }
            Err(e) => {
                eprintln!("error: {e}");
                messages.pop();
                failed += 1;
            }
        }
    }
    if failed > 0 && !std::io::IsTerminal::is_terminal(&stdin) {
        bail!("{failed} chat turn(s) failed");
    }
    Ok(())
}

//! The `bitnet` command-line tool: generate, chat, logits, perplexity, bench, synth and serve.

mod cli;

fn main() -> anyhow::Result<()> {
    cli::run()
}

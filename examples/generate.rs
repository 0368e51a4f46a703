//! Load a checkpoint, generate from a prompt and stream the text: the smallest program using
//! the library. `cargo run --release --example generate -- models/kjv-fortunes "Thou shalt not"`

use std::io::Write;
use std::path::PathBuf;

use bitnet_inference::cpu::{CpuBackend, CpuOptions};
use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::engine::sampler::SamplingParams;
use bitnet_inference::format::safetensors::load;
use bitnet_inference::tokenizer::Tokenizer;

fn main() -> bitnet_inference::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "models/kjv-fortunes".into()));
    let prompt = args.next().unwrap_or_else(|| "Thou shalt not".into());

    let weights = load(&dir)?;
    let tokenizer = Tokenizer::from_dir(&dir)?.ok_or_else(|| {
        bitnet_inference::Error::Tokenizer(format!("{}: no tokenizer.json", dir.display()))
    })?;
    let mut gen = Generator::new(CpuBackend::load(&weights, &CpuOptions::default())?)?;

    let opts = GenerateOptions {
        max_tokens: 32,
        sampling: SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: Some(1),
            ..Default::default()
        },
        eos_token_ids: weights.config.eos_token_ids.clone(),
        ..Default::default()
    };
    let ids = tokenizer.encode(&prompt, true)?;
    let out = gen.generate(&ids, &opts, Some(&tokenizer), |_, piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
        true
    })?;
    println!(
        "\n[{} tokens, {:.1} tok/s, finish: {}]",
        out.tokens.len(),
        out.decode_tok_s(),
        out.finish.as_str()
    );
    Ok(())
}

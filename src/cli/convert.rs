//! `bitnet convert`: a model rewritten with the CPU kernels' layout in its checkpoint, so that
//! loading it is a memory map.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::spinner;

#[derive(Args)]
pub(crate) struct ConvertArgs {
    /// The model to convert: a directory (safetensors) or a GGUF file.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Output directory (model.safetensors, config.json, generation_config.json, tokenizer).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn convert(a: ConvertArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let pb = spinner(&format!("converting {}", a.model.display()));
    let model = bitnet_inference::hub::resolve(&a.model)?;
    bitnet_inference::convert::convert(&model, &a.out)
        .with_context(|| format!("converting {} to {}", a.model.display(), a.out.display()))?;
    pb.finish_and_clear();
    eprintln!(
        "wrote {} in {:.1} s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

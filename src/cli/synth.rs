//! `bitnet synth`: a random model of a preset shape in the HF packed format.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use bitnet_inference::config::Preset;
use bitnet_inference::format;

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// Shape: 2b4t or tiny.
    #[arg(long)]
    pub(crate) shape: String,
    /// Output directory.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}

pub(crate) fn synth(a: SynthArgs) -> Result<()> {
    let cfg = Preset::parse(&a.shape)?.config();
    let pb = ProgressBar::new(0);
    pb.set_style(ProgressStyle::with_template(
        "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
    )?);
    pb.set_message(format!("writing {}", a.out.display()));
    format::synth::write_model(&a.out, &cfg, a.seed, |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    eprintln!("wrote {} ({} shape)", Path::new(&a.out).display(), a.shape);
    Ok(())
}

//! `bitnet bench`: load time, prefill and decode speed, bandwidth, memory, batched decode.

use anyhow::{bail, Result};
use clap::Args;

use super::engine::{load, Ctx, Engine, Loaded};
use super::{spinner, ModelArgs};
use bitnet_inference::backend::BatchBackend;
use bitnet_inference::engine::generate::{GenerateOptions, Generator};

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub(crate) prompt_len: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    pub(crate) gen: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also measure the memory read bandwidth (machine_gb_s): the host's, or on the GPU backend
    /// the device's, with its copy bandwidth, the ternary GEMV's and a device-wide barrier's
    /// cost (gpu_bandwidth).
    #[arg(long)]
    pub(crate) membw: bool,
    /// Report the time per op of the decode steps.
    #[arg(long)]
    pub(crate) profile: bool,
    /// Also measure batched decode: this many sequences of --prompt-len tokens decoding
    /// --gen tokens together over a paged KV cache (reported as batch_decode_tok_s).
    #[arg(long, default_value_t = 0)]
    pub(crate) batch: usize,
}

pub(crate) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) fn bench(a: BenchArgs) -> Result<()> {
    let Loaded { mut gen, ctx } = load(&a.model)?;
    let device = if a.membw {
        device_bandwidth(&mut gen)
    } else {
        None
    };
    with_gen!(&mut gen, g => bench_on(g, ctx, &a, device))
}

/// `bench --membw` on the GPU backend: the device's copy/read bandwidth and the ternary GEMV's
/// weight bandwidth (see `gpu::bandwidth`) as JSON, None on the CPU backend.
pub(crate) fn device_bandwidth(gen: &mut Engine) -> Option<serde_json::Value> {
    match gen {
        #[cfg(feature = "gpu")]
        Engine::Gpu(g) => serde_json::to_value(g.backend_mut().bandwidth(5)).ok(),
        _ => None,
    }
}

/// `bench --batch`: batched decode tok/s and the share of step time in `forward_rows`.
pub(crate) fn bench_batch<B: BatchBackend>(b: &mut B, a: &BenchArgs) -> Result<Option<(f64, f64)>> {
    if a.batch == 0 {
        return Ok(None);
    }
    let (tok_s, forward_s) =
        bitnet_inference::batch::decode_throughput(b, a.batch, a.prompt_len, a.gen)?;
    let steps_s = (a.batch * a.gen) as f64 / tok_s;
    Ok(Some((tok_s, forward_s / steps_s)))
}

pub(crate) fn bench_on<B: BatchBackend>(
    gen: &mut Generator<B>,
    ctx: Ctx,
    a: &BenchArgs,
    device: Option<serde_json::Value>,
) -> Result<()> {
    let Ctx {
        load_s, threads, ..
    } = ctx;
    let cfg = gen.backend().config().clone();
    if a.prompt_len + a.gen > gen.context() {
        bail!(
            "--prompt-len + --gen = {} exceeds the context window ({})",
            a.prompt_len + a.gen,
            gen.context()
        );
    }
    // A deterministic prompt of ordinary token ids.
    let prompt: Vec<u32> = (0..a.prompt_len)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let opts = GenerateOptions {
        max_tokens: a.gen,
        ignore_eos: true,
        ..Default::default()
    };
    let pb = spinner("warming up");
    gen.generate(
        &prompt[..prompt.len().min(8)],
        &GenerateOptions {
            max_tokens: 4,
            ..opts.clone()
        },
        None,
        |_, _| true,
    )?;
    pb.set_message(format!("prefill {} + decode {}", a.prompt_len, a.gen));
    let out = gen.generate(&prompt, &opts, None, |_, _| true)?;
    let profile = if a.profile {
        // A separate decode-only run: one prompt token, then `gen` steps.
        gen.generate(
            &prompt[..1],
            &GenerateOptions {
                max_tokens: 2,
                ..opts.clone()
            },
            None,
            |_, _| true,
        )?;
        gen.start_profile();
        gen.generate(&prompt[..1], &opts, None, |_, _| true)?;
        gen.take_profile()
    } else {
        None
    };
    pb.set_message(format!("batched decode of {} sequences", a.batch));
    let batch = bench_batch(gen.backend_mut(), a)?;
    pb.finish_and_clear();
    let prefill = a.prompt_len as f64 / out.prefill_s;
    let decode = out.decode_tok_s();
    let bytes = gen.backend().decode_bytes_per_token();
    let gb_s = bytes as f64 * decode / 1e9;
    let rss = peak_rss_mb();
    let backend = gen.backend().describe();

    // The GPU's read bandwidth where measured, else the host's.
    let gb = |k: &str| device.as_ref().and_then(|d| d[k].as_f64()).map(|v| v / 1e9);
    let machine = match gb("read") {
        Some(read) => Some(read),
        None => a
            .membw
            .then(|| bitnet_inference::cpu::membw::read_bandwidth_gb_s(1 << 30, threads, 5)),
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode,
                "decode_bytes_per_token": bytes, "decode_gb_s": gb_s, "peak_rss_mb": rss,
                "backend": backend, "prompt_len": a.prompt_len, "gen": a.gen,
                "machine_gb_s": machine, "gpu_bandwidth": device,
                "batch": a.batch, "batch_decode_tok_s": batch.map(|b| b.0),
                "batch_forward_share": batch.map(|b| b.1),
                "profile_ms_per_step": profile.as_ref().map(|p| p.entries.iter().map(|e| (e.0.to_string(), serde_json::json!(e.1 * 1e3 / a.gen as f64))).collect::<serde_json::Map<_, _>>()),
            })
        );
    } else {
        println!("backend        {backend}");
        println!("load           {:.2} s", load_s);
        println!(
            "prefill        {:.1} tok/s ({} tokens)",
            prefill, a.prompt_len
        );
        println!("decode         {:.2} tok/s ({} tokens)", decode, a.gen);
        println!("bytes/token    {:.1} MB", bytes as f64 / 1e6);
        println!("bandwidth      {:.2} GB/s", gb_s);
        println!("peak RSS       {:.0} MB", rss);
        if let Some((tok_s, share)) = batch {
            println!(
                "batch decode   {tok_s:.1} tok/s ({} sequences; {:.0}% of the time in the \
                 steps incl. the head and argmax, the rest on the host)",
                a.batch,
                100.0 * share
            );
        }
        if let (Some(copy), Some(serial), Some(indep)) =
            (gb("copy"), gb("gemv_serial"), gb("gemv_independent"))
        {
            println!("gpu copy       {copy:.1} GB/s (read + write)");
            println!(
                "ternary gemv   {serial:.1} GB/s back to back as in decode ({:.0}% of copy), \
                 {indep:.1} GB/s independent ({:.0}%)",
                100.0 * serial / copy,
                100.0 * indep / copy
            );
        }
        if let Some(g) = device.as_ref().and_then(|d| d.get("grid")) {
            print_grid_barrier(g);
        }
        let tensor = device.as_ref().and_then(|d| d.get("tensor"));
        if let Some(tc) = tensor.filter(|t| !t.is_null()) {
            let f = |k: &str| tc[k].as_f64().unwrap_or(f64::NAN) / 1e12;
            println!(
                "tensor cores   {:.1} T multiply-adds/s (f16 products alone), {:.1} with their \
                 fragment loads from workgroup memory",
                f("mma"),
                f("load_mma")
            );
        }
        if let Some(mb) = machine {
            println!(
                "machine read   {:.2} GB/s ({:.0}% used by decode)",
                mb,
                100.0 * gb_s / mb
            );
        }
        if let Some(p) = &profile {
            let total: f64 = p.entries.iter().map(|e| e.1).sum();
            println!("decode profile (wall time per step over {} steps)", a.gen);
            for (name, secs, calls) in &p.entries {
                let per = secs * 1e3 / a.gen as f64;
                println!(
                    "  {name:<22} {per:>8.3} ms {:>5.1}%  ({calls} calls)",
                    100.0 * secs / total
                );
            }
        }
    }
    Ok(())
}

/// The GPU's device-wide barrier probe (`--membw`), where it ran.
fn print_grid_barrier(g: &serde_json::Value) {
    let Some(points) = g["barrier_s"].as_array() else {
        return;
    };
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let each: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1} µs at {}", f(&p[1]) * 1e6, p[0]))
        .collect();
    println!(
        "grid barrier   {} workgroups ({} resident); a dependent dispatch {:.1} µs; stale \
         reads {:.1}% re-read rows, {:.1}% fresh rows",
        each.join(", "),
        g["workgroups"],
        f(&g["dispatch_s"]) * 1e6,
        100.0 * f(&g["stale_reused"]),
        100.0 * f(&g["stale_fresh"])
    );
}

//! `bitnet bench-serve`: a load generator for the server. At each concurrency level, that many
//! clients each send streaming completions one after another; reported are requests/s,
//! generated tokens/s, time to first token and time per output token (p50/p99).

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One concurrency level's results.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests completed.
    pub requests: usize,
    /// Wall time of the level.
    pub seconds: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Tokens generated (from `usage`).
    pub generated_tokens: usize,
    /// Generated tokens per second over all clients.
    pub tokens_per_s: f64,
    /// Time to first token, median and 99th percentile (ms).
    pub ttft_ms_p50: f64,
    /// See `ttft_ms_p50`.
    pub ttft_ms_p99: f64,
    /// Time between a request's streamed tokens, median and 99th percentile (ms).
    pub tpot_ms_p50: f64,
    /// See `tpot_ms_p50`.
    pub tpot_ms_p99: f64,
}

struct One {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn request(agent: &ureq::Agent, url: &str, body: &Value) -> Result<One> {
    let t0 = Instant::now();
    let r = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())
        .map_err(|e| Error::Backend(format!("{url}: {e}")))?;
    if r.status() != 200 {
        return Err(Error::Backend(format!("{url}: HTTP {}", r.status())));
    }
    let mut last: Option<Instant> = None;
    let mut one = One {
        ttft: 0.0,
        gaps: Vec::new(),
        tokens: 0,
    };
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.map_err(|e| Error::Backend(format!("{url}: {e}")))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)
            .map_err(|e| Error::Backend(format!("{url}: bad chunk: {e}")))?;
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            one.tokens = n as usize;
        }
        let is_token = v["choices"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["finish_reason"].is_null()));
        if is_token {
            let now = Instant::now();
            match last {
                None => one.ttft = (now - t0).as_secs_f64(),
                Some(l) => one.gaps.push((now - l).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    Ok(one)
}

/// Runs `clients` concurrent clients, each sending `per_client` streaming completions of
/// `max_tokens` tokens (random `prompt_len`-token prompts, greedy) to `base` (`http://host:port`),
/// with the request fields of `extra` (an object, e.g. a `response_format`) added. Client `c`
/// draws its prompts from `seed + c`: give every level and run its own seeds, or the server's
/// prefix cache answers the repeated prompts.
#[allow(clippy::too_many_arguments)]
pub fn run_level(
    base: &str,
    clients: usize,
    per_client: usize,
    prompt_len: usize,
    max_tokens: usize,
    extra: &Value,
    seed: u64,
) -> Result<LevelResult> {
    let url = format!("{base}/v1/completions");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into();
    let t0 = Instant::now();
    let results: Vec<Result<Vec<One>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                let (agent, url) = (&agent, &url);
                sc.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(c as u64));
                    (0..per_client)
                        .map(|_| {
                            let prompt: Vec<u32> =
                                (0..prompt_len).map(|_| rng.random_range(1..256)).collect();
                            let mut body = json!({
                                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "stream": true, "stream_options": { "include_usage": true },
                            });
                            for (k, v) in extra.as_object().into_iter().flatten() {
                                body[k] = v.clone();
                            }
                            request(agent, url, &body)
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Backend("client panicked".into())))
            })
            .collect()
    });
    let seconds = t0.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    let mut ttft: Vec<f64> = all.iter().map(|o| o.ttft * 1e3).collect();
    let mut gaps: Vec<f64> = all
        .iter()
        .flat_map(|o| o.gaps.iter().map(|g| g * 1e3))
        .collect();
    let tokens: usize = all.iter().map(|o| o.tokens).sum();
    Ok(LevelResult {
        clients,
        requests: all.len(),
        seconds,
        requests_per_s: all.len() as f64 / seconds,
        generated_tokens: tokens,
        tokens_per_s: tokens as f64 / seconds,
        ttft_ms_p50: pct(&mut ttft, 0.5),
        ttft_ms_p99: pct(&mut ttft, 0.99),
        tpot_ms_p50: pct(&mut gaps, 0.5),
        tpot_ms_p99: pct(&mut gaps, 0.99),
    })
}

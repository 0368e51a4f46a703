//! Continuous batching on the CPU backend: batched steps over the paged pool give each sequence
//! exactly what a single-sequence run gives, and the scheduler's concurrent requests (with
//! preemption, prefix reuse and cancellation) produce the same tokens as `Generator`.

use std::sync::mpsc;
use std::time::Duration;

use bitnet_inference::backend::{Backend, HeadMode, KvDtype, RowSlot};
use bitnet_inference::batch::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use bitnet_inference::engine::forward::forward_rows;
use bitnet_inference::engine::generate::{FinishReason, GenerateOptions, Generator};
use bitnet_inference::engine::sampler::SamplingParams;
use bitnet_inference::engine::window::SinkWindow;
use bitnet_inference::format::{safetensors::load, Weights};

mod common;
use common::{cpu, cpu_with, prompts};

fn weights() -> Weights {
    load(&common::fixture()).unwrap()
}

#[test]
fn batched_rows_equal_single_sequence_logits() {
    batched_rows_equal_single_sequence(KvDtype::F32);
}

/// The int8 pool's rows are its single-sequence cache's: per-position scales make the cache
/// independent of how rows are grouped into steps.
#[test]
fn batched_rows_equal_single_sequence_logits_on_an_int8_pool() {
    batched_rows_equal_single_sequence(KvDtype::Int8);
}

fn batched_rows_equal_single_sequence(kv: KvDtype) {
    let w = weights();
    let vocab = w.config.vocab_size;
    let ps = prompts(5, vocab as u32, 1);
    let mut single = Generator::new(cpu_with(&w, HeadMode::Native, kv)).unwrap();
    let want: Vec<Vec<f32>> = ps.iter().map(|p| single.logits(p, true).unwrap()).collect();

    let mut b = cpu_with(&w, HeadMode::Native, kv);
    let bs = 4;
    let mut pool = b.new_pool(64, bs).unwrap();
    // Block tables handed out in a scrambled order, so no sequence is contiguous.
    let mut next = (0..64u32).rev().step_by(1).collect::<Vec<_>>();
    let tables: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| {
            (0..p.len().div_ceil(bs))
                .map(|_| next.pop().unwrap() ^ 1)
                .collect()
        })
        .collect();
    // Two steps: the first half of every prompt, then the rest (rows of all sequences mixed).
    let mut got = vec![Vec::new(); ps.len()];
    for half in 0..2 {
        let (mut tokens, mut rows) = (Vec::new(), Vec::new());
        for (s, p) in ps.iter().enumerate() {
            let cut = p.len() / 2;
            let range = if half == 0 { 0..cut } else { cut..p.len() };
            for pos in range {
                tokens.push(p[pos]);
                rows.push(RowSlot { seq: s, pos });
            }
        }
        let all: Vec<usize> = (0..rows.len()).collect();
        let mut out = Vec::new();
        forward_rows(&mut b, &mut pool, &tokens, &rows, &tables, &all, &mut out).unwrap();
        for (r, slot) in rows.iter().enumerate() {
            got[slot.seq].push((slot.pos, out[r * vocab..(r + 1) * vocab].to_vec()));
        }
    }
    for (s, rows) in got.iter_mut().enumerate() {
        rows.sort_by_key(|r| r.0);
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
        assert_eq!(flat, want[s], "sequence {s}: batched logits differ");
    }
}

fn collect(rx: &mpsc::Receiver<Event>) -> (Vec<u32>, FinishReason) {
    let mut toks = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            Event::Token(t) => toks.push(t),
            Event::Logprobs(_) => {}
            Event::Done { finish, .. } => return (toks, finish),
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

fn run_concurrent(cfg: SchedulerConfig, n: usize, sampling: SamplingParams) -> (u64, u64) {
    run_concurrent_with(cfg, n, sampling, 12, None)
}

/// `n` concurrent requests of `max_tokens` each (under `window`) give `Generator`'s tokens;
/// returns the steps and preemptions.
fn run_concurrent_with(
    cfg: SchedulerConfig,
    n: usize,
    sampling: SamplingParams,
    max_tokens: usize,
    window: Option<SinkWindow>,
) -> (u64, u64) {
    let w = weights();
    let vocab = w.config.vocab_size as u32;
    let ps = prompts(n, vocab, 2);
    let mut g = Generator::new(cpu(&w)).unwrap();
    let want: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| {
            let opts = GenerateOptions {
                max_tokens,
                sampling: sampling.clone(),
                ignore_eos: true,
                sink_window: window,
                ..Default::default()
            };
            g.generate(p, &opts, None, |_, _| true).unwrap().tokens
        })
        .collect();
    let sched = Scheduler::spawn(cpu(&w), cfg).unwrap();
    let rxs: Vec<_> = ps
        .iter()
        .map(|p| {
            let (tx, rx) = mpsc::channel();
            sched
                .submit(Request {
                    constraint: None,
                    sink_window: window,
                    prompt: p.clone(),
                    max_tokens,
                    sampling: sampling.clone(),
                    stop_ids: Vec::new(),
                    priority: 0,
                    sink: Box::new(tx),
                })
                .unwrap();
            rx
        })
        .collect();
    for (i, rx) in rxs.iter().enumerate() {
        let (toks, finish) = collect(rx);
        assert_eq!(finish, FinishReason::Length);
        assert_eq!(toks, want[i], "request {i}");
    }
    let st = sched.stats().clone();
    sched.shutdown();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(st.kv_used.load(Relaxed), 0);
    (st.steps.load(Relaxed), st.preemptions.load(Relaxed))
}

#[test]
fn concurrent_greedy_requests_match_generator() {
    let (steps, _) = run_concurrent(SchedulerConfig::default(), 12, SamplingParams::default());
    // All 12 run together: about one step per generated token, not 12 times that.
    assert!(steps < 20, "{steps} steps");
}

/// Sliding requests go past the context (the tiny model's 256 positions) inside the batch,
/// each evicting exactly when and what `Generator` evicts (their prompts fit one step, so the
/// eviction points are the same), in odd-sized blocks, sampled with seeds. (A preempted
/// sliding sequence is recomputed through its window, so its continuation may differ from an
/// uninterrupted run: the pool here is large enough that none is.)
#[test]
fn sliding_requests_go_past_the_context_and_match_generator() {
    let cfg = SchedulerConfig {
        block_size: 5,
        max_context: 256,
        ..Default::default()
    };
    let sampling = SamplingParams {
        temperature: 0.9,
        seed: Some(11),
        ..Default::default()
    };
    let window = Some(SinkWindow {
        sinks: 4,
        window: 40,
    });
    let (_, preempted) = run_concurrent_with(cfg, 6, sampling, 400, window);
    assert_eq!(preempted, 0);
}

#[test]
fn seeded_sampling_and_preemption_match_generator() {
    // A pool too small for all at once: admission waits and running sequences get preempted.
    let cfg = SchedulerConfig {
        kv_blocks: 12,
        block_size: 4,
        step_tokens: 16,
        ..Default::default()
    };
    let sampling = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: Some(7),
        ..Default::default()
    };
    let (_, preempted) = run_concurrent(cfg, 8, sampling);
    assert!(preempted > 0, "the small pool should force preemption");
}

#[test]
fn prefix_blocks_are_reused_and_cancelled_requests_free_blocks() {
    let w = weights();
    let sched = Scheduler::spawn(
        cpu(&w),
        SchedulerConfig {
            block_size: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let prompt: Vec<u32> = (1..=21).collect();
    let submit = |max_tokens| {
        let (tx, rx) = mpsc::channel();
        sched
            .submit(Request {
                constraint: None,
                sink_window: None,
                prompt: prompt.clone(),
                max_tokens,
                sampling: SamplingParams::default(),
                stop_ids: Vec::new(),
                priority: 0,
                sink: Box::new(tx),
            })
            .unwrap();
        rx
    };
    let first = collect(&submit(5));
    let st = sched.stats().clone();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(st.prefix_hit_tokens.load(Relaxed), 0);
    let second = collect(&submit(5));
    assert_eq!(first, second);
    // 20 of the 21 prompt tokens fill 5 blocks of 4, all reused.
    assert_eq!(st.prefix_hit_tokens.load(Relaxed), 20);
    // A long request whose receiver goes away frees its blocks.
    let rx = submit(10_000);
    assert!(matches!(rx.recv().unwrap(), Event::Token(_)));
    drop(rx);
    let t0 = std::time::Instant::now();
    while st.kv_used.load(Relaxed) != 0 || st.running.load(Relaxed) != 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "blocks not freed");
        std::thread::sleep(Duration::from_millis(5));
    }
    sched.shutdown();
}

//! Speculative decoding end to end on the CPU backend: greedy output equals plain decoding
//! token for token (prompt lookup and a draft model, every reference checkpoint and the
//! default model), sampled speculation runs within its limits, and the batch scheduler's
//! speculative rows give the generator's tokens.

use std::sync::mpsc;
use std::time::Duration;

use bitnet_inference::backend::Backend;
use bitnet_inference::batch::scheduler::{Event, Request, Scheduler, SchedulerConfig};
use bitnet_inference::cpu::CpuBackend;
use bitnet_inference::engine::generate::{FinishReason, GenerateOptions, Generator};
use bitnet_inference::engine::sampler::SamplingParams;
use bitnet_inference::engine::speculative::{ModelDrafter, NgramDrafter, SpecStats, Speculation};
use bitnet_inference::format::{safetensors::load, Weights};

mod common;
use common::{cpu, prompts};

fn weights(dir: &str) -> Weights {
    load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)).unwrap()
}

fn opts(max_tokens: usize, sampling: SamplingParams) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Every draft verified every step (no cost model), so each test exercises verification.
fn always(
    drafter: Box<dyn bitnet_inference::engine::speculative::Drafter>,
    k: usize,
) -> Speculation {
    let mut s = Speculation::new(drafter, k).unwrap();
    s.adaptive = false;
    s
}

fn run<B: Backend>(
    g: &mut Generator<B>,
    prompt: &[u32],
    o: &GenerateOptions,
) -> (Vec<u32>, Option<SpecStats>) {
    let out = g.generate(prompt, o, None, |_, _| true).unwrap();
    (out.tokens, out.speculative)
}

/// The model's own greedy continuation of a short prompt, twice over, then the prompt again:
/// text that repeats, where prompt lookup drafts.
fn repeating_prompt(g: &mut Generator<CpuBackend>, seed: u64) -> Vec<u32> {
    let vocab = g.backend().config().vocab_size as u32;
    let p = prompts(1, vocab, seed).remove(0);
    let p = p[..p.len().min(6)].to_vec();
    let (cont, _) = run(g, &p, &opts(24, SamplingParams::default()));
    let mut out = p.clone();
    out.extend_from_slice(&cont);
    out.extend_from_slice(&p);
    out
}

#[test]
fn greedy_speculation_gives_plain_decodings_tokens_on_every_checkpoint() {
    let mut dirs = vec![common::DIR, "models/kjv-fortunes"];
    dirs.extend(common::FAMILY_DIRS);
    for dir in dirs {
        let w = weights(dir);
        let mut g = Generator::new(cpu(&w)).unwrap();
        for seed in 0..2 {
            let prompt = repeating_prompt(&mut g, seed);
            let o = opts(40, SamplingParams::default());
            g.set_speculation(None);
            let (want, none) = run(&mut g, &prompt, &o);
            assert!(none.is_none());
            for k in [1, 4, 9] {
                g.set_speculation(Some(always(Box::new(NgramDrafter::default()), k)));
                let (got, st) = run(&mut g, &prompt, &o);
                let st = st.unwrap();
                assert_eq!(got, want, "{dir}, seed {seed}, ngram k {k}: {st:?}");
                // (Random checkpoints rarely repeat themselves: acceptance is the
                // self-draft's to show.)
                assert!(st.drafted > 0, "{dir} k {k}: {st:?}");
            }
            // The model as its own draft: same tokens, (nearly) every draft accepted.
            let draft = ModelDrafter::new(cpu(&w), w.config.vocab_size).unwrap();
            g.set_speculation(Some(always(Box::new(draft), 5)));
            let (got, st) = run(&mut g, &prompt, &o);
            let st = st.unwrap();
            assert_eq!(got, want, "{dir}, seed {seed}, self-draft: {st:?}");
            assert!(st.acceptance_rate() > 0.9, "{dir}: {st:?}");
        }
    }
}

#[test]
fn a_foreign_draft_model_is_verified_exactly_and_mismatched_vocabularies_are_refused() {
    let target = weights("models/kjv-fortunes");
    let tiny = weights(common::DIR);
    let err = ModelDrafter::new(cpu(&tiny), target.config.vocab_size)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("vocabulary (300)") && err.contains("4096"),
        "{err}"
    );
    // A random draft of the target's vocabulary: mostly rejected, never changes the output.
    let dir = std::env::temp_dir().join(format!("bitnet-spec-draft-{}", std::process::id()));
    let mut cfg = target.config.clone();
    cfg.hidden_size = 128;
    cfg.intermediate_size = 256;
    cfg.num_layers = 2;
    cfg.num_heads = 2;
    cfg.num_kv_heads = 1;
    cfg.head_dim = 64;
    bitnet_inference::format::synth::write_model(&dir, &cfg, 3, |_, _| {}).unwrap();
    let draft_w = load(&dir).unwrap();
    let mut g = Generator::new(cpu(&target)).unwrap();
    let prompt = repeating_prompt(&mut g, 7);
    let o = opts(32, SamplingParams::default());
    let (want, _) = run(&mut g, &prompt, &o);
    let mut draft_b = cpu(&draft_w);
    draft_b.share_threads(g.backend());
    let draft = ModelDrafter::new(draft_b, cfg.vocab_size).unwrap();
    g.set_speculation(Some(always(Box::new(draft), 3)));
    let (got, st) = run(&mut g, &prompt, &o);
    assert_eq!(got, want, "{:?}", st);
    assert!(st.unwrap().drafted > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sampled_speculation_respects_the_limits_and_is_reproducible() {
    let w = weights("models/kjv-fortunes");
    let mut g = Generator::new(cpu(&w)).unwrap();
    let prompt = repeating_prompt(&mut g, 3);
    let sampling = SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        seed: Some(42),
        ..Default::default()
    };
    for (k, top_k) in [(4, 0), (4, 20), (2, 0)] {
        let s = SamplingParams {
            top_k,
            ..sampling.clone()
        };
        g.set_speculation(Some(always(Box::new(NgramDrafter::default()), k)));
        let (a, st) = run(&mut g, &prompt, &opts(37, s.clone()));
        let (b, _) = run(&mut g, &prompt, &opts(37, s));
        assert_eq!(a.len(), 37);
        assert_eq!(a, b, "a seed fixes the speculative run");
        assert!(st.unwrap().drafted > 0);
    }
    // The context limit holds with drafts in flight.
    let cap = 40;
    let mut g = Generator::with_context(cpu(&w), cap).unwrap();
    g.set_speculation(Some(always(Box::new(NgramDrafter::default()), 8)));
    let out = g
        .generate(
            &prompt,
            &opts(1000, SamplingParams::default()),
            None,
            |_, _| true,
        )
        .unwrap();
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(prompt.len() + out.tokens.len(), cap);
}

/// A request's tokens; each token's log-probabilities, when they come, precede it and are
/// its own.
fn collect(rx: &mpsc::Receiver<Event>) -> Vec<u32> {
    let mut toks = Vec::new();
    let mut lp = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            Event::Logprobs(l) => lp = Some(l),
            Event::Token(t) => {
                if let Some(l) = lp.take() {
                    assert_eq!(l.token, t);
                    assert!(l.logprob <= 0.0 && l.top.len() == 1, "{l:?}");
                }
                toks.push(t)
            }
            Event::Done { finish, .. } => {
                assert_eq!(finish, FinishReason::Length);
                return toks;
            }
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

#[test]
fn the_scheduler_speculates_per_row_and_keeps_every_requests_tokens() {
    let w = weights("models/kjv-fortunes");
    let mut g = Generator::new(cpu(&w)).unwrap();
    let ps: Vec<Vec<u32>> = (0..6).map(|s| repeating_prompt(&mut g, s)).collect();
    let max_tokens = 30;
    let greedy = SamplingParams::default();
    let want: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| run(&mut g, p, &opts(max_tokens, greedy.clone())).0)
        .collect();
    for step_tokens in [256, 8] {
        let cfg = SchedulerConfig {
            draft_tokens: 4,
            step_tokens,
            block_size: 4,
            ..Default::default()
        };
        let sched = Scheduler::spawn(cpu(&w), cfg).unwrap();
        let rxs: Vec<_> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (tx, rx) = mpsc::channel();
                // Half greedy (some with log-probabilities, whose rows then come whole),
                // half sampled (whose tokens only need to arrive).
                let sampling = if i % 4 == 0 {
                    SamplingParams {
                        logprobs: Some(1),
                        ..greedy.clone()
                    }
                } else if i % 2 == 0 {
                    greedy.clone()
                } else {
                    SamplingParams {
                        temperature: 0.8,
                        seed: Some(i as u64),
                        ..Default::default()
                    }
                };
                sched
                    .submit(Request {
                        constraint: None,
                        sink_window: None,
                        prompt: p.clone(),
                        max_tokens,
                        sampling,
                        stop_ids: Vec::new(),
                        priority: 0,
                        sink: Box::new(tx),
                    })
                    .unwrap();
                rx
            })
            .collect();
        for (i, rx) in rxs.iter().enumerate() {
            let toks = collect(rx);
            assert_eq!(toks.len(), max_tokens);
            if i % 2 == 0 {
                assert_eq!(toks, want[i], "request {i}, step tokens {step_tokens}");
            }
        }
        let st = sched.stats().clone();
        sched.shutdown();
        use std::sync::atomic::Ordering::Relaxed;
        let (d, a) = (
            st.drafted_tokens.load(Relaxed),
            st.accepted_tokens.load(Relaxed),
        );
        assert!(d > 0 && a > 0 && a <= d, "drafted {d}, accepted {a}");
        assert_eq!(st.kv_used.load(Relaxed), 0);
    }
}

/// After a long pause in drafting a draft model restarts from the newest tokens instead of
/// catching up on all of them: its drafts then are those of a fresh drafter given only those.
#[test]
fn a_draft_model_restarts_from_the_newest_tokens_after_a_long_gap() {
    use bitnet_inference::engine::speculative::{Drafter, CATCH_UP};
    let w = weights("models/kjv-fortunes-draft");
    let vocab = w.config.vocab_size;
    let ctx: Vec<u32> = (0..300).map(|i| (i * 37 % 4000 + 5) as u32).collect();
    let mut d = ModelDrafter::new(cpu(&w), vocab).unwrap();
    d.prefill(&ctx[..100]).unwrap();
    let mut out = Vec::new();
    d.draft(&ctx[..101], 4, &mut out).unwrap();
    assert_eq!(out.len(), 4);
    d.draft(&ctx, 4, &mut out).unwrap();
    let mut fresh = ModelDrafter::new(cpu(&w), vocab).unwrap();
    let mut want = Vec::new();
    fresh
        .draft(&ctx[ctx.len() - CATCH_UP..], 4, &mut want)
        .unwrap();
    assert_eq!(out, want);
    // A short gap after that continues the cache from where it starts.
    let base = ctx.len() - CATCH_UP;
    let longer: Vec<u32> = ctx.iter().copied().chain([7, 8, 9, 10, 11, 12]).collect();
    d.draft(&longer, 4, &mut out).unwrap();
    let mut fresh = ModelDrafter::new(cpu(&w), vocab).unwrap();
    fresh.prefill(&ctx[base..]).unwrap();
    fresh.draft(&longer[base..], 4, &mut want).unwrap();
    assert_eq!(out, want);
}

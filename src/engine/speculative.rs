//! Speculative decoding: a drafter proposes the next few tokens, the target model runs them in
//! one step (every position's logits), and the sampler's acceptance rule
//! ([`Sampler::verify`]) keeps the longest correct run plus one token of its own. Greedy
//! output is token for token what plain decoding gives; sampled output follows the same
//! distribution. The single-stream generator and the batch scheduler both use this module.

use super::forward::{forward, forward_argmax};
use super::sampler::{SampleInput, Sampler, Verdict};
use crate::backend::{Backend, KvCache, LogitRows};
use crate::error::{Error, Result};

/// Proposes the tokens that follow a context.
pub trait Drafter: Send {
    /// Up to `k` tokens expected after `context` into `out` (cleared first); none when it has
    /// no guess. Returns the drafts' kind: drafts of one kind share an acceptance estimate
    /// ([`SpecControl`]; prompt lookup: the length of the matched suffix).
    fn draft(&mut self, context: &[u32], k: usize, out: &mut Vec<u32>) -> Result<usize>;
    /// The method's name (`ngram`, `draft`), for reports.
    fn name(&self) -> &'static str;
    /// Sees the prompt as the target runs it (a draft model computes its cache then, so the
    /// first draft does not pay for the whole prompt).
    fn prefill(&mut self, _prompt: &[u32]) -> Result<()> {
        Ok(())
    }
    /// Whether drafting runs a model (it costs steps of its own: the generator drafts only
    /// when the drafts will be verified, never to find out whether there are any).
    fn runs_a_model(&self) -> bool {
        false
    }
}

/// Prompt lookup: the tokens that followed the most recent earlier occurrence of the
/// context's last `n` tokens (the longest `n` from `max_ngram` down to `min_ngram` that
/// occurs). No second model; strong where the output repeats its input (summaries, edits,
/// code, quotations).
#[derive(Debug, Clone)]
pub struct NgramDrafter {
    /// Longest suffix matched.
    pub max_ngram: usize,
    /// Shortest suffix matched.
    pub min_ngram: usize,
    /// Most context tokens searched (the newest), bounding the work per step.
    pub window: usize,
}

impl Default for NgramDrafter {
    fn default() -> Self {
        NgramDrafter {
            max_ngram: 3,
            min_ngram: 1,
            window: 4096,
        }
    }
}

impl Drafter for NgramDrafter {
    fn draft(&mut self, context: &[u32], k: usize, out: &mut Vec<u32>) -> Result<usize> {
        out.clear();
        Ok(ngram_lookup(
            &context[context.len().saturating_sub(self.window)..],
            self.min_ngram.max(1)..=self.max_ngram,
            k,
            out,
        ))
    }

    fn name(&self) -> &'static str {
        "ngram"
    }
}

/// [`NgramDrafter`]'s search: for `n` in `ns` from the longest, the newest `i` with
/// `context[i..i + n]` equal to the last `n` tokens (`i + n < len`), then up to `k` tokens
/// from `i + n` into `out`. Returns the `n` matched (0: none).
pub fn ngram_lookup(
    context: &[u32],
    ns: std::ops::RangeInclusive<usize>,
    k: usize,
    out: &mut Vec<u32>,
) -> usize {
    let len = context.len();
    if k == 0 {
        return 0;
    }
    for n in ns.rev() {
        if n == 0 || n >= len {
            continue;
        }
        let tail = &context[len - n..];
        if let Some(i) = (0..len - n).rev().find(|&i| &context[i..i + n] == tail) {
            let from = i + n;
            out.extend_from_slice(&context[from..(from + k).min(len)]);
            return n;
        }
    }
    0
}

/// A smaller model with the same tokenizer drafting greedily: it keeps its own KV cache of
/// the context it last saw and recomputes only what changed (the accepted tokens and the
/// correction of the last verification). Past [`CATCH_UP`] tokens to recompute, or past its
/// window, it restarts from the newest [`CATCH_UP`] tokens of the context: drafts from a
/// shorter context are still drafts (verification keeps the output exact), and a probe after a
/// long pause in drafting costs a bounded step.
pub struct ModelDrafter<B: Backend> {
    backend: B,
    cache: B::Cache,
    /// Where in the context the cache starts (its position 0).
    base: usize,
    /// The tokens whose keys and values are in `cache`, in order (`context[base..]`'s first).
    cached: Vec<u32>,
    scratch: Vec<f32>,
}

impl<B: Backend> ModelDrafter<B> {
    /// A drafter over `backend` with a cache of its whole context; `target_vocab` is the
    /// target model's vocabulary size, which the draft's must equal.
    pub fn new(backend: B, target_vocab: usize) -> Result<Self> {
        let vocab = backend.config().vocab_size;
        if vocab != target_vocab {
            return Err(Error::Request(format!(
                "the draft model's vocabulary ({vocab}) differs from the target's \
                 ({target_vocab}): speculative decoding needs the same tokenizer"
            )));
        }
        let cache = backend.new_cache(backend.config().max_position_embeddings)?;
        Ok(ModelDrafter {
            backend,
            cache,
            base: 0,
            cached: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// The draft model's backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<B: Backend + Send> Drafter for ModelDrafter<B>
where
    B::Cache: Send,
{
    fn draft(&mut self, context: &[u32], k: usize, out: &mut Vec<u32>) -> Result<usize> {
        out.clear();
        let (len, cap) = (context.len(), self.cache.capacity());
        if len == 0 {
            return Ok(0);
        }
        // The cache holds `context[base..]`'s first tokens. Reuse them; the last context token
        // always runs (its logits decide). A long way to catch up (after a pause in drafting)
        // or a full window restarts from the newest tokens.
        let mut keep = match context.get(self.base..len - 1) {
            Some(c) => common_prefix(&self.cached, c),
            None => 0,
        };
        if self.base >= len || len - self.base - keep > CATCH_UP || len - self.base + k > cap {
            self.base = len.saturating_sub(CATCH_UP.min(cap / 2));
            keep = 0;
        }
        let context = &context[self.base..];
        let k = k.min(cap.saturating_sub(context.len()));
        if k == 0 {
            return Ok(0);
        }
        self.cached.truncate(keep);
        let chunk = self.backend.prefill_chunk().max(1);
        let mut pos = keep;
        let mut tok = 0;
        for part in context[keep..].chunks(chunk) {
            tok = forward_argmax(
                &mut self.backend,
                &mut self.cache,
                part,
                pos,
                &mut self.scratch,
                None,
            )?;
            self.cached.extend_from_slice(part);
            pos += part.len();
        }
        out.push(tok);
        while out.len() < k {
            tok = forward_argmax(
                &mut self.backend,
                &mut self.cache,
                &[tok],
                pos,
                &mut self.scratch,
                None,
            )?;
            self.cached.push(out[out.len() - 1]);
            pos += 1;
            out.push(tok);
        }
        Ok(0)
    }

    fn name(&self) -> &'static str {
        "draft"
    }

    fn runs_a_model(&self) -> bool {
        true
    }

    fn prefill(&mut self, prompt: &[u32]) -> Result<()> {
        // Everything but the last token, which the first draft runs for its logits: the whole
        // prompt when it fits the window, else its newest tokens.
        let cap = self.cache.capacity();
        let base = if prompt.len() < cap {
            0
        } else {
            prompt.len() - CATCH_UP.min(cap / 2)
        };
        if base != self.base {
            self.base = base;
            self.cached.clear();
        }
        let upto = prompt.len().saturating_sub(1).max(base);
        let keep = common_prefix(&self.cached, &prompt[base..upto]);
        self.cached.truncate(keep);
        let chunk = self.backend.prefill_chunk().max(1);
        for part in prompt[base + keep..upto].chunks(chunk) {
            let pos = self.cached.len();
            forward(
                &mut self.backend,
                &mut self.cache,
                part,
                pos,
                LogitRows::None,
                &mut self.scratch,
                None,
            )?;
            self.cached.extend_from_slice(part);
        }
        Ok(())
    }
}

/// Most context tokens a [`ModelDrafter`] recomputes before a draft.
pub const CATCH_UP: usize = 64;

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The speculative decoding method of a generator or scheduler.
pub struct Speculation {
    /// Where drafts come from.
    pub drafter: Box<dyn Drafter>,
    /// Most tokens drafted per step.
    pub draft_tokens: usize,
    /// Verify only as many drafts as pay for themselves ([`SpecControl`]); off, every step
    /// verifies every draft (for tests that must exercise verification every step).
    pub adaptive: bool,
    /// The share of the decode time that speculation may lose before it stops drafting
    /// ([`SpecControl::LOSS_BUDGET`] by default).
    pub loss_budget: f64,
}

impl Speculation {
    /// Prompt lookup drafting `draft_tokens` at a time.
    pub fn ngram(draft_tokens: usize) -> Result<Self> {
        Self::new(Box::new(NgramDrafter::default()), draft_tokens)
    }

    /// `drafter` drafting `draft_tokens` (1..=32) at a time.
    pub fn new(drafter: Box<dyn Drafter>, draft_tokens: usize) -> Result<Self> {
        if !(1..=MAX_DRAFT_TOKENS).contains(&draft_tokens) {
            return Err(Error::Request(format!(
                "draft tokens must be 1..={MAX_DRAFT_TOKENS}, not {draft_tokens}"
            )));
        }
        Ok(Speculation {
            drafter,
            draft_tokens,
            adaptive: true,
            loss_budget: SpecControl::LOSS_BUDGET,
        })
    }
}

/// The most tokens one speculative step drafts.
pub const MAX_DRAFT_TOKENS: usize = 32;

/// Counts of a speculative run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecStats {
    /// Verification steps (steps that carried drafts).
    pub steps: u64,
    /// Tokens drafted.
    pub drafted: u64,
    /// Drafted tokens accepted.
    pub accepted: u64,
    /// Drafted tokens verified after a wrong input (queued verification on a device: behind
    /// a step that rejected a draft, or after a wrong guess of the running step's pick):
    /// counted in `drafted`, never in `accepted`.
    pub wasted: u64,
}

impl SpecStats {
    /// Accepted / drafted (0 when nothing was drafted).
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Accepted / drafted after a true input (0 when nothing was): how often the drafter was
    /// right, whatever the queue wasted.
    pub fn draft_acceptance_rate(&self) -> f64 {
        let sound = self.drafted - self.wasted;
        if sound == 0 {
            0.0
        } else {
            self.accepted as f64 / sound as f64
        }
    }

    /// Adds one verification step's counts: `drafted` tokens, `accepted` of them, `wasted` of
    /// them after a wrong input.
    pub fn add(&mut self, drafted: usize, accepted: usize, wasted: usize) {
        self.steps += 1;
        self.drafted += drafted as u64;
        self.accepted += accepted as u64;
        self.wasted += wasted as u64;
    }
}

/// Chooses how many tokens a step drafts and verifies from what speculation has paid so far:
/// the acceptance rate per drafted token of the drafts' kind (decayed counts, so it follows
/// the text; prompt lookup's long matches are accepted far more often than one-token ones)
/// and the measured wall times: a plain step takes `t1`, a speculative one `c + d·k + r` for
/// `k` drafts, with `d` the drafting time per token, `c` the verification step (a step of
/// several tokens that the host waits for: on a device that queues plain steps it costs more
/// than one of them whatever its size) and `r` what it costs the step after it (a plain step
/// that refills the drained queue takes longer than `t1`). Such a step yields
/// `(1 − a^(k+1)) / (1 − a)` tokens on average; the `k` with the most tokens per second wins,
/// 0 (a plain step) when drafting does not pay. `t1` follows the fastest recent plain steps (a
/// device that queues steps runs them faster once the queue flows), and refused chances probe
/// again after [`SpecControl::PROBE`] of them, twice as long after each probe that did not
/// pay. Drafting
/// (probes and chosen drafts alike) goes on only while the time speculation has lost so far
/// (its steps' time beyond what plain steps would have taken for the same tokens) is within a
/// budget share of the decode time, and a probe waits until the budget also covers what it
/// loses if nothing is accepted: failing drafts, costly drafters, or a cost model that
/// misjudges, cost a bounded share of the generation.
#[derive(Debug, Clone)]
pub struct SpecControl {
    /// Decayed accepted drafts and trials per kind of draft.
    accepted: [f64; Self::KINDS],
    trials: [f64; Self::KINDS],
    t1: Option<f64>,
    verify: Option<f64>,
    draft: Option<f64>,
    /// What a speculative step costs the step after it on average (refilling a drained
    /// queue; nothing when the next step is speculative too, or steps are not queued).
    recovery: Option<f64>,
    /// Whether the last step was speculative (the next step's cost tells its recovery).
    after_verify: bool,
    plain: u32,
    refused: u32,
    probe_every: u32,
    /// Seconds of decoding observed (plain and speculative steps).
    elapsed: f64,
    /// Seconds speculative steps took beyond plain steps for their tokens (negative: gained).
    lost: f64,
    loss_budget: f64,
}

impl Default for SpecControl {
    fn default() -> Self {
        Self::with_budget(Self::LOSS_BUDGET)
    }
}

impl SpecControl {
    /// A controller whose drafting may lose `loss_budget` of the decode time.
    pub fn with_budget(loss_budget: f64) -> Self {
        // A prior of 70% acceptance worth two trials: speculation is tried early.
        SpecControl {
            accepted: [1.4; Self::KINDS],
            trials: [2.0; Self::KINDS],
            t1: None,
            verify: None,
            draft: None,
            recovery: None,
            after_verify: false,
            plain: 0,
            refused: 0,
            probe_every: Self::PROBE,
            elapsed: 0.0,
            lost: 0.0,
            loss_budget,
        }
    }
    /// Refused chances after which a step drafts anyway (doubled after each probe that did
    /// not pay, up to [`SpecControl::MAX_PROBE`]).
    pub const PROBE: u32 = 16;
    /// The longest wait between probes.
    pub const MAX_PROBE: u32 = 512;
    /// Plain steps measured before the first draft.
    pub const WARMUP: u32 = 4;
    /// The default share of the decode time that speculation may have lost.
    pub const LOSS_BUDGET: f64 = 0.04;
    /// Kinds of drafts with acceptance estimates of their own (higher kinds share the last).
    pub const KINDS: usize = 4;
    const DECAY: f64 = 0.9;
    const SMOOTH: f64 = 0.2;

    /// The estimated acceptance rate per drafted token of drafts of `kind`.
    pub fn acceptance(&self, kind: usize) -> f64 {
        let kind = kind.min(Self::KINDS - 1);
        self.accepted[kind] / self.trials[kind]
    }

    fn best(&self, kind: usize, available: usize) -> usize {
        let (Some(t1), Some(c), Some(d)) = (self.t1, self.verify, self.draft) else {
            return available;
        };
        let a = self.acceptance(kind).min(0.999);
        let rate = |k: usize| {
            let r = self.recovery.unwrap_or(0.0);
            let t = if k == 0 { t1 } else { c + d * k as f64 + r };
            (1.0 - a.powi(k as i32 + 1)) / (1.0 - a) / t
        };
        (0..=available)
            .max_by(|&x, &y| rate(x).total_cmp(&rate(y)))
            .unwrap_or(0)
    }

    /// Drafts of `kind` to make and verify of the `available` the step has room for: 0 for a
    /// plain step.
    pub fn choose(&mut self, kind: usize, available: usize) -> usize {
        if available == 0 || self.plain < Self::WARMUP {
            return 0;
        }
        // Past the loss budget (the cost model misjudged, or probes failed) nothing is
        // drafted until plain steps have made up for it.
        let within = self.lost <= self.loss_budget * self.elapsed;
        let best = if within {
            self.best(kind, available)
        } else {
            0
        };
        if best > 0 {
            self.refused = 0;
            return best;
        }
        self.refused += 1;
        // A probe that fails loses its drafting and verification beyond a plain step: it
        // waits until the budget covers that too (a draft model's probe costs many steps).
        let probe_loss = match (self.t1, self.verify, self.draft) {
            (Some(t1), Some(c), Some(d)) => {
                (c + d * available as f64 + self.recovery.unwrap_or(0.0) - t1).max(0.0)
            }
            _ => 0.0,
        };
        let affordable = self.lost + probe_loss <= self.loss_budget * self.elapsed;
        if self.refused >= self.probe_every && affordable {
            self.refused = 0;
            self.probe_every = (self.probe_every * 2).min(Self::MAX_PROBE);
            return available;
        }
        0
    }

    /// A plain one-token step took `secs` (wall time per token). Right after a speculative
    /// step it is charged to speculation beyond a plain step's time, and leaves that estimate
    /// as it was: on a device that queues steps it may refill a queue the speculative step
    /// drained.
    pub fn plain_step(&mut self, secs: f64) {
        self.elapsed += secs;
        if self.after_verify {
            if let Some(t1) = self.t1 {
                // At most a verification's time: a longer stall is not speculation's
                // doing.
                let extra = (secs - t1).clamp(0.0, self.verify.unwrap_or(t1));
                self.lost += extra;
                self.recovered(extra);
                return;
            }
        }
        self.recovered(0.0);
        self.plain = self.plain.saturating_add(1);
        self.t1 = Some(fast_down(self.t1, secs));
    }

    /// A step whose drafts were made for a context that did not come (the step ahead of it,
    /// queued, rejected a draft or picked another input than guessed; the device verified
    /// them all the same) took `secs` with its drafting and gave `tokens` tokens: its time
    /// beyond plain steps' for them is speculation's, the cost of the step ahead.
    pub fn unsound_step(&mut self, secs: f64, tokens: usize) {
        self.elapsed += secs;
        if let Some(t1) = self.t1 {
            let extra = secs - tokens as f64 * t1;
            self.lost += extra;
            self.recovered(extra.max(0.0));
        }
    }

    /// The step after a speculative one cost `secs` beyond its own work.
    fn recovered(&mut self, secs: f64) {
        if std::mem::take(&mut self.after_verify) {
            self.recovery = Some(ema(self.recovery, secs));
        }
    }

    /// A speculative step drafted `drafted` tokens of `kind` in `draft_secs`, then verified
    /// them in `verify_secs` and accepted `accepted`.
    pub fn verify_step(
        &mut self,
        kind: usize,
        drafted: usize,
        accepted: usize,
        draft_secs: f64,
        verify_secs: f64,
    ) {
        let trials = accepted + usize::from(accepted < drafted);
        self.recovered(0.0);
        self.after_verify = true;
        self.elapsed += draft_secs + verify_secs;
        if let Some(t1) = self.t1 {
            self.lost += draft_secs + verify_secs - (accepted + 1) as f64 * t1;
        }
        let kind = kind.min(Self::KINDS - 1);
        self.accepted[kind] = self.accepted[kind] * Self::DECAY + accepted as f64;
        self.trials[kind] = self.trials[kind] * Self::DECAY + trials as f64;
        if drafted > 0 {
            self.draft = Some(ema(self.draft, draft_secs / drafted as f64));
            self.verify = Some(ema(self.verify, verify_secs));
        }
        if self.best(kind, drafted) > 0 {
            // Speculation pays here again: probe at the first interval after the next miss.
            self.probe_every = Self::PROBE;
        }
    }
}

/// Drafts for the next step into `out` after `context`: `lead` tokens that run ahead of the
/// step's verified drafts (the guessed input of a queued successor), then as many drafts as
/// `control` finds pay of up to `room` (all of them when speculation is not adaptive).
/// Prompt lookup drafts first and then asks (its drafts' kind decides); a draft model is
/// asked first (its drafts cost steps). Returns the drafts' kind; `out` is empty when the
/// step should be plain.
pub fn draft_step(
    spec: &mut Speculation,
    control: &mut SpecControl,
    context: &[u32],
    (lead, room): (usize, usize),
    out: &mut Vec<u32>,
) -> Result<usize> {
    out.clear();
    if room == 0 {
        return Ok(0);
    }
    let kind = if !spec.adaptive {
        spec.drafter.draft(context, lead + room, out)?
    } else if spec.drafter.runs_a_model() {
        match control.choose(0, room) {
            0 => 0,
            k => spec.drafter.draft(context, lead + k, out)?,
        }
    } else {
        let kind = spec.drafter.draft(context, lead + room, out)?;
        let k = control.choose(kind, out.len().saturating_sub(lead));
        out.truncate(if k == 0 { 0 } else { lead + k });
        kind
    };
    if out.len() <= lead {
        out.clear();
    }
    Ok(kind)
}

/// A step time estimate that follows the fastest recent steps: down to `x` at once, up by a
/// moving average.
fn fast_down(old: Option<f64>, x: f64) -> f64 {
    match old {
        Some(t) if x < t => x,
        Some(t) => t + SpecControl::SMOOTH * (x - t),
        None => x,
    }
}

/// An exponential moving average of step costs: `x` itself when there is none yet.
fn ema(old: Option<f64>, x: f64) -> f64 {
    old.map_or(x, |o| o + SpecControl::SMOOTH * (x - o))
}

/// Verifies `drafts` against the target's rows: `inputs[i]` is what the sampler needs of the
/// position that predicts `drafts[i]` (`drafts.len() + 1` rows; the last predicts the token
/// after the final draft). Appends the accepted drafts and then the sampler's own token (at
/// the first rejection, or after the last draft) to `out`; returns how many drafts were
/// accepted. `context` (the tokens before the first row's prediction) is used for the
/// repetition penalty and left as it was.
pub fn accept_drafts<'a>(
    sampler: &mut Sampler,
    inputs: impl IntoIterator<Item = SampleInput<'a>>,
    context: &mut Vec<u32>,
    drafts: &[u32],
    out: &mut Vec<u32>,
) -> usize {
    let base = context.len();
    let mut accepted = 0;
    for (i, input) in inputs.into_iter().enumerate() {
        let tok = match drafts.get(i) {
            Some(&d) => match sampler.verify(input, context, d) {
                Verdict::Accept => {
                    out.push(d);
                    context.push(d);
                    accepted += 1;
                    continue;
                }
                Verdict::Reject(t) => t,
            },
            None => sampler.sample_input(input, context),
        };
        out.push(tok);
        break;
    }
    context.truncate(base);
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::SamplingParams;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_controller_drafts_when_it_pays_and_probes_when_it_does_not() {
        let mut c = SpecControl::default();
        // Plain steps first; the slow first one does not stick (the fastest recent counts).
        for secs in [5.0, 1.0, 1.0, 1.0] {
            assert_eq!(c.choose(0, 4), 0);
            c.plain_step(secs);
        }
        assert_eq!(c.choose(0, 4), 4, "then the full draft");
        // Cheap extra tokens and every draft accepted: draft all.
        c.verify_step(0, 4, 4, 0.0, 1.2);
        assert_eq!(c.choose(0, 4), 4);
        assert_eq!(c.choose(0, 0), 0);
        // Little accepted for a while (still within what the first step gained): plain
        // steps, with probes ever further apart.
        for _ in 0..10 {
            c.verify_step(0, 4, 0, 0.0, 1.3);
        }
        assert!(c.acceptance(0) < 0.3, "{}", c.acceptance(0));
        let picks: Vec<usize> = (0..16 + 32 + 64).map(|_| c.choose(0, 4)).collect();
        let probes: Vec<usize> = (0..picks.len()).filter(|&i| picks[i] > 0).collect();
        assert_eq!(probes, [15, 47, 111], "{picks:?}");
        // Costly failures: 29.2 s lost in 62.2 s of decoding. The next probe waits until the
        // loss and what a failing probe would add (verification ~2 s and four drafts at
        // ~0.5 s, less a plain step: ~3 s) are 4% of the decode time (736 plain seconds on).
        for _ in 0..10 {
            c.verify_step(0, 4, 0, 2.0, 2.0);
        }
        let first = (0..3000).find(|_| {
            let probe = c.choose(0, 4) > 0;
            c.plain_step(1.0);
            probe
        });
        assert_eq!(first, Some(736));
        // Moderate cost, high acceptance: a middle length can win.
        let mut c = SpecControl::default();
        for _ in 0..SpecControl::WARMUP {
            c.plain_step(1.0);
        }
        // Drafting at 0.5 per token, verification 1: two-thirds accepted makes 1 or 2 best.
        for _ in 0..20 {
            c.verify_step(0, 4, 2, 2.0, 1.0);
        }
        let k = c.choose(0, 8);
        assert!((1..=2).contains(&k), "{k}");
        // A verification step that costs three plain ones never pays at this acceptance.
        for _ in 0..20 {
            c.verify_step(0, 4, 2, 0.0, 3.0);
        }
        assert_eq!(c.choose(0, 8), 0);
    }

    #[test]
    fn the_step_after_a_speculative_one_counts_against_it() {
        // Each speculative step verifies 4 drafts in 1.1 plain steps' time and keeps one
        // (two tokens); the plain step after it takes `after` (a device refilling its queue).
        let run = |after: f64| {
            let mut c = SpecControl::default();
            let (mut secs, mut tokens, mut speculative) = (0.0, 0u32, 0u32);
            for _ in 0..2000 {
                if c.choose(0, 4) > 0 {
                    c.verify_step(0, 4, 1, 0.0, 1.1);
                    speculative += 1;
                    (secs, tokens) = (secs + 1.1, tokens + 2);
                    c.plain_step(after);
                    (secs, tokens) = (secs + after, tokens + 1);
                } else {
                    c.plain_step(1.0);
                    (secs, tokens) = (secs + 1.0, tokens + 1);
                }
            }
            (speculative, secs / f64::from(tokens))
        };
        let (speculative, per_token) = run(1.0);
        assert!(
            speculative > 1500 && per_token < 0.75,
            "{speculative} {per_token}"
        );
        // Refilling costs 1.4: speculation loses (2.5 + 1 for 3 tokens); it stops, and the
        // whole generation is within the loss budget of plain decoding.
        let (speculative, per_token) = run(2.4);
        assert!(speculative < 20, "{speculative}");
        assert!(per_token <= 1.0 + SpecControl::LOSS_BUDGET, "{per_token}");
    }

    #[test]
    fn draft_acceptance_leaves_out_the_wasted_drafts() {
        let mut st = SpecStats::default();
        st.add(4, 3, 0);
        st.add(5, 0, 4);
        st.add(3, 0, 3);
        assert_eq!(
            (st.steps, st.drafted, st.accepted, st.wasted),
            (3, 12, 3, 7)
        );
        assert_eq!(st.acceptance_rate(), 0.25);
        assert_eq!(st.draft_acceptance_rate(), 0.6);
        assert_eq!(SpecStats::default().draft_acceptance_rate(), 0.0);
    }

    #[test]
    fn an_unsound_step_after_a_rejection_is_the_rejections_cost() {
        let mut c = SpecControl::default();
        for _ in 0..SpecControl::WARMUP {
            c.plain_step(1.0);
        }
        // A verification that keeps nothing, then the step queued behind it, whose drafts
        // followed the rejected ones: 1.3 plain steps for its one token.
        c.verify_step(0, 4, 0, 0.0, 1.2);
        let (lost, acceptance) = (c.lost, c.acceptance(0));
        c.unsound_step(1.3, 1);
        assert!((c.lost - lost - 0.3).abs() < 1e-9, "{c:?}");
        assert!((c.recovery.unwrap() - 0.3).abs() < 1e-9, "{c:?}");
        // Its drafts tell nothing of the drafter, and the plain-step estimate stays.
        assert_eq!(c.acceptance(0), acceptance);
        assert_eq!(c.t1, Some(1.0));
        assert!(!c.after_verify);
    }

    #[test]
    fn each_kind_of_draft_has_its_own_acceptance() {
        let mut c = SpecControl::default();
        for _ in 0..SpecControl::WARMUP {
            c.plain_step(1.0);
        }
        // Verification costs 1.5 plain steps: long matches (kind 3) are all accepted, one-
        // token matches (kind 1) never.
        for _ in 0..20 {
            c.verify_step(3, 4, 4, 0.0, 1.5);
            c.plain_step(1.0);
            c.verify_step(1, 4, 0, 0.0, 1.5);
            c.plain_step(1.0);
        }
        assert!(c.acceptance(3) > 0.95 && c.acceptance(1) < 0.05);
        assert_eq!(c.choose(3, 4), 4);
        assert_eq!(c.choose(1, 4), 0);
        // Kinds past the last share its estimate.
        assert_eq!(c.acceptance(7), c.acceptance(SpecControl::KINDS - 1));
    }

    #[test]
    fn ngram_lookup_takes_the_longest_newest_match() {
        let mut out = Vec::new();
        // "1 2 3" occurs at 0 and at 5; the newest earlier one (5) is followed by 9 9.
        let ctx = [1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 7, 1, 2, 3];
        assert_eq!(
            ngram_lookup(&ctx, 1..=3, 4, &mut out),
            3,
            "the matched length"
        );
        assert_eq!(out, [9, 9, 7, 1]);
        // k beyond the context: as many as there are.
        out.clear();
        ngram_lookup(&[5, 6, 5], 1..=3, 8, &mut out);
        assert_eq!(out, [6, 5]);
        // No match of any length.
        out.clear();
        assert_eq!(ngram_lookup(&[1, 2, 3, 4], 1..=3, 4, &mut out), 0);
        assert!(out.is_empty());
        // The longest n wins over a newer shorter match.
        out.clear();
        let ctx = [7, 8, 1, 7, 9, 2, 8, 3, 7, 8];
        assert_eq!(ngram_lookup(&ctx, 1..=2, 1, &mut out), 2);
        assert_eq!(out, [1]);
        out.clear();
        ngram_lookup(&ctx, 1..=1, 1, &mut out);
        assert_eq!(out, [3]);
        // Tiny contexts and k = 0 never panic.
        for len in 0..4 {
            out.clear();
            ngram_lookup(&ctx[..len], 1..=3, 0, &mut out);
            ngram_lookup(&ctx[..len], 0..=3, 3, &mut out);
        }
    }

    #[test]
    fn the_ngram_drafter_searches_only_its_window() {
        let mut d = NgramDrafter {
            window: 4,
            ..Default::default()
        };
        let mut out = Vec::new();
        d.draft(&[1, 2, 9, 9, 9, 9, 3, 1], 2, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        d.window = 8;
        d.draft(&[1, 2, 9, 9, 9, 9, 3, 1], 2, &mut out).unwrap();
        assert_eq!(out, [2, 9]);
    }

    #[test]
    fn greedy_verification_keeps_the_matching_run_and_corrects_the_first_miss() {
        let mut s = Sampler::new(SamplingParams::default());
        let mut ctx = vec![1, 2];
        let mut out = Vec::new();
        let inputs = [5, 6, 8, 9].map(SampleInput::Argmax);
        assert_eq!(
            accept_drafts(&mut s, inputs, &mut ctx, &[5, 6, 7], &mut out),
            2
        );
        assert_eq!(out, [5, 6, 8]);
        assert_eq!(ctx, [1, 2]);
        out.clear();
        let inputs = [5, 6, 7, 9].map(SampleInput::Argmax);
        assert_eq!(
            accept_drafts(&mut s, inputs, &mut ctx, &[5, 6, 7], &mut out),
            3
        );
        assert_eq!(out, [5, 6, 7, 9]);
    }

    /// The rule written out independently in f64: softmax of the scaled logits, top-k,
    /// min-p, top-p, then accept when `u1 < p(draft)` and otherwise walk the renormalised
    /// residual with `u2`.
    fn reference_rule(logits: &[f32], p: &SamplingParams, draft: u32, u1: f64, u2: f64) -> u32 {
        let mut c: Vec<(f64, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| ((l / p.temperature) as f64, i as u32))
            .collect();
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        let max = c[0].0;
        let z: f64 = c.iter().map(|x| (x.0 - max).exp()).sum();
        for x in &mut c {
            x.0 = (x.0 - max).exp() / z;
        }
        let top = c[0].0;
        let mut keep = c
            .iter()
            .take_while(|x| x.0 >= p.min_p as f64 * top)
            .count()
            .max(1);
        let mut acc = 0.0;
        for (i, x) in c[..keep].iter().enumerate() {
            acc += x.0;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);
        let total: f64 = c.iter().map(|x| x.0).sum();
        let pd = c.iter().find(|x| x.1 == draft).map_or(0.0, |x| x.0) / total;
        if u1 < pd {
            return draft;
        }
        let rest: Vec<_> = c.iter().filter(|x| x.1 != draft).collect();
        let rt: f64 = rest.iter().map(|x| x.0).sum();
        let mut r = u2 * rt;
        for x in &rest {
            r -= x.0;
            if r <= 0.0 {
                return x.1;
            }
        }
        rest.last().map_or(draft, |x| x.1)
    }

    #[test]
    fn sampled_verification_follows_the_reference_rule_seed_for_seed() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut checked = 0;
        for case in 0..400u64 {
            let vocab = rng.random_range(2..60);
            let logits: Vec<f32> = (0..vocab).map(|_| rng.random_range(-4.0..4.0)).collect();
            let p = SamplingParams {
                temperature: [0.5, 1.0, 1.7][case as usize % 3],
                top_k: [0, 5, 40][case as usize / 3 % 3],
                top_p: [1.0, 0.9, 0.5][case as usize / 9 % 3],
                min_p: [0.0, 0.05][case as usize / 27 % 2],
                seed: Some(case),
                ..Default::default()
            };
            let draft = rng.random_range(0..vocab) as u32;
            let mut s = Sampler::new(p.clone());
            let mut l = logits.clone();
            let got = match s.verify(SampleInput::Logits(&mut l), &[], draft) {
                Verdict::Accept => draft,
                Verdict::Reject(t) => {
                    assert_ne!(t, draft);
                    t
                }
            };
            let mut draws = StdRng::seed_from_u64(case);
            let u1 = draws.random::<f32>() as f64;
            let u2 = draws.random::<f32>() as f64;
            // Skip the rare draws within float rounding of a boundary of either computation.
            let want = reference_rule(&logits, &p, draft, u1, u2);
            let near = [u1 - 1e-5, u1 + 1e-5]
                .iter()
                .any(|&u| reference_rule(&logits, &p, draft, u.clamp(0.0, 1.0), u2) != want)
                || [u2 - 1e-5, u2 + 1e-5]
                    .iter()
                    .any(|&u| reference_rule(&logits, &p, draft, u1, u.clamp(0.0, 1.0)) != want);
            if !near {
                assert_eq!(got, want, "case {case}: {p:?} draft {draft}");
                checked += 1;
            }
        }
        assert!(checked > 380, "{checked}");
    }

    #[test]
    fn speculation_leaves_the_sampled_distribution_unchanged() {
        // Two positions: a draft run [d0, d1] against rows whose distributions are known; the
        // first emitted token must follow row 0's distribution whatever the draft.
        let logits = [1.0f32, 0.3, -0.5, 2.0, 0.0];
        let params = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(5),
            ..Default::default()
        };
        let n = 40_000;
        let mut plain = [0usize; 5];
        let mut s = Sampler::new(params.clone());
        for _ in 0..n {
            plain[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        for draft in [3u32, 1, 4] {
            let mut spec = [0usize; 5];
            let mut s = Sampler::new(SamplingParams {
                seed: Some(99 + draft as u64),
                ..params.clone()
            });
            let mut out = Vec::new();
            for _ in 0..n {
                out.clear();
                let (mut a, mut b) = (logits, logits);
                let rows = [SampleInput::Logits(&mut a), SampleInput::Logits(&mut b)];
                accept_drafts(&mut s, rows, &mut vec![], &[draft, 0], &mut out);
                spec[out[0] as usize] += 1;
            }
            for t in 0..5 {
                let (x, y) = (plain[t] as f64 / n as f64, spec[t] as f64 / n as f64);
                let sigma = (x * (1.0 - x) / n as f64).sqrt().max(1e-4);
                assert!(
                    (x - y).abs() < 5.0 * sigma * 2f64.sqrt(),
                    "draft {draft}, token {t}: plain {x:.4} vs speculative {y:.4}"
                );
            }
        }
    }
}

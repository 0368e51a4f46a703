//! Streaming generation over any backend: chunked prefill, then a [`Session`] driven step by
//! step, on the device's own token selection where the backend offers it.

use crate::time::Instant;

use std::collections::VecDeque;

use super::forward::{
    forward, forward_argmax, forward_top_k, head_step_rows, layers, queue_greedy_step, OpProfile,
};
use super::sampler::{SampleInput, TokenLogprobs};
use super::session::{check_prompt, Session, Want};
pub use super::session::{FinishReason, GenerateOptions};
use super::speculative::{draft_step, SpecControl, SpecStats, Speculation};
use super::window::{SinkWindow, Sliding};
use crate::backend::{Backend, HeadRows, KvCache, LogitRows};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

mod queued_speculation;

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Generated text (empty without a tokenizer), cut before any stop string.
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
    /// Seconds spent on the prompt (including the first token's logits).
    pub prefill_s: f64,
    /// Seconds spent decoding the generated tokens after the first.
    pub decode_s: f64,
    /// Speculative decoding's counts (None when it was off).
    pub speculative: Option<SpecStats>,
    /// Positions evicted from the KV cache by the sink window (0 without one).
    pub evicted: usize,
    /// Each generated token's log-probabilities ([`SamplingParams::logprobs`]; empty when
    /// off).
    ///
    /// [`SamplingParams::logprobs`]: crate::engine::sampler::SamplingParams::logprobs
    pub logprobs: Vec<TokenLogprobs>,
}

impl Generation {
    /// Decode speed in tokens per second (tokens after the first, over their time).
    pub fn decode_tok_s(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if self.decode_s > 0.0 {
            n as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// The result of [`Generator::perplexity`].
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// Tokens in the sequence.
    pub tokens: usize,
    /// Tokens predicted (each scored once).
    pub scored: usize,
    /// Sum of −ln p(token) over the scored tokens, in nats.
    pub nll: f64,
    /// Window length in tokens.
    pub window: usize,
    /// Distance between window starts (0: one stream under a sink window).
    pub stride: usize,
    /// The attention sinks of a streamed score ([`Generator::perplexity_streaming`]).
    pub sinks: Option<usize>,
}

impl Perplexity {
    /// Mean negative log-likelihood per scored token, in nats.
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.scored.max(1) as f64
    }

    /// exp(mean_nll).
    pub fn ppl(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// −ln softmax(row)[token], in f64.
fn nll_of(row: &[f32], token: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[token as usize] as f64
}

/// The checks of a sequence to score: two tokens at least, all in the vocabulary.
fn check_score_ids(ids: &[u32], vocab: usize) -> Result<()> {
    if ids.len() < 2 {
        return Err(Error::Request("perplexity needs at least 2 tokens".into()));
    }
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Request(format!(
            "token id {t} is outside the vocabulary ({vocab})"
        )));
    }
    Ok(())
}

/// `gpu:<name>` for a kernel name (a small fixed set, interned once each).
fn gpu_name(name: &'static str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static NAMES: Mutex<Option<HashMap<&'static str, &'static str>>> = Mutex::new(None);
    let mut g = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(HashMap::new)
        .entry(name)
        .or_insert_with(|| Box::leak(format!("gpu:{name}").into_boxed_str()))
}

/// A model with its KV cache: runs prompts and generates.
pub struct Generator<B: Backend> {
    backend: B,
    cache: B::Cache,
    logits: Vec<f32>,
    prefill_chunk: usize,
    profile: Option<OpProfile>,
    spec: Option<Speculation>,
    head: HeadRows,
    drafts: Vec<u32>,
}

impl<B: Backend> Generator<B> {
    /// A generator with a KV cache for the model's whole context window.
    pub fn new(backend: B) -> Result<Self> {
        let cap = backend.config().max_position_embeddings;
        Self::with_context(backend, cap)
    }

    /// A generator with a KV cache of `context` positions.
    pub fn with_context(backend: B, context: usize) -> Result<Self> {
        let cache = backend.new_cache(context)?;
        let prefill_chunk = backend.prefill_chunk();
        Ok(Generator {
            backend,
            cache,
            logits: Vec::new(),
            prefill_chunk,
            profile: None,
            spec: None,
            head: HeadRows::default(),
            drafts: Vec::new(),
        })
    }

    /// Turns speculative decoding on (with its drafter) or off for the next generations.
    pub fn set_speculation(&mut self, spec: Option<Speculation>) {
        self.spec = spec;
    }

    /// The speculative decoding method in use.
    pub fn speculation(&self) -> Option<&Speculation> {
        self.spec.as_ref()
    }

    /// Sets the most prompt tokens run in one step (at least 1).
    pub fn set_prefill_chunk(&mut self, n: usize) {
        self.prefill_chunk = n.max(1);
    }

    /// Starts recording per-op wall time (replacing any previous record), and per-kernel
    /// device time on backends that have it.
    pub fn start_profile(&mut self) {
        self.profile = Some(OpProfile::default());
        if let Some(d) = self.backend.device() {
            d.set_profiling(true);
            let _ = d.take_profile();
        }
    }

    /// Stops recording and returns the per-op times; device kernel times, where the backend
    /// records them, follow as entries named `gpu:<kernel>`.
    pub fn take_profile(&mut self) -> Option<OpProfile> {
        let mut p = self.profile.take()?;
        if let Some(d) = self.backend.device() {
            for (name, secs, calls) in d.take_profile().unwrap_or_default() {
                p.entries.push((gpu_name(name), secs, calls));
            }
            d.set_profiling(false);
        }
        Some(p)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (its KV cache stays with the generator).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Positions the KV cache holds.
    pub fn context(&self) -> usize {
        self.cache.capacity()
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        let vocab = self.backend.config().vocab_size;
        check_prompt(prompt, self.context(), vocab)
    }

    /// Runs `prompt` from position 0 and returns the logits of its last position
    /// (or of every position with `all`), `vocab` values per position.
    pub fn logits(&mut self, prompt: &[u32], all: bool) -> Result<Vec<f32>> {
        self.check_prompt(prompt)?;
        let mut res = Vec::new();
        let n = prompt.len();
        let step = self.prefill_chunk;
        for (i, chunk) in prompt.chunks(step).enumerate() {
            let last = (i + 1) * step >= n;
            let rows = if all {
                LogitRows::All
            } else if last {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            forward(
                &mut self.backend,
                &mut self.cache,
                chunk,
                i * step,
                rows,
                &mut self.logits,
                self.profile.as_mut(),
            )?;
            res.extend_from_slice(&self.logits);
        }
        Ok(res)
    }

    /// Runs a generation's prompt (chunked, evicting under a sink window) and returns the
    /// logits of its last position.
    fn prefill(&mut self, prompt: &[u32], slide: &mut Option<Sliding>) -> Result<Vec<f32>> {
        let Some(sl) = slide else {
            return self.logits(prompt, false);
        };
        let step = self.prefill_chunk.min(sl.spec().max_step());
        let mut start = 0;
        for chunk in prompt.chunks(step) {
            let pos = sl.make_room(&mut self.backend, &mut self.cache, &[0], start, chunk.len())?;
            start += chunk.len();
            let rows = if start == prompt.len() {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            forward(
                &mut self.backend,
                &mut self.cache,
                chunk,
                pos,
                rows,
                &mut self.logits,
                self.profile.as_mut(),
            )?;
        }
        Ok(self.logits.clone())
    }

    /// The cache slot for a step of `t` tokens from context token `i`, making room for it
    /// under a sink window.
    fn slot(&mut self, slide: &mut Option<Sliding>, i: usize, t: usize) -> Result<usize> {
        match slide {
            Some(sl) => sl.make_room(&mut self.backend, &mut self.cache, &[0], i, t),
            None => Ok(i),
        }
    }

    /// Scores `ids` in windows of `window` tokens starting every `stride` tokens, each run from
    /// position 0 (Hugging Face's sliding-window perplexity recipe): in the window `[b, e)`,
    /// token `p` is predicted from `ids[b..p]` and scored if `p > b` and `p` lies past the
    /// previous window's end, so every token but the first is scored once when `stride < window`,
    /// and every token but each window's first when `stride == window`.
    pub fn perplexity(&mut self, ids: &[u32], window: usize, stride: usize) -> Result<Perplexity> {
        if window < 2 || window > self.context() {
            return Err(Error::Request(format!(
                "the window must be 2..={} tokens (the context), not {window}",
                self.context()
            )));
        }
        if stride == 0 || stride > window {
            return Err(Error::Request(format!(
                "the stride must be 1..={window} (the window), not {stride}"
            )));
        }
        let vocab = self.backend.config().vocab_size;
        check_score_ids(ids, vocab)?;
        let n = ids.len();
        let (mut nll, mut scored, mut prev_end, mut b) = (0f64, 0usize, 0usize, 0usize);
        while prev_end < n {
            let e = (b + window).min(n);
            let first = (b + 1).max(prev_end);
            if first < e {
                let logits = self.logits(&ids[b..e], true)?;
                for p in first..e {
                    nll += nll_of(&logits[(p - b - 1) * vocab..(p - b) * vocab], ids[p]);
                }
                scored += e - first;
            }
            prev_end = e;
            b += stride;
        }
        Ok(Perplexity {
            tokens: n,
            scored,
            nll,
            window,
            stride,
            sinks: None,
        })
    }

    /// Scores `ids` as one stream under the sink window `w`: token `p` is predicted from the
    /// sinks and the recent positions the window keeps (the cache a generation past the
    /// context has), every token but the first scored once.
    pub fn perplexity_streaming(&mut self, ids: &[u32], w: SinkWindow) -> Result<Perplexity> {
        w.validate(self.context())?;
        check_score_ids(ids, self.backend.config().vocab_size)?;
        let vocab = self.backend.config().vocab_size;
        let mut sl = Sliding::new(w);
        let step = self.prefill_chunk.min(w.max_step());
        let (n, mut nll) = (ids.len(), 0f64);
        for start in (0..n - 1).step_by(step) {
            let chunk = &ids[start..(start + step).min(n - 1)];
            let pos = sl.make_room(&mut self.backend, &mut self.cache, &[0], start, chunk.len())?;
            forward(
                &mut self.backend,
                &mut self.cache,
                chunk,
                pos,
                LogitRows::All,
                &mut self.logits,
                self.profile.as_mut(),
            )?;
            for (j, row) in self.logits.chunks(vocab).enumerate() {
                nll += nll_of(row, ids[start + j + 1]);
            }
        }
        Ok(Perplexity {
            tokens: n,
            scored: n - 1,
            nll,
            window: w.window,
            stride: 0,
            sinks: Some(w.sinks),
        })
    }

    /// Generates from `prompt`; `on_token(id, new_text)` sees each token as it is produced
    /// and returns false to stop (text held back for a possible stop string comes with a
    /// later token, or, when an EOS token ends the generation, in one more call with the EOS
    /// id).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        tokenizer: Option<&Tokenizer>,
        mut on_token: impl FnMut(u32, &str) -> bool,
    ) -> Result<Generation> {
        let vocab = self.backend.config().vocab_size;
        let mut slide = opts.sink_window.map(Sliding::new);
        // Under a sink window only the token limit ends a generation.
        let context = match opts.sink_window {
            Some(w) => {
                w.validate(self.context())?;
                usize::MAX
            }
            None => self.context(),
        };
        let mut s = Session::new(prompt, opts, context, vocab)?;
        let mut stats = self.spec.as_ref().map(|_| SpecStats::default());
        let done =
            |mut s: Session, prefill_s: f64, decode_s: f64, speculative, evicted| Generation {
                logprobs: s.take_logprobs(),
                tokens: s.tokens().to_vec(),
                text: s.text().to_string(),
                prompt_tokens: s.prompt_len(),
                finish: s.finish().unwrap_or(FinishReason::Length),
                prefill_s,
                decode_s,
                speculative,
                evicted,
            };
        if s.finish().is_some() {
            return Ok(done(s, 0.0, 0.0, stats, 0));
        }
        let t0 = Instant::now();
        let mut logits = self.prefill(prompt, &mut slide)?;
        if let Some(spec) = &mut self.spec {
            spec.drafter.prefill(prompt)?;
        }
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        // Tokens chosen but not yet emitted (a verified speculative run, or one step's pick).
        let mut next: VecDeque<u32> = VecDeque::new();
        let mut candidates = Vec::new();
        // The picks of a queued step's rows.
        let mut picks = Vec::new();
        // Whether the step for the token about to be emitted is already queued on the device.
        let mut queued = false;
        let mut control = SpecControl::with_budget(
            self.spec
                .as_ref()
                .map_or(SpecControl::LOSS_BUDGET, |s| s.loss_budget),
        );
        // Drafts the controller chose while the next plain step was already queued: that step
        // is read first, then the following step verifies this many without asking again.
        let mut deferred: Option<usize> = None;
        // BITNET_SPEC_TRACE=1: every step's kind, time and the controller's state on stderr.
        let trace = self.spec.is_some() && std::env::var_os("BITNET_SPEC_TRACE").is_some();
        loop {
            let tok = match next.pop_front() {
                Some(t) => t,
                None => s.pick(&mut logits),
            };
            if !emit(&mut s, tok, tokenizer, &mut on_token)? {
                break;
            }
            if !next.is_empty() {
                // The rest of a verified run: its keys and values are in the cache already.
                continue;
            }
            let i = s.context().len() - 1;
            if let (Some(st), Want::Argmax, None, false) = (&mut stats, s.want(), &slide, queued) {
                if self.backend.device().is_some() {
                    self.decode_queued_speculation(
                        &mut s,
                        tokenizer,
                        &mut on_token,
                        st,
                        &mut control,
                    )?;
                    break;
                }
            }
            let step_t0 = Instant::now();
            if let Some(spec) = &mut self.spec {
                // Draft only as many as pay for themselves (drafting has its own cost).
                let mut room = s.draft_room().min(spec.draft_tokens);
                if let Some(sl) = &slide {
                    room = room.min(sl.spec().max_step() - 1);
                }
                self.drafts.clear();
                let mut kind = 0;
                let chosen = match deferred.take() {
                    Some(k) => {
                        let k = k.min(room);
                        if k > 0 {
                            kind = spec.drafter.draft(s.context(), k, &mut self.drafts)?;
                            self.drafts.truncate(k);
                        }
                        k
                    }
                    // A draft model's drafts would be thrown away behind a queued step: only
                    // the choice is made now.
                    None if queued && spec.drafter.runs_a_model() => match spec.adaptive {
                        true => control.choose(0, room),
                        false => room,
                    },
                    None => {
                        kind = draft_step(
                            spec,
                            &mut control,
                            s.context(),
                            (0, room),
                            &mut self.drafts,
                        )?;
                        self.drafts.len()
                    }
                };
                let drafted_at = Instant::now();
                if queued && chosen > 0 {
                    // The step for `tok` is on the device already: take its token and draft
                    // and verify from there on.
                    let d = self.backend.device().ok_or_else(|| {
                        Error::Backend("the backend stopped offering device steps".into())
                    })?;
                    d.read_queued_argmax(&mut picks)?;
                    next.extend(picks.last());
                    queued = false;
                    deferred = Some(chosen);
                    control.plain_step(step_t0.elapsed().as_secs_f64());
                    if trace {
                        eprintln!("spec: read-queued {:?} {control:?}", step_t0.elapsed());
                    }
                    continue;
                }
                if !self.drafts.is_empty() {
                    // One step over `tok` and the drafts; every position's pick decides.
                    let mut step = Vec::with_capacity(self.drafts.len() + 1);
                    step.push(tok);
                    step.extend_from_slice(&self.drafts);
                    let pos = self.slot(&mut slide, i, step.len())?;
                    let mut profile = self.profile.as_mut();
                    layers(
                        &mut self.backend,
                        &mut self.cache,
                        &step,
                        pos,
                        profile.as_deref_mut(),
                    )?;
                    let need = vec![s.row_need(); step.len()];
                    let t = Instant::now();
                    head_step_rows(&mut self.backend, &need, &mut self.head)?;
                    if let Some(p) = profile {
                        p.add("final_norm_head", t.elapsed().as_secs_f64());
                    }
                    let vocab = self.backend.config().vocab_size;
                    let inputs = SampleInput::from_head(&need, &mut self.head, vocab);
                    let mut out = Vec::with_capacity(step.len());
                    let accepted = s.verify_drafts(inputs, &self.drafts, &mut out);
                    if let Some(st) = &mut stats {
                        st.add(self.drafts.len(), accepted, 0);
                    }
                    control.verify_step(
                        kind,
                        self.drafts.len(),
                        accepted,
                        (drafted_at - step_t0).as_secs_f64(),
                        drafted_at.elapsed().as_secs_f64(),
                    );
                    if trace {
                        eprintln!(
                            "spec: verify k {} accepted {accepted} draft {:?} verify {:?} {control:?}",
                            self.drafts.len(),
                            drafted_at - step_t0,
                            drafted_at.elapsed()
                        );
                    }
                    next.extend(out);
                    continue;
                }
            }
            match s.want() {
                Want::TopK(k, inv_t) => {
                    let pos = self.slot(&mut slide, i, 1)?;
                    forward_top_k(
                        &mut self.backend,
                        &mut self.cache,
                        &[tok],
                        pos,
                        (k, inv_t),
                        &mut self.logits,
                        &mut candidates,
                        self.profile.as_mut(),
                    )?;
                    next.push_back(s.pick_candidates(&candidates));
                }
                Want::Argmax if self.backend.device().is_some() => {
                    // The step for `tok` (queued ahead by the previous iteration, or now),
                    // then the one after it, fed on the device by this step's argmax: the
                    // device works on the next step while the host reads this one's token.
                    if !queued {
                        let pos = self.slot(&mut slide, i, 1)?;
                        queue_greedy_step(
                            &mut self.backend,
                            &mut self.cache,
                            (Some(tok), &[]),
                            pos,
                            self.profile.as_mut(),
                        )?;
                    }
                    queued = s.room_for(1) && {
                        let pos = self.slot(&mut slide, i + 1, 1)?;
                        queue_greedy_step(
                            &mut self.backend,
                            &mut self.cache,
                            (None, &[]),
                            pos,
                            self.profile.as_mut(),
                        )?
                    };
                    let d = self.backend.device().ok_or_else(|| {
                        Error::Backend("the backend stopped offering device steps".into())
                    })?;
                    d.read_queued_argmax(&mut picks)?;
                    next.extend(picks.last());
                }
                Want::Argmax => {
                    let pos = self.slot(&mut slide, i, 1)?;
                    next.push_back(forward_argmax(
                        &mut self.backend,
                        &mut self.cache,
                        &[tok],
                        pos,
                        &mut self.logits,
                        self.profile.as_mut(),
                    )?);
                }
                Want::Logits => {
                    let pos = self.slot(&mut slide, i, 1)?;
                    forward(
                        &mut self.backend,
                        &mut self.cache,
                        &[tok],
                        pos,
                        LogitRows::Last,
                        &mut self.logits,
                        self.profile.as_mut(),
                    )?;
                    std::mem::swap(&mut logits, &mut self.logits);
                }
            }
            control.plain_step(step_t0.elapsed().as_secs_f64());
            if trace {
                eprintln!("spec: plain {:?} {control:?}", step_t0.elapsed());
            }
        }
        let evicted = slide.map_or(0, |sl| sl.evicted());
        Ok(done(
            s,
            prefill_s,
            t1.elapsed().as_secs_f64(),
            stats,
            evicted,
        ))
    }
}

/// Takes `tok` into the session and hands what it releases to `on_token`; false once the
/// generation is over (finished, or `on_token` stopped it).
fn emit(
    s: &mut Session,
    tok: u32,
    tokenizer: Option<&Tokenizer>,
    on_token: &mut impl FnMut(u32, &str) -> bool,
) -> Result<bool> {
    let e = s.accept(tok, tokenizer)?;
    let go_on = match e.token {
        Some(t) => on_token(t, &e.text),
        None => e.text.is_empty() || on_token(tok, &e.text),
    };
    if !go_on {
        s.cancel();
    }
    Ok(s.finish().is_none())
}

//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition, presence and
//! frequency penalties and logit bias, seeded; with the chosen tokens' log-probabilities on
//! request.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::grammar::Constraint;
use crate::reference::{argmax, top_candidates};

/// Sampling parameters (`temperature == 0` means greedy).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the argmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the top probability (0 = off).
    pub min_p: f32,
    /// Penalty for tokens already in the context (1 = off), as in transformers.
    pub repetition_penalty: f32,
    /// Random seed (None = from the OS).
    pub seed: Option<u64>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`, −100..100).
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted from the logit of every token generated at least once (OpenAI's
    /// `presence_penalty`, −2..2; 0 = off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`, −2..2; 0 = off).
    pub frequency_penalty: f32,
    /// Report each chosen token's log-probability under the model and this many of the most
    /// likely tokens at its position ([`Sampler::take_logprobs`]; None = off, at most
    /// [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
}

/// Most alternatives [`SamplingParams::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            logit_bias: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges of every parameter.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::Request(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(format!(
                "logit_bias of token {id} must be in [-100, 100], got {b}"
            ));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return bad(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
            ));
        }
        Ok(())
    }

    /// Whether the logits are changed before sampling by anything but the temperature
    /// (penalties, bias): such samplers need each row's full logits.
    fn shapes_logits(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
    }
}

/// One chosen token's log-probability under the model (the log-softmax of its raw logits,
/// before temperature, penalties and bias) and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, best first (ties by lower id).
    pub top: Vec<(u32, f32)>,
}

/// A sampler with its random state and reusable scratch.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    cand: Vec<(f32, u32)>,
    /// How often each token was generated (for the presence and frequency penalties).
    generated: HashMap<u32, u32>,
    /// The current row's raw logits when log-probabilities are on.
    raw: Vec<f32>,
    /// Their log-sum-exp while the row is current (None once a token was chosen from it).
    lse: Option<f64>,
    /// Log-probabilities of the tokens chosen since the last [`Sampler::take_logprobs`].
    logprobs: Vec<TokenLogprobs>,
    /// The grammar the text must follow (structured output).
    constraint: Option<Box<Constraint>>,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            cand: Vec::new(),
            generated: HashMap::new(),
            raw: Vec::new(),
            lse: None,
            logprobs: Vec::new(),
            constraint: None,
        }
    }

    /// This sampler, picking only tokens `c` allows (structured output): each row's
    /// forbidden logits are set to −∞ after the penalties and bias.
    pub fn constrain(mut self, c: Constraint) -> Self {
        self.constraint = Some(Box::new(c));
        self
    }

    /// Whether a grammar constrains the tokens.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// Computes the constraint's next mask ahead of the row it applies to (nothing without
    /// a constraint).
    pub fn prefetch_mask(&mut self) {
        if let Some(c) = &mut self.constraint {
            c.prefetch();
        }
    }

    /// The log-probabilities of the tokens chosen since the last call, one per token in order
    /// (empty unless [`SamplingParams::logprobs`] is on).
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprobs> {
        std::mem::take(&mut self.logprobs)
    }

    /// Notes that `token` was chosen from the current row: counted for the penalties, its
    /// log-probability kept when asked for.
    fn chose(&mut self, token: u32) -> u32 {
        if let Some(c) = &mut self.constraint {
            c.commit(token);
        }
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.generated.entry(token).or_default() += 1;
        }
        if let Some(n) = self.params.logprobs {
            let entry = match self.lse.take() {
                Some(lse) => {
                    let raw = &self.raw;
                    let lp = |id: u32| (raw[id as usize] as f64 - lse) as f32;
                    // The candidates' scratch is free once the token is chosen.
                    let top = &mut self.cand;
                    top.clear();
                    if n > 0 {
                        top_candidates(raw, n, 1.0, top);
                    }
                    TokenLogprobs {
                        token,
                        logprob: raw.get(token as usize).map_or(f32::NAN, |_| lp(token)),
                        top: top.iter().map(|&(_, id)| (id, lp(id))).collect(),
                    }
                }
                // A row without logits (never asked for while log-probabilities are on).
                None => TokenLogprobs {
                    token,
                    logprob: f32::NAN,
                    top: Vec::new(),
                },
            };
            self.logprobs.push(entry);
        }
        token
    }

    /// Keeps `logits` (raw) and their log-sum-exp for [`Sampler::chose`].
    fn keep_row(&mut self, logits: &[f32]) {
        if self.params.logprobs.is_none() {
            return;
        }
        self.raw.clear();
        self.raw.extend_from_slice(logits);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        self.lse = Some(max + sum.ln());
    }

    /// Picks the next token from `logits` (modified in place); `context` holds the ids seen so far.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        self.sample_input(SampleInput::Logits(logits), context)
    }

    /// Whether this sampler always picks the argmax of the logits (temperature 0, no
    /// repetition penalty): it then needs the argmax only, not the logits.
    pub fn is_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature == 0.0 && !self.shapes_logits() && p.logprobs.is_none()
    }

    /// Whether the logits change before sampling beyond the temperature (penalties, bias, a
    /// grammar): the sampler then needs each row's full logits.
    fn shapes_logits(&self) -> bool {
        self.params.shapes_logits() || self.constraint.is_some()
    }

    /// When this sampler needs only the `k` most likely tokens of a step (temperature > 0,
    /// top-k on, no penalty, bias or log-probabilities): `Some((k, 1 / temperature))` for
    /// [`top_candidates`], which a backend may find on its device; the token is then drawn by
    /// [`Sampler::sample_candidates`].
    pub fn candidates_only(&self) -> Option<(usize, f32)> {
        let p = &self.params;
        (p.temperature > 0.0 && p.top_k > 0 && !self.shapes_logits() && p.logprobs.is_none())
            .then(|| (p.top_k, 1.0 / p.temperature))
    }

    /// What a batched step must give this sampler for its next token (see
    /// [`crate::backend::BatchBackend::head_rows`]).
    pub fn row_need(&self) -> crate::backend::RowNeed {
        use crate::backend::RowNeed;
        if self.is_greedy() {
            RowNeed::Argmax
        } else if let Some((k, inv_t)) = self.candidates_only() {
            RowNeed::Candidates { k, inv_t }
        } else {
            RowNeed::Logits
        }
    }

    /// Draws a token from the candidates [`top_candidates`] gives for
    /// [`Sampler::candidates_only`]'s request: the same token [`Sampler::sample`] picks from
    /// the full logits.
    pub fn sample_candidates(&mut self, cand: &[(f32, u32)]) -> u32 {
        self.sample_input(SampleInput::Candidates(cand), &[])
    }

    /// Softmax over the sorted scaled candidates, then the min-p and top-p cuts: the
    /// candidates kept (`self.cand[..keep]`, probabilities before renormalisation).
    fn cut(&mut self) -> usize {
        let p = &self.params;
        let max = self.cand[0].0;
        let mut sum = 0.0;
        for c in &mut self.cand {
            c.0 = (c.0 - max).exp();
            sum += c.0;
        }
        for c in &mut self.cand {
            c.0 /= sum;
        }
        let top = self.cand[0].0;
        let mut keep = self.cand.len();
        if p.min_p > 0.0 {
            keep = self
                .cand
                .iter()
                .take_while(|c| c.0 >= p.min_p * top)
                .count()
                .max(1);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, c) in self.cand[..keep].iter().enumerate() {
                acc += c.0;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        keep
    }

    /// A seeded draw from the kept candidates, skipping `except` (the rejected draft of
    /// speculative decoding: the residual distribution of a one-hot draft).
    fn draw_from(&mut self, keep: usize, except: Option<u32>) -> u32 {
        let kept = &self.cand[..keep];
        let total: f32 = kept
            .iter()
            .filter(|c| Some(c.1) != except)
            .map(|c| c.0)
            .sum();
        let mut r = self.rng.random::<f32>() * total;
        let mut last = None;
        for c in kept.iter().filter(|c| Some(c.1) != except) {
            r -= c.0;
            last = Some(c.1);
            if r <= 0.0 {
                return c.1;
            }
        }
        // Rounding left a sliver: the last candidate (or, when the draft was the only one
        // kept, the draft itself, which cannot have been rejected then).
        last.or(except).unwrap_or(kept[keep - 1].1)
    }

    /// Softmax over the sorted scaled candidates, min-p and top-p cuts, then a seeded draw.
    fn draw(&mut self) -> u32 {
        let keep = self.cut();
        self.draw_from(keep, None)
    }

    /// The candidates of `input` (scaled, sorted) into `self.cand`, the penalty applied to
    /// logits first; false for a greedy sampler.
    fn load_candidates(&mut self, input: SampleInput<'_>, context: &[u32]) -> Option<u32> {
        match input {
            SampleInput::Argmax(id) => Some(id),
            SampleInput::Candidates(c) => {
                self.cand.clear();
                self.cand.extend_from_slice(c);
                None
            }
            SampleInput::Logits(l) => {
                self.keep_row(l);
                self.penalize(l, context);
                if let Some(c) = &mut self.constraint {
                    c.mask(l);
                }
                if self.params.temperature == 0.0 {
                    return Some(argmax(l));
                }
                top_candidates(
                    l,
                    self.params.top_k,
                    1.0 / self.params.temperature,
                    &mut self.cand,
                );
                None
            }
        }
    }

    /// Picks the token of one step row from what the backend gave for [`Sampler::row_need`].
    pub fn sample_input(&mut self, input: SampleInput<'_>, context: &[u32]) -> u32 {
        let tok = match self.load_candidates(input, context) {
            Some(id) => id,
            None => self.draw(),
        };
        self.chose(tok)
    }

    /// Speculative decoding's acceptance rule for one drafted token (a one-hot draft
    /// distribution, as prompt lookup and greedy draft models give): greedy samplers accept
    /// the draft when it is the token they would pick; others accept it with probability
    /// p(draft) under this sampler's distribution (temperature, top-k, min-p, top-p, penalty)
    /// and otherwise draw from p with the draft removed, renormalised. The tokens this
    /// produces follow exactly the distribution of [`Sampler::sample`].
    pub fn verify(&mut self, input: SampleInput<'_>, context: &[u32], draft: u32) -> Verdict {
        if let Some(id) = self.load_candidates(input, context) {
            self.chose(id);
            return if id == draft {
                Verdict::Accept
            } else {
                Verdict::Reject(id)
            };
        }
        let keep = self.cut();
        let p: f32 = self.cand[..keep]
            .iter()
            .filter(|c| c.1 == draft)
            .map(|c| c.0)
            .sum();
        let total: f32 = self.cand[..keep].iter().map(|c| c.0).sum();
        if self.rng.random::<f32>() * total < p {
            self.chose(draft);
            Verdict::Accept
        } else {
            let t = self.draw_from(keep, Some(draft));
            Verdict::Reject(self.chose(t))
        }
    }

    /// The penalties and bias on `logits`: repetition (transformers' rule) for the ids of
    /// `context`, presence and frequency (OpenAI's rule) for the tokens this sampler chose,
    /// then the bias.
    fn penalize(&self, logits: &mut [f32], context: &[u32]) {
        let p = &self.params;
        let rp = p.repetition_penalty;
        if rp != 1.0 {
            for &t in context {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        for (&t, &n) in &self.generated {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }
}

/// What the backend gave for one step row, as [`Sampler::row_need`] asked.
#[derive(Debug)]
pub enum SampleInput<'a> {
    /// The argmax (greedy rows).
    Argmax(u32),
    /// The candidates of [`crate::backend::RowNeed::Candidates`].
    Candidates(&'a [(f32, u32)]),
    /// The logits row (modified in place by the penalty).
    Logits(&'a mut [f32]),
}

impl<'a> SampleInput<'a> {
    /// The inputs of a step's rows from what [`crate::backend::BatchBackend::head_rows`] gave
    /// for `need` (one per row, in order).
    pub fn from_head(
        need: &[crate::backend::RowNeed],
        head: &'a mut crate::backend::HeadRows,
        vocab: usize,
    ) -> Vec<SampleInput<'a>> {
        use crate::backend::RowNeed;
        let crate::backend::HeadRows { ids, cands, logits } = head;
        let mut chunks = logits.chunks_mut(vocab.max(1));
        let mut cands = &cands[..];
        need.iter()
            .zip(ids.iter())
            .map(|(n, &id)| match *n {
                RowNeed::Argmax => SampleInput::Argmax(id),
                RowNeed::Candidates { k, .. } => {
                    let (c, rest) = cands.split_at(k.min(vocab).min(cands.len()));
                    cands = rest;
                    SampleInput::Candidates(c)
                }
                RowNeed::Logits => chunks
                    .next()
                    .map_or(SampleInput::Argmax(id), SampleInput::Logits),
            })
            .collect()
    }
}

/// The outcome of [`Sampler::verify`] for one drafted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The draft is the next token.
    Accept,
    /// The draft is rejected; this token comes instead and ends the drafted run.
    Reject(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_matches_a_scalar_scan_on_odd_lengths_ties_and_nan() {
        let scan = |l: &[f32]| {
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut rng = StdRng::seed_from_u64(3);
        for len in [1usize, 2, 15, 16, 17, 37, 1000, 4099] {
            for _ in 0..20 {
                // Few distinct values: ties are common.
                let mut l: Vec<f32> = (0..len).map(|_| rng.random_range(0..8) as f32).collect();
                if len > 3 {
                    l[len / 3] = f32::NAN;
                }
                assert_eq!(argmax(&l), scan(&l), "{l:?}");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 5.0, f32::NAN, 5.0]), 2);
    }

    #[test]
    fn greedy_takes_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let logits = [0.1, 0.5, 2.0, 1.9, -1.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            seed: Some(3),
            ..Default::default()
        };
        assert_eq!(Sampler::new(p).sample(&mut logits.clone(), &[]), 2);
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect()
        };
        let mut s = Sampler::new(p);
        let b: Vec<u32> = (0..20)
            .map(|_| s.sample(&mut logits.clone(), &[]))
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != 2),
            "temperature 1 should not always pick the argmax"
        );
    }

    #[test]
    fn top_p_and_min_p_restrict_candidates() {
        let logits = [10.0, 9.0, 0.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert!((0..50).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert!((0..200).all(|_| s.sample(&mut logits.clone(), &[]) < 2));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(Sampler::new(p).sample(&mut [3.0, 2.0], &[0]), 1);
    }

    #[test]
    fn logit_bias_and_presence_and_frequency_penalties_follow_openai() {
        let bias = SamplingParams {
            logit_bias: vec![(2, 5.0), (0, -100.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(bias);
        assert!(!s.is_greedy() && s.candidates_only().is_none());
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0], &[]), 2, "-97, 2, 5");
        // Presence 1.5 and frequency 1.0 after token 0 was generated once, twice.
        let pen = SamplingParams {
            presence_penalty: 1.5,
            frequency_penalty: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::new(pen);
        assert_eq!(
            s.sample(&mut [4.0, 2.0, 0.0], &[7, 7, 7]),
            0,
            "the prompt is not penalised"
        );
        assert_eq!(
            s.sample(&mut [4.0, 2.0, 0.0], &[]),
            1,
            "4 - 1.5 - 1 = 1.5 < 2"
        );
        assert_eq!(
            s.sample(&mut [5.0, 2.0, 0.0], &[]),
            0,
            "5 - 2.5 = 2.5 > 2 - 2.5"
        );
        let mut l = [5.0, 2.0, 0.0];
        s.penalize(&mut l, &[]);
        assert_eq!(l, [5.0 - 1.5 - 2.0, 2.0 - 1.5 - 1.0, 0.0]);
        let bad = SamplingParams {
            logit_bias: vec![(1, 101.0)],
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("token 1"));
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax_of_each_chosen_token() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        let lp = |i: usize| (logits[i] as f64 - lse) as f32;
        // Biased and sampled at temperature: the log-probabilities stay the model's.
        let p = SamplingParams {
            temperature: 0.7,
            logit_bias: vec![(0, 50.0)],
            logprobs: Some(2),
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
        let got = s.take_logprobs();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].token, 0);
        assert!((got[0].logprob - lp(0)).abs() < 1e-6);
        assert_eq!(got[0].top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((got[0].top[0].1 - lp(1)).abs() < 1e-6);
        assert!(s.take_logprobs().is_empty());
        // Verification reports one entry per token it yields: accepted drafts and the last.
        let p = SamplingParams {
            logprobs: Some(0),
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert_eq!(
            s.verify(SampleInput::Logits(&mut logits.clone()), &[], 1),
            Verdict::Accept
        );
        assert_eq!(
            s.verify(SampleInput::Logits(&mut logits.clone()), &[], 2),
            Verdict::Reject(1)
        );
        let got = s.take_logprobs();
        assert_eq!(got.iter().map(|t| t.token).collect::<Vec<_>>(), [1, 1]);
        assert!(got
            .iter()
            .all(|t| (t.logprob - lp(1)).abs() < 1e-6 && t.top.is_empty()));
        let over = SamplingParams {
            logprobs: Some(MAX_TOP_LOGPROBS + 1),
            ..Default::default()
        };
        assert!(over.validate().is_err());
    }
}

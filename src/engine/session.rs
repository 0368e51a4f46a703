//! One generation as a state machine, independent of how the forward pass is driven: the
//! sampler, the stop conditions (EOS, stop strings, max tokens, the context) and the text
//! stream. The native [`super::generate::Generator`] drives it synchronously, the browser
//! build asynchronously; both emit exactly what this decides.

use super::sampler::{SampleInput, Sampler, SamplingParams, TokenLogprobs};
use super::speculative::accept_drafts;
use super::text::TextStream;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Token ids that end generation (usually generation_config's eos_token_id).
    pub eos_token_ids: Vec<u32>,
    /// Keep going past EOS tokens.
    pub ignore_eos: bool,
    /// Strings that end generation (the text is cut before them).
    pub stop_strings: Vec<String>,
    /// Attention sinks and a sliding window: generation goes on past the KV cache (None:
    /// it ends when the cache is full).
    pub sink_window: Option<super::window::SinkWindow>,
    /// What the text must match (structured output; each generation starts from a fresh
    /// copy of this constraint).
    pub constraint: Option<super::grammar::Constraint>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            eos_token_ids: vec![],
            ignore_eos: false,
            stop_strings: vec![],
            sink_window: None,
            constraint: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or stop string.
    Stop,
    /// `max_tokens` reached, or the context window is full.
    Length,
    /// The caller stopped it.
    Cancelled,
}

impl FinishReason {
    /// The spelling of the APIs (OpenAI's, plus `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// What the next step must produce for the session to pick its token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Want {
    /// The argmax of the last position (greedy decoding).
    Argmax,
    /// The `k` best candidates at `1 / inv_t` temperature (top-k sampling).
    TopK(usize, f32),
    /// The last position's logits.
    Logits,
}

/// What one accepted token adds to the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// The generated token (None when an EOS token ended the generation).
    pub token: Option<u32>,
    /// Text now certain to belong to the answer (possibly empty).
    pub text: String,
}

/// Checks a prompt against the context window and the vocabulary.
pub fn check_prompt(prompt: &[u32], context: usize, vocab: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::Request("the prompt is empty".into()));
    }
    if prompt.len() > context {
        return Err(Error::Request(format!(
            "the prompt has {} tokens but the context window holds {context}",
            prompt.len()
        )));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Request(format!(
            "token id {bad} is out of range (vocab_size {vocab})"
        )));
    }
    Ok(())
}

/// A generation in progress.
pub struct Session {
    opts: GenerateOptions,
    sampler: Sampler,
    want: Want,
    context: Vec<u32>,
    capacity: usize,
    prompt_len: usize,
    tokens: Vec<u32>,
    text: TextStream,
    finish: Option<FinishReason>,
}

impl Session {
    /// A generation from `prompt` in a context of `capacity` positions over `vocab` ids.
    pub fn new(
        prompt: &[u32],
        opts: &GenerateOptions,
        capacity: usize,
        vocab: usize,
    ) -> Result<Self> {
        opts.sampling.validate()?;
        check_prompt(prompt, capacity, vocab)?;
        let sampler = match &opts.constraint {
            Some(c) => Sampler::new(opts.sampling.clone()).constrain(c.fork()),
            None => Sampler::new(opts.sampling.clone()),
        };
        let want = match sampler.candidates_only() {
            Some((k, inv_t)) => Want::TopK(k, inv_t),
            None if sampler.is_greedy() => Want::Argmax,
            None => Want::Logits,
        };
        let mut context = Vec::with_capacity(prompt.len() + opts.max_tokens.min(capacity));
        context.extend_from_slice(prompt);
        Ok(Session {
            sampler,
            want,
            context,
            capacity,
            prompt_len: prompt.len(),
            tokens: Vec::new(),
            text: TextStream::new(&opts.stop_strings),
            finish: (opts.max_tokens == 0).then_some(FinishReason::Length),
            opts: opts.clone(),
        })
    }

    /// What each step must produce.
    pub fn want(&self) -> Want {
        self.want
    }

    /// Prompt and generated tokens so far.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// Prompt length in tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Generated tokens (EOS excluded).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The generated text, cut before a stop string.
    pub fn text(&self) -> &str {
        self.text.text()
    }

    /// Why the generation ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Whether the next step after the pending token still fits (tokens and context).
    pub fn room_for(&self, more: usize) -> bool {
        self.tokens.len() + more < self.opts.max_tokens && self.context.len() + more < self.capacity
    }

    /// Most tokens a speculative step may draft after the pending token: what the token limit
    /// and the context leave (0 when none).
    pub fn draft_room(&self) -> usize {
        let tokens = self.opts.max_tokens.saturating_sub(self.tokens.len() + 1);
        tokens.min(self.capacity.saturating_sub(self.context.len()))
    }

    /// The log-probabilities of the generated tokens so far (those asked for by
    /// [`SamplingParams::logprobs`]), one per token, taken out.
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprobs> {
        let mut lps = self.sampler.take_logprobs();
        // A stop token was chosen but not generated.
        lps.truncate(self.tokens.len());
        lps
    }

    /// What each row of a step needs for this session's sampler.
    pub fn row_need(&self) -> crate::backend::RowNeed {
        self.sampler.row_need()
    }

    /// Speculative decoding's acceptance ([`crate::engine::speculative::accept_drafts`]) of
    /// `drafts` following the context, from the verification step's rows: the tokens to
    /// accept into `out`; returns how many drafts were accepted.
    pub fn verify_drafts<'a>(
        &mut self,
        inputs: impl IntoIterator<Item = SampleInput<'a>>,
        drafts: &[u32],
        out: &mut Vec<u32>,
    ) -> usize {
        accept_drafts(&mut self.sampler, inputs, &mut self.context, drafts, out)
    }

    /// Samples the next token from the last position's `logits` (modified in place).
    pub fn pick(&mut self, logits: &mut [f32]) -> u32 {
        self.sampler.sample(logits, &self.context)
    }

    /// Draws the next token from top-k candidates ([`Want::TopK`]).
    pub fn pick_candidates(&mut self, candidates: &[(f32, u32)]) -> u32 {
        self.sampler.sample_candidates(candidates)
    }

    /// Takes the next token: applies EOS, stop strings and the length limits, and returns
    /// the token and the text it releases.
    pub fn accept(&mut self, tok: u32, tokenizer: Option<&Tokenizer>) -> Result<Emitted> {
        if self.finish.is_some() {
            return Ok(Emitted {
                token: None,
                text: String::new(),
            });
        }
        if !self.opts.ignore_eos && self.opts.eos_token_ids.contains(&tok) {
            self.finish = Some(FinishReason::Stop);
            // Text held back for a possible stop string belongs to the answer after all.
            return Ok(Emitted {
                token: None,
                text: self.text.finish(),
            });
        }
        self.tokens.push(tok);
        self.context.push(tok);
        let mut text = match tokenizer {
            Some(t) => self.text.push(t, tok)?,
            None => String::new(),
        };
        if self.text.stopped() {
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= self.opts.max_tokens || self.context.len() >= self.capacity {
            self.finish = Some(FinishReason::Length);
            text.push_str(&self.text.finish());
        }
        Ok(Emitted {
            token: Some(tok),
            text,
        })
    }

    /// Ends the generation as cancelled (unless it has already ended).
    pub fn cancel(&mut self) {
        self.finish.get_or_insert(FinishReason::Cancelled);
    }
}

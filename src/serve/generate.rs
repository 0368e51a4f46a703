//! One request's generation as the handlers see it: submit to the scheduler, then pull text
//! pieces (detokenized incrementally, stop strings applied) until the end.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::api::ApiError;
use super::{AppState, LoadedModel};
use crate::batch::scheduler::{Event, EventSink, Request, SubmitError};
use crate::engine::grammar::Constraint;
use crate::engine::sampler::{SamplingParams, TokenLogprobs};
use crate::engine::session::FinishReason;
use crate::engine::text::TextStream;
use crate::engine::window::SinkWindow;
use crate::tokenizer::Tokenizer;

/// What to generate.
pub struct Job {
    /// The model (kept alive until the job ends, across model swaps).
    pub model: Arc<LoadedModel>,
    /// The worker (index into the model's workers) that runs it.
    pub worker: usize,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stops: Vec<String>,
    /// Scheduling priority.
    pub priority: i32,
    /// Attention sinks and a sliding window (None: the generation ends at the context).
    pub sink_window: Option<SinkWindow>,
    /// What the text must match (structured output).
    pub constraint: Option<Constraint>,
}

struct TokioSink(UnboundedSender<Event>);

impl EventSink for TokioSink {
    fn send(&mut self, e: Event) -> bool {
        self.0.send(e).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// One generated token's log-probability as the API shows it.
#[derive(Debug, Clone)]
pub struct Logprob {
    /// The token's text (`token_id:N` without a tokenizer).
    pub token: String,
    /// Its log-probability under the model.
    pub logprob: f32,
    /// The most likely tokens at its position: (text, log-probability), best first.
    pub top: Vec<(String, f32)>,
}

impl Logprob {
    fn new(tokenizer: Option<&Tokenizer>, lp: &TokenLogprobs) -> Self {
        let text = |id: u32| match tokenizer.and_then(|t| t.decode(&[id], false).ok()) {
            Some(s) => s,
            None => format!("token_id:{id}"),
        };
        Logprob {
            token: text(lp.token),
            logprob: lp.logprob,
            top: lp.top.iter().map(|&(id, l)| (text(id), l)).collect(),
        }
    }
}

/// A piece of a running job's output.
pub enum Piece {
    /// New text, with the log-probabilities of the tokens that completed it (when asked for;
    /// a token's entry comes with the piece its text first shows in).
    Text(String, Vec<Logprob>),
    /// The end, with OpenAI's finish reason and token counts.
    End {
        /// `stop` or `length`.
        finish: &'static str,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
}

/// A submitted job.
pub struct Run {
    rx: Option<UnboundedReceiver<Event>>,
    state: Arc<AppState>,
    tokenizer: Option<Arc<Tokenizer>>,
    text: TextStream,
    generated: usize,
    prompt_tokens: usize,
    pending: VecDeque<Piece>,
    /// Log-probabilities of tokens whose text has not been released yet.
    logprobs: Vec<Logprob>,
    started: Instant,
    last: Option<Instant>,
    ended: bool,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

impl Run {
    /// Submits `job`; 429 when the queue is full, 400 when it can never run.
    pub fn start(state: &Arc<AppState>, job: Job) -> Result<Run, ApiError> {
        let (tx, rx) = unbounded_channel();
        let eos = job.model.eos.clone();
        let prompt_tokens = job.prompt.len();
        let worker = job.model.workers.get(job.worker).ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "a job for a worker the model does not have",
            )
        })?;
        worker
            .sched
            .submit(Request {
                prompt: job.prompt,
                max_tokens: job.max_tokens,
                sampling: job.sampling,
                stop_ids: eos,
                priority: job.priority,
                sink_window: job.sink_window,
                constraint: job.constraint,
                sink: Box::new(TokioSink(tx)),
            })
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        e.to_string(),
                    )
                },
                SubmitError::Invalid(m) => ApiError::invalid(None, m),
                SubmitError::Stopped => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    e.to_string(),
                ),
            })?;
        Ok(Run {
            rx: Some(rx),
            state: state.clone(),
            tokenizer: job.model.tokenizer.clone(),
            text: TextStream::new(&job.stops),
            generated: 0,
            prompt_tokens,
            pending: VecDeque::new(),
            logprobs: Vec::new(),
            started: Instant::now(),
            last: None,
            ended: false,
        })
    }

    fn end(&mut self, finish: &'static str) {
        // Dropping the receiver cancels the request in the scheduler (if still running).
        self.rx = None;
        self.ended = true;
        let m = &self.state.metrics;
        m.prompt_tokens.inc_by(self.prompt_tokens as u64);
        m.duration.observe(self.started.elapsed().as_secs_f64());
        // Tokens whose text never showed (held back, or cut by a stop string) still report.
        if !self.logprobs.is_empty() {
            let lps = std::mem::take(&mut self.logprobs);
            self.pending.push_back(Piece::Text(String::new(), lps));
        }
        self.pending.push_back(Piece::End {
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated,
        });
    }

    /// The next piece; None after the end. Errors carry the engine's message.
    pub async fn next(&mut self) -> Option<Result<Piece, String>> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(Ok(p));
            }
            if self.ended {
                return None;
            }
            let ev = match &mut self.rx {
                Some(rx) => rx.recv().await,
                None => None,
            };
            match ev {
                Some(Event::Logprobs(lp)) => {
                    if !self.text.stopped() {
                        let lp = Logprob::new(self.tokenizer.as_deref(), &lp);
                        self.logprobs.push(lp);
                    }
                }
                Some(Event::Token(t)) => {
                    let m = &self.state.metrics;
                    match self.last {
                        None => m.ttft.observe(self.started.elapsed().as_secs_f64()),
                        Some(l) => m.token_latency.observe(l.elapsed().as_secs_f64()),
                    }
                    self.last = Some(Instant::now());
                    m.generated_tokens.inc();
                    self.generated += 1;
                    let piece = match &self.tokenizer {
                        Some(tok) => match self.text.push(tok, t) {
                            Ok(p) => p,
                            Err(e) => return Some(Err(e.to_string())),
                        },
                        None => String::new(),
                    };
                    let stopped = self.text.stopped();
                    // Without a tokenizer every token still makes a (textless) chunk.
                    if !piece.is_empty() || self.tokenizer.is_none() {
                        let lps = std::mem::take(&mut self.logprobs);
                        self.pending.push_back(Piece::Text(piece, lps));
                    }
                    if stopped {
                        self.end("stop");
                    }
                }
                Some(Event::Done { finish, .. }) => {
                    // Text held back for a possible stop string belongs to the answer.
                    let piece = self.text.finish();
                    if !piece.is_empty() {
                        let lps = std::mem::take(&mut self.logprobs);
                        self.pending.push_back(Piece::Text(piece, lps));
                    }
                    self.end(finish_str(finish));
                }
                Some(Event::Error(e)) => {
                    self.ended = true;
                    return Some(Err(e));
                }
                None => {
                    self.ended = true;
                    return Some(Err("the engine stopped".into()));
                }
            }
        }
    }
}

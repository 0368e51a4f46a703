//! The continuous-batching scheduler: one engine thread owns the backend and the KV pool;
//! requests join the running batch at any step and leave when they finish or their client goes
//! away. Each step takes one decode row from every sequence that has its prompt done and fills
//! the rest of the step's token budget with prompt chunks, so a long prompt never stalls the
//! others. Admission waits for KV blocks; when the pool runs dry mid-generation the
//! lowest-priority, most recently admitted other sequence is preempted (all its blocks freed, put
//! back at the head of the queue and recomputed from its tokens; its client only waits). A
//! sequence with a sink window ([`crate::engine::window`]) evicts its own oldest positions
//! instead of growing past `sinks + window`, shares no prefix blocks (its blocks move), and is
//! recomputed through its window when preempted.

use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::time::Instant;

use super::blocks::{prefix_hashes, BlockAllocator};
use crate::backend::{BatchBackend, HeadRows, RowSlot};
use crate::engine::forward::forward_rows_sampled;
use crate::engine::grammar::Constraint;
use crate::engine::sampler::{SampleInput, Sampler, SamplingParams, TokenLogprobs};
use crate::engine::session::FinishReason;
use crate::engine::speculative::{accept_drafts, Drafter, NgramDrafter};
use crate::engine::window::{SinkWindow, Sliding};
use crate::error::{Error, Result};

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most requests waiting for admission; more are refused ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
    /// Most token rows in one step (decode rows plus prompt chunks).
    pub step_tokens: usize,
    /// KV blocks in the pool.
    pub kv_blocks: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Most positions of one sequence (prompt + generated).
    pub max_context: usize,
    /// Prompt-lookup tokens drafted per decoding sequence and step (speculative decoding;
    /// 0 = off).
    pub draft_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch: 64,
            max_queue: 256,
            step_tokens: 256,
            kv_blocks: 1024,
            block_size: 16,
            max_context: 4096,
            draft_tokens: 0,
        }
    }
}

/// What a request's sink receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next generated token.
    Token(u32),
    /// The log-probabilities of the token that follows (requests with
    /// [`SamplingParams::logprobs`] only).
    Logprobs(TokenLogprobs),
    /// The request ended.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens (the stop token excluded).
        completion_tokens: usize,
    },
    /// The request failed.
    Error(String),
}

/// Where a request's events go.
pub trait EventSink: Send {
    /// Delivers `e`; false when the receiver is gone (the request is then cancelled).
    fn send(&mut self, e: Event) -> bool;
    /// Whether the receiver is gone (checked every step so abandoned requests free their blocks).
    fn is_closed(&self) -> bool;
}

impl EventSink for mpsc::Sender<Event> {
    fn send(&mut self, e: Event) -> bool {
        mpsc::Sender::send(self, e).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

/// A generation request.
pub struct Request {
    /// What the text must match (structured output; None: free text).
    pub constraint: Option<Constraint>,
    /// Attention sinks and a sliding window: the sequence goes on past the context (None:
    /// it ends there).
    pub sink_window: Option<SinkWindow>,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Token ids that end generation (not emitted).
    pub stop_ids: Vec<u32>,
    /// Higher runs first among waiting requests.
    pub priority: i32,
    /// Receives the tokens and the end.
    pub sink: Box<dyn EventSink>,
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full: retry later.
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    /// The request can never run.
    #[error("{0}")]
    Invalid(String),
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// Live counters of a scheduler (read by the server's metrics).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Requests waiting for admission.
    pub queued: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// KV blocks referenced by sequences.
    pub kv_used: AtomicUsize,
    /// Idle KV blocks holding a reusable prompt prefix.
    pub kv_cached: AtomicUsize,
    /// KV blocks referenced by more than one sequence (shared prompt prefixes).
    pub kv_shared: AtomicUsize,
    /// KV blocks in the pool.
    pub kv_total: AtomicUsize,
    /// Prompt tokens computed (prefix-cache hits excluded).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens served from cached prefix blocks.
    pub prefix_hit_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Batched steps run.
    pub steps: AtomicU64,
    /// Sequences preempted for lack of KV blocks.
    pub preemptions: AtomicU64,
    /// Tokens drafted by speculative decoding.
    pub drafted_tokens: AtomicU64,
    /// Drafted tokens accepted.
    pub accepted_tokens: AtomicU64,
    /// How long the longest-waiting request of priority ≥ 0 has waited for admission, in
    /// milliseconds (0 when none waits).
    pub oldest_wait_ms: AtomicU64,
    /// The last batched step's duration in milliseconds (0 when idle).
    pub step_ms: AtomicU64,
}

/// A handle to a running scheduler; clones share it. The engine thread stops when every
/// handle is gone and its work is done.
#[derive(Clone)]
pub struct Scheduler {
    tx: SyncSender<Msg>,
    /// Set by [`Scheduler::stop_now`]: the engine ends every request and its thread.
    stop: Arc<AtomicBool>,
    stats: Arc<SchedulerStats>,
    cfg: SchedulerConfig,
    vocab: usize,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Scheduler {
    /// Starts the engine thread over `backend` with a pool sized by `cfg`.
    pub fn spawn<B: BatchBackend + Send + 'static>(
        backend: B,
        cfg: SchedulerConfig,
    ) -> Result<Self> {
        if cfg.block_size == 0 || cfg.kv_blocks == 0 || cfg.max_batch == 0 || cfg.step_tokens == 0 {
            return Err(Error::Request(
                "scheduler limits must be positive (block size, blocks, batch, step tokens)".into(),
            ));
        }
        let pool = backend.new_pool(cfg.kv_blocks, cfg.block_size)?;
        let stats = Arc::new(SchedulerStats::default());
        stats.kv_total.store(cfg.kv_blocks, Relaxed);
        let (tx, rx) = mpsc::sync_channel(cfg.max_queue.max(1));
        let vocab = backend.config().vocab_size;
        let stop = Arc::new(AtomicBool::new(false));
        let mut engine = Engine {
            stop: stop.clone(),
            backend,
            pool,
            alloc: BlockAllocator::new(cfg.kv_blocks, cfg.block_size),
            cfg: cfg.clone(),
            stats: stats.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            head: HeadRows::default(),
        };
        let thread = std::thread::Builder::new()
            .name("bitnet-engine".into())
            .spawn(move || engine.run(rx))
            .map_err(|e| Error::Backend(format!("engine thread: {e}")))?;
        Ok(Scheduler {
            tx,
            stop,
            stats,
            cfg,
            vocab,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// The live counters.
    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    /// The model's vocabulary size (token ids are below it).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues `r`; its events go to its sink.
    pub fn submit(&self, r: Request) -> std::result::Result<(), SubmitError> {
        let len = r.prompt.len();
        if len == 0 {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(bad) = r.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is out of range (vocab_size {})",
                self.vocab
            )));
        }
        // Positions the sequence holds at once.
        let held = match r.sink_window {
            Some(w) => {
                w.validate(self.cfg.max_context)
                    .map_err(|e| SubmitError::Invalid(e.to_string()))?;
                (len + 1).min(w.sinks + w.window)
            }
            None if len >= self.cfg.max_context => {
                return Err(SubmitError::Invalid(format!(
                    "the prompt has {len} tokens but the context holds {}",
                    self.cfg.max_context
                )));
            }
            None => len + 1,
        };
        let blocks = held.div_ceil(self.cfg.block_size);
        if blocks > self.cfg.kv_blocks {
            return Err(SubmitError::Invalid(format!(
                "the prompt needs {blocks} KV blocks but the pool has {}",
                self.cfg.kv_blocks
            )));
        }
        r.sampling
            .validate()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        let queued = self.stats.queued.fetch_add(1, Relaxed);
        if queued >= self.cfg.max_queue {
            self.stats.queued.fetch_sub(1, Relaxed);
            return Err(SubmitError::QueueFull(queued));
        }
        match self.tx.try_send(Msg::Run(Box::new(r))) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull(queued),
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Drops this handle and, when it is the last one, waits for the engine thread to finish
    /// its work.
    pub fn shutdown(self) {
        let thread = self.thread.clone();
        drop(self);
        if Arc::strong_count(&thread) == 1 {
            if let Some(t) = thread.lock().ok().and_then(|mut g| g.take()) {
                let _ = t.join();
            }
        }
    }

    /// Ends every queued and running request (an error event: the server stopped) after the
    /// step in progress, and waits for the engine thread to end and drop its backend. Any
    /// handle may call it; a second call waits for the first one's thread to end.
    pub fn stop_now(&self) {
        self.stop.store(true, Relaxed);
        // Wakes an idle engine; a full queue means the engine is busy and sees the flag.
        let _ = self.tx.try_send(Msg::Stop);
        if let Ok(mut thread) = self.thread.lock() {
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// What the engine thread receives.
enum Msg {
    /// A request to run.
    Run(Box<Request>),
    /// Wakes the engine to see [`Scheduler::stop_now`]'s flag.
    Stop,
}

struct Seq {
    id: u64,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    generated: usize,
    /// Tokens whose keys and values are in the pool (or were evicted by the sink window).
    computed: usize,
    /// The sink window's state: which pool position each token has (None: token i at i).
    slide: Option<Sliding>,
    /// Prompt tokens already registered as cached prefix blocks.
    registered: usize,
    /// The prefix hashes of the prompt's full blocks (what its prefill registers; empty for a
    /// sliding sequence).
    prompt_hashes: Vec<u64>,
    table: Vec<u32>,
    sampler: Sampler,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    priority: i32,
    sink: Box<dyn EventSink>,
    /// When it last joined the waiting queue.
    queued_at: Instant,
}

struct Engine<B: BatchBackend> {
    /// [`Scheduler::stop_now`]'s flag.
    stop: Arc<AtomicBool>,
    backend: B,
    pool: B::Cache,
    alloc: BlockAllocator,
    cfg: SchedulerConfig,
    stats: Arc<SchedulerStats>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: u64,
    /// What the last step's sampled rows' samplers needed: argmax, candidates or logits.
    head: HeadRows,
}

impl<B: BatchBackend> Engine<B> {
    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            if self.stop.load(Relaxed) {
                self.end_all("the server stopped before the request finished");
                break;
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(Msg::Run(r)) => self.enqueue(*r),
                    Ok(Msg::Stop) => continue,
                    Err(_) => break,
                }
            }
            while let Ok(m) = rx.try_recv() {
                if let Msg::Run(r) = m {
                    self.enqueue(*r);
                }
            }
            self.drop_cancelled();
            self.admit();
            let t0 = Instant::now();
            let stepped = self.step();
            let ms = if self.running.is_empty() {
                0
            } else {
                t0.elapsed().as_millis() as u64
            };
            self.stats.step_ms.store(ms, Relaxed);
            if let Err(e) = stepped {
                // A failed step poisons every running sequence's state: end them all.
                self.fail_running(&e.to_string());
            }
            self.publish();
        }
    }

    /// Ends every running sequence with an error event saying `why`.
    fn fail_running(&mut self, why: &str) {
        for mut s in std::mem::take(&mut self.running) {
            s.sink.send(Event::Error(why.into()));
            self.free(&mut s);
        }
    }

    /// Ends every running and waiting sequence with an error event saying `why`.
    fn end_all(&mut self, why: &str) {
        self.fail_running(why);
        for mut s in std::mem::take(&mut self.waiting) {
            s.sink.send(Event::Error(why.into()));
            self.stats.queued.fetch_sub(1, Relaxed);
        }
        self.publish();
    }

    fn enqueue(&mut self, r: Request) {
        let prompt_hashes = match r.sink_window {
            Some(_) => Vec::new(),
            None => prefix_hashes(&r.prompt, self.cfg.block_size),
        };
        let seq = Seq {
            prompt_hashes,
            id: self.next_id,
            prompt_len: r.prompt.len(),
            tokens: r.prompt,
            generated: 0,
            computed: 0,
            slide: r.sink_window.map(Sliding::new),
            registered: 0,
            table: Vec::new(),
            sampler: match r.constraint {
                Some(c) => Sampler::new(r.sampling).constrain(c),
                None => Sampler::new(r.sampling),
            },
            max_tokens: r.max_tokens,
            stop_ids: r.stop_ids,
            priority: r.priority,
            sink: r.sink,
            queued_at: Instant::now(),
        };
        self.next_id += 1;
        // Higher priority first; arrival order among equals.
        let at = self
            .waiting
            .iter()
            .position(|w| w.priority < seq.priority)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    fn free(&mut self, s: &mut Seq) {
        for b in s.table.drain(..) {
            self.alloc.release(b);
        }
        s.computed = 0;
        s.registered = 0;
        // Recomputed from the first token, under a fresh window.
        s.slide = s.slide.as_ref().map(|sl| Sliding::new(sl.spec()));
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.is_closed() {
                let mut s = self.running.swap_remove(i);
                self.free(&mut s);
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.sink.is_closed());
        let gone = before - self.waiting.len();
        self.stats.queued.fetch_sub(gone, Relaxed);
    }

    /// Whether a running sequence is still computing prompt blocks that would extend a
    /// waiting sequence's cached prefix of `hit` blocks (of `hashes`): the waiting one then
    /// waits for them rather than computing the same prefix again (a request's `n` choices,
    /// clients sharing a system prompt).
    fn prefix_in_flight(&self, hashes: &[u64], hit: usize) -> bool {
        self.running.iter().any(|r| {
            r.computed < r.prompt_len
                && hashes
                    .iter()
                    .zip(&r.prompt_hashes)
                    .take_while(|(a, b)| a == b)
                    .count()
                    > hit
        })
    }

    /// Admits waiting sequences while the batch has room and the pool has blocks for their
    /// whole prompt (after prefix reuse) plus the first generated token.
    fn admit(&mut self) {
        let bs = self.cfg.block_size;
        while self.running.len() < self.cfg.max_batch {
            let Some(s) = self.waiting.front() else { break };
            // A sliding sequence moves its positions: it shares no prefix blocks.
            let (hashes, held) = match &s.slide {
                Some(sl) => {
                    let w = sl.spec();
                    (Vec::new(), (s.tokens.len() + 1).min(w.sinks + w.window))
                }
                None => (
                    prefix_hashes(&s.tokens[..s.tokens.len() - 1], bs),
                    s.tokens.len() + 1,
                ),
            };
            let hit = self.alloc.cached_prefix(&hashes);
            if self.prefix_in_flight(&hashes, hit) {
                break;
            }
            let need = held.div_ceil(bs) - hit;
            // Cached blocks counted in `available` may be the very ones this prefix reuses.
            if self.alloc.available() < need + hit {
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            self.stats.queued.fetch_sub(1, Relaxed);
            for h in &hashes[..hit] {
                match self.alloc.lookup(*h) {
                    Some(b) => s.table.push(b),
                    None => break,
                }
            }
            s.computed = s.table.len() * bs;
            s.registered = s.computed;
            self.stats
                .prefix_hit_tokens
                .fetch_add(s.computed as u64, Relaxed);
            self.running.push(s);
        }
    }

    /// Makes sure sequence `i` has blocks for positions up to `end`, preempting the most
    /// recently admitted other sequence when the pool is empty. False if it cannot.
    fn reserve(&mut self, i: usize, end: usize) -> bool {
        let bs = self.cfg.block_size;
        while self.running[i].table.len() * bs < end {
            match self.alloc.alloc() {
                Some(b) => self.running[i].table.push(b),
                None => {
                    let me = self.running[i].id;
                    let Some(v) = self
                        .running
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.id != me)
                        .max_by_key(|(_, s)| (-(s.priority as i64), s.id))
                        .map(|(j, _)| j)
                    else {
                        return false;
                    };
                    let mut victim = self.running.remove(v);
                    self.free(&mut victim);
                    victim.queued_at = Instant::now();
                    self.stats.preemptions.fetch_add(1, Relaxed);
                    self.stats.queued.fetch_add(1, Relaxed);
                    self.waiting.push_front(victim);
                    return self.reserve(if v < i { i - 1 } else { i }, end);
                }
            }
        }
        true
    }

    /// Under a sink window, makes room in sequence `i`'s blocks for a step of `n` of its tokens
    /// (cut to the window's largest step) and `drafts` drafts, evicting and moving positions as
    /// [`Sliding::make_room`] does and releasing the blocks that frees; returns the pool
    /// position the step ends at (the token index without a window).
    fn make_room(&mut self, i: usize, n: &mut usize, drafts: usize) -> Result<usize> {
        let bs = self.cfg.block_size;
        let Engine {
            backend,
            pool,
            running,
            alloc,
            ..
        } = self;
        let s = &mut running[i];
        let Some(sl) = &mut s.slide else {
            return Ok(s.computed + *n + drafts);
        };
        // `drafts_for` keeps drafts below the window's largest step.
        *n = (*n).min(sl.spec().max_step() - drafts);
        let start = sl.make_room(backend, pool, &s.table, s.computed, *n + drafts)?;
        let end = start + *n + drafts;
        while s.table.len() > end.div_ceil(bs) {
            if let Some(b) = s.table.pop() {
                alloc.release(b);
            }
        }
        Ok(end)
    }

    /// Prompt-lookup drafts for sequence `i` (decoding, speculation on), bounded by the step's
    /// remaining `budget`, its token limit and the context.
    fn drafts_for(&self, i: usize, budget: usize) -> Vec<u32> {
        let s = &self.running[i];
        let mut out = Vec::new();
        if self.cfg.draft_tokens == 0 || s.tokens.len() - s.computed != 1 {
            return out;
        }
        let context_room = match &s.slide {
            Some(sl) => sl.spec().max_step() - 1,
            None => self.cfg.max_context.saturating_sub(s.tokens.len()),
        };
        let room = self
            .cfg
            .draft_tokens
            .min(budget.saturating_sub(1))
            .min(s.max_tokens.saturating_sub(s.generated + 1))
            .min(context_room);
        if room > 0 {
            let mut d = NgramDrafter::default();
            // The ngram drafter cannot fail.
            let _ = d.draft(&s.tokens, room, &mut out);
        }
        out
    }

    fn step(&mut self) -> Result<()> {
        if self.running.is_empty() {
            return Ok(());
        }
        let mut budget = self.cfg.step_tokens;
        // Decode rows first (one each, plus any drafts), then prompt chunks in admission order.
        let mut order: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        order.sort_by_key(|id| {
            let s = self.running.iter().find(|s| s.id == *id);
            s.map_or((1, *id), |s| {
                ((s.tokens.len() - s.computed > 1) as u64, s.id)
            })
        });
        // (sequence, rows from its tokens, drafted rows after them)
        let mut plan: Vec<(u64, usize, Vec<u32>)> = Vec::new();
        for id in order {
            if budget == 0 {
                break;
            }
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let drafts = self.drafts_for(i, budget);
            let s = &self.running[i];
            let mut n = (s.tokens.len() - s.computed).min(budget);
            let end = match self.make_room(i, &mut n, drafts.len()) {
                Ok(end) => end,
                Err(e) => {
                    let mut s = self.running.remove(i);
                    s.sink.send(Event::Error(e.to_string()));
                    self.free(&mut s);
                    continue;
                }
            };
            if !self.reserve(i, end) {
                continue;
            }
            budget -= n + drafts.len();
            plan.push((id, n, drafts));
        }
        // Preemption may have removed planned sequences.
        plan.retain(|(id, ..)| self.running.iter().any(|s| s.id == *id));
        if plan.is_empty() {
            if let Some(mut s) = self.running.pop() {
                s.sink.send(Event::Error(
                    "the KV cache is too small for this request".into(),
                ));
                self.free(&mut s);
            }
            return Ok(());
        }
        // The blocks this step holds are visible in the stats before any of its tokens is sent.
        self.publish();
        let mut tokens = Vec::new();
        let mut rows = Vec::new();
        let mut tables = Vec::new();
        let mut logit_rows = Vec::new();
        // The sequences that pick tokens this step, with their drafts.
        let mut sampled: Vec<(u64, &[u32])> = Vec::new();
        // Greedy rows take the argmax the backend finds, top-k rows their candidates; only the
        // others need their logits.
        let mut need = Vec::new();
        for (k, (id, n, drafts)) in plan.iter().enumerate() {
            let Some(s) = self.running.iter().find(|s| s.id == *id) else {
                continue;
            };
            let slot = |p: usize| s.slide.as_ref().map_or(p, |sl| sl.pos(p));
            for p in s.computed..s.computed + n {
                tokens.push(s.tokens[p]);
                rows.push(RowSlot {
                    seq: k,
                    pos: slot(p),
                });
            }
            for (j, &d) in drafts.iter().enumerate() {
                tokens.push(d);
                rows.push(RowSlot {
                    seq: k,
                    pos: slot(s.computed + n + j),
                });
            }
            tables.push(s.table.clone());
            if s.computed + n == s.tokens.len() {
                for r in rows.len() - 1 - drafts.len()..rows.len() {
                    logit_rows.push(r);
                    need.push(s.sampler.row_need());
                }
                sampled.push((*id, drafts));
            }
        }
        // Structured output's masks for this step are computed on the host's idle cores
        // while the device runs the step.
        let overlap = self.backend.sample_in_parallel()
            && self.running.iter().any(|s| s.sampler.is_constrained());
        let mut forward = || {
            forward_rows_sampled(
                &mut self.backend,
                &mut self.pool,
                &tokens,
                &rows,
                &tables,
                &logit_rows,
                &need,
                &mut self.head,
            )
        };
        if overlap {
            // A mask is kept until its token is committed: computing one for a sequence that
            // samples later (still prefilling) is work it needs anyway.
            let running = &mut self.running;
            rayon::in_place_scope(|sc| {
                sc.spawn(|_| {
                    running
                        .par_iter_mut()
                        .for_each(|s| s.sampler.prefetch_mask())
                });
                forward()
            })?;
        } else {
            forward()?;
        }
        self.stats.steps.fetch_add(1, Relaxed);
        let vocab = self.backend.config().vocab_size;
        let bs = self.cfg.block_size;
        for (id, n, _) in &plan {
            let Some(s) = self.running.iter_mut().find(|s| s.id == *id) else {
                continue;
            };
            if s.computed < s.prompt_len {
                let prompt_part = (s.computed + n).min(s.prompt_len) - s.computed;
                self.stats
                    .prompt_tokens
                    .fetch_add(prompt_part as u64, Relaxed);
            }
            // Accepted drafts are counted after verification.
            s.computed += n;
            // Full blocks of the prompt become reusable prefixes (not a sliding sequence's:
            // they move).
            let full = (s.computed.min(s.prompt_len)) / bs;
            if full > s.registered / bs && s.slide.is_none() {
                let hashes = prefix_hashes(&s.tokens[..full * bs], bs);
                for (j, h) in hashes.iter().enumerate().skip(s.registered / bs) {
                    self.alloc.register(s.table[j], *h);
                }
                s.registered = full * bs;
            }
        }
        // Every sampled sequence's rows as its sampler needs them.
        let mut inputs = SampleInput::from_head(&need, &mut self.head, vocab).into_iter();
        let mut work: Vec<(Option<&mut Seq>, Vec<SampleInput>, &[u32])> = sampled
            .iter()
            .map(|&(_, d)| (None, inputs.by_ref().take(d.len() + 1).collect(), d))
            .collect();
        for s in self.running.iter_mut() {
            if let Some(k) = sampled.iter().position(|&(id, _)| id == s.id) {
                work[k].0 = Some(s);
            }
        }
        // Sampling (a pass over the vocabulary at least per row) in parallel when the backend
        // leaves the host's cores idle between steps.
        let pick = |(s, inputs, drafts): (Option<&mut Seq>, Vec<SampleInput>, &[u32])| {
            s.map(|s| {
                let mut out = Vec::with_capacity(drafts.len() + 1);
                let accepted =
                    accept_drafts(&mut s.sampler, inputs, &mut s.tokens, drafts, &mut out);
                (out, accepted, s.sampler.take_logprobs())
            })
        };
        type Picked = (Vec<u32>, usize, Vec<TokenLogprobs>);
        let picked: Vec<Option<Picked>> = if self.backend.sample_in_parallel() {
            work.into_par_iter().map(pick).collect()
        } else {
            work.into_iter().map(pick).collect()
        };
        let mut finished = Vec::new();
        for ((id, drafts), picked) in sampled.iter().zip(picked) {
            let (Some(i), Some((toks, accepted, logprobs))) =
                (self.running.iter().position(|s| s.id == *id), picked)
            else {
                continue;
            };
            if !drafts.is_empty() {
                self.stats
                    .drafted_tokens
                    .fetch_add(drafts.len() as u64, Relaxed);
                self.stats
                    .accepted_tokens
                    .fetch_add(accepted as u64, Relaxed);
            }
            let s = &mut self.running[i];
            // The accepted drafts' keys and values are in the pool; the rejected ones' slots
            // are overwritten by later steps.
            s.computed += accepted;
            let mut logprobs = logprobs.into_iter();
            for tok in toks {
                let mut end = None;
                let lp = logprobs.next();
                if s.stop_ids.contains(&tok) {
                    end = Some(FinishReason::Stop);
                } else {
                    s.tokens.push(tok);
                    s.generated += 1;
                    self.stats.generated_tokens.fetch_add(1, Relaxed);
                    let sent = lp.is_none_or(|lp| s.sink.send(Event::Logprobs(lp)));
                    if !sent || !s.sink.send(Event::Token(tok)) {
                        end = Some(FinishReason::Cancelled);
                    } else if s.generated >= s.max_tokens
                        || (s.slide.is_none() && s.tokens.len() >= self.cfg.max_context)
                    {
                        end = Some(FinishReason::Length);
                    }
                }
                if let Some(f) = end {
                    finished.push((*id, f));
                    break;
                }
            }
        }
        for (id, finish) in finished {
            if let Some(i) = self.running.iter().position(|s| s.id == id) {
                let mut s = self.running.swap_remove(i);
                self.free(&mut s);
                self.publish();
                s.sink.send(Event::Done {
                    finish,
                    prompt_tokens: s.prompt_len,
                    completion_tokens: s.generated,
                });
            }
        }
        Ok(())
    }

    fn publish(&self) {
        let st = &self.stats;
        st.running.store(self.running.len(), Relaxed);
        st.kv_used.store(self.alloc.used(), Relaxed);
        st.kv_cached.store(self.alloc.cached(), Relaxed);
        st.kv_shared.store(self.alloc.shared(), Relaxed);
        // Background work (negative priority, such as batch requests) waits by design: only
        // the others count.
        let oldest = (self.waiting.iter().filter(|s| s.priority >= 0))
            .map(|s| s.queued_at)
            .reduce(|a, b| if b < a { b } else { a });
        let wait = oldest.map_or(0, |t| t.elapsed().as_millis() as u64);
        st.oldest_wait_ms.store(wait, Relaxed);
    }
}

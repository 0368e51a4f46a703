//! Greedy speculative decoding on a device that queues steps: verification steps run back to
//! back, each queued before the one ahead of it is read.
//!
//! A step verifies its drafts on the device (the argmax of every row; a few bytes come back).
//! While it runs, the host queues its successor, whose input is the running step's pick after
//! its accepted drafts and whose position follows them: the device accepts the drafts itself
//! ([`crate::backend::DeviceSteps::embed_decode_step`]), so the successor is valid whatever the
//! running step accepts and the device never waits for the host. The successor's own drafts
//! continue the running step's drafts and the drafter's guess of its pick (the guess is one
//! more draft, verified by the running step). When the running step rejects a draft, the
//! successor's drafts are verified all the same but tell nothing of the drafter (their time
//! is the rejection's cost), and the step after it drafts nothing. Greedy tokens are exactly
//! plain decoding's: every emitted token is a row's argmax over the tokens before it, and the
//! rows of a decode step are computed exactly as one-token steps'.

use std::collections::VecDeque;

use super::{emit, Generator};
use crate::backend::Backend;
use crate::engine::forward::queue_greedy_step;
use crate::engine::session::Session;
use crate::engine::speculative::{draft_step, SpecControl, SpecStats};
use crate::error::{Error, Result};
use crate::time::Instant;
use crate::tokenizer::Tokenizer;

/// A step on the device, not read yet.
struct Flight {
    /// The drafts after its first input.
    drafts: Vec<u32>,
    /// The first input its drafts were drafted after, when that input was a guess (the pick
    /// of the step ahead, still running when this one was queued).
    guessed_input: Option<u32>,
    /// Seconds spent drafting for it.
    draft_secs: f64,
    /// The drafts' kind ([`crate::engine::speculative::Drafter::draft`]).
    kind: usize,
    /// Whether the step ahead accepted every draft, and the guessed input came true (None:
    /// no guess): set when the step ahead is read.
    ahead_held: bool,
    guess_ok: Option<bool>,
}

impl Flight {
    /// Whether its drafts follow its true input.
    fn sound(&self) -> bool {
        self.drafts.is_empty() || (self.ahead_held && self.guess_ok != Some(false))
    }
}

impl<B: Backend> Generator<B> {
    /// Decodes `s` (whose last context token is the next step's input) to its end with
    /// queued verification steps; counts drafts in `stats`, sizes them with `control`.
    pub(super) fn decode_queued_speculation(
        &mut self,
        s: &mut Session,
        tokenizer: Option<&Tokenizer>,
        on_token: &mut impl FnMut(u32, &str) -> bool,
        stats: &mut SpecStats,
        control: &mut SpecControl,
    ) -> Result<()> {
        let mut flight: VecDeque<Flight> = VecDeque::new();
        let (mut rows, mut ext) = (Vec::new(), Vec::new());
        let mut last_read = Instant::now();
        // Seconds spent drafting since the last read: they belong to the steps drafted for,
        // not to the step read next.
        let mut drafting = 0.0;
        // BITNET_SPEC_TRACE=1: every read step's drafts, acceptance and wall time on stderr.
        let trace = std::env::var_os("BITNET_SPEC_TRACE").is_some();
        loop {
            if flight.is_empty() {
                let ctx = s.context();
                let (pos, first) = (ctx.len() - 1, ctx[ctx.len() - 1]);
                let t0 = Instant::now();
                let (kind, drafts) =
                    self.draft_after(control, ctx, &[], (0, s.draft_room()), &mut ext)?;
                let draft_secs = t0.elapsed().as_secs_f64();
                drafting += draft_secs;
                queue_greedy_step(
                    &mut self.backend,
                    &mut self.cache,
                    (Some(first), &drafts),
                    pos,
                    self.profile.as_mut(),
                )?;
                flight.push_back(Flight {
                    drafts,
                    guessed_input: None,
                    draft_secs,
                    kind,
                    ahead_held: true,
                    guess_ok: None,
                });
            }
            if flight.len() == 1 {
                // The step ahead's input is the context's last token (everything before it
                // is read): the successor is recorded as if all its drafts were accepted.
                let f = &flight[0];
                let ahead = f.drafts.len() + 1;
                if s.room_for(ahead) {
                    let (mut kind, mut guess, mut draft_secs) = (0, Vec::new(), 0.0);
                    if f.sound() {
                        // The successor's input is a guess for now (the drafter's next token),
                        // then drafts continuing that guess.
                        let room = s.draft_room().saturating_sub(ahead);
                        let t0 = Instant::now();
                        (kind, guess) =
                            self.draft_after(control, s.context(), &f.drafts, (1, room), &mut ext)?;
                        draft_secs = t0.elapsed().as_secs_f64();
                        drafting += draft_secs;
                    }
                    let guessed_input = (!guess.is_empty()).then(|| guess.remove(0));
                    queue_greedy_step(
                        &mut self.backend,
                        &mut self.cache,
                        (None, &guess),
                        s.context().len() - 1 + ahead,
                        self.profile.as_mut(),
                    )?;
                    flight.push_back(Flight {
                        drafts: guess,
                        guessed_input,
                        draft_secs,
                        kind,
                        ahead_held: false,
                        guess_ok: None,
                    });
                }
            }
            let Some(f) = flight.pop_front() else {
                return Err(Error::Backend("no speculative step in flight".into()));
            };
            let d = self.backend.device().ok_or_else(|| {
                Error::Backend("the backend stopped offering device steps".into())
            })?;
            d.read_queued_argmax(&mut rows)?;
            let now = Instant::now();
            let secs = ((now - last_read).as_secs_f64() - std::mem::take(&mut drafting)).max(0.0);
            last_read = now;
            let m = f.drafts.len();
            if rows.len() != m + 1 {
                return Err(Error::Backend(format!(
                    "a queued step of {} rows read back {} picks",
                    m + 1,
                    rows.len()
                )));
            }
            // As the device accepted them (`accept.wgsl`).
            let accepted = f
                .drafts
                .iter()
                .zip(&rows)
                .take_while(|(d, r)| d == r)
                .count();
            // The guessed input is a draft too, verified by the step ahead: when it failed,
            // the drafts after it (which continued it) are wasted, though a chance match is
            // still emitted.
            let (drafted, held) = match f.guess_ok {
                Some(ok) => (m + 1, if ok { accepted + 1 } else { 0 }),
                None => (m, accepted),
            };
            if drafted == 0 {
                control.plain_step(secs + f.draft_secs);
            } else if f.ahead_held {
                // Drafting runs on the host while the device works, but a draft model's steps
                // are seconds the loop spends: they count as drafting, the rest as the step.
                let wasted = if f.guess_ok == Some(false) { m } else { 0 };
                stats.add(drafted, held, wasted);
                control.verify_step(f.kind, drafted, held, f.draft_secs, secs);
            } else {
                // Behind a rejection every draft followed a wrong input.
                stats.add(drafted, 0, drafted);
                control.unsound_step(secs + f.draft_secs, accepted + 1);
            }
            if trace {
                eprintln!(
                    "spec: queued step of {m} drafts (guess {:?}, ahead held {}) accepted {accepted} after {:.0} us ({} behind) {control:?}",
                    f.guess_ok,
                    f.ahead_held,
                    secs * 1e6,
                    flight.len()
                );
            }
            let bonus = rows[accepted];
            if let Some(next) = flight.front_mut() {
                next.ahead_held = accepted == m;
                next.guess_ok = next.guessed_input.map(|g| g == bonus);
            }
            for &tok in f.drafts[..accepted].iter().chain([&bonus]) {
                if !emit(s, tok, tokenizer, on_token)? {
                    return Ok(());
                }
            }
        }
    }

    /// Drafts for a step after `context` and then `pending` (tokens assumed to follow it,
    /// using `ext` as scratch): `lead` guessed inputs (a queued successor's), then up to
    /// `room` drafts. Empty for a plain step. Returns their kind too.
    fn draft_after(
        &mut self,
        control: &mut SpecControl,
        context: &[u32],
        pending: &[u32],
        (lead, room): (usize, usize),
        ext: &mut Vec<u32>,
    ) -> Result<(usize, Vec<u32>)> {
        let mut out = Vec::new();
        let Some(spec) = &mut self.spec else {
            return Ok((0, out));
        };
        let ctx = if pending.is_empty() {
            context
        } else {
            ext.clear();
            ext.extend_from_slice(context);
            ext.extend_from_slice(pending);
            &ext[..]
        };
        let room = room.min(spec.draft_tokens);
        let kind = draft_step(spec, control, ctx, (lead, room), &mut out)?;
        Ok((kind, out))
    }
}

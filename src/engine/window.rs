//! Generation past the context window: attention sinks and a sliding window of recent positions
//! (StreamingLLM, Xiao et al. 2023). The cache keeps the first `sinks` positions for good and
//! the most recent ones behind them; when a step would not fit, the oldest positions after the
//! sinks are evicted and the rest move down ([`Backend::kv_shift`]), their keys re-rotated to
//! their new positions. Positions are therefore always cache slots, as the paper re-bases them,
//! and RoPE never sees a position past the cache.
//!
//! Re-rotating a key by `-d` (R(p − d) = R(−d)·R(p)) gives the key the token would have had at
//! its new slot, so moving costs one pass over the moved positions and no recomputation. To
//! amortise that pass, eviction takes `window / 8` positions at once (or what the step needs, if
//! more): attention sees the sinks and between 7/8 of the window and the whole window of recent
//! positions, and the cache never holds more than `sinks + window` positions.

use crate::backend::Backend;
use crate::error::{Error, Result};

/// Attention sinks and a window of recent positions, chosen per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkWindow {
    /// The first positions, kept for good.
    pub sinks: usize,
    /// Most recent positions kept behind the sinks.
    pub window: usize,
}

impl SinkWindow {
    /// Checks the window against a cache of `capacity` positions.
    pub fn validate(&self, capacity: usize) -> Result<()> {
        if self.window < 2 {
            return Err(Error::Request(format!(
                "window must be at least 2 positions, not {}",
                self.window
            )));
        }
        if self.sinks.saturating_add(self.window) > capacity {
            return Err(Error::Request(format!(
                "sinks ({}) + window ({}) exceed the KV cache's {capacity} positions",
                self.sinks, self.window
            )));
        }
        Ok(())
    }

    /// Positions evicted at once (at least).
    pub fn evict_chunk(&self) -> usize {
        (self.window / 8).max(1)
    }

    /// Most tokens one step may take (prompt chunks, speculative verification).
    pub fn max_step(&self) -> usize {
        (self.window / 2).max(1)
    }
}

/// One sequence's cache under a [`SinkWindow`]: which cache slot each context token has.
#[derive(Debug, Clone)]
pub struct Sliding {
    spec: SinkWindow,
    evicted: usize,
}

impl Sliding {
    /// A sequence that has evicted nothing yet.
    pub fn new(spec: SinkWindow) -> Self {
        Sliding { spec, evicted: 0 }
    }

    /// The sinks and window.
    pub fn spec(&self) -> SinkWindow {
        self.spec
    }

    /// Positions evicted so far.
    pub fn evicted(&self) -> usize {
        self.evicted
    }

    /// The cache slot of context token `i` (one not evicted).
    pub fn pos(&self, i: usize) -> usize {
        i - self.evicted
    }

    /// Makes room for a step of `t` tokens starting at context token `i` in the sequence whose
    /// blocks `table` lists (`[0]` for a single-sequence cache): evicts and moves positions
    /// when the step would not fit; returns the step's first cache slot.
    pub fn make_room<B: Backend>(
        &mut self,
        b: &mut B,
        cache: &mut B::Cache,
        table: &[u32],
        i: usize,
        t: usize,
    ) -> Result<usize> {
        let SinkWindow { sinks, window } = self.spec;
        let len = self.pos(i);
        if len + t <= sinks + window {
            return Ok(len);
        }
        let need = len + t - (sinks + window);
        let recent = len.saturating_sub(sinks);
        if need > recent {
            return Err(Error::Request(format!(
                "a step of {t} tokens does not fit a window of {window} positions"
            )));
        }
        let e = need.max(self.spec.evict_chunk()).min(recent);
        b.kv_shift(cache, table, sinks + e, sinks, recent - e)?;
        self.evicted += e;
        Ok(self.pos(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_checked_against_the_cache() {
        let w = |sinks, window| SinkWindow { sinks, window };
        assert!(w(4, 60).validate(64).is_ok());
        assert!(w(4, 61).validate(64).is_err());
        assert!(w(0, 1).validate(64).is_err());
        assert!(w(usize::MAX, 2).validate(64).is_err());
        assert_eq!(w(4, 64).evict_chunk(), 8);
        assert_eq!(w(4, 3).evict_chunk(), 1);
        assert_eq!(w(4, 3).max_step(), 1);
    }
}

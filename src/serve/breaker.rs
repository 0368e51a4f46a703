//! The load-shedding circuit breaker: when the engine falls behind (the oldest waiting
//! request has waited too long, or a step takes too long) new generation requests get 503 with
//! `Retry-After` instead of joining a queue they would time out in. It stays open for a
//! cooldown, then lets requests through again as soon as the engine has caught up.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::batch::scheduler::SchedulerStats;

/// When the breaker opens, and for how long at least.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerLimits {
    /// Open when the oldest waiting request has waited longer (None: not watched).
    pub queue_wait: Option<Duration>,
    /// Open when the last batched step took longer (None: not watched).
    pub step: Option<Duration>,
    /// Stay open at least this long.
    pub cooldown: Duration,
}

impl BreakerLimits {
    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.queue_wait.is_some() || self.step.is_some()
    }

    /// Which limit the engine's counters pass now, if any.
    fn passed(&self, s: &SchedulerStats) -> Option<&'static str> {
        let ms = |d: Duration| d.as_millis() as u64;
        if self
            .queue_wait
            .is_some_and(|w| s.oldest_wait_ms.load(Relaxed) > ms(w))
        {
            return Some("queue wait");
        }
        if self.step.is_some_and(|w| s.step_ms.load(Relaxed) > ms(w)) {
            return Some("step time");
        }
        None
    }
}

/// The breaker's state.
#[derive(Debug)]
pub struct Breaker {
    limits: BreakerLimits,
    /// Open until then (None: closed).
    open_until: Mutex<Option<Instant>>,
}

/// A refusal: what was passed and when to retry.
#[derive(Debug, PartialEq)]
pub struct Shed {
    /// The limit passed.
    pub reason: &'static str,
    /// Seconds until the breaker may close.
    pub retry_after: u32,
}

impl Breaker {
    /// A closed breaker with `limits`.
    pub fn new(limits: BreakerLimits) -> Self {
        Breaker {
            limits,
            open_until: Mutex::new(None),
        }
    }

    /// Whether the breaker is open now (for the metrics).
    pub fn is_open(&self) -> bool {
        self.lock().is_some_and(|t| Instant::now() < t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.open_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a generation request, or sheds it: open (within the cooldown, or still past a
    /// limit after it) refuses; closed and past a limit opens and refuses.
    pub fn admit(&self, stats: &SchedulerStats) -> Result<(), Shed> {
        if !self.limits.enabled() {
            return Ok(());
        }
        let now = Instant::now();
        let mut open = self.lock();
        let cooldown = self.limits.cooldown;
        let secs = |until: Instant| {
            until
                .saturating_duration_since(now)
                .as_secs_f64()
                .ceil()
                .max(1.0) as u32
        };
        if let Some(until) = *open {
            if now < until {
                return Err(Shed {
                    reason: "cooling down",
                    retry_after: secs(until),
                });
            }
        }
        match self.limits.passed(stats) {
            Some(reason) => {
                let until = now + cooldown;
                *open = Some(until);
                Err(Shed {
                    reason,
                    retry_after: secs(until),
                })
            }
            None => {
                *open = None;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_past_a_limit_and_closes_after_the_cooldown_once_caught_up() {
        let b = Breaker::new(BreakerLimits {
            queue_wait: Some(Duration::from_millis(100)),
            step: Some(Duration::from_millis(50)),
            cooldown: Duration::from_millis(300),
        });
        let s = SchedulerStats::default();
        assert_eq!(b.admit(&s), Ok(()));
        s.step_ms.store(80, Relaxed);
        assert_eq!(b.admit(&s).unwrap_err().reason, "step time");
        assert!(b.is_open());
        // Caught up, but still in the cooldown.
        s.step_ms.store(10, Relaxed);
        assert_eq!(b.admit(&s).unwrap_err().reason, "cooling down");
        std::thread::sleep(Duration::from_millis(320));
        // After it: still behind reopens, caught up closes.
        s.oldest_wait_ms.store(500, Relaxed);
        let shed = b.admit(&s).unwrap_err();
        assert_eq!((shed.reason, shed.retry_after), ("queue wait", 1));
        std::thread::sleep(Duration::from_millis(320));
        s.oldest_wait_ms.store(0, Relaxed);
        assert_eq!(b.admit(&s), Ok(()));
        assert!(!b.is_open());
        let off = Breaker::new(BreakerLimits {
            queue_wait: None,
            step: None,
            cooldown: Duration::from_secs(5),
        });
        s.step_ms.store(1 << 20, Relaxed);
        assert_eq!(off.admit(&s), Ok(()));
    }
}

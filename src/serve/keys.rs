//! API keys with names and per-key rate limits: requests and tokens per minute, each a token
//! bucket that refills continuously; an over-limit request gets 429 with `Retry-After`.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One API key as the operator configures it (`--api-keys FILE`: a JSON array of these).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The name metrics and access logs show (never the key itself).
    pub name: String,
    /// The bearer token.
    pub key: String,
    /// Most requests per minute (None: no limit).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Most tokens per minute, counting each request's prompt and its `max_tokens` per choice
    /// when it starts and giving back what it did not generate (None: no limit).
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
}

/// Reads `--api-keys FILE`: names unique and non-empty, keys at least 8 bytes and unique.
pub fn read_keys(path: &Path) -> Result<Vec<KeySpec>> {
    let bad = |m: String| Error::Request(format!("{}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let keys: Vec<KeySpec> = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "{e} (expected [{{\"name\", \"key\", \"requests_per_minute\"?, \"tokens_per_minute\"?}}])"
        ))
    })?;
    for (i, k) in keys.iter().enumerate() {
        if k.name.is_empty() || k.name.len() > 64 {
            return Err(bad(format!("key {i}: the name must have 1 to 64 bytes")));
        }
        if k.key.len() < 8 {
            return Err(bad(format!(
                "key `{}`: the key must have at least 8 bytes",
                k.name
            )));
        }
        if keys[..i].iter().any(|o| o.name == k.name || o.key == k.key) {
            return Err(bad(format!(
                "key `{}`: names and keys must be unique",
                k.name
            )));
        }
        if k.requests_per_minute == Some(0) || k.tokens_per_minute == Some(0) {
            return Err(bad(format!(
                "key `{}`: a limit of 0 admits nothing",
                k.name
            )));
        }
    }
    Ok(keys)
}

/// A token bucket of `per_minute` units, refilled continuously.
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        Bucket {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Takes `n` units, or says in how many whole seconds they will be there.
    fn take(&mut self, n: f64) -> std::result::Result<(), u32> {
        self.refill();
        if self.level >= n {
            self.level -= n;
            return Ok(());
        }
        let secs = (n - self.level) * 60.0 / self.per_minute;
        Err(secs.ceil().max(1.0) as u32)
    }

    fn give_back(&mut self, n: f64) {
        self.refill();
        self.level = (self.level + n).min(self.per_minute);
    }
}

/// Why a key's request is refused.
#[derive(Debug, PartialEq)]
pub enum Limited {
    /// Over the requests-per-minute limit: retry after this many seconds.
    Requests(u32),
    /// Over the tokens-per-minute limit: retry after this many seconds.
    Tokens(u32),
    /// The request alone needs more tokens than the key's whole minute.
    TooLarge {
        /// Tokens the request needs.
        need: u64,
        /// The key's tokens per minute.
        limit: u32,
    },
}

/// A configured key with its buckets.
#[derive(Debug)]
pub struct Key {
    /// Its configuration.
    pub spec: KeySpec,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

impl Key {
    /// A key with full buckets.
    pub fn new(spec: KeySpec) -> Self {
        Key {
            requests: spec.requests_per_minute.map(|n| Mutex::new(Bucket::new(n))),
            tokens: spec.tokens_per_minute.map(|n| Mutex::new(Bucket::new(n))),
            spec,
        }
    }

    /// Counts one request against the requests-per-minute limit.
    pub fn take_request(&self) -> std::result::Result<(), Limited> {
        match &self.requests {
            Some(b) => lock(b).take(1.0).map_err(Limited::Requests),
            None => Ok(()),
        }
    }

    /// Takes `n` tokens from the tokens-per-minute limit.
    pub fn take_tokens(&self, n: u64) -> std::result::Result<(), Limited> {
        let Some(b) = &self.tokens else {
            return Ok(());
        };
        let mut b = lock(b);
        if n as f64 > b.per_minute {
            return Err(Limited::TooLarge {
                need: n,
                limit: b.per_minute as u32,
            });
        }
        b.take(n as f64).map_err(Limited::Tokens)
    }

    /// Gives back `n` tokens taken but not used (a request that generated fewer than its
    /// `max_tokens`).
    pub fn give_back_tokens(&self, n: u64) {
        if let Some(b) = &self.tokens {
            lock(b).give_back(n as f64);
        }
    }
}

fn lock(b: &Mutex<Bucket>) -> std::sync::MutexGuard<'_, Bucket> {
    // A bucket is always consistent: a panicked holder leaves a usable one.
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// Constant-time comparison of a presented bearer token with a key.
pub fn key_matches(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rpm: Option<u32>, tpm: Option<u32>) -> KeySpec {
        KeySpec {
            name: "a".into(),
            key: "k".repeat(8),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    #[test]
    fn buckets_refuse_past_the_limit_and_say_when_to_retry() {
        let k = Key::new(spec(Some(2), Some(600)));
        assert_eq!(k.take_request(), Ok(()));
        assert_eq!(k.take_request(), Ok(()));
        // One request refills every 30 s.
        assert!(matches!(k.take_request(), Err(Limited::Requests(29..=30))));
        assert_eq!(k.take_tokens(500), Ok(()));
        // 100 left, 10 a second: 200 more need 20 s.
        assert!(matches!(k.take_tokens(300), Err(Limited::Tokens(20..=21))));
        k.give_back_tokens(250);
        assert_eq!(k.take_tokens(300), Ok(()));
        assert_eq!(
            k.take_tokens(601),
            Err(Limited::TooLarge {
                need: 601,
                limit: 600
            })
        );
        let free = Key::new(spec(None, None));
        assert!((0..1000).all(|_| free.take_request().is_ok() && free.take_tokens(1 << 40).is_ok()));
    }

    #[test]
    fn key_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("bitnet-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys.json");
        let write = |s: &str| std::fs::write(&f, s).unwrap();
        write(
            r#"[{"name": "a", "key": "aaaaaaaa", "requests_per_minute": 5},
                  {"name": "b", "key": "bbbbbbbb"}]"#,
        );
        let keys = read_keys(&f).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].requests_per_minute, Some(5));
        for bad in [
            r#"[{"name": "a", "key": "short"}]"#,
            r#"[{"name": "a", "key": "aaaaaaaa"}, {"name": "a", "key": "bbbbbbbb"}]"#,
            r#"[{"name": "a", "key": "aaaaaaaa", "rpm": 3}]"#,
            r#"[{"name": "a", "key": "aaaaaaaa", "tokens_per_minute": 0}]"#,
            r#"{"name": "a"}"#,
        ] {
            write(bad);
            let e = read_keys(&f).unwrap_err().to_string();
            assert!(e.contains("keys.json"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! A monotonic clock that also works on wasm32-unknown-unknown, where `std::time::Instant::now`
//! panics: there it reads `performance.now()` (or returns a clock stuck at 0 without the
//! `wasm` feature, which has no access to JS).

#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
pub use std::time::Instant;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
pub use web::Instant;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod web {
    use std::time::Duration;

    /// A point in time, in milliseconds of `performance.now()`.
    #[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
    pub struct Instant(f64);

    #[cfg(feature = "wasm")]
    fn now_ms() -> f64 {
        use wasm_bindgen::JsCast;
        let perf = js_sys::Reflect::get(&js_sys::global(), &"performance".into()).ok();
        let now = perf.as_ref().and_then(|p| {
            js_sys::Reflect::get(p, &"now".into())
                .ok()?
                .dyn_into::<js_sys::Function>()
                .ok()?
                .call0(p)
                .ok()?
                .as_f64()
        });
        now.unwrap_or_else(js_sys::Date::now)
    }

    #[cfg(not(feature = "wasm"))]
    fn now_ms() -> f64 {
        0.0
    }

    impl Instant {
        /// The current time.
        pub fn now() -> Self {
            Instant(now_ms())
        }

        /// Time since `self`.
        pub fn elapsed(&self) -> Duration {
            Duration::from_secs_f64(((now_ms() - self.0) / 1e3).max(0.0))
        }
    }

    impl std::ops::Sub for Instant {
        type Output = Duration;

        /// The time from `rhs` to `self` (zero when `rhs` is later).
        fn sub(self, rhs: Instant) -> Duration {
            Duration::from_secs_f64(((self.0 - rhs.0) / 1e3).max(0.0))
        }
    }
}

/// Load-phase timing, printed when `BITNET_LOAD_TIMING=1` is set (natively: to stderr) or
/// `globalThis.BITNET_LOAD_TIMING` is true (wasm: to the console): each [`Phases::mark`]
/// prints the seconds since the previous one.
pub struct Phases {
    last: Instant,
    on: bool,
}

impl Phases {
    /// Starts timing (a no-op unless enabled).
    pub fn new() -> Self {
        Phases {
            last: Instant::now(),
            on: timing_enabled(),
        }
    }

    /// Prints the time since the previous mark under `label`.
    pub fn mark(&mut self, label: &str) {
        if !self.on {
            return;
        }
        let line = format!("load: {label} {:.3} s", self.last.elapsed().as_secs_f64());
        print_line(&line);
        self.last = Instant::now();
    }
}

impl Default for Phases {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
fn timing_enabled() -> bool {
    std::env::var_os("BITNET_LOAD_TIMING").is_some_and(|v| v == "1")
}

#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
fn print_line(line: &str) {
    eprintln!("{line}");
}

#[cfg(all(target_arch = "wasm32", target_os = "unknown", feature = "wasm"))]
fn timing_enabled() -> bool {
    js_sys::Reflect::get(&js_sys::global(), &"BITNET_LOAD_TIMING".into())
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

#[cfg(all(target_arch = "wasm32", target_os = "unknown", feature = "wasm"))]
fn print_line(line: &str) {
    use wasm_bindgen::JsCast;
    let console = js_sys::Reflect::get(&js_sys::global(), &"console".into()).ok();
    if let Some(c) = console {
        if let Some(log) = js_sys::Reflect::get(&c, &"log".into())
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
        {
            let _ = log.call1(&c, &line.into());
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_os = "unknown", not(feature = "wasm")))]
fn timing_enabled() -> bool {
    false
}

#[cfg(all(target_arch = "wasm32", target_os = "unknown", not(feature = "wasm")))]
fn print_line(_line: &str) {}

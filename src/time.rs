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
}

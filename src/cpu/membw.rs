//! A memory read-bandwidth probe: the ceiling that decode speed is compared against.

use std::time::Instant;

use rayon::prelude::*;

/// Best-of-`passes` read bandwidth in GB/s over a `bytes`-sized buffer with `threads` threads.
pub fn read_bandwidth_gb_s(bytes: usize, threads: usize, passes: usize) -> f64 {
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(_) => return 0.0,
    };
    let n = bytes / 8;
    let buf: Vec<u64> = pool.install(|| (0..n).into_par_iter().map(|i| i as u64).collect());
    let mut best = 0.0f64;
    for _ in 0..passes {
        let t = Instant::now();
        let s: u64 = pool.install(|| {
            buf.par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &b| a ^ b))
                .reduce(|| 0, |a, b| a ^ b)
        });
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

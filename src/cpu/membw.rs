//! A memory read-bandwidth probe: the ceiling that decode speed is compared against.

use std::time::Instant;

use rayon::prelude::*;

use crate::format::weight_buffer;

/// Bytes each task reads in one contiguous run.
const CHUNK: usize = 4 << 20;

/// Best-of-`passes` read bandwidth in GB/s over a `bytes`-sized buffer with `threads` threads.
/// The buffer is allocated as the weights are (huge pages where available), and each pass is
/// run both plainly and with the kernels' software prefetch ([`super::kernels::PREFETCH_BYTES`]
/// ahead, on x86), so that the figure is the fastest read this machine gives either way (on
/// some Intel machines the plain stream reaches two thirds of the prefetched one).
pub fn read_bandwidth_gb_s(bytes: usize, threads: usize, passes: usize) -> f64 {
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(_) => return 0.0,
    };
    let bytes = bytes / CHUNK * CHUNK;
    let buf = pool.install(|| {
        weight_buffer(bytes, |b| -> Result<(), std::convert::Infallible> {
            b.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
                c.iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v = (i ^ j) as u8);
            });
            Ok(())
        })
    });
    let Ok(buf) = buf;
    let data = buf.as_slice();
    let mut best = 0.0f64;
    for _ in 0..passes {
        for prefetch in [false, true] {
            let t = Instant::now();
            let s: u64 = pool.install(|| {
                data.par_chunks(CHUNK)
                    .map(|c| fold_chunk(c, prefetch))
                    .reduce(|| 0, |a, b| a ^ b)
            });
            std::hint::black_box(s);
            best = best.max(data.len() as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    best
}

/// XOR of a chunk's 64-bit words, 64 bytes at a time (optionally prefetching ahead).
fn fold_chunk(c: &[u8], prefetch: bool) -> u64 {
    let mut acc = [0u64; 8];
    for (i, line) in c.chunks_exact(64).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if prefetch {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe {
                super::kernels::prefetch_ahead::<1>(
                    c.as_ptr().wrapping_add(i * 64),
                    super::kernels::PREFETCH_BYTES,
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i, prefetch);
        for (a, w) in acc.iter_mut().zip(line.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            *a ^= u64::from_le_bytes(word);
        }
    }
    acc.iter().fold(0, |a, &b| a ^ b)
}

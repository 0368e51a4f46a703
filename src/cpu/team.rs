//! A small fork-join team for the decode hot path: the caller plus `threads - 1` workers that
//! spin briefly between jobs instead of sleeping, so the ~150 parallel regions of a decode step
//! do not each pay an OS wake-up (costly on virtual machines). Idle workers park after a while.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Spins before a worker parks (a few milliseconds).
const SPIN: u32 = 200_000;

#[derive(Clone, Copy)]
struct Job {
    epoch: u64,
    n: usize,
    data: *const (),
    call: unsafe fn(*const (), usize),
}

// SAFETY: `data` points to a `Sync` closure that outlives the job (see `Team::run`).
unsafe impl Send for Job {}

struct Shared {
    /// `epoch << 32 | next task index`.
    ticket: AtomicU64,
    done: AtomicUsize,
    job: Mutex<Job>,
    sleepers: Mutex<usize>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// Guards against concurrent `run` calls (the team serves one caller at a time).
    running: Mutex<()>,
}

/// Starts a worker thread: an OS thread natively; in the threaded WebAssembly module, a task
/// that keeps one thread of rayon's Web Worker pool (wasm-bindgen-rayon) until the team is
/// dropped (no handle: the worker returns on shutdown).
#[cfg(not(all(target_arch = "wasm32", feature = "wasm-threads")))]
fn spawn(f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    Some(std::thread::spawn(f))
}

#[cfg(all(target_arch = "wasm32", feature = "wasm-threads"))]
fn spawn(f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    rayon::spawn(f);
    None
}

/// A fixed team of threads running index-parallel jobs.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    epoch: UnsafeCell<u64>,
}

// SAFETY: `epoch` is only touched while holding `shared.running`.
unsafe impl Sync for Team {}

unsafe fn call_closure<F: Fn(usize) + Sync>(data: *const (), i: usize) {
    (*(data as *const F))(i)
}

fn noop(_: *const (), _: usize) {}

impl Shared {
    /// Claims and runs tasks of `job` until none are left.
    fn work(&self, job: &Job) {
        loop {
            let t = self.ticket.load(Ordering::Acquire);
            let (epoch, idx) = (t >> 32, (t & 0xffff_ffff) as usize);
            if epoch != job.epoch || idx >= job.n {
                return;
            }
            if self
                .ticket
                .compare_exchange_weak(t, t + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // SAFETY: the task was claimed under the job's epoch, so `run` is still waiting
                // and the closure is alive.
                unsafe { (job.call)(job.data, idx) };
                self.done.fetch_add(1, Ordering::Release);
            }
        }
    }

    fn worker(&self) {
        let mut seen = 0u64;
        loop {
            let mut spins = 0;
            loop {
                if self.shutdown.load(Ordering::Acquire) {
                    return;
                }
                if self.ticket.load(Ordering::Acquire) >> 32 != seen {
                    break;
                }
                spins += 1;
                if spins < SPIN {
                    std::hint::spin_loop();
                } else {
                    let mut s = self.sleepers.lock().unwrap_or_else(|e| e.into_inner());
                    *s += 1;
                    while self.ticket.load(Ordering::Acquire) >> 32 == seen
                        && !self.shutdown.load(Ordering::Acquire)
                    {
                        s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
                    }
                    *s -= 1;
                    spins = 0;
                }
            }
            // The job is written before its ticket, so this copy is at least as new.
            let job = *self.job.lock().unwrap_or_else(|e| e.into_inner());
            seen = job.epoch;
            self.work(&job);
        }
    }
}

impl Team {
    /// A team of `threads` threads in all (the caller counts as one; 0 means one per core).
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: Mutex::new(Job {
                epoch: 0,
                n: 0,
                data: std::ptr::null(),
                call: noop,
            }),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            running: Mutex::new(()),
        });
        let workers = (1..threads)
            .filter_map(|_| {
                let s = shared.clone();
                spawn(move || s.worker())
            })
            .collect();
        Team {
            shared,
            workers,
            threads,
            epoch: UnsafeCell::new(0),
        }
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every `i` in `0..n` across the team and returns when all are done.
    pub fn run<F: Fn(usize) + Sync>(&self, n: usize, f: &F) {
        if self.threads == 1 || n <= 1 {
            (0..n).for_each(f);
            return;
        }
        let s = &*self.shared;
        let _guard = s.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: exclusive under `running`.
        let epoch = unsafe {
            *self.epoch.get() += 1;
            *self.epoch.get()
        };
        s.done.store(0, Ordering::Relaxed);
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Job {
            epoch,
            n,
            data: f as *const F as *const (),
            call: call_closure::<F>,
        };
        s.ticket.store(epoch << 32, Ordering::Release);
        if *s.sleepers.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        let job = Job {
            epoch,
            n,
            data: f as *const F as *const (),
            call: call_closure::<F>,
        };
        s.work(&job);
        while s.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _s = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_index_exactly_once_across_many_jobs() {
        let team = Team::new(3);
        for n in [0usize, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            team.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
        // Many back-to-back jobs: no task of one job may run with another's closure.
        let total = AtomicUsize::new(0);
        for _ in 0..2000 {
            team.run(5, &|i| {
                total.fetch_add(i + 1, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 15);
    }

    #[test]
    fn parked_workers_wake_up() {
        let team = Team::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let sum = AtomicUsize::new(0);
        team.run(64, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
    }
}

//! Keeping the pool's other threads awake between parallel loops, as OpenMP's do.
//!
//! Rayon's idle workers look for work for a few dozen rounds and then sleep on a futex, so
//! a training step that runs many short parallel loops with a little serial work between
//! them (a residual MLP block's: two GEMMs, a bias, a GELU, a LayerNorm, Candle's
//! gradient sums) pays a wake-up per loop: a system call on the caller's side and, on a
//! virtual machine, the vCPU's way back from halt on the worker's. OpenMP's workers (which
//! PyTorch runs on) spin for a while before they sleep instead.
//!
//! [`keep_warm`], called where an op starts (every op's output buffer,
//! `buffer::vec_written_with`, and every GEMM call), hands each other
//! thread of the current pool a job that runs the pool's pending jobs as they come
//! (`rayon::yield_now`) and gives its core away (`sched_yield`) while there are none, so a
//! thread of another pool or of the data loader runs as soon as it is ready. It returns
//! after [`spin_limit`] without work; the next [`keep_warm`] starts it again. The caller's
//! own thread never spins: where it is one of the pool's threads (`configure_threads_here`)
//! a spinner it picks up itself returns at once.
//!
//! `RESBLOCK_SPIN_US` sets the limit in microseconds (read once; default 200, 0: no
//! spinning, rayon's own sleep as before). On the Xeon of the thirty-eighth session, two
//! threads, alternated processes: started by the GEMMs only, the MLP block's forward +
//! backward (`mlp-profile`) median 2.46-2.55 ms against 2.73-2.85 without (at 50 us the
//! gaps between its GEMMs outlast the limit: 2.65-2.73 ms); started by every op too, 2.36-2.38
//! against 2.40-2.44 (GEMMs only) and ResNet-20's training step 164-180 against 173-179 ms
//! (lower in 5 of 7 pairs); ResNet-18 and ResNet-50 inference unchanged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Spinners running or queued, over all pools (rayon names no pool; a process with several
/// pools warms those that ask first, up to the largest's thread count).
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

/// How long a spinner waits for work before it lets its thread sleep: `RESBLOCK_SPIN_US`
/// microseconds (default 200; 0 turns spinning off).
pub fn spin_limit() -> Duration {
    static LIMIT: OnceLock<Duration> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let us = std::env::var("RESBLOCK_SPIN_US")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(200);
        Duration::from_micros(us)
    })
}

/// The number of spinners running or queued now (for tests and diagnostics).
pub fn spinners() -> usize {
    SPINNERS.load(Ordering::Relaxed)
}

/// Makes sure the current rayon pool's other threads spin for work (see the module's
/// docs): one atomic load when they already do, a `rayon::spawn` per missing spinner
/// otherwise. Does nothing on a pool of one thread or with a limit of 0.
pub fn keep_warm() {
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return;
    }
    let want = threads - 1;
    if SPINNERS.load(Ordering::Relaxed) >= want {
        return;
    }
    let limit = spin_limit();
    if limit.is_zero() {
        return;
    }
    let from = rayon::current_thread_index();
    while SPINNERS
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
            (s < want).then_some(s + 1)
        })
        .is_ok()
    {
        rayon::spawn(move || {
            // The thread that asked runs its own loops: a spinner it picks up from its
            // deque (while it waits in a join) must not hold it.
            if from.is_none() || rayon::current_thread_index() != from {
                spin(limit);
            }
            SPINNERS.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Runs the pool's pending jobs until none has come for `limit`.
fn spin(limit: Duration) {
    let mut idle_since = Instant::now();
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            Some(rayon::Yield::Idle) => {
                if idle_since.elapsed() >= limit {
                    return;
                }
                std::thread::yield_now();
            }
            None => return,
        }
    }
}

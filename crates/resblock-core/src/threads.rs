//! How many CPU threads the kernels use, set once at start-up without touching the
//! environment behind the caller's back.
//!
//! Two thread counts matter on the CPU: rayon's global pool, which runs our kernels, and
//! Candle's own matmul, which reads `RAYON_NUM_THREADS` on every call and, when it is
//! unset, works the count out from the system each time (about 65 us a call here, 5x the
//! cost of a small model's forward). [`configure_threads`] sets the first and never the
//! environment; [`pin_candle_threads`] sets the variable (and keeps Candle's own elementwise
//! pool from competing with ours), only while it can see that the process has no other
//! thread (so nothing can read the environment at the same time), and says whether it did.

/// The thread count `threads` asks for: `Some(n)` with `n > 0`, else `RAYON_NUM_THREADS`
/// when it holds a positive number, else the available parallelism.
pub fn thread_count(threads: Option<usize>) -> usize {
    threads.filter(|&n| n > 0).unwrap_or_else(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// Sizes rayon's global pool (our kernels) to [`thread_count`]`(threads)` and returns the
/// count the pool has. The pool is built once per process: if something already built it,
/// it keeps its size, which is returned. The environment is not changed.
///
/// On Linux with glibc it also keeps freed memory in the process (`mallopt`): training
/// allocates and frees activation-sized buffers for every op, and glibc's default returns
/// blocks over a few MB to the kernel with `munmap`, so every op paid page faults, page
/// zeroing and cross-core TLB flushes (about 20% of a ResNet-20 training step here).
pub fn configure_threads(threads: Option<usize>) -> usize {
    build_pool(threads, false)
}

/// [`configure_threads`] with the calling thread as one of the pool's threads (rayon's
/// `use_current_thread`), as OpenMP's first thread is one of its team: the parallel loops
/// this thread starts then run on it and the pool's other threads, instead of being handed
/// to the pool while this thread sleeps until they finish. That hand-off is two thread
/// wake-ups per parallel loop, and a training step runs hundreds of loops: interleaved on
/// 2 cores, a residual MLP block's forward + backward took 3.4-3.6 against 3.9 ms, a basic
/// block's 6.1-6.5 against 7.7-8.0 ms.
///
/// Call it from the thread that runs the work for the rest of the process (the binaries
/// call it first thing in `main`, the benches from criterion's thread), before anything
/// else builds the pool. The calling thread works for the pool only while it is inside a
/// parallel loop of its own: loops started by other threads run on the pool's other
/// threads. So with one thread the global pool is built as [`configure_threads`] builds it
/// (one thread of its own: else another thread's loop would wait for this one forever),
/// and the caller becomes the only thread of a private pool of one, which nothing else can
/// reach (rayon's `use_current_thread` on a local pool, kept for the process): its loops
/// run where it stands, the other threads' loops on the global pool. The hand-off cost the
/// most there, with no other thread to do any work meanwhile: on one thread a residual MLP
/// block's forward + backward took 3.78-3.85 against 4.96-5.10 ms (PyTorch's 4.52) on the
/// Xeon of the thirty-seventh session. Returns the pool's size.
pub fn configure_threads_here(threads: Option<usize>) -> usize {
    build_pool(threads, true)
}

/// The global pool of [`thread_count`]`(threads)` threads, the caller one of them when
/// `with_caller` and the count is at least 2; with one, the caller in a private pool of
/// one when `with_caller` (see [`configure_threads_here`]).
fn build_pool(threads: Option<usize>, with_caller: bool) -> usize {
    resblock_kernels::alloc::keep_freed_memory();
    let n = thread_count(threads);
    let builder = rayon::ThreadPoolBuilder::new().num_threads(n);
    let builder = if with_caller && n >= 2 {
        builder.use_current_thread()
    } else {
        builder
    };
    // Err means the global pool exists already; its size stands.
    let _ = builder.build_global();
    // `current_num_threads` is the global pool's size while the caller is in no pool.
    if with_caller && rayon::current_thread_index().is_none() && rayon::current_num_threads() == 1 {
        let private = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .use_current_thread()
            .build();
        // Kept for the rest of the process: the caller stays its thread (rayon leaks a
        // local pool's registry that holds the current thread anyway). Where it cannot be
        // built the caller's loops are handed to the global pool, as before.
        if let Ok(pool) = private {
            Box::leak(Box::new(pool));
        }
    }
    rayon::current_num_threads()
}

/// The number of threads of this process, where the system says (Linux: `/proc/self/task`).
fn process_threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// Sets `RAYON_NUM_THREADS` to `n` for Candle's matmul, and `CANDLE_NUM_THREADS` to `n` and
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 0 unless the caller set them, if and only if this
/// process verifiably has a single thread (Linux: `/proc/self/task`), so that no other
/// thread can be reading or writing the environment meanwhile; returns whether it set
/// them. Binaries call it first thing in `main`; where it returns `false` (other threads
/// already running, or a system that does not list them) nothing changed and Candle works
/// the count out per call.
///
/// `CANDLE_NUM_THREADS` sizes Candle 0.11's own pool for its elementwise ops, which include
/// the add that starts every gradient of its backward (`zeros_like` + the op's gradient).
/// Its workers spin for 25,000 iterations after every op before they sleep: beside our
/// rayon pool, which already has a thread per core, they took cores from our kernels (a
/// residual MLP block's training step 2.9 ms with them, 1.8 ms with one Candle thread, in
/// the third session). With a spin limit of 0 they sleep as soon as an op is done, and
/// since the caller is one of rayon's threads ([`configure_threads_here`]) neither pool
/// spins while the other works. Interleaved on 2 cores (twenty-third session), against
/// `CANDLE_NUM_THREADS=1`: BatchNorm + ReLU at 16 channels, 128 images 32x32, forward +
/// backward 3.3 against 4.5-5.2 ms; the residual MLP block 2.2-2.5 against 2.5-2.8 ms; the
/// basic block 4.4-4.9 against 6.0-7.3 ms; ResNet-18 batch-1 inference 14.6-15.2 against
/// 16.0-16.9 ms; a ResNet-20 training step unchanged (fastest 125 against 124 ms).
pub fn pin_candle_threads(n: usize) -> bool {
    if n == 0 || process_threads() != Some(1) {
        return false;
    }
    // Sound: this is the only thread of the process (checked just above), so no other
    // thread can touch the environment concurrently.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    true
}

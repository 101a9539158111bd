//! The pool's spinners (`resblock_kernels::warm`): they take the pool's loops while they
//! run and leave when the work stops. Alone in its process, so that no other test's GEMM
//! starts spinners of its own.

use std::time::{Duration, Instant};

use rayon::prelude::*;
use resblock_kernels::warm::{keep_warm, spin_limit, spinners};

#[test]
fn spinners_run_loops_and_leave_and_one_thread_never_spins() {
    // Half a second, so that a spinner cannot time out between `keep_warm` and the count
    // on a loaded machine. Read once, here first; the only test of this process.
    std::env::set_var("RESBLOCK_SPIN_US", "500000");
    assert_eq!(spin_limit(), Duration::from_millis(500));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("pool");
    let expected = 2;
    pool.install(|| {
        for round in 0..50u64 {
            keep_warm();
            // One spinner for each thread but the caller's, never more.
            let now = spinners();
            assert!(now <= expected, "{now} spinners for 2 other threads");
            if round == 0 {
                assert_eq!(now, expected, "keep_warm starts a spinner per other thread");
            }
            let v: Vec<u64> = (0..10_000u64).collect();
            let sum: u64 = v.par_iter().map(|x| x * round).sum();
            assert_eq!(sum, round * 10_000 * 9_999 / 2);
        }
    });
    let deadline = Instant::now() + spin_limit() * 4 + Duration::from_secs(5);
    while spinners() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        spinners(),
        0,
        "spinners must stop after the limit without work"
    );

    // A pool of one thread has no other thread to keep awake.
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    single.install(keep_warm);
    assert_eq!(spinners(), 0, "a one-thread pool spins nothing");
}

//! `configure_threads_here` makes the calling thread one of rayon's pool: its parallel loops
//! run on it and the other pool threads, and loops that other threads start still finish
//! (on the pool's other threads) while it does something else.
//! Runs without the test harness (`harness = false`): `main` builds the global pool and
//! lives for the whole process, as in the binaries.

use rayon::prelude::*;

fn main() {
    if std::env::var_os("POOL_HERE_ONE_THREAD").is_some() {
        return one_thread();
    }
    assert_eq!(rayon::current_thread_index(), None, "no pool yet");
    assert_eq!(resblock_core::configure_threads_here(Some(2)), 2);
    assert_eq!(rayon::current_num_threads(), 2);
    assert_eq!(
        rayon::current_thread_index(),
        Some(0),
        "the caller is the pool's first thread"
    );
    // The pool is built once: a later call (either kind) reports the size it has.
    assert_eq!(resblock_core::configure_threads_here(Some(4)), 2);
    assert_eq!(resblock_core::configure_threads(Some(4)), 2);

    // A loop started here runs on this thread and the other one.
    let on: std::collections::BTreeSet<usize> = (0..64)
        .into_par_iter()
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            rayon::current_thread_index().expect("on a pool thread")
        })
        .collect();
    assert!(on.contains(&0), "the caller took part: ran on {on:?}");
    let sum: u64 = (0..10_000u64).into_par_iter().sum();
    assert_eq!(sum, 49_995_000);

    // A loop another thread starts finishes while this one waits outside the pool (it
    // runs on the pool's other thread): the binaries' data loaders start loops so.
    let (tx, rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn(move || {
        let s: u64 = (0..1000u64).into_par_iter().map(|v| v * 2).sum();
        tx.send(s).expect("send");
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the other thread's loop finished");
    assert_eq!(got, 999_000);
    other.join().expect("join");

    // Nested loops from the caller (a parallel op inside a parallel loop) still finish.
    let nested: u64 = (0..8u64)
        .into_par_iter()
        .map(|i| (0..100u64).into_par_iter().map(|j| i * j).sum::<u64>())
        .sum();
    assert_eq!(nested, 28 * 4950);

    // With one thread the caller is the only thread of a private pool and the global pool
    // has a thread of its own: checked in a process of its own. Under user-mode QEMU
    // (`cargo xtask aarch64`) this binary cannot start itself without the emulator.
    if std::env::var_os("RESBLOCK_UNDER_QEMU").is_some() {
        println!("pool_here: ok (the one-thread case skipped under QEMU)");
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().expect("this test"))
        .env("POOL_HERE_ONE_THREAD", "1")
        .spawn()
        .expect("run the one-thread case");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().expect("kill");
            panic!("the one-thread case hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "the one-thread case failed: {status}");
    println!("pool_here: ok");
}

/// `configure_threads_here(Some(1))`: the caller alone in a private pool, whose loops run
/// on the caller itself (no hand-off), while the global pool keeps a thread of its own for
/// the loops other threads start (else they would wait for the caller forever).
fn one_thread() {
    assert_eq!(resblock_core::configure_threads_here(Some(1)), 1);
    assert_eq!(
        rayon::current_thread_index(),
        Some(0),
        "the caller is its pool's thread"
    );
    assert_eq!(rayon::current_num_threads(), 1);
    // A second call changes nothing and reports the same size.
    assert_eq!(resblock_core::configure_threads_here(Some(1)), 1);
    assert_eq!(rayon::current_thread_index(), Some(0));

    // The caller's loops, nested ones too, run on the caller.
    let me = std::thread::current().id();
    let on: std::collections::BTreeSet<bool> = (0..64)
        .into_par_iter()
        .map(|_| {
            let inner: Vec<bool> = (0..4)
                .into_par_iter()
                .map(|_| std::thread::current().id() == me)
                .collect();
            inner.iter().all(|&b| b) && std::thread::current().id() == me
        })
        .collect();
    assert_eq!(on, [true].into(), "every iteration ran on the caller");
    let sum: u64 = (0..10_000u64).into_par_iter().sum();
    assert_eq!(sum, 49_995_000);

    // Another thread's loop runs on the global pool's thread while the caller waits for it
    // outside any loop.
    let (tx, rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn(move || {
        let ran_on = std::thread::current().id();
        let s: u64 = (0..1000u64).into_par_iter().sum();
        let here: Vec<bool> = (0..4)
            .into_par_iter()
            .map(|_| std::thread::current().id() == ran_on)
            .collect();
        tx.send((s, here, rayon::current_num_threads()))
            .expect("send");
    });
    let (got, here, size) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("another thread's loop finished while the caller waited");
    assert_eq!(got, 499_500);
    assert_eq!(size, 1, "the global pool has one thread");
    assert!(
        here.iter().all(|&b| !b),
        "the other thread's loop ran on the global pool, not on the other thread"
    );
    other.join().expect("join");
}

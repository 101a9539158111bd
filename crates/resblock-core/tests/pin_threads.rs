//! `pin_candle_threads` sets `RAYON_NUM_THREADS` (and `CANDLE_NUM_THREADS` and
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT` unless set) only while the process has one thread.
//! Runs without the test harness (`harness = false`): `main` is the process's only thread
//! until it starts one.

fn main() {
    // Under user-mode QEMU (`cargo xtask aarch64`) the emulator's own threads are counted
    // in /proc/self/status, so the process never looks single-threaded there.
    if std::env::var_os("RESBLOCK_UNDER_QEMU").is_some() {
        println!("pin_threads: skipped under QEMU (its threads count as the process's)");
        return;
    }
    std::env::remove_var("RAYON_NUM_THREADS");
    std::env::remove_var("CANDLE_NUM_THREADS");
    std::env::remove_var("CANDLE_BARRIER_POOL_SPIN_LIMIT");
    assert!(
        resblock_core::pin_candle_threads(3),
        "single-threaded: must set"
    );
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("3"));
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("3"));
    assert_eq!(
        std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").as_deref(),
        Ok("0")
    );
    // A count and a spin limit the caller chose for Candle's pool stand.
    std::env::set_var("CANDLE_NUM_THREADS", "4");
    std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    assert!(resblock_core::pin_candle_threads(3));
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("4"));
    assert_eq!(
        std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").as_deref(),
        Ok("100")
    );
    assert!(
        !resblock_core::pin_candle_threads(0),
        "0 threads is not a count"
    );

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || rx.recv());
    assert!(
        !resblock_core::pin_candle_threads(5),
        "another thread is running: must not touch the environment"
    );
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("3"));
    tx.send(()).expect("send");
    other.join().expect("join").expect("recv");

    // configure_threads sizes rayon's pool and leaves the environment alone.
    assert_eq!(resblock_core::configure_threads(Some(2)), 2);
    assert_eq!(rayon::current_num_threads(), 2);
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("3"));
    // The pool is built once: a later call reports the size it has.
    assert_eq!(resblock_core::configure_threads(Some(4)), 2);
    println!("pin_threads: ok");
}

//! `pin_candle_threads` sets `RAYON_NUM_THREADS` only while the process has one thread.
//! Runs without the test harness (`harness = false`): `main` is the process's only thread
//! until it starts one.

fn main() {
    std::env::remove_var("RAYON_NUM_THREADS");
    assert!(
        resblock_core::pin_candle_threads(3),
        "single-threaded: must set"
    );
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("3"));
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

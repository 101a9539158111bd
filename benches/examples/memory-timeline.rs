//! Where a training step's memory goes: `memory-timeline ARCH BATCH SIZE` runs two steps
//! of a preset on random images and prints the resident memory after the forward (the
//! activations the graph keeps), after the backward (and the step's peak), after the graph
//! is dropped, and every 100 MiB change in between (sampled every 5 ms). The peak RSS that
//! `cargo xtask bench` reports comes from `peak-memory`; this shows which phase sets it.
//!
//! ```text
//! cargo run --release -p resblock-benches --example memory-timeline -- resnet50 32 224
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::ModuleT;
use resblock_benches::{peak_rss_bytes, rss_bytes, TrainWorkload};
use resblock_core::configure_threads_here;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn rss() -> anyhow::Result<u64> {
    rss_bytes().context("no VmRSS in /proc/self/status")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [arch, batch, size] = args.as_slice() else {
        bail!("usage: memory-timeline ARCH BATCH SIZE");
    };
    let batch: usize = batch.parse().with_context(|| format!("BATCH {batch:?}"))?;
    let size: usize = size.parse().with_context(|| format!("SIZE {size:?}"))?;
    configure_threads_here(None);
    let work = TrainWorkload::new(arch, batch, size);
    println!("model and batch built: {:.0} MiB", mib(rss()?));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut last = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = rss_bytes().unwrap_or(0);
                if r.abs_diff(last) > 100 << 20 {
                    println!(
                        "  {:6.2} s: {:.0} MiB",
                        start.elapsed().as_secs_f64(),
                        mib(r)
                    );
                    last = r;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    for step in 1..=2 {
        let out = work.net.forward_t(&work.batch.inputs, true)?;
        let loss = resblock_train::loss::cross_entropy(&out, &work.batch.targets, 0.)?;
        println!("step {step}: forward done, {:.0} MiB", mib(rss()?));
        let grads = loss.backward()?;
        let peak = peak_rss_bytes().context("no VmHWM in /proc/self/status")?;
        println!(
            "step {step}: backward done, {:.0} MiB (peak so far {:.0} MiB)",
            mib(rss()?),
            mib(peak)
        );
        drop((loss, out, grads));
        println!(
            "step {step}: graph and gradients dropped, {:.0} MiB",
            mib(rss()?)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    Ok(())
}

//! Peak memory of training steps: runs `STEPS` SGD steps of the bench's training workload
//! ([`resblock_benches::TrainWorkload`]) in a fresh process and prints one JSON line,
//! `{"id": ..., "peak_rss_bytes": ..., "base_rss_bytes": ..., "steps": ...}`: the process's
//! peak resident set size (`VmHWM`: code, weights, optimizer state, activations kept for
//! backward, gradients and allocator slack together) and its resident size before the
//! workload was built (the code and libraries alone).
//!
//! `cargo run --release -p resblock-benches --example peak-memory -- ARCH BATCH SIZE [STEPS]`
//! (STEPS defaults to 3). `cargo xtask bench` runs it for the memory column, beside
//! `benches/torch_bench.py --memory` with the same arguments.

use anyhow::{bail, Context};
use resblock_benches::{peak_rss_bytes, rss_bytes, TrainWorkload};
use resblock_core::configure_threads_here;

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(3..=4).contains(&args.len()) {
        bail!("usage: peak-memory ARCH BATCH SIZE [STEPS]");
    }
    let arch = &args[0];
    let batch: usize = args[1]
        .parse()
        .with_context(|| format!("BATCH {:?}", args[1]))?;
    let size: usize = args[2]
        .parse()
        .with_context(|| format!("SIZE {:?}", args[2]))?;
    let steps: usize = match args.get(3) {
        Some(s) => s.parse().with_context(|| format!("STEPS {s:?}"))?,
        None => 3,
    };
    configure_threads_here(None);
    let base = rss_bytes().context("no VmRSS in /proc/self/status")?;
    let work = TrainWorkload::new(arch, batch, size);
    let mut trainer = work.trainer();
    for _ in 0..steps {
        trainer.train_step(&work.batch)?;
    }
    let peak = peak_rss_bytes().context("no VmHWM in /proc/self/status")?;
    println!(
        "{}",
        serde_json::json!({
            "id": format!("cpu/{arch}/train_step/bs{batch}"),
            "peak_rss_bytes": peak,
            "base_rss_bytes": base,
            "steps": steps,
        })
    );
    Ok(())
}

//! Choosing the device to run on.

use candle_core::Device;

use crate::error::{Error, Result};

/// The best device this build and machine offer: the first CUDA GPU when built with the
/// `cuda` feature and one is present, else the Metal GPU when built with `metal`, else the CPU.
pub fn best_device() -> Device {
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    if candle_core::utils::metal_is_available() {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    Device::Cpu
}

/// Parses a device name: `auto` (see [`best_device`]), `cpu`, `cuda`, `cuda:N`, `metal`,
/// `metal:N`.
///
/// # Errors
/// An unknown name, or a GPU that this build (features) or this machine does not have.
///
/// ```
/// let cpu = resblock_core::parse_device("cpu")?;
/// assert!(cpu.is_cpu());
/// assert!(resblock_core::parse_device("tpu").is_err());
/// # Ok::<(), resblock_core::Error>(())
/// ```
pub fn parse_device(name: &str) -> Result<Device> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => {
            let n = n
                .parse::<usize>()
                .map_err(|_| Error::Device(name.into(), "the ordinal is not a number".into()))?;
            (k, n)
        }
        None => (name, 0),
    };
    let unavailable = |why: String| Error::Device(name.into(), why);
    match kind {
        "auto" => Ok(best_device()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                return Err(unavailable(
                    "this build has no CUDA support (build with --features cuda)".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| unavailable(e.to_string()))
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(unavailable(
                    "this build has no Metal support (build with --features metal)".into(),
                ));
            }
            Device::new_metal(ordinal).map_err(|e| unavailable(e.to_string()))
        }
        _ => Err(unavailable(
            "expected one of auto, cpu, cuda[:N], metal[:N]".into(),
        )),
    }
}

/// Fixes the number of CPU threads for Candle and rayon, and returns it.
///
/// Candle asks for the thread count on every matmul and, unless `RAYON_NUM_THREADS` is
/// set, works it out from the system each time (about 65 us a call here, 5x the cost of a
/// small model's forward). Binaries call this first thing in `main`, before any other thread
/// starts: `Some(n)` sets `n` threads, `None` keeps an existing `RAYON_NUM_THREADS` or uses
/// the available parallelism.
///
/// On Linux with glibc it also keeps freed memory in the process (`mallopt`): training
/// allocates and frees activation-sized buffers for every op, and glibc's default returns
/// blocks over a few MB to the kernel with `munmap`, so every op paid page faults, page
/// zeroing and cross-core TLB flushes (about 20% of a ResNet-20 training step here).
pub fn configure_threads(threads: Option<usize>) -> usize {
    resblock_kernels::alloc::keep_freed_memory();
    let n = threads.filter(|&n| n > 0).unwrap_or_else(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    // Setting the variable is sound here: callers do this before starting other threads.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

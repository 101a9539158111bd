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

//! `cargo xtask aarch64 [crate...]`: clippy (`-D warnings`) over the kernel-bearing crates
//! (and the training engine) as 64-bit ARM (`aarch64-unknown-linux-gnu`) compiles them, then
//! their tests built for it and run under user-mode QEMU.
//!
//! No ARM machine is at hand here, and CI runs on x86-64, where the portable kernels are
//! tested only by forcing them (`RESBLOCK_SIMD=0` and `resblock_kernels::dispatch`). This
//! builds the crates as an ARM CPU gets them (every `cfg(target_arch = "x86_64")` path
//! compiled out, the `gemm` crate's NEON kernels in) and runs their tests on an emulated
//! aarch64 CPU. It checks correctness only: QEMU's timings say nothing about an ARM CPU's.
//! The clippy pass comes first because items compiled only off x86-64 (the portable
//! fallbacks) are linted nowhere else: CI's clippy runs on x86-64.
//!
//! Needs the Rust target, a cross linker and QEMU:
//! `rustup target add aarch64-unknown-linux-gnu` and
//! `apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user`.

use std::env;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

/// The Rust target triple.
const TARGET: &str = "aarch64-unknown-linux-gnu";
/// The cross linker (Debian's `gcc-aarch64-linux-gnu`).
const LINKER: &str = "aarch64-linux-gnu-gcc";
/// Where `libc6-dev-arm64-cross` puts the ARM C library, QEMU's `-L` sysroot.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// The crates tested by default: the kernels, the two that run networks on them and the
/// training engine.
const DEFAULT_CRATES: [&str; 4] = [
    "resblock-kernels",
    "resblock-core",
    "resblock-vision",
    "resblock-train",
];

/// Lints `crates` (default [`DEFAULT_CRATES`]) for [`TARGET`], then runs their tests under
/// QEMU.
pub fn run(crates: &[String]) -> Result<()> {
    check_tools()?;
    let crates: Vec<&str> = if crates.is_empty() {
        DEFAULT_CRATES.to_vec()
    } else {
        crates.iter().map(String::as_str).collect()
    };
    let mut clippy = super::cargo();
    clippy.args(["clippy", "--release", "--all-targets", "--target", TARGET]);
    for c in &crates {
        clippy.args(["-p", c]);
    }
    clippy.args(["--", "-D", "warnings"]);
    super::run(
        &format!("clippy of {} on aarch64", crates.join(", ")),
        clippy,
    )?;
    let mut test = super::cargo();
    test.args(["test", "--release", "--no-fail-fast", "--target", TARGET]);
    for c in &crates {
        test.args(["-p", c]);
    }
    test.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", LINKER)
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            format!("qemu-aarch64 -L {SYSROOT}"),
        )
        // The emulator's threads show in /proc/self/status: the one test that counts the
        // process's threads skips itself on this.
        .env("RESBLOCK_UNDER_QEMU", "1");
    if env::var_os("RAYON_NUM_THREADS").is_none() {
        test.env("RAYON_NUM_THREADS", "2");
    }
    super::run(
        &format!("tests of {} on aarch64 under QEMU", crates.join(", ")),
        test,
    )
}

/// Fails with the install commands when the target, the linker or QEMU is missing.
fn check_tools() -> Result<()> {
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut missing = Vec::new();
    if !targets.lines().any(|t| t.trim() == TARGET) {
        missing.push(format!("the Rust target (rustup target add {TARGET})"));
    }
    if !super::have_tool(LINKER) || !Path::new(SYSROOT).join("lib").is_dir() {
        missing.push(
            "the cross linker and ARM C library (apt-get install gcc-aarch64-linux-gnu \
             libc6-dev-arm64-cross)"
                .to_string(),
        );
    }
    if !super::have_tool("qemu-aarch64") {
        missing.push("QEMU (apt-get install qemu-user)".to_string());
    }
    if !missing.is_empty() {
        bail!("aarch64 tests need {}", missing.join(", "));
    }
    Ok(())
}

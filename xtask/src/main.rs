//! Project automation (matklad's cargo-xtask convention): `cargo xtask <command>`.
//!
//! - `ci`: exactly what CI runs, cheapest first: fmt --check, clippy -D warnings, the
//!   workspace tests (doc tests included), rustdoc with warnings denied.
//! - `bench [criterion filter]`: runs the criterion benchmarks and writes
//!   `docs/benchmarks.md` from criterion's estimates.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            println!("usage: cargo xtask <ci | bench [filter]>");
            Ok(())
        }
        Some(other) => bail!("unknown xtask command {other:?}: expected ci or bench"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(step: &str, mut cmd: Command) -> Result<()> {
    eprintln!("\n== xtask: {step}: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

fn ci() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run("format", fmt)?;

    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy", clippy)?;

    let mut test = cargo();
    test.args(["test", "--workspace"]);
    // Candle asks for the thread count on every matmul; a fixed count avoids re-reading the
    // system each time (see resblock_core::configure_threads).
    if env::var_os("RAYON_NUM_THREADS").is_none() {
        test.env("RAYON_NUM_THREADS", "2");
    }
    run("tests (unit, integration, doc)", test)?;

    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-Dwarnings");
    run("rustdoc", doc)?;
    eprintln!("\n== xtask: ci passed");
    Ok(())
}

fn bench(filter: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "bench",
        "-p",
        "resblock-benches",
        "--bench",
        "residual",
        "--",
    ]);
    cmd.args(filter);
    run("criterion benchmarks", cmd)?;
    let table = table_from_criterion(&root().join("target/criterion"))?;
    let out = root().join("docs/benchmarks.md");
    let tmp = out.with_extension("md.tmp");
    fs::write(&tmp, table).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming onto {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Reads `mean.point_estimate` (ns) from every `<id>/new/estimates.json` under `dir`.
fn table_from_criterion(dir: &Path) -> Result<String> {
    let mut rows = Vec::new();
    collect(dir, dir, &mut rows)?;
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let machine = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let mut s = String::new();
    writeln!(s, "# Benchmarks\n")?;
    writeln!(
        s,
        "Written by `cargo xtask bench` from criterion's estimates (mean)."
    )?;
    writeln!(
        s,
        "Machine: {machine}, {} logical CPUs, RAYON_NUM_THREADS={threads}.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(s, "| benchmark | mean time |")?;
    writeln!(s, "|---|---|")?;
    for (id, ns) in rows {
        writeln!(s, "| `{id}` | {} |", human(ns))?;
    }
    Ok(s)
}

fn collect(base: &Path, dir: &Path, rows: &mut Vec<(String, f64)>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let p = e?.path();
        if p.is_dir() {
            let est = p.join("new/estimates.json");
            if est.is_file() {
                let json = fs::read_to_string(&est)?;
                let id = fs::read_to_string(p.join("new/benchmark.json"))
                    .ok()
                    .and_then(|b| json_str(&b, "full_id"))
                    .unwrap_or_else(|| p.strip_prefix(base).unwrap_or(&p).display().to_string());
                if let Some(ns) = mean_ns(&json) {
                    rows.push((id, ns));
                }
            } else {
                collect(base, &p, rows)?;
            }
        }
    }
    Ok(())
}

/// `{"mean":{...,"point_estimate":X,...}}` -> X, without a JSON dependency.
fn mean_ns(json: &str) -> Option<f64> {
    let at = json.find("\"mean\"")?;
    let rest = &json[at..];
    let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let num: String = rest[p..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    num.parse().ok()
}

fn json_str(json: &str, key: &str) -> Option<String> {
    let k = format!("\"{key}\":\"");
    let at = json.find(&k)? + k.len();
    Some(json[at..].split('"').next()?.to_string())
}

fn human(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.3} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

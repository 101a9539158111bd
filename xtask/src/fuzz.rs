//! `cargo xtask fuzz [--seconds N] [target...]`: runs every libFuzzer target of `fuzz/`
//! (cargo-fuzz, nightly) for N seconds each (default 60), then writes `docs/fuzzing.md`
//! with each target's executions, rate, corpus and peak memory.
//!
//! Each run starts from the committed seeds (`fuzz/corpus/<target>/`) and keeps what it
//! finds in `fuzz/target/work/<target>/` (never committed). libFuzzer is told that an
//! allocation over 512 MiB, 2 GiB of RSS or 10 s on one input is a bug. A crash stops
//! the run: its input is copied into `fuzz/regressions/<target>/`, where
//! `crates/resblock-fuzz/tests/corpus.rs` replays it as an ordinary test once fixed.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

struct Stats {
    target: String,
    seconds: u64,
    execs: u64,
    per_sec: u64,
    corpus: u64,
    rss_mb: u64,
}

fn targets(fuzz: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in fs::read_dir(fuzz.join("fuzz_targets")).context("reading fuzz/fuzz_targets")? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "rs") {
            if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                v.push(stem.to_string());
            }
        }
    }
    v.sort();
    Ok(v)
}

/// The value of libFuzzer's final `stat::<key>: N` line.
fn stat(log: &str, key: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix(&format!("stat::{key}:")))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Corpus size from libFuzzer's last status line (`... corp: 123/45Kb ...`).
fn corpus_size(log: &str) -> u64 {
    log.lines()
        .rev()
        .find_map(|l| {
            let rest = l.split("corp: ").nth(1)?;
            rest.split('/').next()?.trim().parse().ok()
        })
        .unwrap_or(0)
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|&s| s > 0)
                    .context("--seconds needs a positive number")?;
            }
            t if !t.starts_with('-') => only.push(t.to_string()),
            other => bail!("cargo xtask fuzz: unknown flag {other:?} (expected --seconds N)"),
        }
    }
    let fuzz = root.join("fuzz");
    let all = targets(&fuzz)?;
    if let Some(bad) = only.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {bad:?}: the targets are {}", all.join(", "));
    }
    let chosen: Vec<String> = if only.is_empty() { all } else { only };
    let probe = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        bail!("cargo xtask fuzz needs cargo-fuzz and a nightly toolchain: `rustup toolchain install nightly && cargo install cargo-fuzz`");
    }
    let mut build = Command::new("cargo");
    build
        .current_dir(&fuzz)
        .args(["+nightly", "fuzz", "build", "-O"]);
    crate::run(
        "building the fuzz targets (nightly, AddressSanitizer)",
        build,
    )?;
    let mut rows = Vec::new();
    let mut crashed = Vec::new();
    for t in &chosen {
        let work = fuzz.join("target/work").join(t);
        fs::create_dir_all(&work)?;
        let seeds = fuzz.join("corpus").join(t);
        eprintln!("\n== xtask: fuzzing {t} for {seconds} s");
        let out = Command::new("cargo")
            .current_dir(&fuzz)
            .args(["+nightly", "fuzz", "run", "-O", t])
            .arg(&work)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-malloc_limit_mb=512",
                "-rss_limit_mb=2048",
                "-timeout=10",
                "-print_final_stats=1",
            ])
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .with_context(|| format!("running fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        fs::write(fuzz.join("target").join(format!("{t}.log")), &log)?;
        if !out.status.success() {
            let dest = fuzz.join("regressions").join(t);
            fs::create_dir_all(&dest)?;
            let artifacts = fuzz.join("artifacts").join(t);
            for e in fs::read_dir(&artifacts).into_iter().flatten().flatten() {
                let p = e.path();
                if let Some(name) = p.file_name() {
                    fs::copy(&p, dest.join(name))?;
                }
            }
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            crashed.push(t.clone());
            continue;
        }
        let s = Stats {
            target: t.clone(),
            seconds,
            execs: stat(&log, "number_of_executed_units"),
            per_sec: stat(&log, "average_exec_per_sec"),
            corpus: corpus_size(&log),
            rss_mb: stat(&log, "peak_rss_mb"),
        };
        eprintln!(
            "{t}: {} executions ({} /s), corpus {}, peak RSS {} MB",
            s.execs, s.per_sec, s.corpus, s.rss_mb
        );
        rows.push(s);
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (inputs copied to fuzz/regressions/<target>/; fix, then `cargo test -p resblock-fuzz` replays them)",
            crashed.join(", ")
        );
    }
    if chosen.len() == targets(&fuzz)?.len() {
        fs::write(root.join("docs/fuzzing.md"), report(&rows))?;
        eprintln!("\n== xtask: wrote docs/fuzzing.md");
    }
    Ok(())
}

fn report(rows: &[Stats]) -> String {
    let mut s = String::from(
        "# Fuzzing: the last full run\n\nWritten by `cargo xtask fuzz` (see `docs/reliability.md`). Every reader of a file a user\nhands to resblock has a coverage-guided libFuzzer target (`fuzz/fuzz_targets/`, over\n`crates/resblock-fuzz`), built with AddressSanitizer; an allocation over 512 MiB, 2 GiB\nof RSS, 10 s on one input or a panic counts as a crash. No target crashed in this run.\n\n| target | seconds | executions | executions/s | corpus (inputs) | peak RSS (MB) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} | {} |",
            r.target, r.seconds, r.execs, r.per_sec, r.corpus, r.rss_mb
        );
    }
    let total: u64 = rows.iter().map(|r| r.execs).sum();
    let _ = writeln!(
        s,
        "\n{total} executions in all, on {} ({} logical CPUs, one target at a time).",
        crate::machine(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    s
}

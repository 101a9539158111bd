//! Project automation (matklad's cargo-xtask convention): `cargo xtask <command>`.
//!
//! - `ci`: exactly what CI runs, cheapest first: fmt --check, the workspace's shape
//!   (`layers.rs`: dependency floors, `unsafe` only in resblock-kernels), clippy -D warnings, the
//!   workspace tests (doc tests included), rustdoc with warnings denied.
//! - `bench [--compare-torch] [criterion filter]`: runs the criterion benchmarks
//!   (`benches/benches/*.rs`) and writes `docs/benchmarks.md`: mean time, images/s, GFLOP/s
//!   and the share of the GEMM peak measured in the same run (`cpu/gemm/f32_1024`). With
//!   `--compare-torch` it also runs `benches/torch_bench.py` (PyTorch eager, same shapes and
//!   thread count) just before and just after ours, and adds PyTorch's mean time (the two
//!   runs bracket ours in time on a host whose speed drifts) and the ratio (PyTorch time /
//!   ours: above 1 means resblock is faster).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod layers;

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            println!("usage: cargo xtask <ci | bench [--compare-torch] [filter]>");
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

    eprintln!("\n== xtask: layers (dependency floors, unsafe only in resblock-kernels)");
    layers::check(cargo(), &root())?;

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

fn bench(args: &[String]) -> Result<()> {
    let compare = args.iter().any(|a| a == "--compare-torch");
    let filter: Vec<&String> = args.iter().filter(|a| *a != "--compare-torch").collect();
    if filter.len() > 1 {
        bail!("bench takes at most one filter, got {filter:?}");
    }
    let target = root().join("target");
    let meta = target.join("bench-meta.jsonl");
    let _ = fs::remove_file(&meta);
    // PyTorch runs just before and just after ours: the host is shared and its speed drifts
    // over minutes, so the mean of the two brackets our run in time.
    let torch_run = |tag: &str| -> Result<serde_json::Value> {
        let out = target.join(format!("torch-bench-{tag}.json"));
        let mut py = Command::new(env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
        py.arg(root().join("benches/torch_bench.py"))
            .arg("--out")
            .arg(&out);
        if let Some(f) = filter.first() {
            py.args(["--filter", f.as_str()]);
        }
        run(
            &format!("PyTorch benchmarks, {tag} ours (benches/torch_bench.py)"),
            py,
        )?;
        let text =
            fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", out.display()))
    };
    // Built first, so that only the measuring lies between the two PyTorch runs.
    let mut build = cargo();
    build.args(["bench", "-p", "resblock-benches", "--benches", "--no-run"]);
    run("building the benchmarks", build)?;
    let before = compare.then(|| torch_run("before")).transpose()?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "resblock-benches", "--benches", "--"]);
    cmd.args(&filter);
    run("criterion benchmarks", cmd)?;
    let after = compare.then(|| torch_run("after")).transpose()?;
    let torch = before.zip(after);
    let table = table(
        &target.join("criterion"),
        &meta,
        torch.as_ref().map(|(b, a)| (b, a)),
    )?;
    let out = root().join("docs/benchmarks.md");
    let tmp = out.with_extension("md.tmp");
    fs::write(&tmp, table).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming onto {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// (images, flop) per iteration for each benchmark id, from the benches' records.
fn read_meta(path: &Path) -> HashMap<String, (Option<f64>, Option<f64>)> {
    let mut m = HashMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(id) = v["id"].as_str() {
                m.insert(id.to_string(), (v["images"].as_f64(), v["flop"].as_f64()));
            }
        }
    }
    m
}

fn machine() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The Markdown table from criterion's means, the benches' metadata and PyTorch's times.
/// PyTorch's results before and after ours.
type TorchRuns<'a> = (&'a serde_json::Value, &'a serde_json::Value);

fn table(dir: &Path, meta: &Path, torch: Option<TorchRuns<'_>>) -> Result<String> {
    let mut rows = Vec::new();
    collect(dir, dir, &mut rows)?;
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = read_meta(meta);
    let gflops = |id: &str, ns: f64| meta.get(id).and_then(|m| m.1).map(|f| f / ns);
    let peak = rows
        .iter()
        .find(|(id, _)| id == "cpu/gemm/f32_1024")
        .and_then(|(id, ns)| gflops(id, *ns));
    let threads = env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let mut s = String::new();
    writeln!(s, "# Benchmarks\n")?;
    writeln!(
        s,
        "Written by `cargo xtask bench{}` from criterion's estimates (mean time per iteration).",
        if torch.is_some() {
            " --compare-torch"
        } else {
            ""
        }
    )?;
    writeln!(
        s,
        "Machine: {}, {} logical CPUs, RAYON_NUM_THREADS={threads}.",
        machine(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    if let Some((t, _)) = torch {
        writeln!(
            s,
            "PyTorch {} eager, {} threads, timed by `benches/torch_bench.py` in the same run, \
             once just before ours and once just after (the host is shared and drifts over \
             minutes); the PyTorch column is the mean of the two, with both in brackets. \
             Ratio = PyTorch's mean time / ours (above 1: resblock is faster).",
            t["_meta"]["torch"].as_str().unwrap_or("?"),
            t["_meta"]["threads"].as_u64().unwrap_or(0)
        )?;
    }
    writeln!(
        s,
        "GFLOP/s counts a multiply-add as two; % peak is against `cpu/gemm/f32_1024` measured \
         in the same run. Folded ResNets have BatchNorm folded into the convolutions \
         (PyTorch eager has no such mode, so both rows compare with the same PyTorch model).\n"
    )?;
    let mut head = "| benchmark | time | images/s | GFLOP/s | % GEMM peak |".to_string();
    let mut rule = "|---|---|---|---|---|".to_string();
    if torch.is_some() {
        head.push_str(" PyTorch | ratio |");
        rule.push_str("---|---|");
    }
    writeln!(s, "{head}\n{rule}")?;
    for (id, ns) in &rows {
        let (images, _) = meta.get(id).copied().unwrap_or((None, None));
        let ips = images.map_or("".into(), |n| format!("{:.1}", n / (ns * 1e-9)));
        let g = gflops(id, *ns);
        let gs = g.map_or("".into(), |g| format!("{g:.1}"));
        let pct = match (g, peak) {
            (Some(g), Some(p)) => format!("{:.0}%", 100. * g / p),
            _ => "".into(),
        };
        write!(s, "| `{id}` | {} | {ips} | {gs} | {pct} |", human(*ns))?;
        if let Some((b, a)) = torch {
            match (b[id.as_str()].as_f64(), a[id.as_str()].as_f64()) {
                (Some(b), Some(a)) => {
                    let mean = 0.5 * (a + b);
                    write!(
                        s,
                        " {} ({} / {}) | {:.2}x |",
                        human(mean * 1e9),
                        human(b * 1e9),
                        human(a * 1e9),
                        mean * 1e9 / ns
                    )?
                }
                _ => write!(s, " | |")?,
            }
        }
        writeln!(s)?;
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
                let id = read_json(&p.join("new/benchmark.json"))
                    .and_then(|b| b["full_id"].as_str().map(String::from))
                    .unwrap_or_else(|| p.strip_prefix(base).unwrap_or(&p).display().to_string());
                // `mean.point_estimate` is in nanoseconds.
                if let Some(ns) = read_json(&est).and_then(|e| e["mean"]["point_estimate"].as_f64())
                {
                    rows.push((id, ns));
                }
            } else {
                collect(base, &p, rows)?;
            }
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
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

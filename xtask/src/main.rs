//! Project automation (matklad's cargo-xtask convention): `cargo xtask <command>`.
//!
//! - `ci`: exactly what CI runs, cheapest first: fmt --check, the workspace's shape
//!   (`layers.rs`: dependency floors, `unsafe` only in resblock-kernels), clippy -D warnings, the
//!   workspace tests (doc tests included), rustdoc with warnings denied.
//! - `fuzz [--seconds N] [target...]`: the libFuzzer targets of `fuzz/`, N seconds each
//!   (`fuzz.rs`); writes `docs/fuzzing.md`.
//! - `bench [--compare-torch] [criterion filter]`: runs the criterion benchmarks
//!   (`benches/benches/*.rs`) and writes `docs/benchmarks.md`: mean time, images/s, GFLOP/s
//!   and the share of the machine's peak FMA rate (`cpu/peak/fma_f32`) and of the GEMM
//!   (`cpu/gemm/f32_1024`) measured in the same run, and the peak memory (RSS) of the
//!   training steps in [`MEMORY`] (`benches/examples/peak-memory.rs`, a fresh process
//!   each). With `--compare-torch` it also runs `benches/torch_bench.py` (PyTorch eager,
//!   same shapes and thread count) just before and just after ours, and adds PyTorch's mean
//!   time (the two runs bracket ours in time on a host whose speed drifts), the ratio
//!   (PyTorch time / ours: above 1 means resblock is faster) and PyTorch's peak memory for
//!   the same steps (`torch_bench.py --memory`).
//! - `aarch64 [crate...]`: clippy on the kernel-bearing crates as 64-bit ARM compiles them,
//!   then their tests built for it and run under user-mode QEMU (`aarch64.rs`; not part
//!   of `ci`).
//! - `asm`: the kernels crate's release assembly, checked for inner FMA loops that store
//!   vector registers to the stack, i.e. keep their sums in memory (`asm.rs`; not part of
//!   `ci`: run it after changing a kernel).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod aarch64;
mod asm;
mod fuzz;
mod layers;

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("fuzz") => fuzz::run(&root(), &args[1..]),
        Some("aarch64") => aarch64::run(&args[1..]),
        Some("asm") => asm::run(),
        Some("help" | "--help" | "-h") | None => {
            println!("usage: cargo xtask <ci | bench [--compare-torch] [filter] | fuzz [--seconds N] [target...] | aarch64 [crate...] | asm>");
            Ok(())
        }
        Some(other) => {
            bail!("unknown xtask command {other:?}: expected ci, bench, fuzz, aarch64 or asm")
        }
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

    // With MPI present, one clippy run covers the workspace and the `mpi` feature's code
    // (a second run for the feature alone re-checked resblock-train and resblock-examples:
    // 3 of CI's 29 minutes on the Zen 3 host). The few items compiled only without the
    // feature are linted where MPI is absent.
    let mpi = mpi_present()?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets"]);
    if mpi {
        clippy.args(["--features", "resblock-examples/mpi"]);
    }
    clippy.args(["--", "-D", "warnings"]);
    run(
        if mpi {
            "clippy (feature mpi included)"
        } else {
            "clippy"
        },
        clippy,
    )?;

    let mut test = cargo();
    test.args(["test", "--workspace"]);
    // Candle asks for the thread count on every matmul; a fixed count avoids re-reading the
    // system each time (see resblock_core::configure_threads).
    if env::var_os("RAYON_NUM_THREADS").is_none() {
        test.env("RAYON_NUM_THREADS", "2");
    }
    run("tests (unit, integration, doc)", test)?;

    if mpi {
        mpi_test()?;
    }

    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-Dwarnings");
    run("rustdoc", doc)?;
    eprintln!("\n== xtask: ci passed");
    Ok(())
}

/// Whether data-parallel training on MPI (`--features mpi`) can be checked here: Open MPI
/// (`mpirun`, `mpicc`) and libclang (the `mpi` crate's bindings are generated at build
/// time) are installed. Without them the MPI checks are skipped with a note, unless
/// `RESBLOCK_REQUIRE_MPI=1` (set by `.ci/run`, which installs them) makes that an error.
fn mpi_present() -> Result<bool> {
    let libclang = env::var_os("LIBCLANG_PATH").is_some()
        || std::fs::read_dir("/usr/lib")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
            .any(|e| {
                std::fs::read_dir(e.path().join("lib"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|f| f.file_name().to_string_lossy().starts_with("libclang"))
            });
    if have_tool("mpirun") && have_tool("mpicc") && libclang {
        return Ok(true);
    }
    let msg = "Open MPI (mpirun, mpicc) or libclang is missing: apt-get install openmpi-bin libopenmpi-dev libclang-dev";
    if env::var_os("RESBLOCK_REQUIRE_MPI").is_some_and(|v| v == "1") {
        bail!("data-parallel tests: {msg}");
    }
    eprintln!("\n== xtask: data-parallel (MPI) clippy and tests SKIPPED: {msg}");
    Ok(false)
}

/// The 2-rank `mpirun` test of data-parallel training against PyTorch DDP (`--features
/// mpi`; the feature's clippy runs with the workspace's, see [`ci`]).
fn mpi_test() -> Result<()> {
    let mut test = cargo();
    test.args([
        "test",
        "-p",
        "resblock-examples",
        "--features",
        "mpi",
        "--test",
        "distributed_cli",
    ]);
    if env::var_os("RAYON_NUM_THREADS").is_none() {
        test.env("RAYON_NUM_THREADS", "1");
    }
    run("data-parallel training on MPI (mpirun -np 2)", test)
}

/// Whether `bin --version` runs and succeeds: a tool a step needs is installed.
fn have_tool(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Gives a benchmark process `RAYON_NUM_THREADS` (all CPUs) unless the caller set it:
/// without it Candle re-reads /proc/cpuinfo on every matmul (about 80 us each), which made
/// the small workloads several times slower (the toy's 1000 steps: 115 ms against 21 ms).
/// The bench harnesses cannot set it themselves safely once threads run. Likewise
/// `CANDLE_NUM_THREADS` (the same count) and `CANDLE_BARRIER_POOL_SPIN_LIMIT=0` (unless
/// set), as `resblock_core::pin_candle_threads` does for the binaries: Candle's
/// elementwise pool then sleeps as soon as an op is done instead of spinning beside ours.
fn pin_threads(cmd: &mut Command) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| cpus.to_string());
    if env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", &threads);
    }
    if env::var_os("CANDLE_NUM_THREADS").is_none() {
        cmd.env("CANDLE_NUM_THREADS", &threads);
    }
    if env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        cmd.env("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}

/// In `docs/benchmarks.md`, everything from this line on is kept when the table is rewritten.
const KEEP_MARKER: &str = "<!-- kept by cargo xtask bench: notes below -->";

/// The training steps whose peak memory the bench measures: (arch, batch, image size).
const MEMORY: [(&str, usize, usize); 2] = [("resnet20", 128, 32), ("resnet50", 32, 224)];

/// Steps each memory probe runs (the peak is reached in the first; the second shows it
/// does not grow).
const MEMORY_STEPS: usize = 2;

/// Peak RSS in bytes per benchmark id: ours, and PyTorch's when compared.
type Memory = HashMap<String, (u64, Option<u64>)>;

/// Runs the memory probes whose ids pass `filter`, ours and (with `compare`) PyTorch's.
fn memory(filter: Option<&str>, compare: bool) -> Result<Memory> {
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "resblock-benches",
        "--example",
        "peak-memory",
    ]);
    run("building the memory probe", build)?;
    let probe = root().join("target/release/examples/peak-memory");
    let mut out = Memory::new();
    for (arch, batch, size) in MEMORY {
        let id = format!("cpu/{arch}/train_step/bs{batch}");
        if filter.is_some_and(|f| !id.contains(f)) {
            continue;
        }
        let args = [
            arch.to_string(),
            batch.to_string(),
            size.to_string(),
            MEMORY_STEPS.to_string(),
        ];
        let mut probe_cmd = Command::new(&probe);
        probe_cmd.args(&args);
        pin_threads(&mut probe_cmd);
        let ours = peak_of(&mut probe_cmd, &format!("memory probe {id}"))?;
        let torch = if compare {
            let mut py = Command::new(env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
            py.arg(root().join("benches/torch_bench.py"))
                .arg("--memory")
                .args(&args);
            Some(peak_of(&mut py, &format!("PyTorch memory probe {id}"))?)
        } else {
            None
        };
        out.insert(id, (ours, torch));
    }
    Ok(out)
}

/// Runs a probe and reads `peak_rss_bytes` from the JSON line it prints.
fn peak_of(cmd: &mut Command, what: &str) -> Result<u64> {
    eprintln!("==> {what}");
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}"))?;
    v["peak_rss_bytes"]
        .as_u64()
        .with_context(|| format!("{what}: no peak_rss_bytes in {line:?}"))
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
    pin_threads(&mut cmd);
    run("criterion benchmarks", cmd)?;
    let after = compare.then(|| torch_run("after")).transpose()?;
    let torch = before.zip(after);
    let mem = memory(filter.first().map(|f| f.as_str()), compare)?;
    let table = table(
        &target.join("criterion"),
        &meta,
        torch.as_ref().map(|(b, a)| (b, a)),
        &mem,
    )?;
    let out = root().join("docs/benchmarks.md");
    // Hand-written notes (earlier tables, findings) below the marker survive a new run.
    let kept = fs::read_to_string(&out)
        .ok()
        .and_then(|old| old.find(KEEP_MARKER).map(|at| old[at..].to_string()))
        .unwrap_or_default();
    let text = if kept.is_empty() {
        table
    } else {
        format!("{table}\n{kept}")
    };
    let tmp = out.with_extension("md.tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
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

/// Which GEMM the bench's GEMM rows run, in words for the table's header: our own
/// (`resblock_kernels::sgemm`) on its AVX-512 kernel where the CPU has AVX-512 F and VL and
/// `RESBLOCK_SIMD` allows it, on its AVX2 kernel where the CPU has AVX2 and FMA (and
/// `RESBLOCK_SIMD` is not `portable`), unless `RESBLOCK_SGEMM=0`; the `gemm` crate's
/// otherwise. These are the library's dispatch rules (`sgemm::isa`), restated here because
/// xtask does not link the library: a change to one is a change to both.
fn gemm_in_use() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl"),
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx512, avx2) = (false, false);
    let sgemm_off = env::var("RESBLOCK_SGEMM").is_ok_and(|v| v == "0");
    let simd = env::var("RESBLOCK_SIMD")
        .map(|v| v.to_ascii_lowercase())
        .unwrap_or_default();
    let portable = matches!(simd.as_str(), "0" | "off" | "portable");
    let at_most_avx2 = portable || simd == "avx2";
    if sgemm_off && (avx2 || avx512) {
        "the `gemm` crate's: RESBLOCK_SGEMM=0 turned our own GEMM off"
    } else if avx512 && !at_most_avx2 {
        "our own GEMM's AVX-512 kernel (8 x 32 tiles), the one the linear layers and the \
         convolutions' GEMM path run"
    } else if avx2 && !portable {
        "our own GEMM's AVX2 kernel (6 x 16 tiles), the one the linear layers and the \
         convolutions' GEMM path run"
    } else if avx2 {
        "the `gemm` crate's: RESBLOCK_SIMD=portable turned our own GEMM's kernels off"
    } else {
        "the `gemm` crate's, which the linear layers and the convolutions' GEMM path run on a \
         CPU without AVX2 and FMA (our own GEMM's kernels need them)"
    }
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

fn table(dir: &Path, meta: &Path, torch: Option<TorchRuns<'_>>, mem: &Memory) -> Result<String> {
    let mut rows = Vec::new();
    collect(dir, dir, &mut rows)?;
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = read_meta(meta);
    // Only the benchmarks the benches define now (each records its id when it is set up,
    // filtered out or not): criterion keeps the estimates of renamed or removed ones.
    if !meta.is_empty() {
        rows.retain(|(id, _)| meta.contains_key(id));
    }
    let gflops = |id: &str, ns: f64| meta.get(id).and_then(|m| m.1).map(|f| f / ns);
    let measured = |name: &str| {
        rows.iter()
            .find(|(id, _)| id == name)
            .and_then(|(id, ns)| gflops(id, *ns))
    };
    let peak = measured("cpu/gemm/f32_1024");
    let fma = measured("cpu/peak/fma_f32");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let threads =
        env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| format!("{cpus} (set by the bench)"));
    let candle = env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| {
        let n = env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| cpus.to_string());
        format!("{n} (set by the bench)")
    });
    let spin = env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT")
        .unwrap_or_else(|_| "0 (set by the bench)".into());
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
        "Machine: {}, {cpus} logical CPUs, RAYON_NUM_THREADS={threads}, CANDLE_NUM_THREADS={candle}, CANDLE_BARRIER_POOL_SPIN_LIMIT={spin}.",
        machine(),
    )?;
    if let Some(f) = fma {
        let threads_used = env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(cpus)
            .max(1);
        // Two FMA pipes per core; 256-bit ones (8 lanes) unless that would need an
        // implausible clock, then full-width 512-bit ones (16 lanes).
        let clock8 = f / (threads_used as f64 * 32.);
        if clock8 <= 5. {
            write!(
                s,
                "Peak: the FMA loop `cpu/peak/fma_f32` runs at {f:.1} GFLOP/s on {threads_used} \
                 threads, i.e. {threads_used} cores x 2 FMA pipes x 8 f32 lanes x 2 flop x \
                 {clock8:.2} GHz effective clock (a core that retires two 256-bit FMAs per \
                 cycle, as AMD Zen 3/4 and Intel client cores do; Zen 4 runs a 512-bit FMA as \
                 two halves, so AVX-512 does not raise this ceiling there).",
            )?;
        } else {
            write!(
                s,
                "Peak: the FMA loop `cpu/peak/fma_f32` (512-bit FMAs) runs at {f:.1} GFLOP/s \
                 on {threads_used} threads, i.e. {threads_used} cores x 2 FMA pipes x 16 f32 \
                 lanes x 2 flop x {:.2} GHz effective clock: this CPU retires two full-width \
                 512-bit FMAs per cycle (as AMD Zen 5 does), twice what 256-bit code (the \
                 `gemm` crate on a stable compiler) can reach.",
                clock8 / 2.
            )?;
        }
        if let Some(g) = peak {
            let which = gemm_in_use();
            write!(
                s,
                " The best measured GEMM, `cpu/gemm/f32_1024` ({which}), reaches {g:.1} \
                 GFLOP/s, {:.0}% of it.",
                100. * g / f
            )?;
        }
        writeln!(s)?;
    }
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
        "GFLOP/s counts a multiply-add as two; % FMA and % GEMM are against `cpu/peak/fma_f32` \
         and `cpu/gemm/f32_1024` measured in the same run. Folded ResNets have BatchNorm \
         folded into the convolutions (PyTorch eager has no such mode, so both rows compare \
         with the same PyTorch model). Peak RSS: the whole process's peak resident memory \
         (`VmHWM`) over {MEMORY_STEPS} training steps in a fresh process \
         (`benches/examples/peak-memory.rs`{}), code and libraries included.\n",
        if torch.is_some() {
            ", and `benches/torch_bench.py --memory` for PyTorch; the ratio in that \
             cell is PyTorch's peak / ours, above 1: resblock uses less"
        } else {
            ""
        }
    )?;
    let mut head = "| benchmark | time | images/s | GFLOP/s | % FMA peak | % GEMM |".to_string();
    let mut rule = "|---|---|---|---|---|---|".to_string();
    if torch.is_some() {
        head.push_str(" PyTorch | ratio |");
        rule.push_str("---|---|");
    }
    head.push_str(" peak RSS |");
    rule.push_str("---|");
    writeln!(s, "{head}\n{rule}")?;
    for (id, ns) in &rows {
        let (images, _) = meta.get(id).copied().unwrap_or((None, None));
        let ips = images.map_or("".into(), |n| format!("{:.1}", n / (ns * 1e-9)));
        let g = gflops(id, *ns);
        let gs = g.map_or("".into(), |g| format!("{g:.1}"));
        let pct = |of: Option<f64>| match (g, of) {
            (Some(g), Some(p)) => format!("{:.0}%", 100. * g / p),
            _ => "".into(),
        };
        write!(
            s,
            "| `{id}` | {} | {ips} | {gs} | {} | {} |",
            human(*ns),
            pct(fma),
            pct(peak)
        )?;
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
        match mem.get(id.as_str()) {
            Some((ours, Some(theirs))) => write!(
                s,
                " {} (PyTorch {}, {:.2}x) |",
                mib(*ours),
                mib(*theirs),
                *theirs as f64 / *ours as f64
            )?,
            Some((ours, None)) => write!(s, " {} |", mib(*ours))?,
            None => write!(s, " |")?,
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

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024. * 1024.))
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

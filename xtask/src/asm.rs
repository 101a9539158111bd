//! `cargo xtask asm`: checks that the compiled kernels keep their sums in registers.
//!
//! A micro-kernel's sums must stay in vector registers through its inner loop. Twice the
//! compiler has kept them in memory as well, storing every sum to the stack on every step
//! of the loop besides computing it in a register: the AVX2 GEMM kernel when its stores
//! were inlined (it then ran at half speed on Zen 3), and the AVX-512 GEMM kernel, whose
//! 16 sums were stored on every step of `k` for several sessions before anyone read its
//! assembly on a host that could not run it. Nothing in the tests or the timings of an
//! AVX2 host shows the second, so this reads the assembly instead.
//!
//! It builds `resblock-kernels` in release with `--emit asm` (in its own target folder,
//! `target/asm`, so the normal build is not rebuilt after it) and, in every function of the
//! crate, finds the innermost loops (a backward jump to a label of the same function, with
//! no other such loop inside) that hold at least [`MIN_FMAS`] fused multiply-adds. None of
//! them may store a vector register to the stack. Reloading a pointer from the stack is
//! allowed: that is the general registers running short, one load beside many FMAs.
//!
//! x86-64 only (AT&T syntax, as rustc writes it there); not part of `ci` (the release
//! build of the dependencies costs minutes). Run it after changing a kernel.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// The fewest FMAs that make a loop a kernel's inner loop for this check.
const MIN_FMAS: usize = 4;

/// Functions (demangled paths, without the hash) that must each show at least one checked
/// loop: if the parse found none there, it is not reading what it should.
const MUST_HAVE_LOOPS: [&str; 2] = [
    "resblock_kernels::sgemm::avx2::kernel",
    "resblock_kernels::sgemm::avx512::kernel",
];

/// Builds the assembly and checks it; fails naming every loop that stores a sum.
pub fn run() -> Result<()> {
    if !cfg!(target_arch = "x86_64") {
        bail!("cargo xtask asm reads x86-64 assembly; this is another architecture");
    }
    let target = super::root().join("target").join("asm");
    let mut build = super::cargo();
    build.args(["rustc", "--release", "-p", "resblock-kernels", "--lib"]);
    build.arg("--target-dir").arg(&target);
    build.args(["--", "--emit", "asm"]);
    super::run("the kernels' assembly", build)?;
    let file = newest_asm(&target.join("release").join("deps"))?;
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let report = check(&text);
    for (name, loops) in &report.checked {
        eprintln!("{loops:3} inner FMA loop(s) checked in {name}");
    }
    for name in MUST_HAVE_LOOPS {
        if !report.checked.iter().any(|(n, _)| n == name) {
            bail!(
                "{}: no inner FMA loop found in {name}: the check is not reading this assembly as it expects",
                file.display()
            );
        }
    }
    if !report.spills.is_empty() {
        for s in &report.spills {
            eprintln!(
                "{}: an inner loop of {} FMAs stores {} vector register(s) to the stack",
                s.function, s.fmas, s.stores
            );
        }
        bail!(
            "{} inner FMA loop(s) keep sums in memory ({}); see xtask/src/asm.rs",
            report.spills.len(),
            file.display()
        );
    }
    eprintln!("\n== xtask: asm passed: no inner FMA loop stores a vector register to the stack");
    Ok(())
}

/// The most recently written `resblock_kernels-*.s` in `deps`.
fn newest_asm(deps: &std::path::Path) -> Result<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(deps)
        .with_context(|| format!("reading {}", deps.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n.starts_with("resblock_kernels-") && n.ends_with(".s"))
        })
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    match found.pop() {
        Some((_, p)) => Ok(p),
        None => bail!("no resblock_kernels-*.s in {}", deps.display()),
    }
}

/// What [`check`] found.
#[derive(Debug, Default)]
struct Report {
    /// Each function of the crate with checked loops: its demangled path and their count.
    checked: Vec<(String, usize)>,
    /// The loops that store vector registers to the stack.
    spills: Vec<Spill>,
}

/// An inner FMA loop that stores vector registers to the stack.
#[derive(Debug, PartialEq, Eq)]
struct Spill {
    function: String,
    fmas: usize,
    stores: usize,
}

/// Reads rustc's x86-64 assembly (AT&T syntax): checks every innermost loop of
/// `resblock_kernels`' functions with at least [`MIN_FMAS`] FMAs for vector stores to the
/// stack.
fn check(asm: &str) -> Report {
    let mut report = Report::default();
    for (symbol, body) in functions(asm) {
        let Some(name) = demangle(symbol).filter(|n| n.starts_with("resblock_kernels::")) else {
            continue;
        };
        let mut count = 0;
        for (start, end) in inner_loops(&body) {
            let lines = &body[start..=end];
            let fmas = lines.iter().filter(|l| is_fma(l)).count();
            if fmas < MIN_FMAS {
                continue;
            }
            count += 1;
            let stores = lines.iter().filter(|l| is_vector_stack_store(l)).count();
            if stores > 0 {
                report.spills.push(Spill {
                    function: name.clone(),
                    fmas,
                    stores,
                });
            }
        }
        if count > 0 {
            match report.checked.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += count,
                None => report.checked.push((name, count)),
            }
        }
    }
    report
}

/// The functions of `asm`: each global label (one at the start of a line, not `.L`-local)
/// and its instruction lines, directives left out.
fn functions(asm: &str) -> Vec<(&str, Vec<&str>)> {
    let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
    for line in asm.lines() {
        if let Some(label) = line.strip_suffix(':') {
            if !label.starts_with('.') && !label.contains(char::is_whitespace) {
                out.push((label, Vec::new()));
                continue;
            }
        }
        if let Some((_, body)) = out.last_mut() {
            let t = line.trim_start();
            let local_label = t.starts_with(".LBB") && t.ends_with(':');
            if local_label || !(t.is_empty() || t.starts_with('.') || t.starts_with('#')) {
                body.push(t);
            }
        }
    }
    out
}

/// The innermost loops of a function body: `(label line, jump line)` of each backward jump
/// to one of its `.LBB` labels that encloses no other.
fn inner_loops(body: &[&str]) -> Vec<(usize, usize)> {
    let label_at = |name: &str| body.iter().position(|l| l.strip_suffix(':') == Some(name));
    let loops: Vec<(usize, usize)> = body
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let mut words = l.split_whitespace();
            let op = words.next()?;
            let dest = words.next()?;
            if !op.starts_with('j') || !dest.starts_with(".LBB") {
                return None;
            }
            label_at(dest).filter(|&s| s < i).map(|s| (s, i))
        })
        .collect();
    loops
        .iter()
        .copied()
        .filter(|&(s, e)| {
            !loops
                .iter()
                .any(|&(s2, e2)| (s2, e2) != (s, e) && s <= s2 && e2 <= e)
        })
        .collect()
}

/// Whether an instruction is a fused multiply-add (any form).
fn is_fma(line: &str) -> bool {
    let op = line.split_whitespace().next().unwrap_or("");
    op.starts_with("vfmadd") || op.starts_with("vfmsub") || op.starts_with("vfnm")
}

/// Whether an instruction moves a vector register (`%xmm`, `%ymm`, `%zmm`) to memory
/// addressed from the stack or frame pointer (AT&T: source first, destination last).
fn is_vector_stack_store(line: &str) -> bool {
    let mut parts = line.splitn(2, char::is_whitespace);
    let op = parts.next().unwrap_or("");
    let operands = parts.next().unwrap_or("").trim();
    if !op.starts_with("vmov") {
        return false;
    }
    let Some((src, dst)) = operands.split_once(", ") else {
        return false;
    };
    let vector = ["%xmm", "%ymm", "%zmm"].iter().any(|r| src.starts_with(r));
    vector && (dst.ends_with("(%rsp)") || dst.ends_with("(%rbp)"))
}

/// The path of a legacy-mangled Rust symbol (`_ZN` length-prefixed segments `E`), without
/// the hash segment; `None` for other symbols.
fn demangle(symbol: &str) -> Option<String> {
    let mut rest = symbol.strip_prefix("_ZN")?;
    let mut parts = Vec::new();
    while !rest.starts_with('E') {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let len: usize = rest[..digits].parse().ok()?;
        let part = rest.get(digits..digits + len)?;
        rest = &rest[digits + len..];
        let hash = part.len() == 17
            && part.starts_with('h')
            && part[1..].bytes().all(|b| b.is_ascii_hexdigit());
        if !hash {
            parts.push(part);
        }
    }
    Some(parts.join("::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two instances of a kernel: one whose loop keeps its sums in registers (a pointer
    /// reloaded from the stack, which is allowed), one that stores a sum every step.
    const ASM: &str = "\
_ZN16resblock_kernels5sgemm6avx5126kernel17h0123456789abcdefE:
\t.cfi_startproc
\tpushq\t%rbp
.LBB1_2:
\tvmovups\t(%rdx), %zmm16
\tmovq\t-16(%rsp), %rbp
\tvfmadd231ps\t%zmm16, %zmm18, %zmm0
\tvfmadd231ps\t%zmm16, %zmm18, %zmm1
\tvfmadd231ps\t%zmm16, %zmm18, %zmm2
\tvfmadd231ps\t%zmm16, %zmm18, %zmm3
\tdecq\t%rdi
\tjne\t.LBB1_2
\tvmovaps\t%zmm0, 64(%rsp)
\tretq
.Lfunc_end1:
_ZN16resblock_kernels5sgemm4avx26kernel17hfedcba9876543210E:
.LBB2_1:
\tmovq\t%rax, %rbx
.LBB2_3:
\tvfmadd231ps\t%ymm12, %ymm14, %ymm11
\tvmovaps\t%ymm11, 32(%rsp)
\tvfmadd231ps\t%ymm12, %ymm14, %ymm10
\tvmovaps\t%ymm10, 64(%rsp)
\tvfmadd231ps\t%ymm12, %ymm14, %ymm9
\tvfmadd231ps\t%ymm12, %ymm14, %ymm8
\tdecq\t%rdi
\tjne\t.LBB2_3
\tdecq\t%rsi
\tjne\t.LBB2_1
\tretq
_ZN4core3ptr13drop_in_place17h0000000000000000E:
.LBB3_1:
\tvfmadd231ps\t%ymm1, %ymm1, %ymm1
\tvfmadd231ps\t%ymm1, %ymm1, %ymm1
\tvfmadd231ps\t%ymm1, %ymm1, %ymm1
\tvfmadd231ps\t%ymm1, %ymm1, %ymm1
\tvmovaps\t%ymm1, (%rsp)
\tjmp\t.LBB3_1
";

    #[test]
    fn finds_the_loop_that_stores_its_sums_and_passes_the_one_that_does_not() {
        let report = check(ASM);
        assert_eq!(
            report.checked,
            vec![
                ("resblock_kernels::sgemm::avx512::kernel".to_string(), 1),
                ("resblock_kernels::sgemm::avx2::kernel".to_string(), 1),
            ],
            "one inner loop each; the outer loop of the second and other crates' code are not checked"
        );
        assert_eq!(
            report.spills,
            vec![Spill {
                function: "resblock_kernels::sgemm::avx2::kernel".to_string(),
                fmas: 4,
                stores: 2,
            }]
        );
    }

    #[test]
    fn reads_stores_and_symbols() {
        assert!(is_vector_stack_store("vmovaps\t%zmm3, 256(%rsp)"));
        assert!(is_vector_stack_store("vmovups\t%ymm0, -32(%rbp)"));
        assert!(!is_vector_stack_store("vmovups\t64(%rsp), %ymm0"), "a load");
        assert!(
            !is_vector_stack_store("vmovups\t%ymm0, (%rdi,%rax,4)"),
            "not the stack"
        );
        assert!(
            !is_vector_stack_store("movq\t%rax, 8(%rsp)"),
            "not a vector"
        );
        assert_eq!(
            demangle("_ZN16resblock_kernels4conv6direct4avx28fwd_tile17h399db96c4fc814acE")
                .as_deref(),
            Some("resblock_kernels::conv::direct::avx2::fwd_tile")
        );
        assert_eq!(demangle("memcpy"), None);
    }
}

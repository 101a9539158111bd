//! The workspace's shape, checked: crates depend only on crates on lower floors, the testing
//! crate is only ever a dev-dependency, and `unsafe` appears only in resblock-kernels. The
//! floors are those of docs/ARCHITECTURE.md; change both together.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// (crate, floor): a crate may depend on crates of lower floors only.
const FLOORS: &[(&str, u8)] = &[
    ("resblock-kernels", 0),
    ("resblock-io", 0),
    ("resblock-core", 1),
    ("resblock-vision", 2),
    ("resblock-train", 3),
    ("resblock-onnx", 3),
    ("resblock-examples", 4),
    ("resblock-benches", 5),
    ("resblock-fuzz", 5),
];

/// The only crate allowed to contain `unsafe` code.
const UNSAFE_CRATE: &str = "crates/resblock-kernels";

fn floor(name: &str) -> Option<u8> {
    FLOORS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Checks dependency directions (from `cargo metadata`) and where `unsafe` appears.
pub fn check(cargo: Command, root: &Path) -> Result<()> {
    let mut cmd = cargo;
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = cmd.output().context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut problems = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let name = pkg["name"].as_str().unwrap_or_default();
        for dep in pkg["dependencies"].as_array().into_iter().flatten() {
            let dname = dep["name"].as_str().unwrap_or_default();
            if !dname.starts_with("resblock-") {
                continue;
            }
            let dev = dep["kind"].as_str() == Some("dev");
            if dname == "resblock-testing" {
                if !dev {
                    problems.push(format!(
                        "{name} depends on resblock-testing outside dev-dependencies"
                    ));
                }
                continue;
            }
            match (floor(name), floor(dname)) {
                (Some(a), Some(b)) if b < a || (dev && b <= a && name != dname) => {}
                (Some(_), Some(_)) => problems.push(format!(
                    "{name} depends on {dname}{}: a crate may only depend on lower floors",
                    if dev { " (dev)" } else { "" }
                )),
                (None, _) if name == "xtask" || name == "resblock-testing" => problems.push(
                    format!("{name} depends on {dname}: it must stay independent of the libraries"),
                ),
                _ => problems.push(format!("{name} -> {dname}: add both to xtask's FLOORS")),
            }
        }
    }
    let mut files = Vec::new();
    collect_rs(root, &mut files)?;
    for f in files {
        let rel = f.strip_prefix(root).unwrap_or(&f);
        if rel.starts_with(UNSAFE_CRATE) || rel.starts_with("target") {
            continue;
        }
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            let code = code_of(line);
            if code.contains("unsafe ") || code.contains("unsafe{") {
                problems.push(format!(
                    "{}:{}: unsafe code outside {UNSAFE_CRATE}",
                    rel.display(),
                    i + 1
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "the workspace's shape is broken:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if p.is_dir() {
            if !(name.starts_with('.') || name == "target") {
                collect_rs(&p, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// A line without its comment and with string literals emptied (a rough lexer: enough for
/// this workspace's code, which has no `unsafe` in raw strings or block comments).
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let (mut in_str, mut escaped) = (false, false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

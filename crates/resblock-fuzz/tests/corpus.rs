//! Replays every committed fuzz input as an ordinary test: the seed corpora
//! (`fuzz/corpus/<target>/`) and every input the fuzzer once crashed on
//! (`fuzz/regressions/<target>/`). A panic anywhere fails the test. Seeds named `ok-*` are
//! valid files and must load; regressions and seeds named `bad-*` must give an error
//! (never a panic) whose message is not empty. Everything runs in one test function, under
//! an allocation cap.

use std::alloc::System;
use std::path::{Path, PathBuf};

use cap::Cap;

/// Each input runs with at most 256 MiB of new allocations: an input that makes a reader
/// believe a huge claim (libFuzzer's `-malloc_limit_mb` finds these) aborts the test.
#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

fn capped<T>(f: impl FnOnce() -> T) -> T {
    let _ = ALLOC.set_limit(ALLOC.allocated() + (256 << 20));
    let out = f();
    let _ = ALLOC.set_limit(usize::MAX);
    out
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

#[test]
fn every_target_has_a_seed_corpus_with_valid_and_broken_files() {
    for (name, _) in resblock_fuzz::TARGETS {
        let seeds = inputs(&root().join("corpus").join(name));
        let named = |prefix: &str| {
            seeds.iter().any(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
        };
        assert!(named("ok-"), "fuzz/corpus/{name} has no ok-* seed");
        assert!(named("bad-"), "fuzz/corpus/{name} has no bad-* seed");
        assert!(
            root()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
    }
}

#[test]
fn seeds_and_regressions_give_results_or_errors_never_panics() {
    let mut replayed = 0;
    for (name, target) in resblock_fuzz::TARGETS {
        for kind in ["corpus", "regressions"] {
            for path in inputs(&root().join(kind).join(name)) {
                let bytes = std::fs::read(&path).expect("readable input");
                let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let out = capped(|| target(&bytes));
                replayed += 1;
                if kind == "corpus" && file.starts_with("ok-") {
                    assert!(out.is_ok(), "{}: {out:?}", path.display());
                }
                if kind == "regressions" || file.starts_with("bad-") {
                    let err = out.expect_err(&format!("{} must be refused", path.display()));
                    assert!(!err.trim().is_empty(), "{}: empty error", path.display());
                }
            }
        }
    }
    assert!(replayed >= 2 * resblock_fuzz::TARGETS.len());
}

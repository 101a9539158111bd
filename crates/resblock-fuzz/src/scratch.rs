//! Where a target puts its input: a folder per process and thread under the system's
//! temporary directory (a RAM disk on most machines), reused for every input.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

thread_local! {
    static DIR: OnceCell<PathBuf> = const { OnceCell::new() };
}

/// This thread's scratch folder, emptied of `name` and its siblings' leftovers by the
/// caller writing over them.
pub fn dir() -> PathBuf {
    DIR.with(|d| {
        d.get_or_init(|| {
            let p = std::env::temp_dir().join(format!(
                "resblock-fuzz-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            p
        })
        .clone()
    })
}

/// Writes `bytes` to `dir()/name` (creating parent folders) and returns the path.
pub fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir().join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
    }
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

/// Links `from` to `dir()/name` (replacing it), so one input can fill several files.
pub fn link(from: &Path, name: &str) -> PathBuf {
    let p = dir().join(name);
    let _ = std::fs::remove_file(&p);
    std::fs::hard_link(from, &p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

//! Where downloaded things are kept.

use std::path::PathBuf;

/// The project's cache folder (not created): `$RESBLOCK_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/resblock`, else `~/.cache/resblock`. Weights go in its `weights/`.
pub fn cache_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("RESBLOCK_CACHE_DIR") {
        return d;
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return d.join("resblock");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/resblock")
}

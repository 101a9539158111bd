//! Writing a file so that it is either its old or its complete new content, never half of
//! either: a temporary file in the same directory, fsync, rename, fsync of the directory.
//! Every file the project writes (weights, model files, checkpoints, metrics) goes through
//! [`write_atomic`].

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (see the module docs). The temporary file is removed
/// on failure.
///
/// # Errors
/// An unwritable destination; the message is the I/O error (the caller names the path).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory entry is.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("resblock-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("f.bin");
        write_atomic(&p, b"first, longer content")?;
        write_atomic(&p, b"second")?;
        assert_eq!(std::fs::read(&p)?, b"second");
        let names: Vec<_> = std::fs::read_dir(&dir)?.filter_map(|e| e.ok()).collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
        // A destination in a missing directory fails and creates nothing.
        assert!(write_atomic(&dir.join("missing/f.bin"), b"x").is_err());
        std::fs::remove_dir_all(&dir)
    }
}

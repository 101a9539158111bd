//! Streaming a URL into a file while hashing it (`ureq`).

use std::io::{Read, Write};
use std::path::Path;

use crate::hash::Hasher;

/// Streams `url` into `path` (created or truncated, synced), returning the SHA-256 of
/// what was written. The caller checks the digest and renames the file into place.
///
/// # Errors
/// The connection's or the file's error, as text (the caller names the URL and the file).
pub fn fetch_to_file(url: &str, path: &Path) -> Result<String, String> {
    let mut resp = ureq::get(url).call().map_err(|e| e.to_string())?;
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut out = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    out.sync_all().map_err(|e| e.to_string())?;
    Ok(h.hex())
}

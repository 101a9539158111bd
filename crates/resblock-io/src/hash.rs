//! SHA-256, as lower-case hex: the one implementation (the `sha2` crate) every checksum in
//! the project uses (dataset files, `SHA256SUMS`, downloaded weights).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes`, lower-case hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The SHA-256 of a file, lower-case hex, read in 64 KiB pieces.
///
/// # Errors
/// An unreadable file (the caller names it).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Incremental hashing for [`crate::fetch`].
pub(crate) struct Hasher(Sha256);

impl Hasher {
    pub(crate) fn new() -> Self {
        Self(Sha256::new())
    }
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub(crate) fn hex(self) -> String {
        hex(&self.0.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() -> std::io::Result<()> {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_bytes(b"abc"), abc);
        let p = std::env::temp_dir().join(format!("resblock-io-hash-{}", std::process::id()));
        std::fs::write(&p, b"abc")?;
        assert_eq!(sha256_file(&p)?, abc);
        std::fs::remove_file(&p)?;
        Ok(())
    }
}

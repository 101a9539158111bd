//! MNIST / Fashion-MNIST IDX files, raw or gzip-compressed, and SHA-256 checksums.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::ImageDataset;
use crate::error::{Error, Result};

fn fail(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| fail(path, e.to_string()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| fail(path, format!("corrupt gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn header(path: &Path, bytes: &[u8], magic: u32, dims: usize) -> Result<Vec<usize>> {
    let need = 4 + 4 * dims;
    if bytes.len() < need {
        return Err(fail(
            path,
            format!(
                "file is too short for an IDX header ({} bytes)",
                bytes.len()
            ),
        ));
    }
    let word = |i: usize| {
        u32::from_be_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
    let found = word(0);
    if found != magic {
        return Err(fail(
            path,
            format!("wrong magic number 0x{found:08x}, expected 0x{magic:08x}"),
        ));
    }
    Ok((1..=dims).map(|i| word(i) as usize).collect())
}

/// Reads an IDX image file (magic 0x00000803): returns (pixels, count, rows, cols).
///
/// # Errors
/// A missing file, wrong magic, or a file shorter than its header says.
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let bytes = read_maybe_gz(path)?;
    let d = header(path, &bytes, 0x0000_0803, 3)?;
    let (n, r, c) = (d[0], d[1], d[2]);
    let want = n
        .checked_mul(r)
        .and_then(|v| v.checked_mul(c))
        .ok_or_else(|| fail(path, "header sizes overflow"))?;
    let data = &bytes[16..];
    if data.len() != want {
        return Err(fail(
            path,
            format!(
                "expected {n} images of {r}x{c} ({want} bytes), found {} bytes",
                data.len()
            ),
        ));
    }
    Ok((data.to_vec(), n, r, c))
}

/// Reads an IDX label file (magic 0x00000801).
///
/// # Errors
/// A missing file, wrong magic, or a length that does not match the header.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gz(path)?;
    let n = header(path, &bytes, 0x0000_0801, 1)?[0];
    let data = &bytes[8..];
    if data.len() != n {
        return Err(fail(
            path,
            format!("expected {n} labels, found {} bytes", data.len()),
        ));
    }
    Ok(data.to_vec())
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(fail(
        &dir.join(stem),
        format!(
            "not found (nor {stem}.gz): put MNIST's files (train-images-idx3-ubyte, ...) in {}",
            dir.display()
        ),
    ))
}

/// Reads MNIST (or Fashion-MNIST) from `dir` with MNIST's file names, raw or `.gz`:
/// returns (train, test) with 10 classes.
///
/// # Errors
/// Missing or malformed files, counts that differ between images and labels, labels >= 10.
pub fn read_mnist(dir: &Path) -> Result<(ImageDataset, ImageDataset)> {
    let split = |img: &str, lbl: &str| -> Result<ImageDataset> {
        let ip = find(dir, img)?;
        let lp = find(dir, lbl)?;
        let (pixels, n, h, w) = read_idx_images(&ip)?;
        let labels = read_idx_labels(&lp)?;
        if labels.len() != n {
            return Err(fail(
                &lp,
                format!("{} labels for {n} images in {}", labels.len(), ip.display()),
            ));
        }
        let ds = ImageDataset {
            pixels,
            labels: labels.into_iter().map(u32::from).collect(),
            channels: 1,
            height: h,
            width: w,
            num_classes: 10,
            class_names: (0..10).map(|d| d.to_string()).collect(),
            sources: Vec::new(),
        };
        ds.validate(&lp.display().to_string())?;
        Ok(ds)
    };
    Ok((
        split("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
    ))
}

/// Checks every file listed in `dir/SHA256SUMS` (`<hex>  <name>` lines).
///
/// # Errors
/// A missing list or file, or a checksum mismatch naming the file.
pub fn verify_sha256sums(dir: &Path) -> Result<()> {
    let list = dir.join("SHA256SUMS");
    let text = std::fs::read_to_string(&list).map_err(|e| fail(&list, e.to_string()))?;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let (Some(want), Some(name)) = (parts.next(), parts.next()) else {
            return Err(fail(&list, format!("malformed line {line:?}")));
        };
        let path = dir.join(name.trim_start_matches('*'));
        let bytes = std::fs::read(&path).map_err(|e| fail(&path, e.to_string()))?;
        let got = resblock_io::sha256_bytes(&bytes);
        if !got.eq_ignore_ascii_case(want) {
            return Err(fail(
                &path,
                format!("SHA-256 is {got}, {} says {want}", list.display()),
            ));
        }
    }
    Ok(())
}

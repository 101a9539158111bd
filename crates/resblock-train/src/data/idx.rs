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

/// The largest expansion of deflate data: 1032 output bytes per input byte.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// An IDX file opened for reading, gunzipped when it starts with the gzip magic, with the
/// most bytes it can possibly yield (the file's length, or 1032x that for gzip).
fn open(path: &Path) -> Result<(Box<dyn Read>, u64)> {
    let file = std::fs::File::open(path).map_err(|e| fail(path, e.to_string()))?;
    let len = file
        .metadata()
        .map_err(|e| fail(path, e.to_string()))?
        .len();
    let mut reader = std::io::BufReader::new(file);
    let gz = {
        use std::io::BufRead;
        let head = reader.fill_buf().map_err(|e| fail(path, e.to_string()))?;
        head.starts_with(&[0x1f, 0x8b])
    };
    if gz {
        let r = flate2::bufread::GzDecoder::new(reader);
        Ok((Box::new(r), len.saturating_mul(DEFLATE_MAX_RATIO)))
    } else {
        Ok((Box::new(reader), len))
    }
}

fn gz_err(path: &Path, e: &std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        fail(path, "file is too short for an IDX header")
    } else {
        fail(path, format!("cannot read: {e}"))
    }
}

/// Reads the header (`magic`, then `dims` big-endian u32 sizes) and then exactly the
/// `item * product(sizes)` bytes it announces. Announced sizes the file cannot hold are
/// refused before any buffer is allocated for them (a 16-byte file claiming 10^12 images
/// is an error, not a 10^12-byte allocation).
fn read_idx(
    path: &Path,
    magic: u32,
    dims: usize,
    describe: fn(&[usize]) -> String,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let (mut r, can_hold) = open(path)?;
    let mut head = vec![0u8; 4 + 4 * dims];
    r.read_exact(&mut head).map_err(|e| gz_err(path, &e))?;
    let word = |i: usize| {
        u32::from_be_bytes([
            head[4 * i],
            head[4 * i + 1],
            head[4 * i + 2],
            head[4 * i + 3],
        ])
    };
    let found = word(0);
    if found != magic {
        return Err(fail(
            path,
            format!("wrong magic number 0x{found:08x}, expected 0x{magic:08x}"),
        ));
    }
    let sizes: Vec<usize> = (1..=dims).map(|i| word(i) as usize).collect();
    let want = sizes
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| fail(path, "header sizes overflow"))?;
    let room = can_hold.saturating_sub(head.len() as u64);
    if want > room {
        return Err(fail(
            path,
            format!(
                "the header announces {} ({want} bytes of data), more than the file can hold ({room} bytes)",
                describe(&sizes)
            ),
        ));
    }
    let mut data = Vec::with_capacity(want.min(room) as usize);
    r.take(want + 1)
        .read_to_end(&mut data)
        .map_err(|e| fail(path, format!("corrupt data: {e}")))?;
    if data.len() as u64 != want {
        return Err(fail(
            path,
            format!(
                "the header announces {} ({want} bytes of data), {} found",
                describe(&sizes),
                if data.len() as u64 > want {
                    "more bytes were".to_string()
                } else {
                    format!("only {} bytes were", data.len())
                }
            ),
        ));
    }
    Ok((sizes, data))
}

/// Reads an IDX image file (magic 0x00000803): returns (pixels, count, rows, cols).
///
/// # Errors
/// A missing file, wrong magic, or a file whose length differs from what its header says
/// (refused before allocating when the header claims more than the file can hold).
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let (d, data) = read_idx(path, 0x0000_0803, 3, |d| {
        format!("{} images of {}x{}", d[0], d[1], d[2])
    })?;
    Ok((data, d[0], d[1], d[2]))
}

/// Reads an IDX label file (magic 0x00000801).
///
/// # Errors
/// A missing file, wrong magic, or a length that does not match the header.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    Ok(read_idx(path, 0x0000_0801, 1, |d| format!("{} labels", d[0]))?.1)
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

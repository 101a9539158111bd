//! CIFAR-10 and CIFAR-100 in their official binary layouts (`cifar-10-batches-bin`,
//! `cifar-100-binary`).

use std::path::{Path, PathBuf};

use super::ImageDataset;
use crate::error::{Error, Result};

/// Which CIFAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// 10 classes; records are 1 label byte + 3072 pixel bytes.
    Cifar10,
    /// 100 classes; records are coarse + fine label bytes + 3072 pixel bytes (the fine
    /// label is used).
    Cifar100,
}

fn fail(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn read_records(path: &Path, kind: CifarKind, ds: &mut ImageDataset) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| fail(path, e.to_string()))?;
    let label_bytes = if kind == CifarKind::Cifar10 { 1 } else { 2 };
    let rec = label_bytes + 3072;
    if bytes.is_empty() || bytes.len() % rec != 0 {
        return Err(fail(
            path,
            format!(
                "{} bytes is not a whole number of {rec}-byte records",
                bytes.len()
            ),
        ));
    }
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let label = r[label_bytes - 1] as u32;
        if label as usize >= ds.num_classes {
            return Err(fail(
                path,
                format!(
                    "record {i} has label {label}, out of range for {} classes",
                    ds.num_classes
                ),
            ));
        }
        ds.labels.push(label);
        ds.pixels.extend_from_slice(&r[label_bytes..]);
    }
    Ok(())
}

/// Reads CIFAR from `dir` (the unpacked `cifar-10-batches-bin` / `cifar-100-binary` folder,
/// or its parent): returns (train, test).
///
/// # Errors
/// Missing files (the message says where to put them), truncated files, labels out of range.
pub fn read_cifar(dir: &Path, kind: CifarKind) -> Result<(ImageDataset, ImageDataset)> {
    let (sub, train_files, test_file, classes): (&str, Vec<String>, &str, usize) = match kind {
        CifarKind::Cifar10 => (
            "cifar-10-batches-bin",
            (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            "test_batch.bin",
            10,
        ),
        CifarKind::Cifar100 => (
            "cifar-100-binary",
            vec!["train.bin".into()],
            "test.bin",
            100,
        ),
    };
    let base: PathBuf = if dir.join(test_file).is_file() {
        dir.to_path_buf()
    } else {
        dir.join(sub)
    };
    let class_names = class_names(&base, kind, classes);
    let empty = || ImageDataset {
        pixels: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: 32,
        width: 32,
        num_classes: classes,
        class_names: class_names.clone(),
        sources: Vec::new(),
    };
    let load = |files: &[String]| -> Result<ImageDataset> {
        let mut ds = empty();
        for f in files {
            let p = base.join(f);
            if !p.is_file() {
                return Err(fail(
                    &p,
                    format!(
                        "not found: unpack the official {sub} archive into {}",
                        dir.display()
                    ),
                ));
            }
            read_records(&p, kind, &mut ds)?;
        }
        Ok(ds)
    };
    Ok((load(&train_files)?, load(&[test_file.to_string()])?))
}

/// CIFAR-10's class names (fixed by the dataset); CIFAR-100's from the archive's
/// `fine_label_names.txt` when it is there, else `class i`.
fn class_names(base: &Path, kind: CifarKind, classes: usize) -> Vec<String> {
    const CIFAR10: [&str; 10] = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    let listed = |file: &str| -> Option<Vec<String>> {
        let text = std::fs::read_to_string(base.join(file)).ok()?;
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        (names.len() == classes).then_some(names)
    };
    match kind {
        CifarKind::Cifar10 => CIFAR10.iter().map(|s| s.to_string()).collect(),
        CifarKind::Cifar100 => listed("fine_label_names.txt")
            .unwrap_or_else(|| (0..classes).map(|i| format!("class {i}")).collect()),
    }
}

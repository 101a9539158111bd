//! Fetching MNIST and CIFAR-10/100 from their official locations: SHA-256 verified, written
//! atomically, CIFAR's tarballs unpacked.
//!
//! ```no_run
//! use resblock_train::data::{download, read_mnist, RemoteDataset};
//! let dir = std::path::Path::new("data/mnist");
//! download(&RemoteDataset::mnist(), dir, None)?;
//! let (train, test) = read_mnist(dir)?;
//! # Ok::<(), resblock_train::Error>(())
//! ```

use std::fs;
use std::path::Path;

use resblock_io::fetch_to_file;

use crate::error::{Error, Result};

fn data_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// What to do with a file once it is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpack {
    /// Keep it as it is (MNIST's `.gz` files: the IDX reader reads them directly).
    Keep,
    /// Extract a `.tar.gz` into the directory (CIFAR's `*-binary.tar.gz`).
    TarGz,
}

/// One file of a dataset: its name at the mirror and in the directory, and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name (appended to each base URL).
    pub name: String,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
    /// What to do with it after verification.
    pub unpack: Unpack,
}

/// A downloadable dataset: base URLs tried in order, and its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDataset {
    /// Short name (`mnist`, `cifar10`, `cifar100`).
    pub name: String,
    /// Base URLs ending in `/`, tried in order for each file.
    pub base_urls: Vec<String>,
    /// The files.
    pub files: Vec<RemoteFile>,
    /// A path (relative to the directory) whose presence means the data is in place, e.g.
    /// CIFAR's unpacked test batch.
    pub ready_marker: Vec<String>,
}

fn file(name: &str, sha256: &str, unpack: Unpack) -> RemoteFile {
    RemoteFile {
        name: name.into(),
        sha256: sha256.into(),
        unpack,
    }
}

impl RemoteDataset {
    /// MNIST's four `.gz` files, from the mirrors torchvision and TensorFlow Datasets use
    /// (the original site is often unavailable). Checksums as TensorFlow Datasets records
    /// them.
    pub fn mnist() -> Self {
        let names = [
            (
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ];
        RemoteDataset {
            name: "mnist".into(),
            base_urls: vec![
                "https://ossci-datasets.s3.amazonaws.com/mnist/".into(),
                "https://storage.googleapis.com/cvdf-datasets/mnist/".into(),
            ],
            files: names
                .iter()
                .map(|(n, h)| file(n, h, Unpack::Keep))
                .collect(),
            ready_marker: names.iter().map(|(n, _)| n.to_string()).collect(),
        }
    }

    /// CIFAR-10's binary version (`cifar-10-binary.tar.gz`, unpacked to
    /// `cifar-10-batches-bin/`).
    pub fn cifar10() -> Self {
        RemoteDataset {
            name: "cifar10".into(),
            base_urls: vec!["https://www.cs.toronto.edu/~kriz/".into()],
            files: vec![file(
                "cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                Unpack::TarGz,
            )],
            ready_marker: vec!["cifar-10-batches-bin/test_batch.bin".into()],
        }
    }

    /// CIFAR-100's binary version (`cifar-100-binary.tar.gz`, unpacked to
    /// `cifar-100-binary/`).
    pub fn cifar100() -> Self {
        RemoteDataset {
            name: "cifar100".into(),
            base_urls: vec!["https://www.cs.toronto.edu/~kriz/".into()],
            files: vec![file(
                "cifar-100-binary.tar.gz",
                "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                Unpack::TarGz,
            )],
            ready_marker: vec!["cifar-100-binary/test.bin".into()],
        }
    }

    /// The dataset by name: `mnist`, `cifar10` or `cifar100`.
    ///
    /// # Errors
    /// Any other name.
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "mnist" => Ok(Self::mnist()),
            "cifar10" => Ok(Self::cifar10()),
            "cifar100" => Ok(Self::cifar100()),
            _ => Err(Error::config(format!(
                "no download for {name:?}: expected mnist, cifar10 or cifar100"
            ))),
        }
    }

    /// Whether `dir` already holds the (unpacked) data.
    pub fn is_present(&self, dir: &Path) -> bool {
        self.ready_marker.iter().all(|m| dir.join(m).is_file())
    }

    /// The sentence telling a user without network where to put the files.
    fn manual_hint(&self, dir: &Path, urls: &[String]) -> String {
        let names: Vec<&str> = self.files.iter().map(|f| f.name.as_str()).collect();
        format!(
            "without network, fetch {} from {} yourself and put {} in {}{}",
            names.join(", "),
            urls.join(" or "),
            if names.len() == 1 { "it" } else { "them" },
            dir.display(),
            if self.files.iter().any(|f| f.unpack == Unpack::TarGz) {
                " (unpacked or not; --download unpacks it)"
            } else {
                ""
            }
        )
    }
}

/// Lower-case hex SHA-256 of a file ([`resblock_io::sha256_file`], naming the file on error).
///
/// # Errors
/// An unreadable file.
pub fn sha256_file(path: &Path) -> Result<String> {
    resblock_io::sha256_file(path).map_err(|e| data_err(path, e))
}

/// Downloads `ds` into `dir` (created if needed) unless it is already there, verifying every
/// file's SHA-256 and unpacking tarballs. `mirror` (a base URL such as
/// `http://127.0.0.1:8000/`) replaces the official URLs. Files already present with the
/// right checksum are not fetched again; a download goes to a temporary file and is renamed
/// only once verified, so a failure never leaves a partial or wrong file under the real
/// name.
///
/// # Errors
/// No mirror reachable (the message says which files to put where), a checksum mismatch
/// (naming the file and both digests), or a corrupt archive.
pub fn download(ds: &RemoteDataset, dir: &Path, mirror: Option<&str>) -> Result<()> {
    if ds.is_present(dir) {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| data_err(dir, e))?;
    let urls: Vec<String> = match mirror {
        Some(m) if m.ends_with('/') => vec![m.to_string()],
        Some(m) => vec![format!("{m}/")],
        None => ds.base_urls.clone(),
    };
    for f in &ds.files {
        let target = dir.join(&f.name);
        let have = target.is_file() && sha256_file(&target)? == f.sha256;
        if !have {
            fetch_verified(ds, f, &urls, dir, &target)?;
        }
        if f.unpack == Unpack::TarGz {
            untar_gz(&target, dir)?;
        }
    }
    if !ds.is_present(dir) {
        return Err(Error::Data {
            path: dir.display().to_string(),
            msg: format!(
                "downloaded {} but {} is missing afterwards",
                ds.name,
                ds.ready_marker.join(", ")
            ),
        });
    }
    Ok(())
}

/// Fetches one file from the first base URL that serves it, checking its SHA-256.
fn fetch_verified(
    ds: &RemoteDataset,
    f: &RemoteFile,
    urls: &[String],
    dir: &Path,
    target: &Path,
) -> Result<()> {
    let part = dir.join(format!(".{}.part", f.name));
    let mut failures = Vec::new();
    for base in urls {
        let url = format!("{base}{}", f.name);
        match fetch_to_file(&url, &part) {
            Ok(digest) if digest == f.sha256 => {
                fs::rename(&part, target).map_err(|e| data_err(target, e))?;
                return Ok(());
            }
            Ok(digest) => {
                let _ = fs::remove_file(&part);
                return Err(Error::Data {
                    path: target.display().to_string(),
                    msg: format!(
                        "{url} has SHA-256 {digest}, expected {}: not using it",
                        f.sha256
                    ),
                });
            }
            Err(e) => {
                let _ = fs::remove_file(&part);
                failures.push(format!("{url}: {e}"));
            }
        }
    }
    Err(Error::Data {
        path: target.display().to_string(),
        msg: format!(
            "could not download {} ({}); {}",
            f.name,
            failures.join("; "),
            ds.manual_hint(dir, urls)
        ),
    })
}

/// Extracts a `.tar.gz` into `dir` (the tar crate refuses entries that escape it).
fn untar_gz(archive: &Path, dir: &Path) -> Result<()> {
    let f = fs::File::open(archive).map_err(|e| data_err(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    tar.unpack(dir)
        .map_err(|e| data_err(archive, format!("cannot unpack: {e}")))
}

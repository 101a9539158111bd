//! `--data SPEC`: which dataset a program reads, shared by `train`, `evaluate` and anything
//! else that takes the flag. `mnist-10k` (the bundled digits), `mnist:DIR`, `cifar10:DIR`,
//! `cifar100:DIR` or `folder:DIR` (`DIR/train/<class>/*` and `DIR/test` or `DIR/val`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{read_cifar, read_mnist, verify_sha256sums, CifarKind, Dataset, ImageFolder};
use crate::error::{Error, Result};

/// The kinds of dataset `--data` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// The bundled MNIST-10k (`data/mnist-10k`, checked against its SHA-256 sums).
    BundledMnist,
    /// MNIST-format IDX files in a folder.
    Mnist,
    /// CIFAR-10 binary.
    Cifar10,
    /// CIFAR-100 binary.
    Cifar100,
    /// An image folder.
    Folder,
}

/// A parsed `--data` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSpec {
    /// The kind.
    pub kind: DataKind,
    /// Its folder (the bundled one for [`DataKind::BundledMnist`]).
    pub dir: PathBuf,
    /// The text it was parsed from (for messages and metadata).
    pub text: String,
}

/// Which split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training split.
    Train,
    /// The test split (`test/`, or `val/` for folders).
    Test,
}

/// The bundled MNIST-10k digits, at the workspace root.
pub fn bundled_mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist-10k")
}

impl DataSpec {
    /// Parses `mnist-10k`, `mnist:DIR`, `cifar10:DIR`, `cifar100:DIR` or `folder:DIR`.
    ///
    /// # Errors
    /// Anything else, with the accepted forms in the message.
    pub fn parse(spec: &str) -> Result<Self> {
        let (kind, dir) = match spec.split_once(':') {
            Some((k, d)) if !d.is_empty() => (k, PathBuf::from(d)),
            _ => (spec, PathBuf::new()),
        };
        let kind = match (kind, dir.as_os_str().is_empty()) {
            ("mnist-10k", true) => DataKind::BundledMnist,
            ("mnist", false) => DataKind::Mnist,
            ("cifar10", false) => DataKind::Cifar10,
            ("cifar100", false) => DataKind::Cifar100,
            ("folder", false) => DataKind::Folder,
            _ => {
                return Err(Error::config(format!(
                    "unknown --data {spec:?}: expected mnist-10k, mnist:DIR, cifar10:DIR, cifar100:DIR or folder:DIR"
                )))
            }
        };
        let dir = if kind == DataKind::BundledMnist {
            bundled_mnist_dir()
        } else {
            dir
        };
        Ok(Self {
            kind,
            dir,
            text: spec.to_string(),
        })
    }

    /// The name the downloader knows this dataset by, if it can fetch it.
    pub fn remote_name(&self) -> Option<&'static str> {
        match self.kind {
            DataKind::Mnist => Some("mnist"),
            DataKind::Cifar10 => Some("cifar10"),
            DataKind::Cifar100 => Some("cifar100"),
            DataKind::BundledMnist | DataKind::Folder => None,
        }
    }

    /// Opens (train, test). MNIST and CIFAR are read into memory; a folder is opened
    /// lazily ([`ImageFolder`]: file lists in memory, images decoded as batches are made).
    /// `image_size` resizes folder images as they are decoded (the other formats have one
    /// size; resize them with [`super::Transform::Resize`]).
    ///
    /// # Errors
    /// The readers' errors (missing, corrupt or inconsistent files, naming them); for
    /// folders, test images whose shape differs from the training ones.
    pub fn load(&self, image_size: Option<usize>) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
        let boxed = |(a, b): (super::ImageDataset, super::ImageDataset)| -> (Arc<dyn Dataset>, Arc<dyn Dataset>) {
            (Arc::new(a), Arc::new(b))
        };
        match self.kind {
            DataKind::BundledMnist => {
                verify_sha256sums(&self.dir)?;
                read_mnist(&self.dir).map(boxed)
            }
            DataKind::Mnist => read_mnist(&self.dir).map(boxed),
            DataKind::Cifar10 => read_cifar(&self.dir, CifarKind::Cifar10).map(boxed),
            DataKind::Cifar100 => read_cifar(&self.dir, CifarKind::Cifar100).map(boxed),
            DataKind::Folder => {
                let train = ImageFolder::open(&self.dir.join("train"), image_size, None)?;
                let test = ImageFolder::open(
                    &self.folder_test_dir()?,
                    image_size,
                    Some(&train.class_names()),
                )?;
                if test.shape() != train.shape() {
                    return Err(Error::Data {
                        path: self.dir.display().to_string(),
                        msg: format!(
                            "test images are {:?} but training images are {:?}: pass --image-size",
                            test.shape(),
                            train.shape()
                        ),
                    });
                }
                Ok((Arc::new(train), Arc::new(test)))
            }
        }
    }

    /// Opens one split (for folders without listing the other).
    ///
    /// # Errors
    /// As [`DataSpec::load`].
    pub fn load_split(&self, split: Split, image_size: Option<usize>) -> Result<Arc<dyn Dataset>> {
        if self.kind == DataKind::Folder {
            let dir = match split {
                Split::Train => self.dir.join("train"),
                Split::Test => self.folder_test_dir()?,
            };
            return Ok(Arc::new(ImageFolder::open(&dir, image_size, None)?));
        }
        let (train, test) = self.load(image_size)?;
        Ok(match split {
            Split::Train => train,
            Split::Test => test,
        })
    }

    /// A folder dataset's test split: `DIR/test`, else `DIR/val`.
    ///
    /// # Errors
    /// Neither exists.
    pub fn folder_test_dir(&self) -> Result<PathBuf> {
        ["test", "val"]
            .iter()
            .map(|s| self.dir.join(s))
            .find(|p| p.is_dir())
            .ok_or_else(|| Error::Data {
                path: self.dir.display().to_string(),
                msg: "needs a test/ or val/ folder beside train/".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_others() -> Result<()> {
        assert_eq!(DataSpec::parse("mnist-10k")?.kind, DataKind::BundledMnist);
        let f = DataSpec::parse("folder:/x/y")?;
        assert_eq!((f.kind, f.dir), (DataKind::Folder, PathBuf::from("/x/y")));
        assert_eq!(
            DataSpec::parse("cifar100:d")?.remote_name(),
            Some("cifar100")
        );
        for bad in ["mnist", "folder:", "imagenet:/x", "mnist-10k:/x", ""] {
            let e = DataSpec::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("unknown --data"), "{e}");
        }
        Ok(())
    }
}

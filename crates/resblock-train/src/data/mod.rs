//! Data: datasets, transforms, a streaming multi-threaded loader, and readers for MNIST
//! (IDX), CIFAR-10/100 (binary) and image folders.
//!
//! A [`Dataset`] gives sample `i` as a `u8` CHW buffer with a class label. MNIST and CIFAR
//! are small and held decoded in memory ([`ImageDataset`]); an [`ImageFolder`] holds only
//! its file list and decodes a sample when it is asked for, so its memory does not grow with
//! the number of images. The [`DataLoader`] shuffles with a permutation that depends only
//! on (seed, epoch), applies a [`Transform`] pipeline whose randomness depends only on
//! (seed, epoch, sample index), and assembles batches on background worker threads into a
//! bounded queue while the model trains, delivering them in order: a resumed run sees
//! exactly the batches of an uninterrupted one, and a streamed folder exactly the batches of
//! the same folder decoded up front.

mod adapt;
pub mod autoaugment;
mod cifar;
#[cfg(feature = "download")]
mod download;
pub mod erasing;
mod folder;
mod idx;
mod loader;
pub mod mix;
pub mod rrc;
mod shard;
mod source;
mod spec;
mod subset;
mod transform;

pub use adapt::ReplicateChannels;
pub use cifar::{read_cifar, CifarKind};
#[cfg(feature = "download")]
pub use download::{download, sha256_file, RemoteDataset, RemoteFile, Unpack};
pub use folder::{
    decode_image, is_image_file, list_image_folder, read_image_folder, FolderListing, ImageFolder,
};
pub use idx::{read_idx_images, read_idx_labels, read_mnist, verify_sha256sums};
pub use loader::DataLoader;
pub use shard::Shard;
pub use source::{Batch, BatchSource, FixedBatches};
pub use spec::{bundled_mnist_dir, DataKind, DataSpec, Split};
pub use subset::{split_validation, Subset};
pub use transform::Transform;

use crate::error::{Error, Result};

/// Images of one size with class labels, decoded into memory.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    /// Pixel data, `len * channels * height * width` bytes, CHW per image.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Channels (1 grayscale, 3 RGB).
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Number of classes (labels are below it).
    pub num_classes: usize,
    /// Class names in label order (image folders: the folder names; MNIST: the digits;
    /// CIFAR: the dataset's names).
    pub class_names: Vec<String>,
    /// Where each sample came from (image folders: the file path), for reports; empty
    /// for formats without one file per sample.
    pub sources: Vec<std::path::PathBuf>,
}

/// A dataset of labelled images, read one sample at a time (from memory or from disk; the
/// [`DataLoader`] calls it from several threads).
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// (channels, height, width) of every sample.
    fn shape(&self) -> (usize, usize, usize);
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// Class names in label order (`class i` where the format has none).
    fn class_names(&self) -> Vec<String> {
        (0..self.num_classes())
            .map(|i| format!("class {i}"))
            .collect()
    }
    /// Sample `i`'s source for reports: its file, or `sample i` when the format has none.
    fn source(&self, i: usize) -> String {
        format!("sample {i}")
    }
    /// Sample `i`: its pixels (CHW, `u8`) and its label.
    ///
    /// # Errors
    /// An index out of range; for datasets on disk an unreadable or undecodable file,
    /// naming it.
    fn pixels(&self, i: usize) -> Result<(Vec<u8>, u32)>;
    /// Sample `i`: pixels scaled to [0, 1] (CHW) and its label.
    ///
    /// # Errors
    /// As [`Dataset::pixels`].
    fn get(&self, i: usize) -> Result<(Vec<f32>, u32)> {
        let (px, label) = self.pixels(i)?;
        Ok((px.iter().map(|&b| f32::from(b) / 255.).collect(), label))
    }
}

impl ImageDataset {
    /// Checks that the buffers agree and every label is in range.
    ///
    /// # Errors
    /// Inconsistent sizes or a label out of range, naming `what` (the source file or folder).
    pub fn validate(&self, what: &str) -> Result<()> {
        let per = self.channels * self.height * self.width;
        if per == 0 || self.pixels.len() != per * self.labels.len() {
            return Err(Error::config(format!(
                "{what}: {} pixel bytes for {} labels of {}x{}x{}",
                self.pixels.len(),
                self.labels.len(),
                self.channels,
                self.height,
                self.width
            )));
        }
        if let Some((i, l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= self.num_classes)
        {
            return Err(Error::config(format!(
                "{what}: label {l} of sample {i} is out of range for {} classes",
                self.num_classes
            )));
        }
        Ok(())
    }
}

impl Dataset for ImageDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn class_names(&self) -> Vec<String> {
        if self.class_names.len() == self.num_classes {
            self.class_names.clone()
        } else {
            (0..self.num_classes)
                .map(|i| format!("class {i}"))
                .collect()
        }
    }
    fn source(&self, i: usize) -> String {
        self.sources
            .get(i)
            .map_or_else(|| format!("sample {i}"), |p| p.display().to_string())
    }
    fn pixels(&self, i: usize) -> Result<(Vec<u8>, u32)> {
        let per = self.channels * self.height * self.width;
        let label = *self
            .labels
            .get(i)
            .ok_or_else(|| Error::config(format!("sample {i} out of range ({})", self.len())))?;
        Ok((self.pixels[i * per..(i + 1) * per].to_vec(), label))
    }
}

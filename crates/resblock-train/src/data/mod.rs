//! Data: datasets, transforms, a multi-threaded loader, and readers for MNIST (IDX),
//! CIFAR-10/100 (binary) and image folders.
//!
//! A [`Dataset`] holds decoded images as `u8` CHW buffers with a class label. The
//! [`DataLoader`] shuffles with a permutation that depends only on (seed, epoch), applies a
//! [`Transform`] pipeline whose randomness depends only on (seed, epoch, sample index), and
//! assembles batches on background worker threads, in order: a resumed run sees exactly the
//! batches of an uninterrupted one.

mod cifar;
#[cfg(feature = "download")]
mod download;
mod folder;
mod idx;
mod loader;
mod source;
mod spec;
mod transform;

pub use cifar::{read_cifar, CifarKind};
#[cfg(feature = "download")]
pub use download::{download, fetch_to_file, sha256_file, RemoteDataset, RemoteFile, Unpack};
pub use folder::{
    decode_image, is_image_file, list_image_folder, read_image_folder, FolderListing,
};
pub use idx::{read_idx_images, read_idx_labels, read_mnist, verify_sha256sums};
pub use loader::DataLoader;
pub use source::{Batch, BatchSource, FixedBatches};
pub use spec::{bundled_mnist_dir, DataKind, DataSpec, Split};
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

/// A dataset of labelled images.
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
    /// Sample `i`: pixels scaled to [0, 1] (CHW) and its label.
    ///
    /// # Errors
    /// An index out of range.
    fn get(&self, i: usize) -> Result<(Vec<f32>, u32)>;
}

impl ImageDataset {
    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1] (the
    /// normalisation `train` uses and records in the model file).
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let per = self.height * self.width;
        let mut sum = vec![0f64; self.channels];
        let mut sq = vec![0f64; self.channels];
        for img in self.pixels.chunks_exact(self.channels * per) {
            for c in 0..self.channels {
                for &p in &img[c * per..(c + 1) * per] {
                    let v = f64::from(p) / 255.;
                    sum[c] += v;
                    sq[c] += v * v;
                }
            }
        }
        let n = (self.labels.len() * per).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| ((q / n - m * m).max(1e-12)).sqrt() as f32)
            .collect();
        (mean.into_iter().map(|m| m as f32).collect(), std)
    }

    /// The dataset with its single channel repeated `channels` times (grayscale images
    /// for a 3-channel network, as torchvision's `Grayscale(3)`).
    ///
    /// # Errors
    /// A dataset that does not have exactly one channel.
    pub fn replicate_channels(self, channels: usize) -> Result<Self> {
        if self.channels != 1 {
            return Err(Error::config(format!(
                "only 1-channel images can be replicated, these have {}",
                self.channels
            )));
        }
        let per = self.height * self.width;
        let mut pixels = Vec::with_capacity(self.pixels.len() * channels);
        for img in self.pixels.chunks_exact(per.max(1)) {
            for _ in 0..channels {
                pixels.extend_from_slice(img);
            }
        }
        Ok(Self {
            pixels,
            channels,
            ..self
        })
    }

    /// Class names in label order: the dataset's, or `class i` where it has none.
    pub fn class_names_or_indices(&self) -> Vec<String> {
        if self.class_names.len() == self.num_classes {
            self.class_names.clone()
        } else {
            (0..self.num_classes)
                .map(|i| format!("class {i}"))
                .collect()
        }
    }

    /// Sample `i`'s source for reports: its file, or `sample i` when the format has none.
    pub fn source(&self, i: usize) -> String {
        self.sources
            .get(i)
            .map_or_else(|| format!("sample {i}"), |p| p.display().to_string())
    }

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
    fn get(&self, i: usize) -> Result<(Vec<f32>, u32)> {
        let per = self.channels * self.height * self.width;
        let label = *self
            .labels
            .get(i)
            .ok_or_else(|| Error::config(format!("sample {i} out of range ({})", self.len())))?;
        let px = self.pixels[i * per..(i + 1) * per]
            .iter()
            .map(|&b| f32::from(b) / 255.)
            .collect();
        Ok((px, label))
    }
}

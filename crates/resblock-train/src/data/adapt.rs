//! Datasets made from other datasets, sample by sample (nothing is copied up front).

use std::sync::Arc;

use super::Dataset;
use crate::error::{Error, Result};

/// A 1-channel dataset with its channel repeated `channels` times: grayscale images for a
/// 3-channel network, as torchvision's `Grayscale(num_output_channels=3)`.
pub struct ReplicateChannels {
    inner: Arc<dyn Dataset>,
    channels: usize,
}

impl ReplicateChannels {
    /// `inner` with every sample's channel repeated `channels` times.
    ///
    /// # Errors
    /// A dataset that does not have exactly one channel.
    pub fn new(inner: Arc<dyn Dataset>, channels: usize) -> Result<Self> {
        let (c, _, _) = inner.shape();
        if c != 1 || channels == 0 {
            return Err(Error::config(format!(
                "only 1-channel images can be replicated (to {channels} channels), these have {c}"
            )));
        }
        Ok(Self { inner, channels })
    }
}

impl Dataset for ReplicateChannels {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        let (_, h, w) = self.inner.shape();
        (self.channels, h, w)
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn source(&self, i: usize) -> String {
        self.inner.source(i)
    }
    fn pixels(&self, i: usize) -> Result<(Vec<u8>, u32)> {
        let (px, label) = self.inner.pixels(i)?;
        Ok((px.repeat(self.channels), label))
    }
}

//! A dataset seen through a list of its indices, and the seeded split of a training set
//! into training and validation parts (`train --val-split F`).

use std::sync::Arc;

use resblock_core::RngHandle;

use super::Dataset;
use crate::error::{Error, Result};

/// The samples `indices` of `inner`, in that order.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// A view of `inner` through `indices`.
    ///
    /// # Errors
    /// An index out of range.
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= inner.len()) {
            return Err(Error::config(format!(
                "subset index {bad} out of range ({} samples)",
                inner.len()
            )));
        }
        Ok(Self { inner, indices })
    }

    /// The indices into the whole dataset.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn source(&self, i: usize) -> String {
        self.indices
            .get(i)
            .map_or_else(|| format!("sample {i}"), |&j| self.inner.source(j))
    }
    fn pixels(&self, i: usize) -> Result<(Vec<u8>, u32)> {
        let j = *self.indices.get(i).ok_or_else(|| {
            Error::config(format!("sample {i} out of range ({})", self.indices.len()))
        })?;
        self.inner.pixels(j)
    }
}

/// Splits `ds` into (training, validation) parts: a seeded shuffle of its indices, the
/// first `round(fraction * len)` (at least one) for validation, the rest for training,
/// each part in the dataset's order. The same seed gives the same split.
///
/// # Errors
/// A fraction outside (0, 1), or a split that leaves either part empty.
pub fn split_validation(
    ds: Arc<dyn Dataset>,
    fraction: f64,
    seed: u64,
) -> Result<(Subset, Subset)> {
    if !(fraction > 0. && fraction < 1.) {
        return Err(Error::config(format!(
            "the validation fraction must be in (0, 1), got {fraction}"
        )));
    }
    let n = ds.len();
    let k = ((fraction * n as f64).round() as usize).max(1);
    if k >= n {
        return Err(Error::config(format!(
            "a validation split of {fraction} leaves no training samples out of {n}"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    RngHandle::seed_from_u64(seed).shuffle(&mut order);
    let mut val = order[..k].to_vec();
    let mut train = order[k..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((Subset::new(ds.clone(), train)?, Subset::new(ds, val)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageDataset;

    fn ds(n: usize) -> Arc<dyn Dataset> {
        Arc::new(ImageDataset {
            pixels: (0..n).map(|i| i as u8).collect(),
            labels: (0..n).map(|i| (i % 3) as u32).collect(),
            channels: 1,
            height: 1,
            width: 1,
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            sources: Vec::new(),
        })
    }

    #[test]
    fn splits_are_disjoint_complete_seeded_and_read_through() -> Result<()> {
        let (t, v) = split_validation(ds(50), 0.1, 7)?;
        assert_eq!((t.len(), v.len()), (45, 5));
        let mut all: Vec<usize> = t.indices().iter().chain(v.indices()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        let (t2, v2) = split_validation(ds(50), 0.1, 7)?;
        assert_eq!((t.indices(), v.indices()), (t2.indices(), v2.indices()));
        let (_, v3) = split_validation(ds(50), 0.1, 8)?;
        assert_ne!(v.indices(), v3.indices());
        // A subset's sample i is the dataset's sample indices[i].
        let j = v.indices()[2];
        assert_eq!(v.pixels(2)?, (vec![j as u8], (j % 3) as u32));
        assert!(v.pixels(5).is_err());
        for bad in [0., 1., -0.5, f64::NAN] {
            assert!(split_validation(ds(50), bad, 0).is_err(), "{bad}");
        }
        assert!(split_validation(ds(1), 0.5, 0).is_err());
        Ok(())
    }
}

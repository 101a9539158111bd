//! Dataset files: MNIST's IDX (raw or gzip), CIFAR-10's binary batches, and one image of an
//! image folder (PNG or JPEG, header read at open, pixels decoded per sample).

use resblock_train::data::{read_cifar, read_idx_images, read_idx_labels, CifarKind, ImageFolder};
use resblock_train::Dataset;

use crate::{scratch, shown, Outcome};

/// An IDX image file (`train-images-idx3-ubyte`, gzipped when it starts with gzip's magic).
pub fn idx_images(bytes: &[u8]) -> Outcome {
    read_idx_images(&scratch::put("images-idx3-ubyte", bytes))
        .map(drop)
        .map_err(shown)
}

/// An IDX label file.
pub fn idx_labels(bytes: &[u8]) -> Outcome {
    read_idx_labels(&scratch::put("labels-idx1-ubyte", bytes))
        .map(drop)
        .map_err(shown)
}

/// The same bytes as each of CIFAR-10's six batch files.
pub fn cifar10(bytes: &[u8]) -> Outcome {
    let test = scratch::put("cifar/test_batch.bin", bytes);
    for i in 1..=5 {
        scratch::link(&test, &format!("cifar/data_batch_{i}.bin"));
    }
    read_cifar(&scratch::dir().join("cifar"), CifarKind::Cifar10)
        .map(drop)
        .map_err(shown)
}

/// One image in a one-class folder: opened (header), then decoded, at its own size and
/// resized to 8x8.
pub fn image(bytes: &[u8]) -> Outcome {
    scratch::put("folder/a/x.png", bytes);
    let dir = scratch::dir().join("folder");
    for size in [None, Some(8)] {
        let f = ImageFolder::open(&dir, size, None).map_err(shown)?;
        f.pixels(0).map_err(shown)?;
    }
    Ok(())
}

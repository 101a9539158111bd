//! Tiny image folders for tests of the programs that train.

use std::path::{Path, PathBuf};

/// Writes an ImageFolder with two classes of `size` x `size` grayscale PNGs, `dark` and
/// `bright`, with a little texture: `root/train/<class>/<i>.png` (`train` per class) and
/// `root/test/<class>/<i>.png` (`test` per class). Returns `root`.
///
/// # Panics
/// When the files cannot be written (a test cannot go on without them).
#[allow(clippy::expect_used)]
pub fn two_class_folder(root: &Path, size: u32, train: u32, test: u32) -> PathBuf {
    for (split, n) in [("train", train), ("test", test)] {
        for (class, base) in [("dark", 40u8), ("bright", 200u8)] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).expect("cannot create the image folder");
            for i in 0..n {
                let img = image::GrayImage::from_fn(size, size, |x, y| {
                    image::Luma([base.wrapping_add(((x * 7 + y * 3 + i) % 20) as u8)])
                });
                img.save(dir.join(format!("{i}.png")))
                    .expect("cannot write a test image");
            }
        }
    }
    root.to_path_buf()
}

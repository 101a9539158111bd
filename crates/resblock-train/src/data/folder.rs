//! An image folder like torchvision's `ImageFolder`: `DIR/<split>/<class>/*.png|jpg`.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{ColorType, DynamicImage};

use super::ImageDataset;
use crate::error::{Error, Result};

fn fail(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Whether `p` has an image extension this reader takes (`.png`, `.jpg`, `.jpeg`, any case).
pub fn is_image_file(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| fail(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// What [`list_image_folder`] finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderListing {
    /// Class (folder) names, sorted; the index is the label.
    pub class_names: Vec<String>,
    /// Every image with its label, sorted by path within a class.
    pub files: Vec<(PathBuf, u32)>,
}

/// The files of `split_dir/<class>/*.png|jpg|jpeg`: the class names (folder names, sorted;
/// their index is the label) and every image with its label, sorted by path within a class.
/// Nothing is decoded.
///
/// # Errors
/// A missing folder, no class folders, or a class folder without images, naming the path.
pub fn list_image_folder(split_dir: &Path) -> Result<FolderListing> {
    let class_dirs: Vec<PathBuf> = sorted_entries(split_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    let names: Vec<String> = class_dirs
        .iter()
        .map(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    if names.is_empty() {
        return Err(fail(
            split_dir,
            "no class folders (expected DIR/<split>/<class>/*.png)",
        ));
    }
    let mut files = Vec::new();
    for (label, dir) in class_dirs.iter().enumerate() {
        let images: Vec<PathBuf> = sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image_file(p))
            .collect();
        if images.is_empty() {
            return Err(fail(dir, "class folder has no .png/.jpg images"));
        }
        files.extend(images.into_iter().map(|f| (f, label as u32)));
    }
    Ok(FolderListing {
        class_names: names,
        files,
    })
}

/// Decodes one image file (PNG or JPEG, format guessed from the bytes).
///
/// # Errors
/// An unreadable or undecodable file, naming it.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| fail(path, e.to_string()))?
        .decode()
        .map_err(|e| fail(path, format!("cannot decode image: {e}")))
}

/// Reads `split_dir/<class>/*` with classes sorted by name (their index is the label).
/// Images are decoded up front: grayscale when every image is grayscale, RGB otherwise;
/// resized to `image_size` x `image_size` when given (bilinear), else all must share one size.
/// `classes` fixes the class list (for a test split that must match the training one).
///
/// # Errors
/// A missing folder, a class folder without images, an undecodable image, or mixed sizes
/// without `image_size`, each naming the path.
pub fn read_image_folder(
    split_dir: &Path,
    image_size: Option<usize>,
    classes: Option<&[String]>,
) -> Result<ImageDataset> {
    let FolderListing {
        class_names: names,
        files,
    } = list_image_folder(split_dir)?;
    if let Some(want) = classes {
        if want != names.as_slice() {
            return Err(fail(
                split_dir,
                format!("classes {names:?} differ from the training split's {want:?}"),
            ));
        }
    }
    let decoded: Vec<(PathBuf, DynamicImage, u32)> = files
        .into_iter()
        .map(|(f, label)| decode_image(&f).map(|img| (f, img, label)))
        .collect::<Result<_>>()?;
    let gray = decoded.iter().all(|(_, img, _)| {
        matches!(
            img.color(),
            ColorType::L8 | ColorType::La8 | ColorType::L16 | ColorType::La16
        )
    });
    let channels = if gray { 1 } else { 3 };
    let (h, w) = match image_size {
        Some(s) if s > 0 => (s, s),
        Some(_) => return Err(fail(split_dir, "--image-size must be positive")),
        None => {
            let (_, first, _) = &decoded[0];
            (first.height() as usize, first.width() as usize)
        }
    };
    let mut ds = ImageDataset {
        pixels: Vec::with_capacity(decoded.len() * channels * h * w),
        labels: Vec::with_capacity(decoded.len()),
        channels,
        height: h,
        width: w,
        num_classes: names.len(),
        class_names: names,
        sources: Vec::with_capacity(decoded.len()),
    };
    for (path, img, label) in decoded {
        let img = if (img.height() as usize, img.width() as usize) != (h, w) {
            if image_size.is_none() {
                return Err(fail(
                    &path,
                    format!(
                        "is {}x{} but the first image is {w}x{h}: pass --image-size to resize",
                        img.width(),
                        img.height()
                    ),
                ));
            }
            img.resize_exact(w as u32, h as u32, FilterType::Triangle)
        } else {
            img
        };
        if gray {
            ds.pixels.extend_from_slice(img.to_luma8().as_raw());
        } else {
            let rgb = img.to_rgb8();
            for c in 0..3 {
                ds.pixels.extend(rgb.pixels().map(|p| p[c]));
            }
        }
        ds.labels.push(label);
        ds.sources.push(path);
    }
    Ok(ds)
}

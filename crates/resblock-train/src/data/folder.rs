//! An image folder like torchvision's `ImageFolder`: `DIR/<split>/<class>/*.png|jpg`.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{ColorType, DynamicImage, ImageDecoder};

use super::{Dataset, ImageDataset};
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

/// An image folder read lazily: the file list and labels are in memory, each image is
/// decoded (and resized) only when a sample is asked for, so memory does not grow with the
/// number of images and decoding runs on the [`super::DataLoader`]'s worker threads.
///
/// Opening reads every file's header (not its pixels): images are grayscale when every one
/// is, RGB otherwise; resized to `image_size` x `image_size` when given (bilinear, PIL's
/// "triangle" filter), else all must share one size.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    files: Vec<(PathBuf, u32)>,
    class_names: Vec<String>,
    channels: usize,
    height: usize,
    width: usize,
}

/// The color type and (width, height) in a file's header, without decoding its pixels.
fn header(path: &Path) -> Result<(ColorType, (u32, u32))> {
    let decoder = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| fail(path, e.to_string()))?
        .into_decoder()
        .map_err(|e| fail(path, format!("cannot decode image: {e}")))?;
    Ok((decoder.color_type(), decoder.dimensions()))
}

fn is_gray(c: ColorType) -> bool {
    matches!(
        c,
        ColorType::L8 | ColorType::La8 | ColorType::L16 | ColorType::La16
    )
}

impl ImageFolder {
    /// Lists `split_dir/<class>/*` (classes sorted by name; their index is the label) and
    /// reads every image's header. `classes` fixes the class list (for a test split that
    /// must match the training one).
    ///
    /// # Errors
    /// A missing folder, a class folder without images, an unreadable header, classes other
    /// than `classes`, or mixed sizes without `image_size`, each naming the path.
    pub fn open(
        split_dir: &Path,
        image_size: Option<usize>,
        classes: Option<&[String]>,
    ) -> Result<Self> {
        let FolderListing { class_names, files } = list_image_folder(split_dir)?;
        if let Some(want) = classes {
            if want != class_names.as_slice() {
                return Err(fail(
                    split_dir,
                    format!("classes {class_names:?} differ from the training split's {want:?}"),
                ));
            }
        }
        let mut gray = true;
        let mut first: Option<(u32, u32)> = None;
        for (path, _) in &files {
            let (color, (w, h)) = header(path)?;
            gray &= is_gray(color);
            match (first, image_size) {
                (None, _) => first = Some((w, h)),
                (Some((w0, h0)), None) if (w, h) != (w0, h0) => {
                    return Err(fail(
                        path,
                        format!(
                        "is {w}x{h} but the first image is {w0}x{h0}: pass --image-size to resize"
                    ),
                    ))
                }
                _ => {}
            }
        }
        let (height, width) = match (image_size, first) {
            (Some(0), _) => return Err(fail(split_dir, "--image-size must be positive")),
            (Some(s), _) => (s, s),
            (None, Some((w, h))) => (h as usize, w as usize),
            (None, None) => (0, 0),
        };
        Ok(Self {
            files,
            class_names,
            channels: if gray { 1 } else { 3 },
            height,
            width,
        })
    }

    /// Every image with its label, sorted by path within a class.
    pub fn files(&self) -> &[(PathBuf, u32)] {
        &self.files
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }
    fn num_classes(&self) -> usize {
        self.class_names.len()
    }
    fn class_names(&self) -> Vec<String> {
        self.class_names.clone()
    }
    fn source(&self, i: usize) -> String {
        self.files
            .get(i)
            .map_or_else(|| format!("sample {i}"), |(p, _)| p.display().to_string())
    }
    fn pixels(&self, i: usize) -> Result<(Vec<u8>, u32)> {
        let (path, label) = self.files.get(i).ok_or_else(|| {
            Error::config(format!("sample {i} out of range ({})", self.files.len()))
        })?;
        let (h, w) = (self.height, self.width);
        let img = decode_image(path)?;
        let img = if (img.height() as usize, img.width() as usize) != (h, w) {
            img.resize_exact(w as u32, h as u32, FilterType::Triangle)
        } else {
            img
        };
        let px = if self.channels == 1 {
            img.to_luma8().into_raw()
        } else {
            let rgb = img.to_rgb8();
            let mut px = Vec::with_capacity(3 * h * w);
            for c in 0..3 {
                px.extend(rgb.pixels().map(|p| p[c]));
            }
            px
        };
        if px.len() != self.channels * h * w {
            return Err(fail(
                path,
                format!(
                    "decoded to {} bytes, expected {}x{h}x{w}",
                    px.len(),
                    self.channels
                ),
            ));
        }
        Ok((px, *label))
    }
}

/// Reads `split_dir/<class>/*` like [`ImageFolder::open`] and decodes every image into
/// memory (small folders, tests; training streams an [`ImageFolder`] instead).
///
/// # Errors
/// As [`ImageFolder::open`], and an undecodable image, naming it.
pub fn read_image_folder(
    split_dir: &Path,
    image_size: Option<usize>,
    classes: Option<&[String]>,
) -> Result<ImageDataset> {
    let folder = ImageFolder::open(split_dir, image_size, classes)?;
    let (channels, height, width) = folder.shape();
    let mut ds = ImageDataset {
        pixels: Vec::with_capacity(folder.len() * channels * height * width),
        labels: Vec::with_capacity(folder.len()),
        channels,
        height,
        width,
        num_classes: folder.num_classes(),
        class_names: folder.class_names.clone(),
        sources: folder.files.iter().map(|(p, _)| p.clone()).collect(),
    };
    for i in 0..folder.len() {
        let (px, label) = folder.pixels(i)?;
        ds.pixels.extend_from_slice(&px);
        ds.labels.push(label);
    }
    Ok(ds)
}

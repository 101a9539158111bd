//! ImageNet evaluation preprocessing (torchvision's `Resize`, `CenterCrop`, `ToTensor`,
//! `Normalize`) and the 1000 class names.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::DynamicImage;

use crate::error::{Error, Result};
use crate::preprocess::Preprocess;

/// ImageNet's per-channel mean (RGB), as torchvision normalises.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (RGB).
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The 1000 ImageNet class names in torchvision's order (index = logit).
pub fn class_names() -> Vec<&'static str> {
    include_str!("../data/imagenet_classes.txt")
        .lines()
        .collect()
}

/// Reads and decodes an image file (PNG or JPEG).
///
/// # Errors
/// A missing, unreadable or undecodable file, named in the message.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let err = |msg: String| Error::Image {
        path: path.display().to_string(),
        msg,
    };
    let reader = image::ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    let img = reader.decode().map_err(|e| err(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("the image is empty".into()));
    }
    Ok(img)
}

/// torchvision's evaluation transform: resize the shorter side to `resize` (bilinear with
/// antialiasing, as PIL), center-crop `crop` x `crop`, scale to [0, 1], normalise with
/// [`MEAN`] and [`STD`] ([`Preprocess`] with ImageNet's values).
///
/// # Shapes
/// - output: (3, crop, crop)
///
/// # Errors
/// `crop > resize` or zero sizes.
pub fn preprocess(
    img: &DynamicImage,
    resize: usize,
    crop: usize,
    device: &Device,
) -> Result<Tensor> {
    if resize == 0 || crop == 0 || crop > resize {
        return Err(Error::config(format!(
            "need 0 < crop ({crop}) <= resize ({resize})"
        )));
    }
    evaluation(resize, crop).tensor(img, device)
}

/// torchvision's ImageNet evaluation preprocessing as a [`Preprocess`]: RGB, shorter side to
/// `resize`, centre crop `crop` x `crop`, [`MEAN`] and [`STD`].
pub fn evaluation(resize: usize, crop: usize) -> Preprocess {
    Preprocess {
        channels: 3,
        image_size: [crop, crop],
        resize: Some(resize),
        mean: MEAN.to_vec(),
        std: STD.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_are_1000_classes() {
        let c = class_names();
        assert_eq!(c.len(), 1000);
        assert_eq!(c[0], "tench");
        assert_eq!(c[999], "toilet tissue");
    }

    #[test]
    fn preprocess_shapes_and_normalises() -> Result<()> {
        // A uniform mid-grey image normalises to (0.5 - mean) / std everywhere.
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            300,
            200,
            image::Rgb([128, 128, 128]),
        ));
        let t = preprocess(&img, 256, 224, &Device::Cpu)?;
        assert_eq!(t.dims(), [3, 224, 224]);
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        for c in 0..3 {
            let want = (128. / 255. - MEAN[c]) / STD[c];
            assert!((v[c * 224 * 224 + 1000] - want).abs() < 1e-5);
        }
        assert!(preprocess(&img, 100, 224, &Device::Cpu).is_err());
        Ok(())
    }
}

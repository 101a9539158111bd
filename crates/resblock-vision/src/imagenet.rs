//! ImageNet evaluation preprocessing (torchvision's `Resize`, `CenterCrop`, `ToTensor`,
//! `Normalize`) and the 1000 class names.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};

use crate::error::{Error, Result};

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
/// [`MEAN`] and [`STD`].
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
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    // torchvision: the shorter side becomes `resize`, the longer int(resize * long / short).
    let (nw, nh) = if w <= h {
        (resize, resize * h / w)
    } else {
        (resize * w / h, resize)
    };
    let rgb = img
        .resize_exact(nw as u32, nh as u32, FilterType::Triangle)
        .to_rgb8();
    // torchvision's center crop: top = round((h - crop) / 2).
    let top = ((nh - crop) as f64 / 2.).round() as usize;
    let left = ((nw - crop) as f64 / 2.).round() as usize;
    let mut data = vec![0f32; 3 * crop * crop];
    for y in 0..crop {
        for x in 0..crop {
            let p = rgb.get_pixel((left + x) as u32, (top + y) as u32);
            for c in 0..3 {
                data[c * crop * crop + y * crop + x] = (f32::from(p[c]) / 255. - MEAN[c]) / STD[c];
            }
        }
    }
    Ok(Tensor::from_vec(data, (3, crop, crop), device)?)
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

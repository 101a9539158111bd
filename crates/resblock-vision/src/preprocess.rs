//! Turning an image file into the network's input, the same way for training, `predict`,
//! `evaluate` and ImageNet evaluation.
//!
//! The steps, in order:
//! 1. resize: with `resize = Some(r)` the shorter side becomes `r` (the longer
//!    `r * long / short`, rounded down, as torchvision's `Resize(r)`) and the centre
//!    `image_size` is cropped (torchvision's `CenterCrop`: top = round((h - crop_h) / 2));
//!    with `resize = None` an image of another size is stretched to exactly `image_size`
//!    (what the image-folder reader does while training). Both resize bilinearly with
//!    antialiasing (the `image` crate's triangle filter, as PIL's bilinear).
//! 2. colour: 1 channel = luma (ITU-R 601-2, as PIL's `convert("L")`), 3 channels = RGB; a
//!    grayscale image fed to a 3-channel network has its channel replicated (torchvision's
//!    `Grayscale(3)` habit).
//! 3. scale to [0, 1] and normalise per channel: `(p / 255 - mean[c]) / std[c]`.

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};

use crate::error::{Error, Result};

/// How an image becomes a network input (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Input channels (1 or 3).
    pub channels: usize,
    /// (height, width) fed to the network.
    pub image_size: [usize; 2],
    /// Resize the shorter side to this, then centre-crop `image_size`; `None` stretches to
    /// `image_size`.
    pub resize: Option<usize>,
    /// Per-channel mean of pixels in [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of pixels in [0, 1].
    pub std: Vec<f32>,
}

impl Preprocess {
    /// Checks the fields against each other.
    ///
    /// # Errors
    /// Channels other than 1 or 3, zero sizes, a crop larger than the resize, or mean/std of
    /// the wrong length or a non-positive std.
    pub fn validate(&self) -> Result<()> {
        let [h, w] = self.image_size;
        if !matches!(self.channels, 1 | 3) {
            return Err(Error::config(format!(
                "images have 1 or 3 channels, not {}",
                self.channels
            )));
        }
        if h == 0 || w == 0 {
            return Err(Error::config(format!("image size {h}x{w} is empty")));
        }
        if let Some(r) = self.resize {
            if r < h.min(w) {
                return Err(Error::config(format!(
                    "resize {r} is smaller than the {h}x{w} crop"
                )));
            }
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return Err(Error::config(format!(
                "mean {:?} and std {:?} need one value per channel ({})",
                self.mean, self.std, self.channels
            )));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(Error::config(format!(
                "mean {:?} must be finite and std {:?} positive",
                self.mean, self.std
            )));
        }
        Ok(())
    }

    /// Steps 1 and 2: the image as `channels x H x W` bytes (CHW), `image_size` large.
    pub fn pixels(&self, img: &DynamicImage) -> Vec<u8> {
        let [h, w] = self.image_size;
        let (iw, ih) = img.dimensions();
        let (iw, ih) = (iw as usize, ih as usize);
        let sized = match self.resize {
            Some(r) => {
                let (nw, nh) = if iw <= ih {
                    (r, (r * ih / iw).max(h))
                } else {
                    ((r * iw / ih).max(w), r)
                };
                let resized = if (nw, nh) == (iw, ih) {
                    img.clone()
                } else {
                    img.resize_exact(nw as u32, nh as u32, FilterType::Triangle)
                };
                let top = ((nh - h) as f64 / 2.).round() as u32;
                let left = ((nw - w) as f64 / 2.).round() as u32;
                resized.crop_imm(left, top, w as u32, h as u32)
            }
            None if (iw, ih) != (w, h) => {
                img.resize_exact(w as u32, h as u32, FilterType::Triangle)
            }
            None => img.clone(),
        };
        if self.channels == 1 {
            sized.to_luma8().into_raw()
        } else {
            let rgb = sized.to_rgb8();
            let mut out = Vec::with_capacity(3 * h * w);
            for c in 0..3 {
                out.extend(rgb.pixels().map(|p| p[c]));
            }
            out
        }
    }

    /// Step 3 on CHW bytes: `(p / 255 - mean[c]) / std[c]`.
    pub fn normalize(&self, pixels: &[u8]) -> Vec<f32> {
        let plane = self.image_size[0] * self.image_size[1];
        pixels
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let c = (i / plane).min(self.channels - 1);
                (f32::from(p) / 255. - self.mean[c]) / self.std[c]
            })
            .collect()
    }

    /// All three steps: a `(channels, H, W)` tensor.
    ///
    /// # Errors
    /// Only on tensor errors.
    pub fn tensor(&self, img: &DynamicImage, device: &Device) -> Result<Tensor> {
        let [h, w] = self.image_size;
        let data = self.normalize(&self.pixels(img));
        Ok(Tensor::from_vec(data, (self.channels, h, w), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([(x * 10 + y) as u8])
        }))
    }

    #[test]
    fn same_size_images_pass_through_unchanged() {
        let p = Preprocess {
            channels: 1,
            image_size: [3, 4],
            resize: None,
            mean: vec![0.],
            std: vec![1.],
        };
        let img = gray(4, 3);
        assert_eq!(p.pixels(&img), img.to_luma8().into_raw());
        // Normalisation by hand: (p / 255 - 0.5) / 0.25.
        let q = Preprocess {
            mean: vec![0.5],
            std: vec![0.25],
            ..p
        };
        let v = q.normalize(&[0, 255, 51]);
        assert_eq!(v, [-2., 2., (0.2 - 0.5) / 0.25]);
    }

    #[test]
    fn gray_meets_three_channels_replicated_and_crops_are_centred() {
        let p = Preprocess {
            channels: 3,
            image_size: [2, 2],
            resize: Some(4),
            mean: vec![0.; 3],
            std: vec![1.; 3],
        };
        // A 4x6 image (w x h) is already at resize 4 (shorter side): only cropped, at
        // top = round((6 - 2) / 2) = 2, left = round((4 - 2) / 2) = 1.
        let img = gray(4, 6);
        let px = p.pixels(&img);
        // Pixel (x, y) is 10x + y: rows y = 2, 3 and columns x = 1, 2.
        let want = [12u8, 22, 13, 23];
        assert_eq!(px, [want, want, want].concat());
        assert!(p.validate().is_ok());
        let bad = Preprocess {
            resize: Some(1),
            ..p.clone()
        };
        assert!(bad.validate().is_err());
        let bad = Preprocess {
            std: vec![1., 0., 1.],
            ..p
        };
        assert!(bad.validate().is_err());
    }
}

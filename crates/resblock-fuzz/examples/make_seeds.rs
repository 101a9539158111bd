//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/` (committed):
//! `ok-*` files each reader must accept, `bad-*` files it must refuse with an error. The
//! `.pth` seeds come from `fuzz/make_pth_seeds.py` (PyTorch's own writer).
//!
//! `cargo run -p resblock-fuzz --example make_seeds`

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resblock_core::RngHandle;
use resblock_vision::model_file::{save_model_varmap, ModelMeta};
use resblock_vision::{resnet, Preprocess, ResNetConfig};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn corpus(target: &str) -> Result<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn put(target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::write(corpus(target)?.join(name), bytes)?;
    Ok(())
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes)?;
    Ok(e.finish()?)
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

fn idx_seeds() -> Result<()> {
    let px: Vec<u8> = (0..3 * 2 * 2).map(|i| (i * 20) as u8).collect();
    let images = idx(0x803, &[3, 2, 2], &px);
    put("idx_images", "ok-3x2x2", &images)?;
    put("idx_images", "ok-3x2x2.gz", &gzip(&images)?)?;
    put("idx_images", "bad-truncated", &images[..images.len() - 1])?;
    put("idx_images", "bad-magic", &idx(0x801, &[3, 2, 2], &px))?;
    // u32::MAX images of 28x28: 3.4e12 bytes claimed by a 16-byte file.
    put(
        "idx_images",
        "bad-huge-count",
        &idx(0x803, &[u32::MAX, 28, 28], &[]),
    )?;
    put(
        "idx_images",
        "bad-huge-count.gz",
        &gzip(&idx(0x803, &[u32::MAX, 28, 28], &[0; 64]))?,
    )?;
    let labels = idx(0x801, &[4], &[0, 1, 2, 9]);
    put("idx_labels", "ok-4", &labels)?;
    put("idx_labels", "ok-4.gz", &gzip(&labels)?)?;
    put("idx_labels", "bad-short-header", &labels[..6])?;
    put(
        "idx_labels",
        "bad-huge-count",
        &idx(0x801, &[u32::MAX], &[1, 2]),
    )?;
    Ok(())
}

fn cifar_seeds() -> Result<()> {
    let mut rec = vec![3u8];
    rec.extend((0..3072).map(|i| (i % 251) as u8));
    put("cifar10", "ok-one-record", &rec)?;
    put("cifar10", "bad-partial-record", &rec[..1000])?;
    let mut wrong = rec.clone();
    wrong[0] = 10;
    put("cifar10", "bad-label-10", &wrong)?;
    Ok(())
}

/// A PNG with its IHDR's width and height replaced (CRC recomputed).
fn png_claiming(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut v = png.to_vec();
    // signature (8), IHDR length (4), "IHDR" (4), width, height, ..., CRC over type+data.
    v[16..20].copy_from_slice(&w.to_be_bytes());
    v[20..24].copy_from_slice(&h.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&v[12..29]);
    v[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    v
}

fn image_seeds() -> Result<()> {
    let gray = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y * 10) as u8]));
    let rgb = image::RgbImage::from_fn(6, 3, |x, y| image::Rgb([x as u8 * 30, y as u8 * 60, 7]));
    let mut png = Vec::new();
    image::DynamicImage::ImageLuma8(gray)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let mut jpg = Vec::new();
    image::DynamicImage::ImageRgb8(rgb).write_to(
        &mut std::io::Cursor::new(&mut jpg),
        image::ImageFormat::Jpeg,
    )?;
    put("image", "ok-gray-5x4.png", &png)?;
    put("image", "ok-rgb-6x3.jpg", &jpg)?;
    put("image", "bad-truncated.png", &png[..png.len() / 2])?;
    put("image", "bad-truncated.jpg", &jpg[..jpg.len() / 2])?;
    put(
        "image",
        "bad-100000x100000.png",
        &png_claiming(&png, 100_000, 100_000),
    )?;
    put("image", "bad-not-an-image", b"GIF89a? no, plain text")?;
    Ok(())
}

/// A resnet8 with 2/4/8 channels (a few KB) saved as `train` saves a model.
fn model_seeds() -> Result<()> {
    let mut cfg = ResNetConfig::cifar(8)?;
    cfg.planes = vec![2, 4, 8];
    cfg.stem_width = 2;
    cfg.num_classes = 3;
    cfg.in_channels = 1;
    let varmap = VarMap::new();
    let rng = RngHandle::seed_from_u64(0);
    resnet(
        &cfg,
        &rng,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    let pre = Preprocess {
        channels: 1,
        image_size: [8, 8],
        resize: None,
        mean: vec![0.5],
        std: vec![0.25],
    };
    let names = vec!["a".into(), "b".into(), "c".into()];
    let meta = ModelMeta::new("resnet8", &cfg, names, &pre);
    let dir = corpus("safetensors")?;
    let ok = dir.join("ok-resnet8-tiny.safetensors");
    save_model_varmap(&varmap, &meta, &ok)?;
    let bytes = std::fs::read(&ok)?;
    put("safetensors", "bad-truncated", &bytes[..bytes.len() - 9])?;
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    put("safetensors", "bad-huge-header-length", &huge)?;
    let plain = safetensors::serialize(
        [("x", &Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?)],
        None,
    )?;
    put("safetensors", "bad-no-metadata-not-resnet20", &plain)?;

    let json = meta.to_json()?;
    let flags = r#"{"arch":"resnet20","epochs":2,"lr":0.1,"threads":1}"#;
    put(
        "run_meta",
        "ok-flags-and-model-meta.json",
        format!("{flags}\n{json}").as_bytes(),
    )?;
    put("run_meta", "bad-not-json", b"{\"arch\": resnet20\n{}")?;
    let contradicts = json.replacen("\"num_classes\":3", "\"num_classes\":4", 1);
    put(
        "run_meta",
        "bad-num-classes-contradicts-config.json",
        format!("{flags}\n{contradicts}").as_bytes(),
    )?;
    Ok(())
}

/// A checkpoint of the 4 -> 3 linear model that the checkpoint target resumes into.
fn checkpoint_seeds() -> Result<()> {
    let (fc, varmap) = resblock_fuzz::linear_model()?;
    let trainer = resblock_fuzz::linear_trainer(&fc, &varmap)?
        .with_rng(RngHandle::seed_from_u64(1))
        .with_checkpoint_meta("run_flags", r#"{"epochs":1}"#.into());
    let ok = corpus("checkpoint")?.join("ok-linear-4x3.safetensors");
    trainer.save_checkpoint(&ok)?;
    let bytes = std::fs::read(&ok)?;
    put("checkpoint", "bad-truncated", &bytes[..bytes.len() / 2])?;
    let mut other = bytes.clone();
    let at = other
        .windows(b"resblock-checkpoint/1".len())
        .position(|w| w == b"resblock-checkpoint/1")
        .ok_or("format tag not found")?;
    other[at + b"resblock-checkpoint/".len()] = b'9';
    put("checkpoint", "bad-format-9", &other)?;
    Ok(())
}

fn main() -> Result<()> {
    idx_seeds()?;
    cifar_seeds()?;
    image_seeds()?;
    model_seeds()?;
    checkpoint_seeds()?;
    println!("seeds written under fuzz/corpus/");
    Ok(())
}

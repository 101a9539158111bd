//! `--pretrained NAME`: torchvision's official ImageNet weights for every ResNet, ResNeXt
//! and Wide ResNet, downloaded once, checked, converted once into a model file with
//! metadata ([`crate::ModelMeta`]) and cached.
//!
//! - Names: the architecture (`resnet50`: torchvision's `IMAGENET1K_V1`) or
//!   `ARCH.IMAGENET1K_V2` where torchvision has a second recipe ([`PRETRAINED`] lists them).
//! - Check: as `torch.hub` with `check_hash=True`, the SHA-256 of the download must start
//!   with the hash prefix in the file name (`resnet50-0676ba61.pth`). A mismatch deletes the
//!   download and names the URL and both digests.
//! - Cache: `$RESBLOCK_CACHE_DIR/weights`, else `$XDG_CACHE_HOME/resblock/weights`, else
//!   `~/.cache/resblock/weights` ([`cache_dir`]). The `.pth` is converted to
//!   `<stem>.safetensors` (torchvision names, ImageNet class names and preprocessing in the
//!   metadata, `source` = the URL) and removed; later calls use the converted file.
//! - Mirror: `RESBLOCK_WEIGHTS_MIRROR=URL` replaces the official base URL (for machines
//!   without internet access, and for the tests, which serve files on loopback).

use std::path::{Path, PathBuf};

use resblock_io::fetch_to_file;

use crate::error::{Error, Result};
use crate::weights::{check_state_dict, read_state_dict};
use crate::{resnet, ModelMeta};

/// torchvision's base URL for model weights.
pub const OFFICIAL_BASE: &str = "https://download.pytorch.org/models/";

/// One set of published weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pretrained {
    /// `--pretrained` name.
    pub name: &'static str,
    /// The resblock preset it fits.
    pub arch: &'static str,
    /// File name under the base URL; `<stem>-<sha256 prefix>.pth`.
    pub file: &'static str,
    /// The evaluation resize (shorter side) of its recipe; the crop is 224.
    pub resize: usize,
}

const fn w(
    name: &'static str,
    arch: &'static str,
    file: &'static str,
    resize: usize,
) -> Pretrained {
    Pretrained {
        name,
        arch,
        file,
        resize,
    }
}

/// Every published ImageNet weight set of the ResNet family in torchvision.
pub const PRETRAINED: &[Pretrained] = &[
    w("resnet18", "resnet18", "resnet18-f37072fd.pth", 256),
    w("resnet34", "resnet34", "resnet34-b627a593.pth", 256),
    w("resnet50", "resnet50", "resnet50-0676ba61.pth", 256),
    w(
        "resnet50.IMAGENET1K_V2",
        "resnet50",
        "resnet50-11ad3fa6.pth",
        232,
    ),
    w("resnet101", "resnet101", "resnet101-63fe2227.pth", 256),
    w(
        "resnet101.IMAGENET1K_V2",
        "resnet101",
        "resnet101-cd907fc2.pth",
        232,
    ),
    w("resnet152", "resnet152", "resnet152-394f9c45.pth", 256),
    w(
        "resnet152.IMAGENET1K_V2",
        "resnet152",
        "resnet152-f82ba261.pth",
        232,
    ),
    w(
        "resnext50_32x4d",
        "resnext50_32x4d",
        "resnext50_32x4d-7cdf4587.pth",
        256,
    ),
    w(
        "resnext50_32x4d.IMAGENET1K_V2",
        "resnext50_32x4d",
        "resnext50_32x4d-1a0047aa.pth",
        232,
    ),
    w(
        "resnext101_32x8d",
        "resnext101_32x8d",
        "resnext101_32x8d-8ba56ff5.pth",
        256,
    ),
    w(
        "resnext101_32x8d.IMAGENET1K_V2",
        "resnext101_32x8d",
        "resnext101_32x8d-110c445d.pth",
        232,
    ),
    w(
        "resnext101_64x4d",
        "resnext101_64x4d",
        "resnext101_64x4d-173b62eb.pth",
        232,
    ),
    w(
        "wide_resnet50_2",
        "wide_resnet50_2",
        "wide_resnet50_2-95faca4d.pth",
        256,
    ),
    w(
        "wide_resnet50_2.IMAGENET1K_V2",
        "wide_resnet50_2",
        "wide_resnet50_2-9ba9bcbe.pth",
        232,
    ),
    w(
        "wide_resnet101_2",
        "wide_resnet101_2",
        "wide_resnet101_2-32ee1156.pth",
        256,
    ),
    w(
        "wide_resnet101_2.IMAGENET1K_V2",
        "wide_resnet101_2",
        "wide_resnet101_2-d733dc28.pth",
        232,
    ),
];

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Download {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

impl Pretrained {
    /// The weights called `name` (case-insensitive; `ARCH.IMAGENET1K_V1` is `ARCH`).
    ///
    /// # Errors
    /// An unknown name; the message lists the known ones.
    pub fn by_name(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let lower = lower.strip_suffix(".imagenet1k_v1").unwrap_or(&lower);
        PRETRAINED
            .iter()
            .find(|p| p.name.to_ascii_lowercase() == lower)
            .copied()
            .ok_or_else(|| {
                let known: Vec<&str> = PRETRAINED.iter().map(|p| p.name).collect();
                Error::config(format!(
                    "unknown --pretrained {name:?}; known: {}",
                    known.join(", ")
                ))
            })
    }

    /// The hash prefix in the file name (`0676ba61` of `resnet50-0676ba61.pth`).
    pub fn hash_prefix(&self) -> &'static str {
        let stem = self.file.strip_suffix(".pth").unwrap_or(self.file);
        stem.rsplit('-').next().unwrap_or("")
    }

    /// The converted file's name in the cache.
    pub fn cached_name(&self) -> String {
        let stem = self.file.strip_suffix(".pth").unwrap_or(self.file);
        format!("{stem}.safetensors")
    }
}

/// The weights cache (see the module docs); not created.
pub fn cache_dir() -> PathBuf {
    resblock_io::cache_root().join("weights")
}

/// The model file of `p` in `cache`: converted from a download from `base` (the official
/// URL unless a mirror is given) the first time, taken from the cache afterwards. Prints
/// nothing; returns the path of the `.safetensors` model file.
///
/// # Errors
/// No connection (the message says where to put the file by hand), a hash mismatch, or a
/// download that does not hold the architecture's weights.
pub fn fetch_pretrained(p: &Pretrained, cache: &Path, base: Option<&str>) -> Result<PathBuf> {
    let model = cache.join(p.cached_name());
    if model.is_file() && crate::read_model_meta(&model).is_ok_and(|m| m.is_some()) {
        return Ok(model);
    }
    std::fs::create_dir_all(cache).map_err(|e| err(cache, e.to_string()))?;
    let base = match base {
        Some(b) if b.ends_with('/') => b.to_string(),
        Some(b) => format!("{b}/"),
        None => OFFICIAL_BASE.to_string(),
    };
    let url = format!("{base}{}", p.file);
    let pth = cache.join(p.file);
    if !pth.is_file() {
        let part = cache.join(format!(".{}.part", p.file));
        let digest = fetch_to_file(&url, &part).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            err(
                &pth,
                format!(
                    "could not download {url} ({e}); without network, put the file there by hand \
                     or set RESBLOCK_WEIGHTS_MIRROR to a server that has it"
                ),
            )
        })?;
        if !digest.starts_with(p.hash_prefix()) {
            let _ = std::fs::remove_file(&part);
            return Err(err(
                &pth,
                format!(
                    "{url} has SHA-256 {digest}, which does not start with {} as its name says: not using it",
                    p.hash_prefix()
                ),
            ));
        }
        std::fs::rename(&part, &pth).map_err(|e| err(&pth, e.to_string()))?;
    }
    convert(p, &pth, &model, &url)?;
    let _ = std::fs::remove_file(&pth);
    Ok(model)
}

/// Checks a downloaded `.pth` against its architecture and writes it as a model file.
fn convert(p: &Pretrained, pth: &Path, model: &Path, url: &str) -> Result<()> {
    let sd = read_state_dict(pth)?;
    let classes = sd
        .get("fc.weight")
        .and_then(|t| t.dims().first().copied())
        .ok_or_else(|| err(pth, "no fc.weight: not a classifier's state_dict"))?;
    let in_channels = sd
        .get("conv1.weight")
        .and_then(|t| t.dims().get(1).copied())
        .unwrap_or(3);
    let mut meta = ModelMeta::assumed(p.arch, classes, in_channels)?;
    if meta.resize.is_some() {
        meta.resize = Some(p.resize);
    }
    meta.source = Some(url.to_string());
    let (vb, rec) = resblock_core::params::shape_only_var_builder(
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    resnet(
        &meta.config,
        &resblock_core::RngHandle::seed_from_u64(0),
        vb,
    )?;
    check_state_dict(&rec.shapes(), &sd, pth)?;
    let tensors = sd.into_iter().collect();
    crate::save_model(&tensors, &meta, model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_prefixes_are_eight_hex_digits() -> Result<()> {
        assert_eq!(
            Pretrained::by_name("ResNet50")?.file,
            "resnet50-0676ba61.pth"
        );
        assert_eq!(
            Pretrained::by_name("resnet50.imagenet1k_v1")?,
            Pretrained::by_name("resnet50")?
        );
        assert_eq!(Pretrained::by_name("resnet50.IMAGENET1K_V2")?.resize, 232);
        let e = Pretrained::by_name("resnet20").expect_err("not published");
        assert!(e.to_string().contains("wide_resnet101_2"), "{e}");
        for p in PRETRAINED {
            let h = p.hash_prefix();
            assert!(
                h.len() == 8 && h.chars().all(|c| c.is_ascii_hexdigit()),
                "{}",
                p.file
            );
            crate::ResNetConfig::preset(p.arch)?;
        }
        Ok(())
    }
}

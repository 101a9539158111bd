//! The self-describing model file: a `.safetensors` file with torchvision's tensor names
//! (it still loads strictly into torchvision) whose safetensors `__metadata__` holds, under
//! the key [`METADATA_KEY`] (`"resblock"`), a JSON object ([`ModelMeta`]) with everything
//! needed to use the network without knowing how it was trained:
//!
//! ```json
//! {"version": 1, "arch": "resnet20", "num_classes": 10, "in_channels": 1,
//!  "class_names": ["0", "1", ...], "image_size": [28, 28], "resize": null,
//!  "mean": [0.1307], "std": [0.3081], "config": {"block": "basic", ...},
//!  "dataset": "mnist-10k", "train_flags": {...}, "test_accuracy": 98.9}
//! ```
//!
//! - `image_size` is `[h, w]` fed to the net; `mean`/`std` apply per input channel to pixels
//!   scaled to 0..1; `resize` (shorter side, then a centre crop) or `null` (stretch to
//!   `image_size`): the steps of [`Preprocess`].
//! - `config` is the whole [`ResNetConfig`] (shortcut option, widths, groups, dilation, ...),
//!   so the net is rebuilt exactly; `arch` is the preset it started from.
//! - `version` is [`METADATA_VERSION`]; a file of a newer version is refused with a message
//!   saying so, unknown fields of the same version are ignored.
//!
//! A file without the key (torchvision's own weights) still loads when the architecture is
//! given ([`load_model`] with `arch`).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::preprocess::Preprocess;
use crate::resnet::{ResNet, ResNetConfig, StemType};
use crate::weights::{
    load_resnet, read_state_dict, resnet_from_state_dict, save_tensors_with_metadata,
};

/// The safetensors `__metadata__` key that holds the model metadata.
pub const METADATA_KEY: &str = "resblock";
/// The metadata version this build writes and the newest it reads.
pub const METADATA_VERSION: u32 = 1;

/// What a model file says about its network (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// [`METADATA_VERSION`] when written.
    pub version: u32,
    /// The preset the network was built from (`resnet20`, `resnet50`, ...).
    pub arch: String,
    /// Classes of the classifier.
    pub num_classes: usize,
    /// Input channels of the network.
    pub in_channels: usize,
    /// Class names in index (logit) order.
    pub class_names: Vec<String>,
    /// `[height, width]` fed to the network.
    pub image_size: [usize; 2],
    /// Shorter side before the centre crop, or `None` to stretch to `image_size`.
    #[serde(default)]
    pub resize: Option<usize>,
    /// Per-channel mean of pixels in 0..1.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of pixels in 0..1.
    pub std: Vec<f32>,
    /// Everything that rebuilds the network.
    pub config: ResNetConfig,
    /// The data it was trained on (`mnist-10k`, `folder:DIR`, `imagenet`, ...).
    #[serde(default)]
    pub dataset: Option<String>,
    /// The `train` flags of the run that made it (flag name -> value).
    #[serde(default)]
    pub train_flags: Option<serde_json::Value>,
    /// Final test accuracy in percent.
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    /// Where the weights came from when not trained here (e.g. torchvision's URL).
    #[serde(default)]
    pub source: Option<String>,
    /// Which weights of a run these are: `"ema"` (the moving average, `train --ema`, kept
    /// because it scored higher), `"raw"` (the trained weights, when an average was kept)
    /// or `"best"` (`best.safetensors` of `train --keep-best`: the epoch with the best
    /// validation accuracy); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

fn meta_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Metadata {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

impl ModelMeta {
    /// Metadata for `config` (built from preset `arch`) with the given data description.
    pub fn new(
        arch: &str,
        config: &ResNetConfig,
        class_names: Vec<String>,
        preprocess: &Preprocess,
    ) -> Self {
        Self {
            version: METADATA_VERSION,
            arch: arch.to_string(),
            num_classes: config.num_classes,
            in_channels: config.in_channels,
            class_names,
            image_size: preprocess.image_size,
            resize: preprocess.resize,
            mean: preprocess.mean.clone(),
            std: preprocess.std.clone(),
            config: config.clone(),
            dataset: None,
            train_flags: None,
            test_accuracy: None,
            source: None,
            weights: None,
        }
    }

    /// torchvision's ImageNet weights for preset `arch`: the 1000 class names, RGB,
    /// resize 256, crop 224, ImageNet mean and std.
    ///
    /// # Errors
    /// An unknown preset.
    pub fn imagenet(arch: &str) -> Result<Self> {
        let cfg = ResNetConfig::preset(arch)?;
        let names = crate::imagenet::class_names()
            .into_iter()
            .map(String::from)
            .collect();
        let mut m = Self::new(arch, &cfg, names, &crate::imagenet::evaluation(256, 224));
        m.dataset = Some("imagenet".into());
        Ok(m)
    }

    /// Metadata guessed for a weight file that has none, for preset `arch` with
    /// `num_classes` classes and `in_channels` channels: ImageNet's for a 1000-class
    /// 3-channel ImageNet-stem net ([`ModelMeta::imagenet`]); otherwise classes named by
    /// index, the stem's natural input size (224 ImageNet, 32 CIFAR) and mean 0.5, std 0.5.
    ///
    /// # Errors
    /// An unknown preset.
    pub fn assumed(arch: &str, num_classes: usize, in_channels: usize) -> Result<Self> {
        let mut cfg = ResNetConfig::preset(arch)?;
        if num_classes == 1000 && in_channels == 3 && cfg.stem != StemType::Cifar {
            return Self::imagenet(arch);
        }
        cfg.num_classes = num_classes;
        cfg.in_channels = in_channels;
        let (size, resize) = match cfg.stem {
            StemType::Cifar => (32, None),
            _ => (224, Some(256)),
        };
        let pre = Preprocess {
            channels: in_channels,
            image_size: [size, size],
            resize,
            mean: vec![0.5; in_channels],
            std: vec![0.5; in_channels],
        };
        let names = (0..num_classes).map(|i| format!("class {i}")).collect();
        Ok(Self::new(arch, &cfg, names, &pre))
    }

    /// The image preprocessing this network expects.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            channels: self.in_channels,
            image_size: self.image_size,
            resize: self.resize,
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }

    /// Checks the fields against each other (`path` names the file in errors).
    ///
    /// # Errors
    /// A newer version, or counts that disagree (classes vs names vs config, channels vs
    /// mean/std vs config).
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(meta_err(path, m));
        if self.version == 0 || self.version > METADATA_VERSION {
            return bad(format!(
                "version {} is not readable by this build (it reads up to {METADATA_VERSION}); upgrade resblock",
                self.version
            ));
        }
        if self.class_names.len() != self.num_classes {
            return bad(format!(
                "{} class names for num_classes {}",
                self.class_names.len(),
                self.num_classes
            ));
        }
        if self.config.num_classes != self.num_classes
            || self.config.in_channels != self.in_channels
        {
            return bad(format!(
                "config has {} classes and {} channels but the metadata says {} and {}",
                self.config.num_classes,
                self.config.in_channels,
                self.num_classes,
                self.in_channels
            ));
        }
        self.preprocess()
            .validate()
            .map_err(|e| meta_err(path, e.to_string()))
    }

    /// The metadata as the JSON string stored in the file.
    ///
    /// # Errors
    /// Only if serialisation fails (non-finite numbers).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::config(format!("model metadata: {e}")))
    }
}

/// Reads the model metadata of a `.safetensors` file; `Ok(None)` for a file without it
/// (torchvision weights) or of another format (`.pth`).
///
/// # Errors
/// An unreadable or corrupt file, or metadata that is not valid JSON, is of a newer
/// version, or contradicts itself, each naming the file.
pub fn read_model_meta(path: &Path) -> Result<Option<ModelMeta>> {
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Ok(None);
    }
    // Only the header is read (a model file can be hundreds of MB): its 8-byte length,
    // then the JSON object whose `__metadata__` holds string values.
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let format = |msg: String| Error::WeightsFormat {
        path: path.display().to_string(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| format(format!("not a safetensors file ({e})")))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || n + 8 > file_len {
        return Err(format(format!(
            "header length {n} does not fit a {file_len}-byte file"
        )));
    }
    let mut head = vec![0u8; n as usize];
    f.read_exact(&mut head).map_err(io)?;
    // The tensors themselves are checked when they are loaded; here only `__metadata__`.
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: Option<HashMap<String, String>>,
    }
    let header: Header = serde_json::from_slice(&head)
        .map_err(|e| format(format!("the header is not valid JSON ({e})")))?;
    let Some(json) = header.metadata.as_ref().and_then(|m| m.get(METADATA_KEY)) else {
        return Ok(None);
    };
    let meta: ModelMeta = serde_json::from_str(json)
        .map_err(|e| meta_err(path, format!("key {METADATA_KEY:?} is not valid: {e}")))?;
    meta.validate(path)?;
    Ok(Some(meta))
}

/// Writes a model file: `tensors` under their (torchvision) names and `meta` under
/// [`METADATA_KEY`], atomically.
///
/// # Errors
/// Metadata that contradicts itself or the tensors' classifier shape, or an unwritable
/// destination.
pub fn save_model(tensors: &HashMap<String, Tensor>, meta: &ModelMeta, path: &Path) -> Result<()> {
    meta.validate(path)?;
    if let Some(fc) = tensors.get("fc.weight") {
        if fc.dims().first() != Some(&meta.num_classes) {
            return Err(meta_err(
                path,
                format!(
                    "fc.weight has shape {:?} but the metadata says {} classes",
                    fc.dims(),
                    meta.num_classes
                ),
            ));
        }
    }
    let md = HashMap::from([(METADATA_KEY.to_string(), meta.to_json()?)]);
    save_tensors_with_metadata(tensors, Some(md), path)
}

/// [`save_model`] of every variable of `varmap`.
///
/// # Errors
/// As [`save_model`].
pub fn save_model_varmap(varmap: &VarMap, meta: &ModelMeta, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    };
    save_model(&tensors, meta, path)
}

/// A network loaded for inference with what it expects.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The network (plain tensors, eval use).
    pub net: ResNet,
    /// Its metadata: read from the file, or assumed for a file without it.
    pub meta: ModelMeta,
    /// Whether `meta` was assumed (the file had none).
    pub assumed: bool,
}

/// Loads a model file for inference. With metadata the network is rebuilt from its
/// `config` (`arch`, if given, must agree); without, `arch` is required and the classes and
/// input channels are read off the weights (`fc.weight`, the first convolution), with
/// [`ModelMeta::assumed`] preprocessing.
///
/// # Errors
/// A file without metadata and no `arch`, an `arch` that contradicts the metadata, or the
/// errors of [`load_resnet`] (weights that do not fit, naming the keys).
pub fn load_model(path: &Path, arch: Option<&str>, device: &Device) -> Result<LoadedModel> {
    if let Some(meta) = read_model_meta(path)? {
        if let Some(a) = arch {
            if a != meta.arch {
                return Err(meta_err(
                    path,
                    format!("the file holds a {} but --arch {a} was given", meta.arch),
                ));
            }
        }
        let net = load_resnet(&meta.config, path, device)?;
        return Ok(LoadedModel {
            net,
            meta,
            assumed: false,
        });
    }
    let Some(arch) = arch else {
        return Err(meta_err(
            path,
            format!("no {METADATA_KEY:?} metadata (not written by `train`): pass the architecture with --arch"),
        ));
    };
    let sd = read_state_dict(path)?;
    let num_classes = sd
        .get("fc.weight")
        .and_then(|t| t.dims().first().copied())
        .unwrap_or(ResNetConfig::preset(arch)?.num_classes);
    let stem = ["conv1.weight", "conv1.0.weight"]
        .iter()
        .find_map(|k| sd.get(*k));
    let in_channels = stem.and_then(|t| t.dims().get(1).copied()).unwrap_or(3);
    let meta = ModelMeta::assumed(arch, num_classes, in_channels)?;
    let net = resnet_from_state_dict(&meta.config, &sd, path, device)?;
    Ok(LoadedModel {
        net,
        meta,
        assumed: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("resblock-model-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch");
        d
    }

    fn tiny() -> Result<(HashMap<String, Tensor>, ModelMeta)> {
        let mut cfg = ResNetConfig::preset("resnet8")?;
        cfg.in_channels = 1;
        cfg.num_classes = 2;
        let varmap = VarMap::new();
        let rng = resblock_core::RngHandle::seed_from_u64(0);
        crate::resnet(
            &cfg,
            &rng,
            resblock_core::seeded_var_builder(&varmap, &rng, candle_core::DType::F32, &Device::Cpu),
        )?;
        let tensors = varmap
            .data()
            .lock()
            .map_err(|_| Error::config("lock"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let pre = Preprocess {
            channels: 1,
            image_size: [12, 12],
            resize: None,
            mean: vec![0.25],
            std: vec![0.5],
        };
        let meta = ModelMeta::new("resnet8", &cfg, vec!["no".into(), "yes".into()], &pre);
        Ok((tensors, meta))
    }

    #[test]
    fn round_trips_and_rebuilds_the_net() -> Result<()> {
        let dir = scratch("rt");
        let (tensors, mut meta) = tiny()?;
        meta.test_accuracy = Some(97.5);
        let path = dir.join("m.safetensors");
        save_model(&tensors, &meta, &path)?;
        assert_eq!(read_model_meta(&path)?, Some(meta.clone()));
        let loaded = load_model(&path, None, &Device::Cpu)?;
        assert!(!loaded.assumed);
        assert_eq!(loaded.net.config(), &meta.config);
        // --arch must agree with the file.
        let e = load_model(&path, Some("resnet20"), &Device::Cpu).expect_err("wrong arch");
        assert!(e.to_string().contains("resnet8"), "{e}");
        Ok(())
    }

    #[test]
    fn newer_versions_contradictions_and_missing_metadata_are_errors() -> Result<()> {
        let dir = scratch("bad");
        let (tensors, meta) = tiny()?;
        let path = dir.join("m.safetensors");
        let write = |json: String| {
            let md = HashMap::from([(METADATA_KEY.to_string(), json)]);
            crate::weights::save_tensors_with_metadata(&tensors, Some(md), &path)
        };
        let mut newer = meta.clone();
        newer.version = METADATA_VERSION + 1;
        write(newer.to_json()?)?;
        let e = read_model_meta(&path).expect_err("newer");
        assert!(e.to_string().contains("upgrade"), "{e}");
        let mut names = meta.clone();
        names.class_names.pop();
        write(names.to_json()?)?;
        assert!(read_model_meta(&path).is_err());
        write("{not json".into())?;
        let e = read_model_meta(&path).expect_err("json");
        assert!(e.to_string().contains("m.safetensors"), "{e}");
        // A classifier of another size than the metadata says is refused on save.
        let mut more = meta.clone();
        more.num_classes = 3;
        more.config.num_classes = 3;
        more.class_names.push("maybe".into());
        assert!(save_model(&tensors, &more, &path).is_err());
        // Truncated or absurd headers are errors naming the file, before any large read.
        std::fs::write(&path, [1u8, 2, 3]).map_err(|e| Error::config(e.to_string()))?;
        let e = read_model_meta(&path).expect_err("truncated");
        assert!(e.to_string().contains("m.safetensors"), "{e}");
        std::fs::write(&path, u64::MAX.to_le_bytes()).map_err(|e| Error::config(e.to_string()))?;
        let e = read_model_meta(&path).expect_err("huge header");
        assert!(e.to_string().contains("header length"), "{e}");
        // Plain weights: no metadata, so the architecture is needed.
        crate::weights::save_tensors(&tensors, &path)?;
        assert_eq!(read_model_meta(&path)?, None);
        let e = load_model(&path, None, &Device::Cpu).expect_err("no arch");
        assert!(e.to_string().contains("--arch"), "{e}");
        let m = load_model(&path, Some("resnet8"), &Device::Cpu)?;
        assert!(m.assumed);
        assert_eq!((m.meta.num_classes, m.meta.in_channels), (2, 1));
        Ok(())
    }
}

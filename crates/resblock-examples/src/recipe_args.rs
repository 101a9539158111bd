//! The training recipe's flags, shared by every program that trains (`train`,
//! `degradation`, `grow`, `gradient-flow`), and what they mean: the data (opened, measured,
//! augmented), the loaders, the optimizer and the schedule. One meaning for every program,
//! so that their runs are comparable.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use resblock_train::data::mix::MixConfig;
use resblock_train::data::{
    download, split_validation, DataKind, DataSpec, RemoteDataset, ReplicateChannels, Shard, Subset,
};
use resblock_train::optim::{Optimizer, ParamGroup};
use resblock_train::recipe::{
    dataset_stats, AugmentExtras, AugmentPolicy, OptimizerConfig, OptimizerKind, ScheduleConfig,
    ScheduleKind,
};
use resblock_train::schedule::LrSchedule;
use resblock_train::{DataLoader, Dataset, LossKind, Transform};
use resblock_vision::Preprocess;
use serde::Serialize;

use crate::positive_f64;

/// Data, optimizer, schedule, augmentation, seed and runtime flags (see `train --help`).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RecipeArgs {
    /// Data: `mnist-10k` (bundled), `mnist:DIR`, `cifar10:DIR`, `cifar100:DIR`, or `folder:DIR`
    /// with `DIR/train/<class>/*.png` (or `.jpg`) and `DIR/test` (or `DIR/val`).
    #[arg(long, default_value = "mnist-10k")]
    pub data: String,
    /// Resize images to SIZE x SIZE: folder images as they are read (needed when their sizes
    /// differ), other datasets by a bilinear `Resize` transform before augmentation.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub image_size: Option<u64>,
    /// Fetch `mnist:DIR`, `cifar10:DIR` or `cifar100:DIR` into DIR from the official
    /// locations if it is not there yet (SHA-256 verified, CIFAR unpacked). The environment
    /// variable RESBLOCK_DATA_MIRROR=URL replaces the official base URL.
    #[arg(long)]
    pub download: bool,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub batch_size: u64,
    /// Optimizer: sgd, adam, adamw or lars (SGD with layer-wise trust ratios, for large
    /// batches).
    #[arg(long, default_value = "sgd")]
    pub optimizer: OptimizerKind,
    /// Learning rate (the maximum for one-cycle).
    #[arg(long, default_value_t = 0.1, value_parser = positive_f64)]
    pub lr: f64,
    /// SGD momentum (Nesterov unless --no-nesterov).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Plain instead of Nesterov momentum.
    #[arg(long)]
    pub no_nesterov: bool,
    /// Weight decay (not applied to norms and biases).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Learning-rate schedule, stepped per iteration: constant, step, multistep, cosine or
    /// onecycle.
    #[arg(long, default_value = "onecycle")]
    pub schedule: ScheduleKind,
    /// Linear warmup epochs before the schedule.
    #[arg(long, default_value_t = 0.)]
    pub warmup_epochs: f64,
    /// Label smoothing of the cross-entropy (default: 0.1 for `train`, whose default recipe
    /// reaches 99 % on the bundled digits with it; 0 for the claim programs).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Augment the training data (random shifts; plus flips for CIFAR and folders).
    #[arg(long, overrides_with = "no_augment")]
    pub augment: bool,
    /// Do not augment.
    #[arg(long)]
    pub no_augment: bool,
    /// Random resized crops (torchvision's RandomResizedCrop, area --rrc-scale..1 of the
    /// image, aspect 3/4..4/3) instead of shifts.
    #[arg(long)]
    pub rrc: bool,
    /// Smallest area of a random resized crop, as a fraction of the image (default 0.08,
    /// torchvision's).
    #[arg(long, requires = "rrc", value_name = "MIN")]
    pub rrc_scale: Option<f64>,
    /// Random erasing (torchvision's RandomErasing) with probability P, after
    /// normalisation.
    #[arg(long, value_name = "P")]
    pub random_erasing: Option<f64>,
    /// RandAugment: N operations per image at magnitude M of 30 (`2,9` is the paper's
    /// ImageNet setting); shears, shifts and rotations for grayscale images, all fourteen
    /// operations for colour ones.
    #[arg(long, value_name = "N,M", value_parser = parse_n_m, conflicts_with = "trivial_augment")]
    pub randaugment: Option<(usize, usize)>,
    /// TrivialAugment Wide: one operation per image at a random magnitude.
    #[arg(long)]
    pub trivial_augment: bool,
    /// Mixup with this Beta alpha (e.g. 0.2): each batch blended with its mirror image,
    /// the targets likewise (timm's Mixup, batch mode; --label-smoothing applies to them).
    #[arg(long, value_name = "ALPHA")]
    pub mixup: Option<f64>,
    /// CutMix with this Beta alpha (e.g. 1.0): a box of the mirror image pasted in, the
    /// targets mixed by area. With --mixup too, each batch takes one of the two (50 %).
    #[arg(long, value_name = "ALPHA")]
    pub cutmix: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.99 for
    /// runs of a few thousand steps, 0.9998 for long ones; timm's ModelEmaV3), evaluated
    /// after every epoch; `model.safetensors` gets whichever of the average and the
    /// trained weights scores higher.
    #[arg(long, value_name = "DECAY")]
    pub ema: Option<f64>,
    /// Warm the average up (timm's `use_warmup`): decay min(DECAY, 1 - (1 + t)^(-2/3)) at
    /// step t, so early weights fade fast.
    #[arg(long, requires = "ema")]
    pub ema_warmup: bool,
    /// Batches per optimizer step (gradient accumulation): the step sees the mean loss of
    /// K batches' samples, as one batch K times the size would (batch norm still
    /// normalises each batch by itself). The schedule counts optimizer steps.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub accumulate: u64,
    /// Hold out this fraction of the training set (seeded) as a validation set, evaluated
    /// after every epoch; keep-best and early stopping select on it, never on the test set.
    #[arg(long, value_name = "F")]
    pub val_split: Option<f64>,
    /// Save the weights of the epoch with the best validation accuracy as
    /// `best.safetensors` (a model file, like `model.safetensors`, which holds the last).
    #[arg(long, requires = "val_split")]
    pub keep_best: bool,
    /// Stop when the validation accuracy has not improved for PATIENCE epochs.
    #[arg(long, value_name = "PATIENCE", requires = "val_split", value_parser = clap::value_parser!(u64).range(1..))]
    pub early_stop: Option<u64>,
    /// Keep the training order fixed.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Seed of the weights, the data order and the augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: Option<u64>,
    /// Background threads that prepare batches.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub workers: u64,
    /// Device: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` or `auto`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The data as the recipe trains on it.
pub struct PreparedData {
    /// Training split (channels replicated for a 3-channel model when asked).
    pub train: Arc<dyn Dataset>,
    /// Test split.
    pub test: Arc<dyn Dataset>,
    /// Validation part held out of the training split (`--val-split`).
    pub val: Option<Arc<dyn Dataset>>,
    /// What `--data` named.
    pub spec: DataSpec,
    /// Input shape (C, H, W) after resizing.
    pub shape: (usize, usize, usize),
    /// The preprocessing a model file records (channels, size, mean and std).
    pub preprocess: Preprocess,
    /// Per-sample transforms of training samples (resize, augmentation, normalisation).
    pub train_transforms: Vec<Transform>,
    /// Per-sample transforms of test samples (resize, normalisation).
    pub test_transforms: Vec<Transform>,
}

impl PreparedData {
    /// Classes of the training split.
    pub fn num_classes(&self) -> usize {
        self.train.num_classes()
    }
}

impl RecipeArgs {
    /// The label smoothing in use: `--label-smoothing`, else 0 (programs with another
    /// default set the field before [`RecipeArgs::start`]).
    pub fn smoothing(&self) -> f64 {
        self.label_smoothing.unwrap_or(0.)
    }

    /// Checks the numeric flags, configures the CPU threads and returns the device.
    ///
    /// # Errors
    /// A flag out of range (named), or an unknown or unavailable device.
    pub fn start(&self) -> Result<Device> {
        for (name, v) in [
            ("--momentum", self.momentum),
            ("--weight-decay", self.weight_decay),
            ("--warmup-epochs", self.warmup_epochs),
        ] {
            // Checked here too so that the flag is named (the recipe names the setting).
            if !(v.is_finite() && v >= 0.) {
                bail!("{name} must be a finite number >= 0, got {v}");
            }
        }
        if !(0. ..1.).contains(&self.smoothing()) {
            bail!(
                "--label-smoothing must be in [0, 1), got {}",
                self.smoothing()
            );
        }
        if let Some(p) = self.random_erasing {
            if !(0. ..=1.).contains(&p) {
                bail!("--random-erasing must be a probability in [0, 1], got {p}");
            }
        }
        for (name, a) in [("--mixup", self.mixup), ("--cutmix", self.cutmix)] {
            if let Some(a) = a {
                if !(a.is_finite() && a > 0.) {
                    bail!("{name} must be a positive Beta alpha, got {a}");
                }
            }
        }
        if let Some(f) = self.val_split {
            if !(f > 0. && f < 1.) {
                bail!("--val-split must be a fraction in (0, 1), got {f}");
            }
        }
        if let Some(d) = self.ema {
            if !(0. ..1.).contains(&d) {
                bail!("--ema must be a decay in [0, 1), got {d}");
            }
        }
        if let Some(m) = self.rrc_scale {
            if !(m > 0. && m <= 1.) {
                bail!("--rrc-scale must be in (0, 1], got {m}");
            }
        }
        crate::start_threads(self.threads);
        Ok(resblock_core::parse_device(&self.device)?)
    }

    /// Opens `--data` (fetching it first with `--download`; folders are streamed: only
    /// their file lists are read here), replicates a grayscale dataset's channel when the
    /// model's stem has `model_channels = Some(3)`, measures the training split's
    /// per-channel statistics and builds the transforms. Prints one line about the data.
    ///
    /// # Errors
    /// Unreadable or inconsistent data, naming the file or flag.
    pub fn open_data(&self, model_channels: Option<usize>) -> Result<PreparedData> {
        let spec = DataSpec::parse(&self.data)?;
        if self.download {
            let Some(kind) = spec.remote_name() else {
                bail!(
                    "--download fetches mnist:DIR, cifar10:DIR or cifar100:DIR, not {:?}",
                    spec.text
                );
            };
            let ds = RemoteDataset::by_name(kind)?;
            let dir = &spec.dir;
            if !ds.is_present(dir) {
                crate::say!("downloading {kind} into {}", dir.display());
            }
            let mirror = std::env::var("RESBLOCK_DATA_MIRROR").ok();
            download(&ds, dir, mirror.as_deref())
                .with_context(|| format!("--download {kind} into {}", dir.display()))?;
        }
        let image_size = self.image_size.map(|s| s as usize);
        let (mut train, mut test) = spec.load(image_size)?;
        let folder = spec.kind == DataKind::Folder;
        let mnist = matches!(spec.kind, DataKind::Mnist | DataKind::BundledMnist);
        // Grayscale data meets a 3-channel stem (pretrained weights) by replicating its channel.
        if let (Some(3), (1, _, _)) = (model_channels, train.shape()) {
            crate::say!("grayscale data, 3-channel weights: replicating the channel (as torchvision's Grayscale(3))");
            train = Arc::new(ReplicateChannels::new(train, 3)?);
            test = Arc::new(ReplicateChannels::new(test, 3)?);
        }
        let val: Option<Arc<dyn Dataset>> = match self.val_split {
            Some(f) => {
                let (t, v) = split_validation(train, f, self.seed)
                    .with_context(|| format!("--val-split {f}"))?;
                crate::say!(
                    "--val-split {f}: {} images held out for validation (seed {})",
                    v.len(),
                    self.seed
                );
                train = Arc::new(t);
                Some(Arc::new(v))
            }
            None => None,
        };
        let (c, h, w) = train.shape();
        // Folders are resized as they are decoded; other datasets by a transform, first.
        let resize = match image_size {
            Some(s) if !folder && (s, s) != (h, w) => vec![Transform::Resize {
                height: s,
                width: s,
            }],
            _ => Vec::new(),
        };
        let (h, w) = match image_size {
            Some(s) if !resize.is_empty() => {
                crate::say!("resizing to {s}x{s}");
                (s, s)
            }
            _ => (h, w),
        };
        crate::say!(
            "data {}: {} training and {} test images, {c}x{h}x{w}, {} classes",
            self.data,
            train.len(),
            test.len(),
            train.num_classes()
        );
        let (mean, std) = dataset_stats(train.as_ref())?;
        let preprocess = Preprocess {
            channels: c,
            image_size: [h, w],
            resize: None,
            mean: mean.clone(),
            std: std.clone(),
        };
        let normalize = Transform::Normalize { mean, std };
        let policy = match (self.no_augment, mnist) {
            (true, _) => AugmentPolicy::None,
            (false, true) => AugmentPolicy::Digits,
            (false, false) => AugmentPolicy::Natural,
        };
        let extras = AugmentExtras {
            rrc_scale: self.rrc.then_some((self.rrc_scale.unwrap_or(0.08), 1.)),
            random_erasing: self.random_erasing,
            randaugment: self.randaugment,
            trivial_augment: self.trivial_augment,
        };
        let train_transforms =
            extras.apply(policy.train_transforms((h, w), &resize, &normalize)?, h)?;
        let test_transforms = [resize, vec![normalize]].concat();
        Ok(PreparedData {
            train,
            test,
            val,
            spec,
            shape: (c, h, w),
            preprocess,
            train_transforms,
            test_transforms,
        })
    }

    /// The training loader (shuffled with the seed unless `--no-shuffle`, augmented per
    /// (seed, epoch, sample)) and the test loader, each with `shard`'s part of the data in
    /// a data-parallel run (the training set as PyTorch's `DistributedSampler` splits it,
    /// the test set in disjoint parts; see [`Shard`]).
    ///
    /// # Errors
    /// An empty dataset.
    pub fn loaders(
        &self,
        data: &PreparedData,
        device: &Device,
        shard: Shard,
    ) -> Result<(DataLoader, DataLoader)> {
        let workers = self.workers as usize;
        let mut train = DataLoader::new(data.train.clone(), self.batch_size as usize)?
            .transforms(data.train_transforms.clone())
            .seed(self.seed)
            .workers(workers)
            .shard(shard)
            .device(device.clone());
        if !self.no_shuffle {
            train = train.shuffle(self.seed);
        }
        if self.mixup.is_some() || self.cutmix.is_some() {
            train = train.mix(MixConfig {
                mixup_alpha: self.mixup.unwrap_or(0.),
                cutmix_alpha: self.cutmix.unwrap_or(0.),
                switch_prob: 0.5,
                label_smoothing: self.smoothing(),
                num_classes: data.num_classes(),
            })?;
        }
        let test = DataLoader::new(eval_part(&data.test, shard)?, self.batch_size as usize)?
            .transforms(data.test_transforms.clone())
            .workers(workers)
            .device(device.clone());
        Ok((train, test))
    }

    /// The validation loader (`--val-split`; test transforms, fixed order), if any.
    ///
    /// # Errors
    /// An empty dataset.
    pub fn val_loader(
        &self,
        data: &PreparedData,
        device: &Device,
        shard: Shard,
    ) -> Result<Option<DataLoader>> {
        let Some(val) = &data.val else {
            return Ok(None);
        };
        Ok(Some(
            DataLoader::new(eval_part(val, shard)?, self.batch_size as usize)?
                .transforms(data.test_transforms.clone())
                .workers(self.workers as usize)
                .device(device.clone()),
        ))
    }

    /// The optimizer over `groups`.
    ///
    /// # Errors
    /// Invalid hyper-parameters.
    pub fn optimizer(&self, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        Ok(OptimizerConfig {
            kind: self.optimizer,
            lr: self.lr,
            momentum: self.momentum,
            nesterov: !self.no_nesterov,
            weight_decay: self.weight_decay,
        }
        .build(groups)?)
    }

    /// The schedule of a run of `epochs` epochs of `steps_per_epoch` steps.
    ///
    /// # Errors
    /// Invalid warmup or rate.
    pub fn schedule(&self, steps_per_epoch: u64, epochs: u64) -> Result<LrSchedule> {
        Ok(ScheduleConfig {
            kind: self.schedule,
            lr: self.lr,
            warmup_epochs: self.warmup_epochs,
        }
        .build(steps_per_epoch, epochs)?)
    }

    /// The loss.
    pub fn loss(&self) -> LossKind {
        LossKind::CrossEntropy {
            label_smoothing: self.smoothing(),
        }
    }
}

/// `shard`'s part of an evaluation set: all of it alone, else every W-th sample from the
/// rank's own (each sample evaluated once over the ranks).
fn eval_part(set: &Arc<dyn Dataset>, shard: Shard) -> Result<Arc<dyn Dataset>> {
    if shard.world == 1 {
        return Ok(set.clone());
    }
    Ok(Arc::new(Subset::new(
        set.clone(),
        shard.eval_indices(set.len()),
    )?))
}

/// Parses `N,M` (RandAugment's operation count and magnitude 0..=30).
fn parse_n_m(s: &str) -> std::result::Result<(usize, usize), String> {
    let (n, m) = s
        .split_once(',')
        .ok_or_else(|| format!("expected N,M (e.g. 2,9), got {s:?}"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("N must be a count, got {n:?}"))?;
    let m: usize = m
        .trim()
        .parse()
        .map_err(|_| format!("M must be 0..=30, got {m:?}"))?;
    if m > 30 {
        return Err(format!("M must be 0..=30, got {m}"));
    }
    Ok((n, m))
}

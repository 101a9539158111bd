//! The streaming data path: a lazily decoded image folder gives the same training, bit for
//! bit, as the same folder decoded up front; the loader never runs more than its queue ahead
//! of the trainer; `max_steps` ends a run early.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarMap;
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_train::data::{read_image_folder, ImageFolder, ReplicateChannels};
use resblock_train::optim::param_groups;
use resblock_train::recipe::{
    dataset_stats, AugmentPolicy, OptimizerConfig, OptimizerKind, ScheduleConfig, ScheduleKind,
};
use resblock_train::{
    BatchSource, DataLoader, Dataset, LossKind, Progress, Trainer, TrainerConfig, Transform,
};
use resblock_vision::{resnet, ResNetConfig};

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("streaming-tests", name)
}

/// `n` JPEGs per class of varied sizes (so decoding resizes them), deterministic content.
fn jpeg_folder(root: &Path, classes: &[&str], n: usize) -> Result<()> {
    for (c, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir)?;
        for i in 0..n {
            let (w, h) = (20 + (i % 3) as u32 * 4, 18 + (i % 2) as u32 * 6);
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let v = (x * 13 + y * 7 + (i * 31 + c * 101) as u32) % 256;
                image::Rgb([v as u8, (255 - v) as u8, ((x * y) % 256) as u8])
            });
            img.save(dir.join(format!("{i:03}.jpg")))?;
        }
    }
    Ok(())
}

fn weights(varmap: &VarMap) -> Result<Weights> {
    let data = varmap.data().lock().expect("lock");
    let mut v = data
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Trains a small CIFAR ResNet for `max_steps` on `ds` with the `train` recipe; returns the
/// step losses and the final weights.
/// Named tensors as f64 values.
type Weights = Vec<(String, Vec<f64>)>;

fn train(ds: Arc<dyn Dataset>, max_steps: u64) -> Result<(Vec<f64>, Weights)> {
    let (c, h, w) = ds.shape();
    let (mean, std) = dataset_stats(ds.as_ref())?;
    let tf = AugmentPolicy::Natural.train_transforms(
        (h, w),
        &[],
        &Transform::Normalize { mean, std },
    )?;
    let mut loader = DataLoader::new(ds.clone(), 4)?
        .transforms(tf)
        .shuffle(5)
        .workers(2);
    let mut cfg = ResNetConfig::cifar(8)?;
    cfg.in_channels = c;
    cfg.num_classes = ds.num_classes();
    let rng = RngHandle::seed_from_u64(1);
    let varmap = VarMap::new();
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    let opt = OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr: 0.05,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 5e-4,
    }
    .build(param_groups(&varmap, 5e-4, true))?;
    let schedule = ScheduleConfig {
        kind: ScheduleKind::Onecycle,
        lr: 0.05,
        warmup_epochs: 0.,
    }
    .build(loader.num_batches() as u64, 2)?;
    let tcfg = TrainerConfig {
        epochs: 2,
        loss: LossKind::CrossEntropy {
            label_smoothing: 0.,
        },
        max_steps: Some(max_steps),
        ..Default::default()
    };
    let mut trainer = Trainer::new(&net, &varmap, opt, schedule, tcfg);
    trainer.fit(&mut loader, None)?;
    assert_eq!(trainer.step(), max_steps, "max_steps ends the run");
    Ok((trainer.step_losses().to_vec(), weights(&varmap)?))
}

#[test]
fn a_streamed_folder_trains_exactly_like_one_decoded_up_front() -> Result<()> {
    let root = scratch("same");
    jpeg_folder(&root, &["ant", "bee", "cat"], 6)?;
    let eager: Arc<dyn Dataset> = Arc::new(read_image_folder(&root, Some(16), None)?);
    let lazy: Arc<dyn Dataset> = Arc::new(ImageFolder::open(&root, Some(16), None)?);
    assert_eq!((lazy.len(), lazy.shape()), (18, (3, 16, 16)));
    assert_eq!(lazy.class_names(), ["ant", "bee", "cat"]);
    assert!(
        lazy.source(7).ends_with("bee/001.jpg"),
        "{}",
        lazy.source(7)
    );
    for i in [0, 7, 17] {
        assert_eq!(eager.pixels(i)?, lazy.pixels(i)?, "sample {i}");
    }
    assert_eq!(
        dataset_stats(eager.as_ref())?,
        dataset_stats(lazy.as_ref())?
    );
    // 18 images in batches of 4: 5 steps per epoch, so 7 steps cross an epoch boundary.
    let (loss_a, w_a) = train(eager, 7)?;
    let (loss_b, w_b) = train(lazy, 7)?;
    assert_eq!(loss_a.len(), 7);
    assert_eq!(loss_a, loss_b, "same losses, bit for bit");
    assert!(w_a == w_b, "same weights, bit for bit");
    Ok(())
}

#[test]
fn gray_folders_replicate_lazily_and_bad_files_are_named_when_read() -> Result<()> {
    let root = scratch("gray");
    for (class, v) in [("a", 30u8), ("b", 200)] {
        std::fs::create_dir_all(root.join(class))?;
        image::GrayImage::from_pixel(5, 4, image::Luma([v]))
            .save(root.join(class).join("0.png"))?;
    }
    let gray: Arc<dyn Dataset> = Arc::new(ImageFolder::open(&root, None, None)?);
    assert_eq!(gray.shape(), (1, 4, 5));
    let rgb = ReplicateChannels::new(gray.clone(), 3)?;
    assert_eq!(rgb.shape(), (3, 4, 5));
    let (px, label) = rgb.pixels(1)?;
    assert_eq!((px.len(), px[0], px[59], label), (60, 200, 200, 1));
    assert!(
        ReplicateChannels::new(Arc::new(rgb), 3).is_err(),
        "3 channels cannot be replicated"
    );

    // A file whose header reads but whose pixels do not: named when the sample is read.
    let good = std::fs::read(root.join("a/0.png"))?;
    std::fs::write(root.join("a/1.png"), &good[..good.len() - 20])?;
    let ds = ImageFolder::open(&root, None, None)?;
    let err = ds.pixels(1).expect_err("truncated").to_string();
    assert!(err.contains("1.png"), "{err}");
    // Through the loader the error reaches the caller as an error, not a panic.
    let mut loader = DataLoader::new(Arc::new(ds), 3)?;
    let first = loader.epoch(0)?.next().expect("a batch");
    assert!(first.expect_err("bad batch").to_string().contains("1.png"));
    Ok(())
}

/// `inner` repeated to `len` samples, counting the samples read (to see how far the loader
/// runs ahead of the trainer).
struct Counting {
    inner: Arc<dyn Dataset>,
    len: usize,
    read: Arc<AtomicUsize>,
}

impl Dataset for Counting {
    fn len(&self) -> usize {
        self.len
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn pixels(&self, i: usize) -> resblock_train::Result<(Vec<u8>, u32)> {
        self.read.fetch_add(1, Ordering::SeqCst);
        self.inner.pixels(i % self.inner.len())
    }
}

#[test]
fn the_loader_stays_a_bounded_queue_ahead_of_training() -> Result<()> {
    let root = scratch("bounded");
    jpeg_folder(&root, &["x", "y"], 2)?;
    let read = Arc::new(AtomicUsize::new(0));
    let inner: Arc<dyn Dataset> = Arc::new(ImageFolder::open(&root, Some(8), None)?);
    // Pretend the folder has 2,000 images (400 batches of 5).
    let ds = Arc::new(Counting {
        inner,
        len: 2000,
        read: read.clone(),
    });
    let (workers, prefetch, bs) = (2, 2, 5);
    let mut loader = DataLoader::new(ds, bs)?.workers(workers).prefetch(prefetch);
    let varmap = VarMap::new();
    let rng = RngHandle::seed_from_u64(0);
    let mut cfg = ResNetConfig::cifar(8)?;
    cfg.in_channels = 3;
    cfg.num_classes = 2;
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    let opt = OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr: 0.01,
        momentum: 0.,
        nesterov: false,
        weight_decay: 0.,
    }
    .build(param_groups(&varmap, 0., true))?;
    let schedule = ScheduleConfig {
        kind: ScheduleKind::Constant,
        lr: 0.01,
        warmup_epochs: 0.,
    }
    .build(400, 1)?;
    let tcfg = TrainerConfig {
        max_steps: Some(6),
        ..Default::default()
    };
    let ahead = Arc::new(AtomicUsize::new(0));
    let (seen, r) = (ahead.clone(), read.clone());
    let mut trainer = Trainer::new(&net, &varmap, opt, schedule, tcfg).on_progress(move |p| {
        if let Progress::Step { step, .. } = p {
            let batches_read = r.load(Ordering::SeqCst).div_ceil(bs);
            seen.fetch_max(batches_read.saturating_sub(*step), Ordering::SeqCst);
        }
    });
    trainer.fit(&mut loader, None)?;
    assert_eq!(trainer.step(), 6);
    // In flight: one batch being made per worker and `prefetch` queued per worker.
    let bound = workers * (prefetch + 1) + 1;
    let max_ahead = ahead.load(Ordering::SeqCst);
    assert!(
        max_ahead <= bound,
        "the loader ran {max_ahead} batches ahead (bound {bound})"
    );
    assert!(
        read.load(Ordering::SeqCst) <= (6 + bound) * bs,
        "an epoch was not read up front"
    );
    Ok(())
}

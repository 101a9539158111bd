//! Batching with seeded shuffling and augmentation on background threads, streamed through a
//! bounded queue.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use resblock_core::RngHandle;

use super::mix::MixConfig;
use super::{Batch, BatchSource, Dataset, Shard, Transform};
use crate::error::{Error, Result};

/// Mixes (seed, a, b) into one 64-bit seed (splitmix64 steps).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let step = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    step(step(step(seed) ^ a) ^ b)
}

/// Loads batches from a [`Dataset`]: the order of epoch `e` is a permutation seeded by
/// (seed, e); sample `i` of epoch `e` is augmented with a stream seeded by (seed, e, i); batches
/// are assembled (read, decoded, augmented) by `workers` threads while the model trains and
/// delivered in order. At most `workers * (prefetch + 1)` batches exist ahead of the one
/// in use, whatever the dataset's size: batch `b` is made by worker `b % workers`, and each
/// worker's queue holds `prefetch` finished batches.
pub struct DataLoader {
    dataset: Arc<dyn Dataset>,
    transforms: Arc<Vec<Transform>>,
    batch_size: usize,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    workers: usize,
    prefetch: usize,
    device: Device,
    mix: Option<MixConfig>,
    shard: Shard,
}

impl DataLoader {
    /// A loader over `dataset` with batches of `batch_size`.
    ///
    /// # Errors
    /// A zero batch size or an empty dataset.
    pub fn new(dataset: Arc<dyn Dataset>, batch_size: usize) -> Result<Self> {
        if batch_size == 0 || dataset.is_empty() {
            return Err(Error::config(format!(
                "data loader needs a batch size > 0 and samples (batch size {batch_size}, {} samples)",
                dataset.len()
            )));
        }
        Ok(Self {
            dataset,
            transforms: Arc::new(Vec::new()),
            batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
            workers: 2,
            prefetch: 2,
            device: Device::Cpu,
            mix: None,
            shard: Shard::whole(),
        })
    }

    /// Mixes each batch (Mixup/CutMix, see [`super::mix`]) after the per-sample
    /// transforms, with a stream seeded by (seed, epoch, batch); the targets become class
    /// probabilities, (N, classes) f32.
    ///
    /// # Errors
    /// Invalid settings.
    pub fn mix(mut self, cfg: MixConfig) -> Result<Self> {
        cfg.validate()?;
        self.mix = Some(cfg);
        Ok(self)
    }
    /// Shuffles each epoch with this seed.
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.shuffle = true;
        self.seed = seed;
        self
    }
    /// Seed of the augmentation streams (set by [`DataLoader::shuffle`] too).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Drops the last incomplete batch.
    pub fn drop_last(mut self, yes: bool) -> Self {
        self.drop_last = yes;
        self
    }
    /// The per-sample transforms, in order.
    pub fn transforms(mut self, t: Vec<Transform>) -> Self {
        self.transforms = Arc::new(t);
        self
    }
    /// Background threads (at least 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }
    /// Finished batches each worker may queue ahead (at least 1; default 2).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// The device batches are moved to.
    pub fn device(mut self, d: Device) -> Self {
        self.device = d;
        self
    }

    /// Takes only this rank's share of every epoch (data-parallel training, see
    /// [`Shard`]): the whole epoch's order is the same on every rank (same seed), and each
    /// rank's batches are made from its positions of it. Batch mixing is seeded per rank.
    pub fn shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// The sample order of `epoch` (this rank's share of it, see [`DataLoader::shard`]).
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            RngHandle::seed_from_u64(mix(self.seed, epoch as u64, 0x5348_5546)).shuffle(&mut idx);
        }
        self.shard.take(&idx)
    }
}

/// Salt of the batch-level mixing streams (distinct from the per-sample ones).
const MIX_STREAM: u64 = 0x6d69_7875_7063_7574;

fn make_batch(
    ds: &dyn Dataset,
    transforms: &[Transform],
    (idx, batch): (&[usize], u64),
    seed: u64,
    epoch: usize,
    mixing: Option<&MixConfig>,
) -> Result<Batch> {
    let (c, h0, w0) = ds.shape();
    let mut pixels = Vec::new();
    let mut labels = Vec::with_capacity(idx.len());
    let mut out_hw = (h0, w0);
    for &i in idx {
        let (mut x, label) = ds.get(i)?;
        let rng = RngHandle::seed_from_u64(mix(seed, epoch as u64, i as u64 + 1));
        let (mut h, mut w) = (h0, w0);
        for t in transforms {
            (h, w) = t.apply(&mut x, c, h, w, &rng)?;
        }
        out_hw = (h, w);
        pixels.extend_from_slice(&x);
        labels.push(label);
    }
    let n = labels.len();
    let targets = match mixing {
        Some(cfg) => {
            let rng = RngHandle::seed_from_u64(mix(seed ^ MIX_STREAM, epoch as u64, batch));
            let t =
                super::mix::mix_batch(&mut pixels, &labels, (c, out_hw.0, out_hw.1), cfg, &rng)?;
            Tensor::from_vec(t, (n, cfg.num_classes), &Device::Cpu)?
        }
        None => Tensor::from_vec(labels, n, &Device::Cpu)?,
    };
    Ok(Batch {
        inputs: Tensor::from_vec(pixels, (n, c, out_hw.0, out_hw.1), &Device::Cpu)?,
        targets,
    })
}

/// Delivers the workers' batches in order: batch `b` comes from worker `b % workers`.
struct InOrder {
    queues: Vec<Receiver<Result<Batch>>>,
    next: usize,
    total: usize,
    device: Device,
    handles: Vec<JoinHandle<()>>,
}

impl Iterator for InOrder {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        let queue = &self.queues[self.next % self.queues.len()];
        self.next += 1;
        match queue.recv() {
            Ok(b) => Some(b.and_then(|b| {
                Ok(Batch {
                    inputs: b.inputs.to_device(&self.device)?,
                    targets: b.targets.to_device(&self.device)?,
                })
            })),
            Err(_) => {
                self.next = self.total;
                Some(Err(Error::config(
                    "a data loader worker stopped unexpectedly",
                )))
            }
        }
    }
}

impl Drop for InOrder {
    fn drop(&mut self) {
        // Dropping the receivers makes every blocked send fail, so the workers return.
        self.queues.clear();
        for h in std::mem::take(&mut self.handles) {
            let _ = h.join();
        }
    }
}

impl BatchSource for DataLoader {
    fn num_batches(&self) -> usize {
        let n = self.shard.len(self.dataset.len());
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn epoch(&mut self, epoch: usize) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        self.epoch_prefix(epoch, usize::MAX)
    }

    fn epoch_prefix(
        &mut self,
        epoch: usize,
        n: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        let order = self.order(epoch);
        let chunks: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .filter(|c| !self.drop_last || c.len() == self.batch_size)
            .take(n)
            .map(<[usize]>::to_vec)
            .collect();
        let total = chunks.len();
        let chunks = Arc::new(chunks);
        let workers = self.workers.min(total.max(1));
        let mut queues = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.prefetch);
            let (chunks, ds, tf) = (
                chunks.clone(),
                self.dataset.clone(),
                self.transforms.clone(),
            );
            let seed = self.seed;
            let mixing = self.mix;
            // Mixing streams are per batch and per rank (rank 0's are the single process's).
            let rank = (self.shard.rank as u64) << 32;
            handles.push(std::thread::spawn(move || {
                for i in (w..chunks.len()).step_by(workers) {
                    let b = make_batch(
                        ds.as_ref(),
                        &tf,
                        (&chunks[i], rank | i as u64),
                        seed,
                        epoch,
                        mixing.as_ref(),
                    );
                    let failed = b.is_err();
                    if tx.send(b).is_err() || failed {
                        return;
                    }
                }
            }));
            queues.push(rx);
        }
        Ok(Box::new(InOrder {
            queues,
            next: 0,
            total,
            device: self.device.clone(),
            handles,
        }))
    }
}

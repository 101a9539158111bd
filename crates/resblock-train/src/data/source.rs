//! What the trainer needs from data: a source of (inputs, targets) batches per epoch.

use candle_core::Tensor;

use crate::error::Result;

/// One batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Model inputs, batch first.
    pub inputs: Tensor,
    /// Targets: class indices (N) for classification, values for regression.
    pub targets: Tensor,
}

/// A source of batches. The order of epoch `e` must depend only on `e` and the source's
/// own seed (not on what was drawn before), so that resuming at epoch `e` sees the same
/// batches as an uninterrupted run.
pub trait BatchSource {
    /// Batches per epoch.
    fn num_batches(&self) -> usize;
    /// The batches of epoch `epoch` (0-based), in order.
    ///
    /// # Errors
    /// Reading or decoding failures.
    fn epoch(&mut self, epoch: usize) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>>;
    /// The first `n` batches of epoch `epoch` (a run that stops early): a source that
    /// prepares batches ahead prepares no more than these.
    ///
    /// # Errors
    /// As [`BatchSource::epoch`].
    fn epoch_prefix(
        &mut self,
        epoch: usize,
        n: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        Ok(Box::new(self.epoch(epoch)?.take(n)))
    }
}

/// A fixed list of batches, the same every epoch (tests, small in-memory data).
#[derive(Debug, Clone)]
pub struct FixedBatches(pub Vec<Batch>);

impl BatchSource for FixedBatches {
    fn num_batches(&self) -> usize {
        self.0.len()
    }
    fn epoch(&mut self, _epoch: usize) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        Ok(Box::new(self.0.iter().cloned().map(Ok)))
    }
}

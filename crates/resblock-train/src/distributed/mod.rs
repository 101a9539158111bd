//! Data-parallel training across processes: what the [`crate::Trainer`] needs from a
//! communication library ([`Communicator`]), the single-process one ([`SingleProcess`]),
//! MPI's (`mpi::MpiCommunicator`, feature `mpi`), threads of one process as ranks
//! ([`LocalGroup`], for tests), and the two collective steps the trainer
//! takes ([`sync`]: broadcasting variables, averaging gradients in buckets).
//!
//! The semantics are PyTorch `DistributedDataParallel`'s, so that runs compare with it:
//! every rank starts from rank 0's weights, takes its own share of each epoch
//! ([`crate::data::Shard`], `DistributedSampler`'s), computes gradients on it, and the
//! gradients are averaged over the ranks before every optimizer step, so all ranks step
//! alike. Batch-norm statistics stay local to each rank during an epoch and rank 0's are
//! broadcast at its end (before evaluation and the checkpoint), as DDP's
//! `broadcast_buffers` does before every forward. See docs/distributed.md.

mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod sync;

pub use local::LocalGroup;

use crate::error::Result;

/// Collective operations among the processes (ranks) of one data-parallel run. Every rank
/// must call the same operations in the same order with buffers of the same length.
pub trait Communicator: std::fmt::Debug {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// The number of ranks on this machine (for sizing thread pools).
    fn local_size(&self) -> usize {
        1
    }
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`.
    ///
    /// # Errors
    /// A failed transfer.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Communicator::all_reduce_sum_f32`] for f64 values (metrics, losses, f64 models).
    ///
    /// # Errors
    /// A failed transfer.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Sums several buffers (gradient buckets): an implementation may have them all in
    /// flight at once. By default one after the other.
    ///
    /// # Errors
    /// A failed transfer.
    fn all_reduce_sum_f32_buckets(&self, bufs: &mut [Vec<f32>]) -> Result<()> {
        for b in bufs {
            self.all_reduce_sum_f32(b)?;
        }
        Ok(())
    }
    /// Replaces `buf` on every rank by `root`'s.
    ///
    /// # Errors
    /// A failed transfer.
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()>;
    /// Waits until every rank has arrived here.
    ///
    /// # Errors
    /// A failed transfer.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the run with exit status `code` (a rank that fails while the
    /// others wait in a collective would otherwise leave them waiting forever).
    fn abort(&self, code: i32) -> !;
}

/// One process alone: rank 0 of 1, every collective a no-op.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f64(&self, _buf: &mut [f64], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

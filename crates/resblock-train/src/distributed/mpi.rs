//! The [`Communicator`] on MPI (the `mpi` crate over the system's MPI library, e.g. Open
//! MPI from the distribution's packages): one process per rank, started by `mpirun -np W`,
//! a hostfile or Slurm's `srun`.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives, Root};
use mpi::Threading;

use super::Communicator;
use crate::error::{Error, Result};

/// `MPI_COMM_WORLD` of an initialised MPI; dropping it finalises MPI.
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    local_size: usize,
    // Declared last: dropped (MPI_Finalize) after the communicators.
    _universe: Universe,
}

impl std::fmt::Debug for MpiCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MpiCommunicator {{ rank: {}, size: {}, local_size: {} }}",
            self.rank(),
            self.size(),
            self.local_size
        )
    }
}

impl MpiCommunicator {
    /// Initialises MPI (only the calling thread makes MPI calls: `MPI_THREAD_FUNNELED`).
    ///
    /// # Errors
    /// MPI already initialised in this process, or a library without funneled threads.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::config("MPI is already initialised in this process"))?;
        if threading < Threading::Funneled {
            return Err(Error::config(format!(
                "the MPI library offers thread support {threading:?}; funneled is needed (worker threads load data while the main thread communicates)"
            )));
        }
        let world = universe.world();
        let local_size = world.split_shared(world.rank()).size().max(1) as usize;
        Ok(Self {
            world,
            local_size,
            _universe: universe,
        })
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f32_buckets(&self, bufs: &mut [Vec<f32>]) -> Result<()> {
        // All buckets in flight at once (MPI_Iallreduce), then waited for in order.
        let sends: Vec<Vec<f32>> = bufs.to_vec();
        mpi::request::scope(|scope| {
            let requests: Vec<_> = sends
                .iter()
                .zip(bufs.iter_mut())
                .map(|(s, r)| {
                    self.world.immediate_all_reduce_into(
                        scope,
                        &s[..],
                        &mut r[..],
                        SystemOperation::sum(),
                    )
                })
                .collect();
            for r in requests {
                r.wait();
            }
        });
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::config(format!(
                "broadcast from rank {root} of {}",
                self.size()
            )));
        }
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

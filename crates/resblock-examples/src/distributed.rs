//! `train --distributed`: joining the ranks of an MPI launch (`mpirun -np W`, a hostfile,
//! Slurm's `srun`), sizing each rank's threads, and the console rule that rank 0 alone
//! prints. The training semantics are the trainer's (see `resblock_train::distributed`
//! and docs/distributed.md).

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use resblock_train::{Communicator, SingleProcess};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences [`crate::say!`] (ranks other than 0 of a data-parallel run).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether [`crate::say!`] is silenced.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// `println!` unless silenced: the programs' console output, which only rank 0 of a
/// data-parallel run writes.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        if !$crate::distributed::quiet() {
            println!($($arg)*);
        }
    };
}

/// The ranks launched on this machine, as the launcher tells its processes (Open MPI,
/// MPICH/Hydra, Slurm), known before MPI starts: threads are sized while the process has
/// only one (see `resblock_core::pin_candle_threads`), and MPI starts threads of its own.
pub fn local_ranks_from_env() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|k| {
        let v = std::env::var(k).ok()?;
        // Slurm writes e.g. "2(x3)" for three nodes of two tasks.
        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<usize>().ok().filter(|&n| n > 0)
    })
}

/// The default threads of one rank when `--threads` and `RAYON_NUM_THREADS` are not
/// given: this machine's cores shared among its ranks (at least 1).
pub fn default_rank_threads() -> Option<u64> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let local = local_ranks_from_env()?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Some((cores / local).max(1) as u64)
}

/// The ranks of this run: MPI's with `distributed` (in a build with the `mpi` feature),
/// else this process alone. Ranks other than 0 are silenced.
///
/// # Errors
/// `--distributed` in a build without MPI, or MPI failing to start.
pub fn connect(distributed: bool) -> Result<Rc<dyn Communicator>> {
    if !distributed {
        return Ok(Rc::new(SingleProcess));
    }
    let comm = mpi_world()?;
    set_quiet(comm.rank() != 0);
    Ok(comm)
}

#[cfg(feature = "mpi")]
fn mpi_world() -> Result<Rc<dyn Communicator>> {
    Ok(Rc::new(
        resblock_train::distributed::mpi::MpiCommunicator::init()?,
    ))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world() -> Result<Rc<dyn Communicator>> {
    anyhow::bail!(
        "--distributed needs a build with MPI: install Open MPI and libclang (apt-get install openmpi-bin libopenmpi-dev libclang-dev), then cargo build --release -p resblock-examples --features mpi (see docs/distributed.md)"
    )
}

/// Runs `f`; in a run of several ranks an error is printed with the rank and ends every
/// rank (MPI abort), since the others would wait for this one forever.
///
/// # Errors
/// `f`'s error (one rank alone).
pub fn or_abort<T>(comm: &dyn Communicator, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match f() {
        Ok(v) => Ok(v),
        Err(e) if comm.size() > 1 => {
            eprintln!("Error (rank {} of {}): {e:#}", comm.rank(), comm.size());
            comm.abort(1)
        }
        Err(e) => Err(e),
    }
}

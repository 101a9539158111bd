//! Ranks as threads of one process ([`LocalGroup`]): the data-parallel trainer tested
//! without an MPI launch, and the smallest complete [`Communicator`] to read when writing
//! another (NCCL, a cloud fabric).

use std::sync::{Arc, Barrier, Mutex};

use super::Communicator;
use crate::error::{Error, Result};

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

/// One rank of a group of threads. Sums are taken in rank order (the same on every
/// rank); f32 buffers are summed in f32.
#[derive(Clone)]
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LocalGroup {{ rank: {}, size: {} }}",
            self.rank, self.size
        )
    }
}

impl LocalGroup {
    /// `size` ranks, to be moved one to each thread.
    ///
    /// # Errors
    /// `size` 0.
    pub fn new(size: usize) -> Result<Vec<Self>> {
        if size == 0 {
            return Err(Error::config("a group needs at least one rank"));
        }
        let shared = Arc::new(Shared {
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
        });
        Ok((0..size)
            .map(|rank| Self {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Every rank's `mine`, by rank.
    fn exchange(&self, mine: Vec<f64>) -> Result<Vec<Vec<f64>>> {
        let n = mine.len();
        self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = mine;
        self.shared.barrier.wait();
        let all = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Nobody writes the next round's slot before everyone has read this one.
        self.shared.barrier.wait();
        if let Some((r, b)) = all.iter().enumerate().find(|(_, b)| b.len() != n) {
            return Err(Error::config(format!(
                "rank {r} sent {} values, rank {} {n}",
                b.len(),
                self.rank
            )));
        }
        Ok(all)
    }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange(buf.iter().map(|&x| f64::from(x)).collect())?;
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all.iter().fold(0f32, |s, b| s + b[i] as f32);
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let all = self.exchange(buf.to_vec())?;
        for (i, x) in buf.iter_mut().enumerate() {
            *x = all.iter().fold(0., |s, b| s + b[i]);
        }
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        let all = self.exchange(buf.to_vec())?;
        let from = all
            .get(root)
            .ok_or_else(|| Error::config(format!("broadcast from rank {root} of {}", self.size)))?;
        buf.copy_from_slice(from);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        panic!(
            "rank {} of {} aborted with status {code}",
            self.rank, self.size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_broadcasts_across_threads() -> Result<()> {
        let handles: Vec<_> = LocalGroup::new(3)?
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || -> Result<(Vec<f32>, Vec<f64>)> {
                    let r = g.rank() as f32;
                    let mut a = vec![r, 2. * r];
                    g.all_reduce_sum_f32(&mut a)?;
                    let mut b = vec![f64::from(r) + 10.];
                    g.broadcast_f64(&mut b, 2)?;
                    Ok((a, b))
                })
            })
            .collect();
        for h in handles {
            let (a, b) = h.join().map_err(|_| Error::config("thread panicked"))??;
            assert_eq!(a, vec![3., 6.]);
            assert_eq!(b, vec![12.]);
        }
        Ok(())
    }
}

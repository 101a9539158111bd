//! The dense custom op: `(x, w[, b])` -> `act(x . w^T + b)` on the CPU, f32 or f64.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{gelu, DenseActivation};
use crate::buffer::{contiguous_slice, relu_mask_slice, vec_written_by, with_cpu_slice};
use crate::dispatch::Simd;
use crate::matmul::{as_f32, as_f32_mut, as_f32_uninit, gemm_new};
use crate::simd::with_simd;

/// Elements per parallel task of the elementwise passes.
const CHUNK: usize = 1 << 14;

/// `(dx, dw, db)`, `dx` and `db` where asked for.
type Grads<T> = (Option<Vec<T>>, Vec<T>, Option<Vec<T>>);

/// `z[i * n + j] += b[j]` over the rows of `z` (`n = b.len()`).
#[inline(always)]
fn add_rows<T: WithDType>(z: &mut [T], b: &[T]) {
    for row in z.chunks_exact_mut(b.len()) {
        for (v, b) in row.iter_mut().zip(b) {
            *v += *b;
        }
    }
}

/// [`add_rows`] in f32 compiled for `simd` (the widest of it the CPU has): at the build
/// target's level it ran four lanes wide, about 1.1% of a residual MLP block's forward +
/// backward for its two layers' biases. Every level adds the same values.
pub(super) fn add_rows_with(simd: Simd, z: &mut [f32], b: &[f32]) {
    with_simd!(simd, add_rows::<f32>(z: &mut [f32], b: &[f32]))
}

/// `acc[j] += sum_i rows[i * n + j]` in f64 (`n = acc.len()`).
#[inline(always)]
fn column_sums<T: WithDType>(acc: &mut [f64], rows: &[T]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.to_f64();
        }
    }
}

/// [`column_sums`] of f32 rows compiled for `simd` (the widest of it the CPU has): the bias
/// gradient, which at the build target's level ran two f64 lanes wide (0.9% of a residual
/// MLP block's forward + backward). Every level adds the same values in the same order.
pub(super) fn column_sums_with(simd: Simd, acc: &mut [f64], rows: &[f32]) {
    with_simd!(simd, column_sums::<f32>(acc: &mut [f64], rows: &[f32]))
}

/// One application of [`super::linear`] to an `m x k` input and an `n x k` weight.
pub(super) struct Dense {
    m: usize,
    k: usize,
    n: usize,
    act: DenseActivation,
    /// Keep GELU's derivative at the pre-activation for the backward.
    save: bool,
    grad: OnceLock<CpuStorage>,
}

impl Dense {
    pub(super) fn new((m, k, n): (usize, usize, usize), act: DenseActivation, save: bool) -> Dense {
        Dense {
            m,
            k,
            n,
            act,
            save: save && act == DenseActivation::Gelu,
            grad: OnceLock::new(),
        }
    }

    /// Whether a forward kept the activation's derivative.
    #[cfg(test)]
    pub(super) fn keeps_derivative(&self) -> bool {
        self.grad.get().is_some()
    }

    /// Threads for a GEMM of `flop` multiply-adds: below ~64^3 the split costs more than it
    /// saves.
    fn par(flop: usize) -> Parallelism {
        let threads = rayon::current_num_threads();
        if threads > 1 && flop >= 1 << 18 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        }
    }

    /// `(act(z), act'(z) if kept)` with `z = x . w^T + b`.
    fn forward<T: WithDType>(&self, x: &[T], w: &[T], b: Option<&[T]>) -> (Vec<T>, Option<Vec<T>>) {
        let (m, k, n) = (self.m, self.k, self.n);
        let mut z = gemm_new((m, n, k), x, (k, 1), w, (1, k), Self::par(m * n * k));
        // Whole rows per task, about `CHUNK` values: each task adds the bias to its rows and
        // applies the activation while they are in cache (one pass over `z`, not two).
        let rows = n * CHUNK.div_ceil(n);
        let simd = crate::dispatch::simd_in_use();
        let add_bias = |z: &mut [T]| {
            if let Some(b) = b {
                match (as_f32_mut(z), as_f32(b)) {
                    (Some(z), Some(b)) => add_rows_with(simd, z, b),
                    _ => add_rows(z, b),
                }
            }
        };
        match self.act {
            DenseActivation::Identity => {
                if b.is_some() {
                    z.par_chunks_mut(rows).for_each(add_bias);
                }
                (z, None)
            }
            DenseActivation::Relu => {
                let zero = T::zero();
                z.par_chunks_mut(rows).for_each(|z| {
                    add_bias(z);
                    // As PyTorch's relu: NaN propagates.
                    z.iter_mut()
                        .for_each(|v| *v = if *v < zero { zero } else { *v });
                });
                (z, None)
            }
            DenseActivation::Gelu => {
                let (len, keep) = (z.len(), self.save);
                // Kept for a backward, `z` is overwritten with `gelu'(z)` as `y` is written.
                let fill = |y: &mut [MaybeUninit<T>]| {
                    y.par_chunks_mut(rows)
                        .zip(z.par_chunks_mut(rows))
                        .for_each(|(y, z)| {
                            // In f32 the GELU pass adds the bias itself (one pass over the
                            // rows, not two).
                            let bf = b.map(as_f32).unwrap_or(Some(&[]));
                            match (as_f32_mut(z), as_f32_uninit(y), bf) {
                                (Some(zf), Some(yf), Some(bf)) if keep => {
                                    gelu::forward_keeping_grad_with(simd, zf, yf, bf)
                                }
                                (Some(zf), Some(yf), Some(bf)) => {
                                    gelu::forward_with(simd, zf, yf, bf)
                                }
                                _ => {
                                    add_bias(z);
                                    for (y, z) in y.iter_mut().zip(z.iter_mut()) {
                                        let v = z.to_f64();
                                        y.write(T::from_f64(gelu::forward_f64(v)));
                                        if keep {
                                            *z = T::from_f64(gelu::grad_f64(v));
                                        }
                                    }
                                }
                            }
                        })
                };
                // SAFETY: the tasks cover `y` and each writes every value of its rows.
                let y = unsafe { vec_written_by(len, fill) };
                (y, self.save.then_some(z))
            }
        }
    }

    /// `(dx if need_dx, dw, db if with_bias)` for the output `y` and its gradient `dy`.
    fn backward<T: WithDType>(
        &self,
        (x, w): (&[T], &[T]),
        (y, dy): (&[T], &[T]),
        grad: Option<&[T]>,
        (need_dx, with_bias): (bool, bool),
    ) -> candle_core::Result<Grads<T>> {
        let (m, k, n) = (self.m, self.k, self.n);
        let owned;
        let dz: &[T] = match self.act {
            DenseActivation::Identity => dy,
            DenseActivation::Relu => {
                owned = relu_mask_slice(y, dy);
                &owned
            }
            DenseActivation::Gelu => {
                let Some(gp) = grad else {
                    candle_core::bail!("linear: the GELU backward needs the forward's derivative")
                };
                // The fill below writes every value only if the two are as long.
                if gp.len() != dy.len() {
                    candle_core::bail!(
                        "linear: an output gradient of {} values for {} outputs",
                        dy.len(),
                        gp.len()
                    )
                }
                let fill = |g: &mut [MaybeUninit<T>]| {
                    g.par_chunks_mut(CHUNK)
                        .zip(gp.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
                        .for_each(|(g, (gp, dy))| {
                            for ((g, gp), dy) in g.iter_mut().zip(gp).zip(dy) {
                                g.write(*dy * *gp);
                            }
                        })
                };
                // SAFETY: the tasks cover `g` and each writes every value of its part.
                let g = unsafe { vec_written_by(gp.len(), fill) };
                owned = g;
                &owned
            }
        };
        let dx = need_dx.then(|| gemm_new((m, k, n), dz, (n, 1), w, (k, 1), Self::par(m * n * k)));
        let dw = gemm_new((n, k, m), dz, (1, n), x, (k, 1), Self::par(m * n * k));
        // The bias gradient: column sums in f64 over fixed blocks of rows (about `CHUNK` values
        // each), summed in parallel where there are several, then added in block order, so
        // the result does not depend on how the threads split the work. (One thread summing
        // every row took 1.6% of a residual MLP block's forward + backward.)
        let db = with_bias.then(|| {
            let simd = crate::dispatch::simd_in_use();
            let block_sum = |block: &[T]| {
                let mut acc = vec![0f64; n];
                match as_f32(block) {
                    Some(block) => column_sums_with(simd, &mut acc, block),
                    None => column_sums(&mut acc, block),
                }
                acc
            };
            let rows = CHUNK.div_ceil(n) * n;
            let acc = if dz.len() <= rows {
                block_sum(dz)
            } else {
                let blocks: Vec<Vec<f64>> = dz.par_chunks(rows).map(block_sum).collect();
                let mut acc = vec![0f64; n];
                for b in &blocks {
                    acc.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
                acc
            };
            acc.into_iter().map(T::from_f64).collect()
        });
        Ok((dx, dw, db))
    }

    /// The forward on the op's CPU inputs, keeping the activation's derivative when asked.
    fn run(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        const OP: &str = "linear";
        let shape = Shape::from((self.m, self.n));
        if l1.shape().elem_count() != self.m * self.k || l2.shape().elem_count() != self.n * self.k
        {
            candle_core::bail!(
                "{OP}: inputs {:?} and {:?} do not match the op",
                l1.dims(),
                l2.dims()
            )
        }
        macro_rules! run_as {
            ($variant:ident, $x:expr, $w:expr) => {{
                let x = contiguous_slice($x, l1, OP)?;
                let w = contiguous_slice($w, l2, OP)?;
                let b = match bias {
                    Some((CpuStorage::$variant(b), lb)) => Some(contiguous_slice(b, lb, OP)?),
                    Some(_) => candle_core::bail!("{OP}: the bias has another dtype"),
                    None => None,
                };
                let (y, grad) = self.forward(x, w, b);
                if let Some(grad) = grad {
                    if self.grad.set(CpuStorage::$variant(grad)).is_err() {
                        candle_core::bail!("{OP}: a kernel instance ran twice")
                    }
                }
                Ok((CpuStorage::$variant(y), shape))
            }};
        }
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => run_as!(F32, x, w),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => run_as!(F64, x, w),
            _ => candle_core::bail!("{OP}: the native kernel takes f32 or f64 of one dtype"),
        }
    }

    /// The gradients of `(x, w, b)` (b's only when the op has one).
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        with_bias: bool,
        (y, dy): (&Tensor, &Tensor),
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        const OP: &str = "linear";
        let need_dx = x.track_op();
        macro_rules! grads_as {
            ($t:ty, $variant:ident) => {{
                let grad = match self.grad.get() {
                    Some(CpuStorage::$variant(p)) => Some(p.as_slice()),
                    _ => None,
                };
                with_cpu_slice(x, OP, |xs: &[$t]| {
                    with_cpu_slice(w, OP, |ws: &[$t]| {
                        with_cpu_slice(y, OP, |ys: &[$t]| {
                            with_cpu_slice(dy, OP, |dys: &[$t]| {
                                self.backward((xs, ws), (ys, dys), grad, (need_dx, with_bias))
                            })
                        })
                    })
                })?????
            }};
        }
        let (dx, dw, db) = match x.dtype() {
            candle_core::DType::F32 => {
                let (dx, dw, db) = grads_as!(f32, F32);
                (
                    dx.map(CpuStorage::F32),
                    CpuStorage::F32(dw),
                    db.map(CpuStorage::F32),
                )
            }
            candle_core::DType::F64 => {
                let (dx, dw, db) = grads_as!(f64, F64);
                (
                    dx.map(CpuStorage::F64),
                    CpuStorage::F64(dw),
                    db.map(CpuStorage::F64),
                )
            }
            dt => candle_core::bail!("{OP}: the native kernel has no {dt:?} backward"),
        };
        let dev = x.device();
        let tensor = |s: CpuStorage, shape: &[usize]| -> candle_core::Result<Tensor> {
            let t = match s {
                CpuStorage::F32(v) => Tensor::from_vec(v, shape, dev)?,
                CpuStorage::F64(v) => Tensor::from_vec(v, shape, dev)?,
                _ => candle_core::bail!("{OP}: unreachable dtype"),
            };
            Ok(t)
        };
        Ok((
            dx.map(|d| tensor(d, x.dims())).transpose()?,
            tensor(dw, w.dims())?,
            db.map(|d| tensor(d, &[self.n])).transpose()?,
        ))
    }
}

/// `(x, w)`: `act(x . w^T)`.
impl CustomOp2 for Dense {
    fn name(&self) -> &'static str {
        "resblock-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, false, (y, dy))?;
        Ok((dx, Some(dw)))
    }
}

/// `(x, w, b)`: `act(x . w^T + b)`.
impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "resblock-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l3.shape().elem_count() != self.n {
            candle_core::bail!("linear: bias {:?} for {} outputs", l3.dims(), self.n)
        }
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, true, (y, dy))?;
        Ok((dx, Some(dw), db))
    }
}

//! Training-mode batch normalisation as one op with its own backward.
//!
//! Built from Candle ops, a training BatchNorm is a dozen single-threaded passes over the
//! activation (and needs an f64 copy of it: Candle sums sequentially, and f32 sums over
//! N*H*W values drift from PyTorch's within a few steps). Here the forward is two parallel
//! passes (per-channel statistics in f64, then normalise-scale-shift, optionally with the
//! ReLU fused), and the backward two more (per-channel sums of `dy` and `dy * x_hat` in f64,
//! then `dx = gamma / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat))`), with `dy` masked by
//! the output's sign when the ReLU is fused.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{Error, Result};

mod layer;
mod residual;
pub(crate) mod simd;

pub use layer::{layer_norm, layer_norm_candle};
pub use residual::batch_norm_add_relu_train;

/// The batch statistics of one training-mode forward, per channel, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// The mean over every dim but the channel dim.
    pub mean: Vec<f64>,
    /// The biased variance (divided by the count).
    pub var: Vec<f64>,
    /// Values per channel (N * H * W).
    pub count: usize,
}

/// Batch normalisation in training mode: normalises `x` (N, C, ...) with its own batch
/// statistics, scales by `weight` and shifts by `bias` (both (C)), and applies a ReLU when
/// `relu` is set. Returns the output and the statistics (for the running averages). The
/// gradient reaches `x`, `weight` and `bias`.
///
/// Runs our multithreaded kernel on the CPU in f32/f64 unless [`crate::dispatch`] chose
/// Candle's; elsewhere it is [`batch_norm_train_candle`].
///
/// # Errors
/// A rank below 2, a weight or bias whose length is not C, fewer than two values per channel.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let (c, count) = check(x, weight, bias)?;
    let native = crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype();
    if !native {
        return batch_norm_train_candle(x, weight, bias, eps, relu);
    }
    let stats = Arc::new(OnceLock::new());
    let op = NativeBatchNorm {
        channels: c,
        eps,
        relu,
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let (mean, var) = stats
        .get()
        .ok_or_else(|| Error::config("batch_norm: the kernel did not record its statistics"))?;
    Ok((
        y,
        BatchStats {
            mean: mean.clone(),
            var: var.clone(),
            count,
        },
    ))
}

/// [`batch_norm_train`] from Candle ops (any device): statistics reduced in f64, the
/// normalisation in the input's dtype.
///
/// # Errors
/// As [`batch_norm_train`].
pub fn batch_norm_train_candle(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let (c, count) = check(x, weight, bias)?;
    let mut bshape = vec![1; x.rank()];
    bshape[1] = c;
    let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
    let x64 = x.to_dtype(DType::F64)?;
    let mean64 = x64.mean_keepdim(dims.as_slice())?;
    let var64 = x64
        .broadcast_sub(&mean64)?
        .sqr()?
        .mean_keepdim(dims.as_slice())?;
    let mean = mean64.to_dtype(x.dtype())?;
    let inv = (&var64 + eps)?.sqrt()?.recip()?.to_dtype(x.dtype())?;
    let w = weight.reshape(bshape.as_slice())?;
    let b = bias.reshape(bshape.as_slice())?;
    let y = x
        .broadcast_sub(&mean)?
        .broadcast_mul(&inv.broadcast_mul(&w)?)?
        .broadcast_add(&b)?;
    let y = if relu { y.relu()? } else { y };
    let stats = BatchStats {
        mean: mean64.detach().flatten_all()?.to_vec1()?,
        var: var64.detach().flatten_all()?.to_vec1()?,
        count,
    };
    Ok((y, stats))
}

/// (channels, values per channel), after checking the shapes.
fn check(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<(usize, usize)> {
    if x.rank() < 2 {
        return Err(Error::Shape {
            op: "batch_norm",
            expected: "an (N, C, ...) input".into(),
            got: x.dims().to_vec(),
        });
    }
    let c = x.dim(1)?;
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [c] {
            return Err(Error::Shape {
                op: "batch_norm",
                expected: format!("a {name} of shape [{c}]"),
                got: t.dims().to_vec(),
            });
        }
    }
    let count = x.elem_count() / c.max(1);
    if count < 2 {
        return Err(Error::Shape {
            op: "batch_norm",
            expected: "more than one value per channel in training".into(),
            got: x.dims().to_vec(),
        });
    }
    Ok((c, count))
}

/// Per-channel mean and biased variance, f64.
type Stats = (Vec<f64>, Vec<f64>);

/// 1 / sqrt(var + eps) per channel.
pub(crate) fn inv_std(var: &[f64], eps: f64) -> Vec<f64> {
    var.iter().map(|v| 1. / (v + eps).sqrt()).collect()
}

struct NativeBatchNorm {
    channels: usize,
    eps: f64,
    relu: bool,
    /// Written by the forward, read by the caller (running statistics) and the backward.
    stats: Arc<OnceLock<Stats>>,
}

/// Runs `f(channel)` for every channel in parallel, collecting the results in order.
fn per_channel<R: Send>(c: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    (0..c).into_par_iter().map(f).collect()
}

/// Independent f64 accumulators per plane (lets the compiler vectorise the f32 -> f64 sums).
const LANES: usize = 8;

/// `sum(x)` and `sum((x - mu)^2)` of one plane, in f64.
pub(crate) fn plane_moments<T: WithDType>(p: &[T], mu: f64) -> (f64, f64) {
    let (mut s, mut q) = ([0f64; LANES], [0f64; LANES]);
    let chunks = p.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            let v = ch[l].to_f64();
            s[l] += v;
            q[l] += (v - mu) * (v - mu);
        }
    }
    let (mut s1, mut q1) = (s.iter().sum::<f64>(), q.iter().sum::<f64>());
    for v in rest {
        let v = v.to_f64();
        s1 += v;
        q1 += (v - mu) * (v - mu);
    }
    (s1, q1)
}

/// The N planes (each `s` values) of channel `ci` in an (N, C, S) buffer.
fn planes<T>(x: &[T], (c, s): (usize, usize), ci: usize) -> impl Iterator<Item = &[T]> {
    x.chunks(c * s).map(move |img| &img[ci * s..(ci + 1) * s])
}

fn forward<T: WithDType>(
    x: &[T],
    w: &[T],
    b: &[T],
    (c, s): (usize, usize),
    eps: f64,
    relu: bool,
) -> (Vec<T>, Stats) {
    let m = (x.len() / c) as f64;
    // Two passes in f64: the mean, then the squared deviations from it.
    let stats: Vec<(f64, f64)> = per_channel(c, |ci| {
        let sum: f64 = planes(x, (c, s), ci).map(|p| plane_moments(p, 0.).0).sum();
        let mu = sum / m;
        let sq: f64 = planes(x, (c, s), ci).map(|p| plane_moments(p, mu).1).sum();
        (mu, sq / m)
    });
    let (mean, var): (Vec<f64>, Vec<f64>) = stats.into_iter().unzip();
    let coef = norm_coef(&mean, &inv_std(&var, eps), w, b);
    let y = normalize(x, &coef, s, relu);
    (y, (mean, var))
}

/// Per channel `(mean, inv_std * weight, bias)` in the input's dtype: the forward's affine
/// map `y = (x - mean) * scale + shift`, as PyTorch computes it.
pub(crate) fn norm_coef<T: WithDType>(
    mean: &[f64],
    inv_std: &[f64],
    w: &[T],
    b: &[T],
) -> Vec<(T, T, T)> {
    mean.iter()
        .zip(inv_std)
        .zip(w.iter().zip(b))
        .map(|((mu, inv), (w, b))| (T::from_f64(*mu), T::from_f64(*inv) * *w, *b))
        .collect()
}

/// The normalised (and ReLU'd) copy of `x`, planes of `s` values, channel `i % c` of plane
/// `i` taking `coef[..]` from [`norm_coef`].
pub(crate) fn normalize<T: WithDType>(x: &[T], coef: &[(T, T, T)], s: usize, relu: bool) -> Vec<T> {
    let c = coef.len();
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(s)
        .zip(x.par_chunks(s))
        .enumerate()
        .for_each(|(i, (yp, xp))| {
            let (mu, scale, shift) = coef[i % c];
            let zero = T::zero();
            for (o, v) in yp.iter_mut().zip(xp) {
                let r = (*v - mu) * scale + shift;
                *o = if relu && r < zero { zero } else { r };
            }
        });
    y
}

/// Per channel `(mean, a, mean(g), k)` of the input gradient
/// `dx = a * (g - mean(g) - (x - mean) * k)`, from the channel sums `(sum(g),
/// sum(g * x_hat))` over `m` values.
pub(crate) fn grad_coef<T: WithDType>(
    sums: &[(f64, f64)],
    w: &[T],
    mean: &[f64],
    inv_std: &[f64],
    m: f64,
) -> Vec<(T, T, T, T)> {
    (0..sums.len())
        .map(|ci| {
            let (sd, sdx) = sums[ci];
            let a = w[ci].to_f64() * inv_std[ci];
            (
                T::from_f64(mean[ci]),
                T::from_f64(a),
                T::from_f64(sd / m),
                T::from_f64(inv_std[ci] * sdx / m),
            )
        })
        .collect()
}

/// `sum(g)` and `sum(g * (x - mu))` of one plane, g = dy masked by the fused ReLU, in f64.
fn plane_grad_sums<T: WithDType>(x: &[T], y: &[T], dy: &[T], mu: f64, relu: bool) -> (f64, f64) {
    let zero = T::zero();
    let grad = |yv: T, g: T| if relu && yv <= zero { 0. } else { g.to_f64() };
    let (mut sd, mut sdx) = ([0f64; LANES], [0f64; LANES]);
    let n = x.len() / LANES * LANES;
    for ((xc, yc), gc) in x[..n]
        .chunks_exact(LANES)
        .zip(y[..n].chunks_exact(LANES))
        .zip(dy[..n].chunks_exact(LANES))
    {
        for l in 0..LANES {
            let g = grad(yc[l], gc[l]);
            sd[l] += g;
            sdx[l] += g * (xc[l].to_f64() - mu);
        }
    }
    let (mut a, mut b) = (sd.iter().sum::<f64>(), sdx.iter().sum::<f64>());
    for j in n..x.len() {
        let g = grad(y[j], dy[j]);
        a += g;
        b += g * (x[j].to_f64() - mu);
    }
    (a, b)
}

/// (dx, dweight, dbias).
#[allow(clippy::too_many_arguments)]
fn backward<T: WithDType>(
    x: &[T],
    w: &[T],
    y: &[T],
    dy: &[T],
    (c, s): (usize, usize),
    (mean, var): &Stats,
    (eps, relu): (f64, bool),
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let m = (x.len() / c) as f64;
    let inv_std = inv_std(var, eps);
    let zero = T::zero();
    // Per channel: sum(dy) and sum(dy * x_hat).
    let sums: Vec<(f64, f64)> = per_channel(c, |ci| {
        let (mut sd, mut sdx) = (0f64, 0f64);
        for ((xp, yp), gp) in
            planes(x, (c, s), ci)
                .zip(planes(y, (c, s), ci))
                .zip(planes(dy, (c, s), ci))
        {
            let (a, b) = plane_grad_sums(xp, yp, gp, mean[ci], relu);
            sd += a;
            sdx += b;
        }
        (sd, sdx * inv_std[ci])
    });
    let coef = grad_coef(&sums, w, mean, &inv_std, m);
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(s)
        .zip(x.par_chunks(s))
        .zip(y.par_chunks(s).zip(dy.par_chunks(s)))
        .enumerate()
        .for_each(|(i, ((dxp, xp), (yp, gp)))| {
            let (mu, a, mdy, k) = coef[i % c];
            for (((o, xv), yv), gv) in dxp.iter_mut().zip(xp).zip(yp).zip(gp) {
                let g = if relu && *yv <= zero { zero } else { *gv };
                *o = a * (g - mdy - (*xv - mu) * k);
            }
        });
    let dw = sums.iter().map(|p| T::from_f64(p.1)).collect();
    let db = sums.iter().map(|p| T::from_f64(p.0)).collect();
    (dx, dw, db)
}

/// Per-channel (mean, biased variance) from the (mean, sum of squared deviations) of every
/// plane of `s` values, planes in (N, C) order: equal counts per plane, so the mean of the
/// means, and the squared deviations plus each plane's offset from the channel mean
/// (Chan et al.'s exact combination).
/// Per channel, `sum(g)` and `sum(g * (x - mean)) * inv_std` of the f32 planes of `x` and
/// `dy` (`c` channels of `s` values per image; `g` is `dy` through the ReLU when `relu`, see
/// [`simd::grad_sums`]): the sums [`grad_coef`] takes. The planes are read in memory order, in parallel, and each
/// channel's sums are added over the images in order (the same f64 sums as a loop per
/// channel). A loop per channel read one plane per image, strided by the image: at
/// 28x28 and 32x32 a plane is one 4 KiB page, where the hardware prefetcher stops, and
/// that pass ran at about half the speed of the in-order passes around it.
pub(crate) fn channel_grad_sums(
    (x, dy): (&[f32], &[f32]),
    (c, s): (usize, usize),
    fcoef: &[(f32, f32, f32)],
    (mean, inv_std): (&[f64], &[f64]),
    relu: bool,
) -> Vec<(f64, f64)> {
    assert!(
        x.len() == dy.len() && x.len().is_multiple_of(c * s) && fcoef.len() == c,
        "batch_norm: gradient sums' sizes"
    );
    let per_plane: Vec<(f64, f64)> = x
        .par_chunks(s)
        .zip(dy.par_chunks(s))
        .enumerate()
        .map(|(i, (xp, gp))| simd::grad_sums(xp, gp, fcoef[i % c], mean[i % c], relu))
        .collect();
    let mut sums = vec![(0f64, 0f64); c];
    for image in per_plane.chunks_exact(c) {
        for (acc, (a, b)) in sums.iter_mut().zip(image) {
            acc.0 += a;
            acc.1 += b;
        }
    }
    for (acc, inv) in sums.iter_mut().zip(inv_std) {
        acc.1 *= inv;
    }
    sums
}

pub(crate) fn combine_moments(moments: &[(f64, f64)], c: usize, s: usize) -> Stats {
    let n = moments.len() / c;
    (0..c)
        .map(|ci| {
            let per = || moments.iter().skip(ci).step_by(c);
            let mu = per().map(|m| m.0).sum::<f64>() / n as f64;
            let m2: f64 = per()
                .map(|&(m, q)| q + s as f64 * (m - mu) * (m - mu))
                .sum();
            (mu, m2 / (n * s) as f64)
        })
        .unzip()
}

/// Planes shorter than this take the generic path (the per-plane kernels' set-up would
/// dominate, as for (N, C) inputs).
const MIN_FAST_PLANE: usize = 16;

/// [`forward`] for f32 with the vectorised kernels: each plane's moments in one pass (its
/// second, squared-deviation pass runs in cache), combined exactly per channel.
fn forward_f32(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (c, s): (usize, usize),
    eps: f64,
    relu: bool,
) -> (Vec<f32>, Stats) {
    use simd as k;
    let moments: Vec<(f64, f64)> = x.par_chunks(s).map(k::moments).collect();
    let (mean, var) = combine_moments(&moments, c, s);
    let coef = norm_coef(&mean, &inv_std(&var, eps), w, b);
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
        y.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            .for_each(|(i, (yp, xp))| k::normalize(yp, xp, coef[i % c], relu))
    };
    // SAFETY: the planes cover the buffer and `normalize` writes every element of its own.
    let y = unsafe { crate::buffer::vec_written_by(x.len(), fill) };
    (y, (mean, var))
}

/// [`backward`] for f32 with the vectorised kernels; the ReLU's mask is recomputed from `x`
/// (the forward's arithmetic), so the output is not read.
fn backward_f32(
    (x, w, b): (&[f32], &[f32], &[f32]),
    dy: &[f32],
    (c, s): (usize, usize),
    (mean, var): &Stats,
    (eps, relu): (f64, bool),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use simd as k;
    let m = (x.len() / c) as f64;
    let inv_std = inv_std(var, eps);
    let fcoef = norm_coef(mean, &inv_std, w, b);
    let sums = channel_grad_sums((x, dy), (c, s), &fcoef, (mean, &inv_std), relu);
    let coef = grad_coef(&sums, w, mean, &inv_std, m);
    let fill = |dx: &mut [std::mem::MaybeUninit<f32>]| {
        dx.par_chunks_mut(s)
            .zip(x.par_chunks(s).zip(dy.par_chunks(s)))
            .enumerate()
            .for_each(|(i, (dxp, (xp, gp)))| {
                k::input_grad_uninit(dxp, (xp, gp), fcoef[i % c], coef[i % c], relu)
            })
    };
    // SAFETY: the planes cover the buffer and `input_grad_uninit` writes every element of
    // its own (not zero-filled first: one pass less over a buffer the size of `x`).
    let dx = unsafe { crate::buffer::vec_written_by(x.len(), fill) };
    let dw = sums.iter().map(|p| p.1 as f32).collect();
    let db = sums.iter().map(|p| p.0 as f32).collect();
    (dx, dw, db)
}

fn slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::buffer::contiguous_slice(s, l, "batch_norm")
}

impl CustomOp3 for NativeBatchNorm {
    fn name(&self) -> &'static str {
        "resblock-batch-norm-train"
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
        let dims = (self.channels, l1.dims()[2..].iter().product());
        let (out, stats) = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let kernel = if dims.1 >= MIN_FAST_PLANE {
                    forward_f32
                } else {
                    forward::<f32>
                };
                let (y, st) = kernel(
                    slice(x, l1)?,
                    slice(w, l2)?,
                    slice(b, l3)?,
                    dims,
                    self.eps,
                    self.relu,
                );
                (CpuStorage::F32(y), st)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let (y, st) = forward(
                    slice(x, l1)?,
                    slice(w, l2)?,
                    slice(b, l3)?,
                    dims,
                    self.eps,
                    self.relu,
                );
                (CpuStorage::F64(y), st)
            }
            _ => candle_core::bail!("batch_norm: the native kernel takes f32 or f64 of one dtype"),
        };
        if self.stats.set(stats).is_err() {
            candle_core::bail!("batch_norm: a kernel instance ran twice");
        }
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("batch_norm: backward before forward")
        };
        let plane: usize = x.dims()[2..].iter().product();
        let dims = (self.channels, plane);
        let opts = (self.eps, self.relu);
        // The f32 kernels recompute the ReLU mask from `x` and need the shift `b`; the
        // generic ones read the output `y`.
        let (dx, dw, db) = match x.dtype() {
            DType::F32 if plane >= MIN_FAST_PLANE => {
                grad_tensors::<f32>((x, w, b, dy), |x, w, b, dy| {
                    backward_f32((x, w, b), dy, dims, stats, opts)
                })?
            }
            DType::F32 => grad_tensors::<f32>((x, w, y, dy), |x, w, y, dy| {
                backward(x, w, y, dy, dims, stats, opts)
            })?,
            DType::F64 => grad_tensors::<f64>((x, w, y, dy), |x, w, y, dy| {
                backward(x, w, y, dy, dims, stats, opts)
            })?,
            dt => candle_core::bail!("batch_norm: the native kernel has no {dt:?} backward"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (dx, dweight, dbias) as tensors, from `backward` run on the CPU slices of
/// `(x, weight, extra, dy)` (`extra`: whichever saved tensor the kernel needs).
fn grad_tensors<T: WithDType>(
    (x, w, extra, dy): (&Tensor, &Tensor, &Tensor, &Tensor),
    backward: impl FnOnce(&[T], &[T], &[T], &[T]) -> (Vec<T>, Vec<T>, Vec<T>),
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    use crate::buffer::with_cpu_slice as with;
    let (dx, dw, db) = with(x, "batch_norm", |xs: &[T]| {
        with(w, "batch_norm", |ws: &[T]| {
            with(extra, "batch_norm", |es: &[T]| {
                with(dy, "batch_norm", |dys: &[T]| backward(xs, ws, es, dys))
            })
        })
    })????;
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), dev)?,
        Tensor::from_vec(dw, w.shape(), dev)?,
        Tensor::from_vec(db, w.shape(), dev)?,
    ))
}

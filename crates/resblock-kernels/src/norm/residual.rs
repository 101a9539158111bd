//! Training-mode BatchNorm + shortcut sum + ReLU as one op, `relu(bn(x) + residual)`: the
//! end of a post-activation residual block whose convolution runs on its own (1x1 and
//! strided convolutions, the GEMM path; stride-1 3x3 ones fuse further, see
//! `crate::fused`).
//!
//! As two ops (the norm, then [`crate::eltwise::add_relu`]) the norm's output is a tensor
//! of the graph, and Candle keeps every tensor of the graph until the whole backward is
//! done. Here it never exists: the backward needs only the op's input (the convolution's
//! output, kept anyway), its output (the ReLU's mask) and the per-channel statistics. In a
//! ResNet-50 training step at batch 32 that is 674 MiB of activations not kept (every
//! bottleneck's third norm output). The arithmetic is the two ops', rounding for rounding.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{
    backward_f32, batch_norm_train, check, combine_moments, inv_std, norm_coef, simd, BatchStats,
    Stats, MIN_FAST_PLANE,
};
use crate::error::{Error, Result};

/// `relu(batch_norm_train(x, weight, bias, eps) + residual)` with the batch statistics of
/// `x` (returned, for the running averages). The gradient reaches `x`, `weight`, `bias`
/// and `residual`.
///
/// Runs one op on the CPU in f32 (with planes of at least 16 values) unless
/// [`crate::dispatch`] chose Candle's kernels; elsewhere the norm and
/// [`crate::eltwise::add_relu`].
///
/// # Errors
/// As [`batch_norm_train`], or a residual of another shape.
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<(Tensor, BatchStats)> {
    let (c, count) = check(x, weight, bias)?;
    if residual.dims() != x.dims() {
        return Err(Error::Shape {
            op: "batch_norm_add_relu",
            expected: format!("a residual of the input's shape {:?}", x.dims()),
            got: residual.dims().to_vec(),
        });
    }
    let plane: usize = x.dims()[2..].iter().product();
    let native = crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && plane >= MIN_FAST_PLANE
        && [x, weight, bias, residual]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !native {
        let (y, stats) = batch_norm_train(x, weight, bias, eps, false)?;
        return Ok((crate::eltwise::add_relu(residual, &y)?, stats));
    }
    let stats = Arc::new(OnceLock::new());
    let op = BnAddRelu {
        channels: c,
        eps,
        stats: stats.clone(),
    };
    // Candle's custom ops take three tensors: the weight and bias travel as one.
    let params = Tensor::cat(&[weight, bias], 0)?;
    let y = x
        .contiguous()?
        .apply_op3(&params, &residual.contiguous()?, op)?;
    let (mean, var) = stats.get().ok_or_else(|| {
        Error::config("batch_norm_add_relu: the kernel did not record its statistics")
    })?;
    Ok((
        y,
        BatchStats {
            mean: mean.clone(),
            var: var.clone(),
            count,
        },
    ))
}

struct BnAddRelu {
    channels: usize,
    eps: f64,
    /// Written by the forward, read by the caller (running statistics) and the backward.
    stats: Arc<OnceLock<Stats>>,
}

impl CustomOp3 for BnAddRelu {
    fn name(&self) -> &'static str {
        "resblock-batch-norm-add-relu-train"
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
        let c = self.channels;
        let s: usize = l1.dims()[2..].iter().product();
        let slice = |s, l| crate::buffer::f32_slice(s, l, "batch_norm_add_relu");
        let (x, params, res) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let moments: Vec<(f64, f64)> = x.par_chunks(s).map(simd::moments).collect();
        let (mean, var) = combine_moments(&moments, c, s);
        let coef = norm_coef(&mean, &inv_std(&var, self.eps), &params[..c], &params[c..]);
        let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
            y.par_chunks_mut(s)
                .zip(x.par_chunks(s).zip(res.par_chunks(s)))
                .enumerate()
                .for_each(|(i, (yp, xr))| simd::normalize_add(yp, xr, coef[i % c], true))
        };
        // SAFETY: the planes cover the buffer and `normalize_add` writes every element of
        // its own.
        let y = unsafe { crate::buffer::vec_written_by(x.len(), fill) };
        if self.stats.set((mean, var)).is_err() {
            candle_core::bail!("batch_norm_add_relu: a kernel instance ran twice");
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        residual: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::buffer::with_cpu_slice as with;
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("batch_norm_add_relu: backward before forward")
        };
        let c = self.channels;
        let dims = (c, x.dims()[2..].iter().product());
        // Through the ReLU, `g` is the gradient of both the norm's output and the residual.
        let g = with(y, "batch_norm_add_relu", |ys: &[f32]| {
            with(dy, "batch_norm_add_relu", |dys: &[f32]| {
                simd::relu_grad(ys, dys)
            })
        })??;
        let (dx, dw, db) = with(x, "batch_norm_add_relu", |xs: &[f32]| {
            with(params, "batch_norm_add_relu", |ps: &[f32]| {
                backward_f32((xs, &ps[..c], &ps[c..]), &g, dims, stats, (self.eps, false))
            })
        })??;
        let dev = x.device();
        let dparams = Tensor::from_vec([dw, db].concat(), params.shape(), dev)?;
        let dres = residual
            .track_op()
            .then(|| Tensor::from_vec(g, residual.shape(), dev))
            .transpose()?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(dparams),
            dres,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(dims: &[usize], seed: u64) -> Tensor {
        crate::test_support::uniform_tensor(dims, seed, 2.)
    }

    /// The fused op against the two ops it replaces: the same output, statistics and
    /// gradients, bit for bit.
    #[test]
    fn equals_the_norm_then_add_relu() -> Result<()> {
        let dims = [3, 4, 5, 6];
        let x = Var::from_tensor(&randn(&dims, 1))?;
        let w = Var::from_tensor(&(randn(&[4], 2) + 1.)?)?;
        let b = Var::from_tensor(&randn(&[4], 3))?;
        let r = Var::from_tensor(&randn(&dims, 4))?;
        let up = randn(&dims, 5);
        let run = |fused: bool| -> Result<(Vec<f32>, BatchStats, Vec<Vec<f32>>)> {
            let (y, st) = if fused {
                batch_norm_add_relu_train(
                    x.as_tensor(),
                    w.as_tensor(),
                    b.as_tensor(),
                    1e-5,
                    r.as_tensor(),
                )?
            } else {
                let (n, st) =
                    batch_norm_train(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, false)?;
                (crate::eltwise::add_relu(r.as_tensor(), &n)?, st)
            };
            let grads = (&y * &up)?.sum_all()?.backward()?;
            let g = [&x, &w, &b, &r]
                .iter()
                .map(|v| {
                    Ok(grads
                        .get(v.as_tensor())
                        .ok_or_else(|| Error::config("no gradient"))?
                        .flatten_all()?
                        .to_vec1::<f32>()?)
                })
                .collect::<Result<_>>()?;
            Ok((y.flatten_all()?.to_vec1::<f32>()?, st, g))
        };
        let (fused, separate) = (run(true)?, run(false)?);
        assert_eq!(fused.0, separate.0, "outputs");
        assert_eq!(fused.1, separate.1, "statistics");
        for (i, (a, b)) in fused.2.iter().zip(&separate.2).enumerate() {
            assert_eq!(a, b, "gradient {i} (x, weight, bias, residual)");
        }
        assert!(fused.0.contains(&0.) && fused.0.iter().any(|v| *v > 0.));
        Ok(())
    }

    #[test]
    fn refuses_a_residual_of_another_shape() -> Result<()> {
        let x = randn(&[2, 3, 4, 4], 1);
        let w = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        let err =
            batch_norm_add_relu_train(&x, &w, &w.zeros_like()?, 1e-5, &randn(&[2, 3, 4, 5], 2))
                .expect_err("a mismatched residual");
        assert!(err.to_string().contains("residual"), "{err}");
        Ok(())
    }
}

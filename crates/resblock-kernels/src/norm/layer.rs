//! Layer normalisation over the last dim as one op with its own backward.
//!
//! As Candle ops a LayerNorm is eight passes forward (mean, centre, square, mean, add,
//! sqrt, reciprocal, three broadcasts) and about twenty tensors in its backward, and
//! candle-nn's fused `LayerNorm` has no backward at all. Here each row is one task: its
//! mean and variance in f64, then `y = (x - mean) / sigma * gamma + beta` in one pass; the
//! backward recomputes `x_hat` from the saved per-row mean and `1 / sigma` and writes
//! `dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma` with `g = dy * gamma`, while
//! `dgamma = sum(dy * x_hat)` and `dbeta = sum(dy)` are summed over the rows in f64.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::buffer::{contiguous_slice, with_cpu_slice};
use crate::error::{Error, Result};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dim of `x` (PyTorch's
/// `nn.LayerNorm(dim)`: biased variance, eps inside the root), with gradients for all three.
/// Our kernel on the CPU in f32/f64 unless [`crate::dispatch`] chose Candle's ops; elsewhere
/// Candle ops.
///
/// # Shapes
/// `x`: (..., D); `weight`, `bias`: (D); output as `x`.
///
/// # Errors
/// A weight or bias whose length is not the last dim of `x`, or a rank-0 `x`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let Some(&d) = x.dims().last() else {
        return Err(Error::Shape {
            op: "layer_norm",
            expected: "an input of rank 1 or more".into(),
            got: vec![],
        });
    };
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [d] {
            return Err(Error::Shape {
                op: "layer_norm",
                expected: format!("a {name} of shape ({d})"),
                got: t.dims().to_vec(),
            });
        }
    }
    let native = crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype()
        && d > 0;
    if !native {
        return layer_norm_candle(x, weight, bias, eps);
    }
    let op = LayerNorm {
        d,
        eps,
        stats: OnceLock::new(),
    };
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// [`layer_norm`] as differentiable Candle ops (any device).
///
/// # Errors
/// As [`layer_norm`].
pub fn layer_norm_candle(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = candle_core::D::Minus1;
    let mean = x.mean_keepdim(d)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(d)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    Ok(xc
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// The op: rows of `d` values; the forward leaves each row's `(mean, 1 / sigma)`.
struct LayerNorm {
    d: usize,
    eps: f64,
    stats: OnceLock<Vec<(f64, f64)>>,
}

/// Rows per parallel task: about 16k values.
fn rows_per_task(d: usize) -> usize {
    (1usize << 14).div_ceil(d).max(1)
}

impl LayerNorm {
    fn forward<T: WithDType>(&self, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<(f64, f64)>) {
        let d = self.d;
        let rows = x.len() / d;
        let mut y = vec![T::zero(); x.len()];
        let mut stats = vec![(0f64, 0f64); rows];
        let per = rows_per_task(d);
        y.par_chunks_mut(per * d)
            .zip(x.par_chunks(per * d))
            .zip(stats.par_chunks_mut(per))
            .for_each(|((y, x), st)| {
                for ((y, x), st) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(st) {
                    let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / d as f64;
                    let var = x.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / d as f64;
                    let inv = 1.0 / (var + self.eps).sqrt();
                    *st = (mean, inv);
                    let (m, s) = (T::from_f64(mean), T::from_f64(inv));
                    for (((o, v), g), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        *o = (*v - m) * s * *g + *b;
                    }
                }
            });
        (y, stats)
    }

    /// `(dx, dweight, dbias)`.
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        dy: &[T],
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("layer_norm: backward before forward")
        };
        let d = self.d;
        let per = rows_per_task(d);
        let mut dx = vec![T::zero(); x.len()];
        let (dw, db) = dx
            .par_chunks_mut(per * d)
            .zip(x.par_chunks(per * d).zip(dy.par_chunks(per * d)))
            .zip(stats.par_chunks(per))
            .fold(
                || (vec![0f64; d], vec![0f64; d], vec![0f64; d]),
                |(mut dw, mut db, mut g), ((dx, (x, dy)), st)| {
                    let rows = dx
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d).zip(dy.chunks_exact(d)));
                    for ((dx, (x, dy)), &(mean, inv)) in rows.zip(st) {
                        // g = dy * gamma; the row's sums of g and g * x_hat.
                        let (mut sg, mut sgx) = (0f64, 0f64);
                        for ((((gi, v), t), wj), (dwj, dbj)) in g
                            .iter_mut()
                            .zip(x)
                            .zip(dy)
                            .zip(w)
                            .zip(dw.iter_mut().zip(db.iter_mut()))
                        {
                            let xh = (v.to_f64() - mean) * inv;
                            let t = t.to_f64();
                            *gi = t * wj.to_f64();
                            sg += *gi;
                            sgx += *gi * xh;
                            *dwj += t * xh;
                            *dbj += t;
                        }
                        let (mg, mgx) = (sg / d as f64, sgx / d as f64);
                        for ((o, v), gi) in dx.iter_mut().zip(x).zip(&g) {
                            let xh = (v.to_f64() - mean) * inv;
                            *o = T::from_f64(inv * (gi - mg - xh * mgx));
                        }
                    }
                    (dw, db, g)
                },
            )
            .map(|(dw, db, _)| (dw, db))
            .reduce(
                || (vec![0f64; d], vec![0f64; d]),
                |(mut a, mut b), (c, e)| {
                    a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
                    b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
                    (a, b)
                },
            );
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
        Ok((dx, cast(dw), cast(db)))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "resblock-layer-norm"
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
        const OP: &str = "layer_norm";
        if l2.shape().elem_count() != self.d || l3.shape().elem_count() != self.d {
            candle_core::bail!(
                "{OP}: weight {:?} or bias {:?} is not ({})",
                l2.dims(),
                l3.dims(),
                self.d
            )
        }
        macro_rules! run_as {
            ($variant:ident, $x:expr, $w:expr, $b:expr) => {{
                let (x, w, b) = (
                    contiguous_slice($x, l1, OP)?,
                    contiguous_slice($w, l2, OP)?,
                    contiguous_slice($b, l3, OP)?,
                );
                let (y, stats) = self.forward(x, w, b);
                if self.stats.set(stats).is_err() {
                    candle_core::bail!("{OP}: a kernel instance ran twice")
                }
                CpuStorage::$variant(y)
            }};
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => run_as!(F32, x, w, b),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => run_as!(F64, x, w, b),
            _ => candle_core::bail!("{OP}: the native kernel takes f32 or f64 of one dtype"),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        const OP: &str = "layer_norm";
        macro_rules! grads_as {
            ($t:ty) => {{
                let (dx, dw, db) = with_cpu_slice(x, OP, |xs: &[$t]| {
                    with_cpu_slice(w, OP, |ws: &[$t]| {
                        with_cpu_slice(dy, OP, |dys: &[$t]| self.backward(xs, ws, dys))
                    })
                })????;
                let dev = x.device();
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::from_vec(dw, w.shape(), dev)?,
                    Tensor::from_vec(db, w.shape(), dev)?,
                )
            }};
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => grads_as!(f32),
            DType::F64 => grads_as!(f64),
            dt => candle_core::bail!("{OP}: the native kernel has no {dt:?} backward"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Ours against the Candle composition in f64: output and all three gradients, f32 and
    /// f64, 2-D and 3-D inputs, a constant row (variance 0).
    #[test]
    fn matches_candle_ops() -> Result<()> {
        for dims in [vec![5usize, 7], vec![2, 3, 33]] {
            let n: usize = dims.iter().product();
            let d = *dims.last().expect("dims");
            let mut xv: Vec<f64> = (0..n)
                .map(|i| ((i * 37 % 101) as f64 - 50.) / 17.)
                .collect();
            xv[..d].fill(0.25);
            let x = Tensor::from_vec(xv, dims.as_slice(), &Device::Cpu)?;
            let w = Tensor::from_vec(
                (0..d).map(|i| 0.5 + i as f64 / 10.).collect(),
                d,
                &Device::Cpu,
            )?;
            let b = Tensor::from_vec(
                (0..d).map(|i| i as f64 / 7. - 1.).collect(),
                d,
                &Device::Cpu,
            )?;
            let r = Tensor::from_vec(
                (0..n).map(|i| ((i * 13 % 29) as f64 - 14.) / 9.).collect(),
                dims.as_slice(),
                &Device::Cpu,
            )?;
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
                let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
                           dt: DType|
                 -> Result<Vec<Tensor>> {
                    let vars = [&x, &w, &b]
                        .map(|t| Var::from_tensor(&t.to_dtype(dt).expect("dtype")).expect("var"));
                    let y = f(
                        vars[0].as_tensor(),
                        vars[1].as_tensor(),
                        vars[2].as_tensor(),
                    )?;
                    let grads = (y.to_dtype(DType::F64)? * &r)?.sum_all()?.backward()?;
                    let mut out = vec![y];
                    for v in &vars {
                        out.push(grads.get(v.as_tensor()).expect("grad").clone());
                    }
                    Ok(out)
                };
                let got = run(&|x, w, b| layer_norm(x, w, b, 1e-5), dtype)?;
                let want = run(&|x, w, b| layer_norm_candle(x, w, b, 1e-5), DType::F64)?;
                for (what, (g, e)) in ["y", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
                    assert_eq!(g.dtype(), dtype);
                    let diff = (g.to_dtype(DType::F64)? - e)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f64>()?;
                    let scale = e.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
                    assert!(
                        diff <= tol * scale,
                        "{dims:?} {dtype:?} {what}: {diff:e} of {scale:e}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_parameters_are_named() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).expect("x");
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).expect("w");
        let b = Tensor::zeros(3, DType::F32, &Device::Cpu).expect("b");
        let e = layer_norm(&x, &w, &b, 1e-5).expect_err("bias");
        assert!(e.to_string().contains("bias of shape (4)"), "{e}");
    }
}

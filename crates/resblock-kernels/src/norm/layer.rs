//! Layer normalisation over the last dim as one op with its own backward.
//!
//! As Candle ops a LayerNorm is eight passes forward (mean, centre, square, mean, add,
//! sqrt, reciprocal, three broadcasts) and about twenty tensors in its backward, and
//! candle-nn's fused `LayerNorm` has no backward at all. Here each row is one task: its
//! mean and variance in f64, then `y = (x - mean) / sigma * gamma + beta` in one pass; the
//! backward recomputes `x_hat` from the saved per-row mean and `1 / sigma` and writes
//! `dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma` with `g = dy * gamma` (only for
//! an input that tracks a gradient), while `dgamma = sum(dy * x_hat)` and `dbeta = sum(dy)`
//! are summed over the rows in f64. Outputs are written into fresh buffers, never
//! zero-filled first.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::buffer::{contiguous_slice, vec_written_by, vec_written_with, with_cpu_slice};
use crate::dispatch::Simd;
use crate::error::{Error, Result};
use crate::matmul::{as_f32, as_f32_uninit};
use crate::simd::with_simd;

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

/// Partial sums kept apart in a row's reductions: independent additions the compiler can
/// overlap or vectorise (one running sum waits about four cycles for each addition).
const LANES: usize = 8;

/// `sum f(v)` over `xs` in f64, as [`LANES`] interleaved partial sums added at the end.
#[inline(always)]
fn sum_f64<T: WithDType>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f(v.to_f64());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f(v.to_f64())).sum();
    acc.iter().sum::<f64>() + tail
}

/// One row of the backward: `g = dy * gamma` into `g`, the row's terms of `dgamma` and
/// `dbeta` added into `dw` and `db`; returns `(mean(g), mean(g * x_hat))`. Three short
/// loops over the row (in L1), each a plain zip the compiler vectorises (one loop doing it
/// all stayed scalar), the sums in [`LANES`] partial sums as [`sum_f64`]'s.
#[inline(always)]
fn row_sums<T: WithDType>(
    (x, dy, w): (&[T], &[T], &[T]),
    (mean, inv): (f64, f64),
    (dw, db, g): (&mut [f64], &mut [f64], &mut [f64]),
) -> (f64, f64) {
    let d = x.len();
    let x_hat = |v: &T| (v.to_f64() - mean) * inv;
    for ((g, dy), w) in g.iter_mut().zip(dy).zip(w) {
        *g = dy.to_f64() * w.to_f64();
    }
    for ((dw, db), (x, dy)) in dw.iter_mut().zip(db.iter_mut()).zip(x.iter().zip(dy)) {
        let t = dy.to_f64();
        *dw += t * x_hat(x);
        *db += t;
    }
    let (mut sg, mut sgx) = ([0f64; LANES], [0f64; LANES]);
    let (gs, xs) = (g.chunks_exact(LANES), x.chunks_exact(LANES));
    let (g_tail, x_tail) = (gs.remainder(), xs.remainder());
    for (gb, xb) in gs.zip(xs) {
        for (((sg, sgx), g), x) in sg.iter_mut().zip(sgx.iter_mut()).zip(gb).zip(xb) {
            *sg += g;
            *sgx += g * x_hat(x);
        }
    }
    let tail = g_tail
        .iter()
        .zip(x_tail)
        .fold((0f64, 0f64), |(a, b), (g, x)| (a + g, b + g * x_hat(x)));
    let n = d as f64;
    (
        (sg.iter().sum::<f64>() + tail.0) / n,
        (sgx.iter().sum::<f64>() + tail.1) / n,
    )
}

/// A task's rows of the backward (see [`row_sums`]), with `dx` where given: the sums added
/// into `(dw, db)`, `g` the scratch row.
#[inline(always)]
fn backward_rows<T: WithDType>(
    w: &[T],
    (x, dy): (&[T], &[T]),
    st: &[(f64, f64)],
    (dw, db, g): (&mut [f64], &mut [f64], &mut [f64]),
    mut dx: Option<&mut [MaybeUninit<T>]>,
) {
    let d = w.len();
    for (r, &(mean, inv)) in st.iter().enumerate() {
        let span = r * d..(r + 1) * d;
        let (x, dy) = (&x[span.clone()], &dy[span.clone()]);
        let (mg, mgx) = row_sums((x, dy, w), (mean, inv), (&mut *dw, &mut *db, &mut *g));
        if let Some(dx) = dx.as_deref_mut() {
            for ((o, v), gi) in dx[span].iter_mut().zip(x).zip(&*g) {
                let xh = (v.to_f64() - mean) * inv;
                o.write(T::from_f64(inv * (gi - mg - xh * mgx)));
            }
        }
    }
}

/// [`backward_rows`] in f32 compiled for `simd` (the widest of it the CPU has): at the
/// build target's level the f64 loops ran two lanes wide, 1.7% of a residual MLP block's
/// forward + backward. Every level computes the same values (the same f64 operations in
/// the same order).
fn backward_rows_with(
    simd: Simd,
    w: &[f32],
    xdy: (&[f32], &[f32]),
    st: &[(f64, f64)],
    sums: (&mut [f64], &mut [f64], &mut [f64]),
    dx: Option<&mut [MaybeUninit<f32>]>,
) {
    with_simd!(simd, backward_rows::<f32>(w: &[f32], xdy: (&[f32], &[f32]), st: &[(f64, f64)], sums: (&mut [f64], &mut [f64], &mut [f64]), dx: Option<&mut [MaybeUninit<f32>]>))
}

/// Per-task sums of `dgamma` and `dbeta`, and the task's `g` row.
type Partial = (Vec<f64>, Vec<f64>, Vec<f64>);

/// The backward's gradients: `dx` (where asked), `dgamma`, `dbeta`.
type Grads<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

/// A task's rows of `x` and `dy`, with their `(mean, 1 / sigma)`.
type RowsIn<'a, T> = ((&'a [T], &'a [T]), &'a [(f64, f64)]);

impl LayerNorm {
    fn forward<T: WithDType>(&self, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<(f64, f64)>) {
        let d = self.d;
        let rows = x.len() / d;
        let mut stats = vec![(0f64, 0f64); rows];
        let per = rows_per_task(d);
        let fill = |y: &mut [MaybeUninit<T>]| {
            y.par_chunks_mut(per * d)
                .zip(x.par_chunks(per * d))
                .zip(stats.par_chunks_mut(per))
                .for_each(|((y, x), st)| {
                    for ((y, x), st) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(st) {
                        let mean = sum_f64(x, |v| v) / d as f64;
                        let var = sum_f64(x, |v| (v - mean) * (v - mean)) / d as f64;
                        let inv = 1.0 / (var + self.eps).sqrt();
                        *st = (mean, inv);
                        let (m, s) = (T::from_f64(mean), T::from_f64(inv));
                        for (((o, v), g), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                            o.write((*v - m) * s * *g + *b);
                        }
                    }
                })
        };
        // SAFETY: the tasks cover `y` in whole rows, and each row is written whole.
        let y = unsafe { vec_written_by(x.len(), fill) };
        (y, stats)
    }

    /// `(dx where asked, dweight, dbias)`.
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        dy: &[T],
        need_dx: bool,
    ) -> candle_core::Result<Grads<T>> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("layer_norm: backward before forward")
        };
        // The tasks below cover `dx` (written without a zero fill) only if these agree.
        if dy.len() != x.len() || stats.len() * self.d != x.len() {
            candle_core::bail!(
                "layer_norm: an output gradient of {} values for an input of {}",
                dy.len(),
                x.len()
            )
        }
        let d = self.d;
        let per = rows_per_task(d);
        let zeros = || (vec![0f64; d], vec![0f64; d], vec![0f64; d]);
        let inputs = x
            .par_chunks(per * d)
            .zip(dy.par_chunks(per * d))
            .zip(stats.par_chunks(per));
        // Each task's rows: their sums, and `dx = (g - mean(g) - x_hat * mean(g x_hat)) /
        // sigma` where asked (an input that tracks no gradient, the first layer's, gets none).
        let simd = crate::dispatch::simd_in_use();
        let rows = |(mut dw, mut db, mut g): Partial,
                    ((x, dy), st): RowsIn<'_, T>,
                    dx: Option<&mut [MaybeUninit<T>]>| {
            let sums = (&mut dw[..], &mut db[..], &mut g[..]);
            match (as_f32(w), as_f32(x), as_f32(dy)) {
                (Some(w), Some(x), Some(dy)) => {
                    // `T` is f32, so `dx` (where given) is one too.
                    let dx = dx.and_then(as_f32_uninit);
                    backward_rows_with(simd, w, (x, dy), st, sums, dx)
                }
                _ => backward_rows(w, (x, dy), st, sums, dx),
            }
            (dw, db, g)
        };
        let sum = |(mut a, mut b, g): Partial, (c, e, _): Partial| {
            a.iter_mut().zip(&c).for_each(|(a, c)| *a += c);
            b.iter_mut().zip(&e).for_each(|(b, e)| *b += e);
            (a, b, g)
        };
        let (dx, (dw, db, _)) = if need_dx {
            let fill = |dx: &mut [MaybeUninit<T>]| {
                dx.par_chunks_mut(per * d)
                    .zip(inputs)
                    .fold(zeros, |acc, (dx, inp)| rows(acc, inp, Some(dx)))
                    .reduce(zeros, sum)
            };
            // SAFETY: the tasks cover `dx` in whole rows, and each row is written whole.
            let (dx, sums) = unsafe { vec_written_with(x.len(), fill) };
            (Some(dx), sums)
        } else {
            let sums = inputs
                .fold(zeros, |acc, inp| rows(acc, inp, None))
                .reduce(zeros, sum);
            (None, sums)
        };
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
        // An input that tracks no gradient (a network's input) gets none: no pass to compute
        // it, and no zero-filled buffer for Candle to add it into.
        let need_dx = x.track_op();
        macro_rules! grads_as {
            ($t:ty) => {{
                let (dx, dw, db) = with_cpu_slice(x, OP, |xs: &[$t]| {
                    with_cpu_slice(w, OP, |ws: &[$t]| {
                        with_cpu_slice(dy, OP, |dys: &[$t]| self.backward(xs, ws, dys, need_dx))
                    })
                })????;
                let dev = x.device();
                (
                    dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                        .transpose()?,
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
        Ok((dx, Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The backward's rows in f32 give the same values, bit for bit, on every SIMD level,
    /// over rows with whole blocks of `LANES` and a tail, with and without `dx`.
    #[test]
    fn backward_rows_agree_on_every_simd_level() {
        let (rows, d) = (3, 2 * LANES + 5);
        let scattered = |step: usize, modulus: usize, scale: f32| -> Vec<f32> {
            (0..rows * d)
                .map(|i| ((i * step % modulus) as f32 - modulus as f32 / 2.) * scale)
                .collect()
        };
        let (x, dy) = (scattered(37, 101, 0.06), scattered(13, 29, 0.1));
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / 10.).collect();
        let st: Vec<(f64, f64)> = (0..rows)
            .map(|r| (r as f64 / 3. - 0.2, 1.5 - r as f64 / 4.))
            .collect();
        let run = |simd: Simd, with_dx: bool| {
            let (mut dw, mut db, mut g) = (vec![0f64; d], vec![0f64; d], vec![0f64; d]);
            let sums = (&mut dw[..], &mut db[..], &mut g[..]);
            let dx: Vec<f32> = if with_dx {
                // SAFETY: `backward_rows` writes every value of each row's `dx`.
                unsafe {
                    vec_written_by(rows * d, |dx| {
                        backward_rows_with(simd, &w, (&x, &dy), &st, sums, Some(dx))
                    })
                }
            } else {
                backward_rows_with(simd, &w, (&x, &dy), &st, sums, None);
                Vec::new()
            };
            (dx, dw, db)
        };
        for with_dx in [true, false] {
            let want = run(Simd::Portable, with_dx);
            assert!(want.1.iter().chain(&want.2).all(|v| *v != 0.));
            for simd in [Simd::Avx2, Simd::Avx512] {
                assert_eq!(run(simd, with_dx), want, "{simd:?}, dx {with_dx}");
            }
        }
    }

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

    /// An input that tracks no gradient (a network's input) gets none, and the weight's and
    /// bias's gradients are those it gets when the input is a variable.
    #[test]
    fn untracked_input_gets_no_gradient() -> Result<()> {
        let dims = (6usize, 19usize);
        // A (6, 19) tensor of scattered values `((i * step % modulus) - modulus / 2) / scale`.
        let scattered = |step: usize, modulus: usize, scale: f32| -> Result<Tensor> {
            let half = (modulus / 2) as f32;
            let v = (0..dims.0 * dims.1)
                .map(|i| ((i * step % modulus) as f32 - half) / scale)
                .collect();
            Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
        };
        let x = scattered(37, 101, 17.)?;
        let ramp = |lo: f32, step: f32| -> Result<Var> {
            let v = (0..dims.1).map(|i| lo + step * i as f32).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                v,
                dims.1,
                &Device::Cpu,
            )?)?)
        };
        let (w, b) = (ramp(0.5, 0.08)?, ramp(-1., 0.1)?);
        let r = scattered(13, 29, 9.)?;
        let grads = |x: &Tensor| -> Result<candle_core::backprop::GradStore> {
            let y = layer_norm(x, w.as_tensor(), b.as_tensor(), 1e-5)?;
            Ok((y * &r)?.sum_all()?.backward()?)
        };
        let plain = grads(&x)?;
        let xv = Var::from_tensor(&x)?;
        let tracked = grads(xv.as_tensor())?;
        assert!(
            plain.get(&x).is_none(),
            "no gradient for an untracked input"
        );
        assert!(tracked.get(xv.as_tensor()).is_some());
        for (what, p) in [("weight", &w), ("bias", &b)] {
            let (got, want) = (
                plain.get(p.as_tensor()).expect("grad").to_vec1::<f32>()?,
                tracked.get(p.as_tensor()).expect("grad").to_vec1::<f32>()?,
            );
            assert_eq!(got, want, "{what}");
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

//! The convolution as Candle custom ops (forward and backward, bias and scale-shift
//! epilogues): dtype and layout dispatch around the two paths.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::epilogue::{epilogue, Affine, Epilogue};
use super::frozen::Forms;
use super::gemm::{backward, backward_tensors, forward};
use super::geom::{ConvGeom, Dims};
use super::path::{
    backward_direct, backward_strided, direct_backward_plans, forward_f32, strided_backward_plan,
    weight_grad_direct,
};

/// Per-channel sums of `dy` (N, C, H, W), f64 accumulated: a bias gradient.
pub(crate) fn channel_sums<T: WithDType>(dy: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = dy.dims4()?;
    let sums = crate::buffer::with_cpu_slice(dy, "conv2d", |g: &[T]| {
        (0..c)
            .into_par_iter()
            .map(|ci| {
                let s: f64 = (0..n)
                    .map(|ni| {
                        let plane = &g[(ni * c + ci) * h * w..(ni * c + ci + 1) * h * w];
                        plane.iter().map(|v| v.to_f64()).sum::<f64>()
                    })
                    .sum();
                T::from_f64(s)
            })
            .collect::<Vec<T>>()
    })?;
    Tensor::from_vec(sums, c, dy.device())
}

/// The convolution (optionally + bias, optionally followed by a ReLU) as a custom op with its
/// own backward (CPU, f32/f64): `NativeConv2d` takes (x, w), `NativeConv2dBias` (x, w, b).
pub(crate) struct NativeConv2d {
    pub geom: ConvGeom,
    pub relu: bool,
    /// The kernel's forms when it is frozen ([`super::frozen`]).
    pub frozen: Option<Arc<Forms>>,
}

/// See [`NativeConv2d`].
pub(crate) struct NativeConv2dBias {
    pub geom: ConvGeom,
    pub relu: bool,
    /// As [`NativeConv2d::frozen`].
    pub frozen: Option<Arc<Forms>>,
}

pub(crate) fn slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::buffer::contiguous_slice(s, l, "conv2d")
}

/// The forward on CPU storages, with an optional third input (see [`Affine`]) and an
/// optional residual added before the ReLU (laid out as the output); `frozen`: the forms of
/// the kernel `s2` when it is frozen.
pub(crate) fn cpu_forward(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    third: Option<((&CpuStorage, &Layout), Affine)>,
    (residual, relu): (Option<(&CpuStorage, &Layout)>, bool),
    g: &ConvGeom,
    frozen: Option<&Forms>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let d = Dims::new(g, l1.dims(), l2.dims())?;
    if let Some((_, lr)) = residual {
        if lr.dims() != [d.n, d.cout, d.oh, d.ow] {
            candle_core::bail!(
                "conv2d: a residual {:?} for an output {:?}",
                lr.dims(),
                [d.n, d.cout, d.oh, d.ow]
            )
        }
    }
    let affine = third.map_or(Affine::Bias, |t| t.1);
    if let Some(((_, lb), affine)) = third {
        let want = match affine {
            Affine::Bias => d.cout,
            Affine::ScaleShift => 2 * d.cout,
        };
        if lb.dims() != [want] {
            candle_core::bail!(
                "conv2d: {affine:?} {:?} for {} output channels",
                lb.dims(),
                d.cout
            )
        }
    }
    let shape = Shape::from((d.n, d.cout, d.oh, d.ow));
    let third_storage = third.map(|t| t.0);
    let out = match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            let ep = typed_epilogue(third_storage, residual, affine, relu)?;
            let (x, w) = (slice(a, l1)?, slice(b, l2)?);
            CpuStorage::F32(forward_f32(x, w, frozen, ep, &d, g))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            let ep = typed_epilogue(third_storage, residual, affine, relu)?;
            CpuStorage::F64(forward(slice(a, l1)?, slice(b, l2)?, ep, &d, g))
        }
        _ => candle_core::bail!("conv2d: the native kernel takes f32 or f64 of one dtype"),
    };
    Ok((out, shape))
}

/// The epilogue of [`cpu_forward`] in the inputs' dtype `T`, from the optional third input
/// and residual.
fn typed_epilogue<'a, T: WithDType>(
    third: Option<(&'a CpuStorage, &Layout)>,
    residual: Option<(&'a CpuStorage, &Layout)>,
    affine: Affine,
    relu: bool,
) -> candle_core::Result<Epilogue<'a, T>> {
    let part = |p: Option<(&'a CpuStorage, &Layout)>| {
        p.map(|(s, l)| match s.as_slice::<T>() {
            Ok(v) => slice(v, l),
            Err(_) => candle_core::bail!("conv2d: the native kernel takes inputs of one dtype"),
        })
        .transpose()
    };
    Ok(Epilogue {
        residual: part(residual)?,
        ..epilogue(part(third)?, affine, relu)
    })
}

/// (dx, dw, db if `with_bias`) for the upstream gradient `dy` of `y`.
pub(crate) fn cpu_backward(
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    (relu, with_bias): (bool, bool),
    g: &ConvGeom,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    match x.dtype() {
        candle_core::DType::F32 => backward_typed::<f32>(x, w, y, dy, (relu, with_bias), g),
        candle_core::DType::F64 => backward_typed::<f64>(x, w, y, dy, (relu, with_bias), g),
        dt => candle_core::bail!("conv2d: the native kernel has no {dt:?} backward"),
    }
}

pub(crate) fn backward_typed<T: WithDType>(
    x: &Tensor,
    w: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    (relu, with_bias): (bool, bool),
    g: &ConvGeom,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let d = Dims::new(g, x.dims(), w.dims())?;
    let dy = if relu {
        crate::buffer::relu_mask::<T>(y, dy, "conv2d")?
    } else {
        dy.clone()
    };
    // f32: Winograd for wide 3x3 "same" layers, the direct kernels when they apply;
    // otherwise per-image GEMMs.
    let f32 = T::DTYPE == candle_core::DType::F32;
    let winograd = f32 && super::winograd::applies(&d, g);
    let plans = (f32 && !winograd)
        .then(|| direct_backward_plans(&d, g))
        .flatten();
    let strided = (f32 && !winograd && plans.is_none())
        .then(|| strided_backward_plan(&d, g))
        .flatten();
    // Where only the input gradient pays on Winograd: that one from it, the weight gradient
    // from the direct kernels.
    let split = plans.is_some() && super::winograd::input_grad_applies(&d, g);
    let (dx, dw) = match (plans, strided) {
        _ if winograd => backward_tensors::<f32>(x, w, &dy, |x, w, dy| {
            super::winograd::backward(x, w, dy, &d)
        })?,
        (Some(plans), _) if split => backward_tensors::<f32>(x, w, &dy, |x, w, dy| {
            let dx = super::winograd::input_grad(w, dy, &d);
            (dx, weight_grad_direct(&plans.0, x, dy, &d))
        })?,
        (Some(plans), _) => backward_tensors::<f32>(x, w, &dy, |x, w, dy| {
            backward_direct(&plans, x, w, dy, &d, g)
        })?,
        (None, Some(plan)) => backward_tensors::<f32>(x, w, &dy, |x, w, dy| {
            backward_strided(&plan, x, w, dy, &d, g)
        })?,
        (None, None) => backward_tensors::<T>(x, w, &dy, |x, w, dy| backward(x, w, dy, &d, g))?,
    };
    let db = if with_bias {
        Some(channel_sums::<T>(&dy)?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

impl CustomOp2 for NativeConv2d {
    fn name(&self) -> &'static str {
        "resblock-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let frozen = self.frozen.as_deref();
        cpu_forward(
            (s1, l1),
            (s2, l2),
            None,
            (None, self.relu),
            &self.geom,
            frozen,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = cpu_backward(x, w, y, dy, (self.relu, false), &self.geom)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for NativeConv2dBias {
    fn name(&self) -> &'static str {
        "resblock-conv2d-bias"
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
        cpu_forward(
            (s1, l1),
            (s2, l2),
            Some(((s3, l3), Affine::Bias)),
            (None, self.relu),
            &self.geom,
            self.frozen.as_deref(),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = cpu_backward(x, w, y, dy, (self.relu, true), &self.geom)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// `relu?(conv(x, w) * scale + shift)` per output channel (an eval-mode BatchNorm in the
/// epilogue), for inference: it has no backward (the caller uses it only when nothing needs
/// a gradient).
pub(crate) struct NativeConv2dScaleShift {
    pub geom: ConvGeom,
    pub relu: bool,
    /// As [`NativeConv2d::frozen`].
    pub frozen: Option<Arc<Forms>>,
}

impl CustomOp3 for NativeConv2dScaleShift {
    fn name(&self) -> &'static str {
        "resblock-conv2d-scale-shift"
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
        cpu_forward(
            (s1, l1),
            (s2, l2),
            Some(((s3, l3), Affine::ScaleShift)),
            (None, self.relu),
            &self.geom,
            self.frozen.as_deref(),
        )
    }
}

/// `relu(residual + conv(x, w) [* scale] [+ bias])`, the per-channel values (a bias, or
/// `[scale; shift]`) held by the op, on inputs (x, w, residual): the last convolution of an
/// inference residual block with its shortcut's output and the block's ReLU. No backward
/// (the caller uses it only when nothing needs a gradient).
pub(crate) struct NativeConv2dResidual {
    pub geom: ConvGeom,
    /// The per-channel values (contiguous, the input's dtype) and their kind.
    pub affine: Option<(Tensor, Affine)>,
    /// As [`NativeConv2d::frozen`].
    pub frozen: Option<Arc<Forms>>,
}

impl CustomOp3 for NativeConv2dResidual {
    fn name(&self) -> &'static str {
        "resblock-conv2d-add-relu"
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
        let held = self
            .affine
            .as_ref()
            .map(|(t, kind)| (t.storage_and_layout(), *kind));
        let third = match &held {
            None => None,
            Some(((storage, layout), kind)) => match &**storage {
                candle_core::Storage::Cpu(cpu) => Some(((cpu, *layout), *kind)),
                _ => candle_core::bail!("conv2d: the native kernel runs on the CPU only"),
            },
        };
        cpu_forward(
            (s1, l1),
            (s2, l2),
            third,
            (Some((s3, l3)), true),
            &self.geom,
            self.frozen.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::epilogue::Epilogue;
    use crate::conv::pack::valid_range;
    use crate::conv::path::{direct_plan, forward_direct};

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn to64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|v| f64::from(*v)).collect()
    }

    /// The epilogue with the parts (bias, scale, ReLU, residual) that are on, from the
    /// given values.
    fn epilogue_of<'a, T: WithDType>(
        (bias, scale, relu, residual): (bool, bool, bool, bool),
        b: &'a [T],
        sc: &'a [T],
        res: &'a [T],
    ) -> Epilogue<'a, T> {
        Epilogue {
            scale: scale.then_some(sc),
            bias: bias.then_some(b),
            relu,
            residual: residual.then_some(res),
        }
    }

    /// Largest |a - b| relative to the largest |b| (at least 1).
    fn rel_err(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0., f64::max)
            / scale
    }

    /// The direct f32 kernels against the f64 GEMM path: forward (with bias and ReLU), the
    /// input gradient and the weight gradient, over tails of every tile size, paddings below,
    /// at and above `k / 2`, non-square kernels, and a batch of 1 (parallel channel blocks)
    /// and of 3 (parallel images), input gradients of 16 and 32 channels on `conv/lanes`;
    /// stride 2 (the phase-split layout, whose backward is `backward_strided`) at odd and
    /// even sizes and the stem's 7x7.
    #[test]
    fn direct_kernels_match_the_gemm_path() {
        let shapes = [
            // (n, c, h, w, cout, kh, kw, padding, stride)
            (3, 16, 8, 8, 16, 3, 3, 1, 1),
            (2, 32, 6, 7, 16, 3, 3, 1, 1),
            (1, 3, 7, 9, 5, 3, 3, 1, 1),
            (3, 5, 9, 6, 7, 3, 3, 0, 1),
            (2, 4, 6, 11, 9, 5, 3, 1, 1),
            (1, 3, 10, 10, 6, 7, 7, 3, 1),
            (3, 2, 5, 5, 3, 1, 1, 1, 1),
            (2, 6, 13, 5, 4, 3, 3, 2, 1),
            (3, 16, 8, 8, 16, 3, 3, 1, 2),
            (2, 4, 9, 10, 5, 3, 3, 1, 2),
            (1, 3, 12, 11, 8, 7, 7, 3, 2),
            (5, 3, 4, 4, 9, 3, 3, 1, 2),
        ];
        for (i, &(n, c, h, w, cout, kh, kw, padding, stride)) in shapes.iter().enumerate() {
            let g = ConvGeom {
                padding,
                stride,
                dilation: 1,
                groups: 1,
            };
            let d = Dims::new(&g, &[n, c, h, w], &[cout, c, kh, kw]).expect("valid test shape");
            let Some(plan) = direct_plan(&d, &g) else {
                // No AVX2/FMA (or the kernels are switched off): nothing to compare.
                return;
            };
            let x = values(n * c * h * w, 1 + i as u64);
            let k = values(cout * c * kh * kw, 100 + i as u64);
            let b = values(cout, 200 + i as u64);
            let dy = values(n * cout * d.p(), 300 + i as u64);
            let (x64, k64, b64, dy64) = (to64(&x), to64(&k), to64(&b), to64(&dy));
            let sc = values(cout, 400 + i as u64);
            let sc64 = to64(&sc);
            let res = values(d.n * d.cout * d.p(), 500 + i as u64);
            let res64 = to64(&res);
            for (bias, scale, relu, residual) in [
                (false, false, false, false),
                (true, false, true, false),
                (false, false, true, false),
                (true, true, true, false),
                (true, true, false, false),
                (false, false, true, true),
                (true, false, true, true),
                (true, true, true, true),
            ] {
                let parts = (bias, scale, relu, residual);
                let ep64 = epilogue_of(parts, &b64, &sc64, &res64);
                let ep = epilogue_of(parts, &b, &sc, &res);
                let want = forward(&x64, &k64, ep64, &d, &g);
                let got = forward_direct(&plan, &x, &k, ep, &d);
                let e = rel_err(&got, &want);
                assert!(
                    e < 1e-5,
                    "shape {i} bias {bias} scale {scale} relu {relu} residual {residual}: \
                     forward off by {e}"
                );
            }
            let (dx64, dw64) = backward(&x64, &k64, &dy64, &d, &g);
            if stride == 2 {
                let plan = strided_backward_plan(&d, &g).expect("a stride-2 plan");
                let (dx, dw) = backward_strided(&plan, &x, &k, &dy, &d, &g);
                let (ex, ew) = (rel_err(&dx, &dx64), rel_err(&dw, &dw64));
                assert!(
                    ex < 1e-5 && ew < 1e-5,
                    "shape {i}: dx off by {ex}, dw by {ew}"
                );
                continue;
            }
            // The input gradient's plan exists exactly when the padding is below the kernel.
            let plans = direct_backward_plans(&d, &g);
            assert_eq!(plans.is_some(), padding < kh.min(kw), "shape {i}");
            let Some(plans) = plans else { continue };
            // With 32 input channels (3x3, padding 1) the input gradient runs on
            // `conv/lanes` (whole blocks of either tile); with 16 on AVX2's tile alone.
            #[cfg(target_arch = "x86_64")]
            if c == 32 && crate::dispatch::current().channel_lanes {
                let lanes = crate::conv::lanes::input_grad(&k, &d, &g);
                assert!(lanes.is_some(), "shape {i}: input gradient on lanes");
            }
            let (dx, dw) = backward_direct(&plans, &x, &k, &dy, &d, &g);
            let (ex, ew) = (rel_err(&dx, &dx64), rel_err(&dw, &dw64));
            assert!(
                ex < 1e-5 && ew < 1e-5,
                "shape {i}: dx off by {ex}, dw by {ew}"
            );
            // The weight gradient alone (the backward that takes its input gradient from
            // Winograd).
            let ew = rel_err(&weight_grad_direct(&plans.0, &x, &dy, &d), &dw64);
            assert!(ew < 1e-5, "shape {i}: weight gradient alone off by {ew}");
        }
    }

    /// The forwards that write the plain output directly and apply the epilogue in place
    /// (`Plan::writes_plain`: the masked layout, whole tiles): at batch 1 on two threads
    /// (channel blocks in parallel, each block's epilogue applied by its thread) and at
    /// batch 3 and on one thread (images in parallel, the epilogue after each image), with
    /// every epilogue, against the f64 GEMM path.
    #[test]
    fn plain_output_forwards_apply_every_epilogue() {
        let g = ConvGeom {
            padding: 1,
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        for (n, threads) in [(1, 2), (1, 1), (3, 2)] {
            let d = Dims::new(&g, &[n, 5, 8, 6], &[24, 5, 3, 3]).expect("valid test shape");
            let Some(plan) = direct_plan(&d, &g) else {
                return;
            };
            if !plan.writes_plain() {
                // The AVX2 kernels keep the shared-padding layout: no plain output here.
                continue;
            }
            let x = values(n * 5 * 48, 11);
            let k = values(24 * 5 * 9, 12);
            let (b, sc, res) = (values(24, 13), values(24, 14), values(n * 24 * 48, 15));
            let (x64, k64, b64, sc64, res64) =
                (to64(&x), to64(&k), to64(&b), to64(&sc), to64(&res));
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            for (bias, scale, relu, residual) in [
                (false, false, false, false),
                (true, false, true, false),
                (true, true, false, false),
                (false, false, true, true),
                (true, true, true, true),
            ] {
                let parts = (bias, scale, relu, residual);
                let ep64 = epilogue_of(parts, &b64, &sc64, &res64);
                let ep = epilogue_of(parts, &b, &sc, &res);
                let want = forward(&x64, &k64, ep64, &d, &g);
                let got = pool.install(|| forward_direct(&plan, &x, &k, ep, &d));
                let e = rel_err(&got, &want);
                assert!(
                    e < 1e-5,
                    "n {n} threads {threads} bias {bias} scale {scale} relu {relu} \
                     residual {residual}: off by {e}"
                );
            }
        }
    }

    #[test]
    fn valid_range_covers_exactly_the_in_bounds_columns() {
        for w in 1..9usize {
            for s in 1..4usize {
                for off in -4isize..6 {
                    for ow in 0..10usize {
                        let (lo, hi) = valid_range(ow, w, s, off);
                        for ox in 0..ow {
                            let ix = ox as isize * s as isize + off;
                            let inside = ix >= 0 && ix < w as isize;
                            assert_eq!(
                                inside,
                                ox >= lo && ox < hi,
                                "w {w} s {s} off {off} ox {ox}"
                            );
                        }
                    }
                }
            }
        }
    }
}

//! Convolution + training-mode BatchNorm (+ ReLU) as one op: `relu?(bn(conv(x, w)))` with
//! the batch statistics of the convolution's output, for f32 convolutions with an odd square
//! kernel and `2 * padding = k - 1` ("same" at stride 1, the halving 3x3 of a downsampling
//! block at stride 2) on the direct kernels.
//!
//! Run as two ops, a conv-BN layer costs a training step about a dozen passes over its
//! activation besides the kernels: the BatchNorm reads the convolution's output twice for
//! the statistics and once to normalise; in the backward Candle allocates a zero tensor and
//! adds into it for the gradient of every intermediate tensor, the BatchNorm's input
//! gradient is written and read back, and the convolution copies it into its padded layouts
//! twice. Here:
//!
//! - forward: each image's convolution output gets its per-channel mean and squared
//!   deviations (f64) while it is in cache; the images' moments are combined exactly
//!   (Chan et al.), then one pass normalises;
//! - backward: one pass for the per-channel sums of `g` and `g * x_hat` (`g` is the output
//!   gradient masked by the ReLU, whose sign is recomputed from the saved convolution output
//!   instead of reading the op's output); then, per image, the BatchNorm's input gradient is
//!   written straight into the padded buffer the input-gradient kernel reads, and the weight
//!   gradient reads the same buffer (for a "same" convolution the padded `dY` is the
//!   flattened `dY` shifted by the border, see `Plan::weight_grad_padded`).
//! - Winograd (`conv/winograd/`, where it applies: 64 channels and more): the forward
//!   convolves the batch there and takes each plane's moments after; the backward writes
//!   the norm's input gradient once and runs Winograd's two gradients on it.
//! - `conv/lanes` (x86-64 with AVX-512 or AVX2, output channels in whole blocks of its
//!   tile's 32 or 16, where Winograd does not run): the forward convolves the batch there
//!   (a plain input, or at stride 1 one in the plan's padded layout) and takes each plane's
//!   moments after; at stride 1 with input channels in whole blocks of the tile's the
//!   input gradient runs there too,
//!   image by image on the padded `dY` above.
//! - stride 2: the forward on `conv/lanes` or the polyphase plan; the backward writes each
//!   image's norm input gradient once, flattens it for the direct weight gradient and
//!   multiplies it by `W^T` for `col2im_into` (a stride-2 input gradient is no convolution
//!   of `dY`).
//!
//! The op's inputs are `x`, the kernel and `[gamma; beta]` concatenated (Candle's custom ops
//! take at most three tensors); its gradients are those of the three.

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::buffer::{f32_slice, vec_written_by};
use crate::conv::direct;
use crate::conv::epilogue::Epilogue;
use crate::conv::gemm::{for_each_image_summed, gemm_parallelism, with_thread_scratch, WeightLhs};
use crate::conv::geom::{ConvGeom, Dims};
use crate::conv::path::{flipped_for_direct, StridedGroup};
use crate::conv::weight_sum::{WeightSum, WeightSums};
use crate::norm::simd as kernels;
use crate::norm::{channel_grad_sums, combine_moments, grad_coef, inv_std, norm_coef};

/// Per-channel batch mean and biased variance, f64.
pub(crate) type Stats = (Vec<f64>, Vec<f64>);

/// Whether the forward runs on `conv/lanes` (x86-64 only).
fn lanes_applies(d: &Dims, g: &ConvGeom) -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::conv::lanes::applies(d, g);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, g);
        false
    }
}

/// The fused op; see the module docs.
pub(crate) struct ConvBnTrain {
    d: Dims,
    geom: ConvGeom,
    fwd: direct::Plan,
    /// The input gradient's plan (stride 1); `None` at stride 2.
    back: Option<direct::Plan>,
    /// The convolution and its gradients on Winograd instead of the plans.
    winograd: bool,
    /// The forward on `conv/lanes` instead of the plan (where Winograd does not run); at
    /// stride 1 it reads a padded input in the plan's layout too. (Always false, and not
    /// read, off x86-64.)
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    lanes: bool,
    eps: f64,
    relu: bool,
    /// Written by the forward: the statistics (also read by the caller, for the running
    /// averages) and the convolution's output (the backward's `x` of the norm).
    stats: Arc<OnceLock<Stats>>,
    conv: OnceLock<Vec<f32>>,
}

impl ConvBnTrain {
    /// The op for input dims `x` and kernel dims `k`, or `None` where it does not apply (the
    /// caller then runs the convolution and the norm as two ops).
    pub(crate) fn new(
        x: &[usize],
        k: &[usize],
        geom: ConvGeom,
        eps: f64,
        relu: bool,
        stats: Arc<OnceLock<Stats>>,
    ) -> Option<ConvBnTrain> {
        let same = k.len() == 4 && k[2] == k[3] && k[2] % 2 == 1 && 2 * geom.padding + 1 == k[2];
        let stride_ok = geom.stride == 1 || (geom.stride == 2 && k[2] > 1);
        if !same || !stride_ok || geom.dilation != 1 || geom.groups != 1 {
            return None;
        }
        let d = Dims::new(&geom, x, k).ok()?;
        if d.n * d.p() < 2 {
            return None;
        }
        let winograd = crate::conv::winograd::applies(&d, &geom);
        let op = |fwd, back| ConvBnTrain {
            d,
            geom,
            fwd,
            back,
            winograd,
            lanes: lanes_applies(&d, &geom) && !winograd,
            eps,
            relu,
            stats: stats.clone(),
            conv: OnceLock::new(),
        };
        if geom.stride == 2 {
            let fwd = crate::conv::path::strided_backward_plan(&d, &geom)?;
            return Some(op(fwd, None));
        }
        let (fwd, back) = crate::conv::path::direct_backward_plans(&d, &geom)?;
        // The shared-buffer weight gradient must apply: checked once on an empty probe.
        let mut probe = vec![0f32; d.cout * d.c * d.kh * d.kw];
        let xp = fwd.padded_buffer(d.c);
        let dyp = back.padded_buffer(fwd.cout_rounded());
        fwd.weight_grad_padded(&[&xp], &back, &[&dyp], &mut probe)?;
        Some(op(fwd, Some(back)))
    }

    /// Whether the convolution runs on Winograd.
    #[cfg(test)]
    pub(crate) fn on_winograd(&self) -> bool {
        self.winograd
    }

    /// The output's shape `(n, cout, oh, ow)`.
    pub(crate) fn out_shape(&self) -> [usize; 4] {
        [self.d.n, self.d.cout, self.d.oh, self.d.ow]
    }

    /// The input's shape `(n, c, h, w)`.
    pub(crate) fn in_shape(&self) -> [usize; 4] {
        [self.d.n, self.d.c, self.d.h, self.d.w]
    }

    /// Lengths of the kernel and of `[kernel; gamma; beta]`.
    pub(crate) fn param_lens(&self) -> (usize, usize) {
        let d = &self.d;
        let wlen = d.cout * d.c * d.kh * d.kw;
        (wlen, wlen + 2 * d.cout)
    }

    /// (output, convolution output, statistics) from `x`, the packed parameters
    /// `[kernel; gamma; beta]` and the residual `res` when the op has one; the output written
    /// as `out` says. A padded `x` must be in this op's [`ConvBnTrain::padded_input`] layout.
    fn forward(
        &self,
        x: Input<'_>,
        params: &[f32],
        res: Option<&[f32]>,
        out: Output<'_>,
    ) -> (Written, Vec<f32>, Stats) {
        let (wlen, _) = self.param_lens();
        let (w, gb) = params.split_at(wlen);
        let d = &self.d;
        let (p, cout) = (d.p(), d.cout);
        // Per (image, channel): the plane's mean and sum of squared deviations.
        let mut moments = vec![(0f64, 0f64); d.n * cout];
        if let Some(conv) = self.whole_batch_forward(x, w) {
            moments
                .par_iter_mut()
                .zip(conv.par_chunks(p))
                .for_each(|(m, plane)| *m = kernels::moments(plane));
            return self.normalize(conv, &moments, gb, res, out);
        }
        let (parallel, _) = gemm_parallelism(d.n);
        let wk = self.fwd.pack_weights(w);
        let plen = self.fwd.padded_len();
        let image = |(xp, flat): &mut (Vec<f32>, Vec<f32>), (ni, (y_n, m_n)): ImageOut<'_>| {
            let xp: &[f32] = match x {
                Input::Plain(x) => {
                    self.fwd.pad(&x[ni * d.chw()..(ni + 1) * d.chw()], xp);
                    xp
                }
                Input::Padded(xb) => &xb[ni * plen..(ni + 1) * plen],
            };
            if self.fwd.writes_plain() {
                self.fwd.forward_plain(xp, &wk, y_n, !parallel);
            } else {
                self.fwd.forward(xp, &wk, flat, !parallel);
                self.fwd.unflatten(flat, y_n, Epilogue::NONE);
            }
            // SAFETY: `forward_plain` or `unflatten` just wrote every element of `y_n`.
            let y_n = unsafe { std::slice::from_raw_parts(y_n.as_ptr().cast::<f32>(), y_n.len()) };
            for (m, plane) in m_n.iter_mut().zip(y_n.chunks_exact(p)) {
                *m = kernels::moments(plane);
            }
        };
        let init = || (Vec::new(), Vec::new());
        let fill = |conv: &mut [MaybeUninit<f32>]| {
            if parallel {
                conv.par_chunks_mut(cout * p)
                    .zip(moments.par_chunks_mut(cout))
                    .enumerate()
                    .for_each_init(init, image);
            } else {
                let mut s = init();
                conv.chunks_mut(cout * p)
                    .zip(moments.chunks_mut(cout))
                    .enumerate()
                    .for_each(|item| image(&mut s, item));
            }
        };
        // SAFETY: the images' chunks cover the buffer and `forward_plain` or `unflatten`
        // writes each whole.
        let conv = unsafe { vec_written_by(d.n * cout * p, fill) };
        self.normalize(conv, &moments, gb, res, out)
    }

    /// The convolution of the whole batch on Winograd (a plain input) or on `conv/lanes`
    /// (a plain input, or at stride 1 one in the plan's padded layout), where the op runs
    /// there; `None` for the plan's per-image forward.
    fn whole_batch_forward(&self, x: Input<'_>, w: &[f32]) -> Option<Vec<f32>> {
        let d = &self.d;
        match x {
            Input::Plain(x) if self.winograd => {
                Some(crate::conv::winograd::forward(x, w, Epilogue::NONE, d))
            }
            #[cfg(target_arch = "x86_64")]
            Input::Plain(x) if self.lanes => Some(crate::conv::lanes::forward(
                x,
                (w, None),
                Epilogue::NONE,
                d,
                self.geom.stride,
            )),
            #[cfg(target_arch = "x86_64")]
            Input::Padded(x) if self.lanes => {
                let layout = self.fwd.lanes_layout()?;
                let x = (x, layout);
                let conv = crate::conv::lanes::forward_in(x, (w, None), Epilogue::NONE, d, 1);
                Some(conv)
            }
            _ => None,
        }
    }

    /// (output, convolution output, statistics) from the convolution output `conv` and
    /// its planes' `moments`: the batch statistics and one normalising pass (adding `res`),
    /// writing the output as `out` says.
    fn normalize(
        &self,
        conv: Vec<f32>,
        moments: &[(f64, f64)],
        gb: &[f32],
        res: Option<&[f32]>,
        out: Output<'_>,
    ) -> (Written, Vec<f32>, Stats) {
        let (p, cout) = (self.d.p(), self.d.cout);
        let (mean, var) = combine_moments(moments, cout, p);
        let coef = norm_coef(&mean, &inv_std(&var, self.eps), &gb[..cout], &gb[cout..]);
        // Plane `i` normalised (the residual added) into `o`.
        let values = |i: usize, o: &mut [MaybeUninit<f32>]| {
            let (v, c) = (&conv[i * p..(i + 1) * p], coef[i % cout]);
            match res {
                None => kernels::normalize(o, v, c, self.relu),
                Some(r) => kernels::normalize_add(o, (v, &r[i * p..(i + 1) * p]), c, self.relu),
            }
        };
        let (next, plain) = match out {
            Output::Plain => {
                let fill = |y: &mut [MaybeUninit<f32>]| {
                    y.par_chunks_mut(p)
                        .enumerate()
                        .for_each(|(i, yp)| values(i, yp))
                };
                // SAFETY: the planes cover the buffer and the kernels write every element.
                let y = unsafe { vec_written_by(conv.len(), fill) };
                return ((Some(y), None), conv, (mean, var));
            }
            Output::Padded(next) => (next, false),
            Output::Both(next) => (next, true),
        };
        assert_eq!(
            next.padded_len(),
            cout * next.plane_stride(),
            "conv_bn: a padded output has the next layer's input planes"
        );
        // Each plane is normalised into a thread's scratch (in cache), then written out:
        // into the padded layout (in whole pieces, see `direct::copy_row`) and plainly when
        // asked. Normalised straight into the padded rows, 7 to 28 values long, the loop
        // ran scalar; padded by the next layer, the output was read back from memory.
        let ps = next.plane_stride();
        let write = |i, pp: &mut [_], yp: Option<&mut [MaybeUninit<f32>]>| {
            with_thread_scratch(p + direct::ROW_SLACK, |tmp: &mut [f32]| {
                // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the kernels write
                // only initialised values through it.
                let o = unsafe { &mut *(&mut tmp[..p] as *mut [f32] as *mut [MaybeUninit<f32>]) };
                values(i, o);
                next.write_padded_plane(pp, tmp, true);
                if let Some(yp) = yp {
                    yp.iter_mut().zip(&tmp[..p]).for_each(|(o, v)| {
                        o.write(*v);
                    });
                }
            })
        };
        let len = if plain { conv.len() } else { 0 };
        let mut y: Vec<f32> = Vec::with_capacity(len);
        let fill = |pb: &mut [MaybeUninit<f32>]| {
            let pb = pb.par_chunks_mut(ps);
            if plain {
                pb.zip(y.spare_capacity_mut()[..len].par_chunks_mut(p))
                    .enumerate()
                    .for_each(|(i, (pp, yp))| write(i, pp, Some(yp)));
            } else {
                pb.enumerate().for_each(|(i, pp)| write(i, pp, None));
            }
        };
        // SAFETY: the planes cover the buffer and `write_padded_plane` writes each whole.
        let padded = unsafe { vec_written_by(self.d.n * cout * ps, fill) };
        // SAFETY: with `plain`, each plane of `y` was written whole from the scratch.
        unsafe { y.set_len(len) };
        ((plain.then_some(y), Some(padded)), conv, (mean, var))
    }

    /// (dx if `need_dx`, [dkernel; dgamma; dbeta]) for the gradient `dy` of the norm's
    /// output (after the ReLU when `relu`); `dx_add` (laid out as `x`), when given, is
    /// added to dx (the residual's gradient of a block whose input this layer reads).
    fn backward(
        &self,
        (x, params): (Input<'_>, &[f32]),
        conv: &[f32],
        dy: &[f32],
        (need_dx, relu): (bool, bool),
        dx_add: Option<&[f32]>,
    ) -> (Option<Vec<f32>>, Vec<f32>) {
        let (wlen, _) = self.param_lens();
        let (w, gb) = params.split_at(wlen);
        let d = &self.d;
        let (p, cout) = (d.p(), d.cout);
        let (mean, var) = self.stats.get().expect("conv_bn: backward after forward");
        let inv = inv_std(var, self.eps);
        let fcoef = norm_coef(mean, &inv, &gb[..cout], &gb[cout..]);
        let sums = channel_grad_sums((conv, dy), (cout, p), &fcoef, (mean, &inv), relu);
        let m = (d.n * p) as f64;
        let gcoef = grad_coef(&sums, &gb[..cout], mean, &inv, m);
        let coefs = (&fcoef[..], &gcoef[..]);
        let (dx, mut dparams) = match (&self.back, x) {
            (Some(back), _) if !self.winograd => {
                let (dx, dw) =
                    self.same_grads(back, (x, w), (conv, dy), coefs, (need_dx, relu), dx_add);
                (dx, dw.total(2 * cout))
            }
            // `check_input` takes a padded input only where `padded_input` is the direct plan.
            (_, Input::Padded(_)) => unreachable!("conv_bn: a padded input off the direct kernels"),
            (_, Input::Plain(x)) if self.winograd => {
                let (dx, dw) = self.winograd_grads((x, w), (conv, dy), coefs, (need_dx, relu));
                (add_into(dx, dx_add), dw)
            }
            (_, Input::Plain(x)) => {
                let (dx, dw) = self.strided_grads((x, w), (conv, dy), coefs, (need_dx, relu));
                (add_into(dx, dx_add), dw.total(2 * cout))
            }
        };
        dparams.extend(sums.iter().map(|s| s.1 as f32));
        dparams.extend(sums.iter().map(|s| s.0 as f32));
        (dx, dparams)
    }

    /// The input gradient's convolution on `conv/lanes` where it applies (x86-64, the
    /// input's channels in whole blocks of the tile's): the flipped kernel packed, the
    /// layout of `back`'s padded `dY` and the dimensions of that convolution (one image).
    #[cfg(target_arch = "x86_64")]
    fn lanes_input_grad(
        &self,
        back: &direct::Plan,
        w: &[f32],
    ) -> Option<(crate::conv::lanes::Packed, crate::conv::lanes::Layout, Dims)> {
        let layout = back.lanes_layout()?;
        let (packed, bd) = crate::conv::lanes::input_grad(w, &self.d, &self.geom)?;
        Some((packed, layout, bd))
    }

    /// On Winograd: (dx if `need_dx`, the kernel's gradient with room for `2 * cout` more
    /// values) from the norm's coefficients. The norm's input gradient is written once,
    /// for the whole batch, and both of Winograd's gradients read it.
    fn winograd_grads(
        &self,
        (x, w): (&[f32], &[f32]),
        (conv, dy): (&[f32], &[f32]),
        (fcoef, gcoef): Coefs<'_>,
        (need_dx, relu): (bool, bool),
    ) -> (Option<Vec<f32>>, Vec<f32>) {
        let d = &self.d;
        let (p, cout) = (d.p(), d.cout);
        // Written on all threads, not zero-filled first on the calling one.
        // SAFETY: `input_grad_uninit` writes each plane's `p` values, and the planes cover
        // the vector.
        let g = unsafe {
            vec_written_by(d.n * cout * p, |g| {
                g.par_chunks_mut(p).enumerate().for_each(|(i, g_c)| {
                    let co = i % cout;
                    let vg = (&conv[i * p..(i + 1) * p], &dy[i * p..(i + 1) * p]);
                    kernels::input_grad_uninit(g_c, vg, fcoef[co], gcoef[co], relu);
                });
            })
        };
        let dx = need_dx.then(|| crate::conv::winograd::input_grad(w, &g, d));
        let mut dw = crate::conv::winograd::weight_grad(x, &g, d);
        dw.reserve(2 * cout);
        (dx, dw)
    }

    /// Stride 1: (dx if `need_dx`, the workers' f64 sums of the kernel's gradient) from the norm's
    /// coefficients, the input-gradient plan `back` running the input gradient. Each image's
    /// dx is written straight into place where `back` writes the plain layout, `dx_add`
    /// added in place after while the image is in cache; otherwise `dx_add` is added as dx
    /// is copied out of the kernel's flattened layout.
    fn same_grads(
        &self,
        back: &direct::Plan,
        (x, w): (Input<'_>, &[f32]),
        (conv, dy): (&[f32], &[f32]),
        (fcoef, gcoef): Coefs<'_>,
        (need_dx, relu): (bool, bool),
        dx_add: Option<&[f32]>,
    ) -> (Option<Vec<f32>>, WeightSums) {
        let d = &self.d;
        let (p, cout) = (d.p(), d.cout);
        let (parallel, _) = gemm_parallelism(d.n);
        #[cfg(target_arch = "x86_64")]
        let lanes_dx = need_dx.then(|| self.lanes_input_grad(back, w)).flatten();
        #[cfg(target_arch = "x86_64")]
        let wfk = flipped_for_direct(back, w, lanes_dx.is_some());
        #[cfg(not(target_arch = "x86_64"))]
        let wfk = flipped_for_direct(back, w, false);
        let wlen = w.len();
        let plen = self.fwd.padded_len();
        let group = self.fwd.images_per_group(d.n);
        let (xlen, chunk) = if need_dx {
            (d.n * d.chw(), group * d.chw())
        } else {
            (d.n, group)
        };
        // Written image by image when `need_dx` (see below); otherwise a placeholder whose
        // chunks only number the groups.
        let cout_r = self.fwd.cout_rounded();
        let images =
            |s: &mut Scratch, acc: &mut WeightSum, gi: usize, dx_g: &mut [MaybeUninit<f32>]| {
                let first = gi * group;
                let m = group.min(d.n - first);
                while s.dyp.len() < m {
                    s.dyp.push(back.padded_buffer(cout_r));
                    s.xp.push(Vec::new());
                }
                for (k, (dyp, xp)) in s.dyp.iter_mut().zip(&mut s.xp).take(m).enumerate() {
                    let ni = first + k;
                    // The norm's input gradient, each plane computed in the scratch `tmp`
                    // (in cache) and copied into the padded layout in whole pieces.
                    s.tmp.resize(p + direct::ROW_SLACK, 0.0);
                    let planes = dyp.chunks_exact_mut(back.plane_stride()).take(cout);
                    for (co, plane) in planes.enumerate() {
                        let at = (ni * cout + co) * p;
                        let (cv, g) = (&conv[at..at + p], &dy[at..at + p]);
                        let t = &mut s.tmp[..p];
                        kernels::input_grad(t, (cv, g), fcoef[co], gcoef[co], relu);
                        back.write_padded_plane(plane, &s.tmp, false);
                    }
                    if let Input::Plain(x) = x {
                        self.fwd.pad(&x[ni * d.chw()..(ni + 1) * d.chw()], xp);
                    }
                }
                s.dw_n.resize(wlen, 0.0);
                let xps: Vec<&[f32]> = match x {
                    Input::Plain(_) => s.xp[..m].iter().map(Vec::as_slice).collect(),
                    // Written by the layer before, in the forward: nothing to pad.
                    Input::Padded(xb) => xb[first * plen..(first + m) * plen]
                        .chunks_exact(plen)
                        .collect(),
                };
                let dyps: Vec<&[f32]> = s.dyp[..m].iter().map(Vec::as_slice).collect();
                self.fwd
                    .weight_grad_padded(&xps, back, &dyps, &mut s.dw_n)
                    .expect("conv_bn: layouts checked in new");
                acc.add(&s.dw_n);
                if need_dx {
                    let chunks = s.dyp.iter().zip(dx_g.chunks_exact_mut(d.chw()));
                    for (k, (dyp, dx_n)) in chunks.enumerate() {
                        let ep = Epilogue {
                            residual: dx_add,
                            ..Epilogue::NONE
                        };
                        let ep = ep.image(first + k, d.chw());
                        #[cfg(target_arch = "x86_64")]
                        if let Some((wl, layout, bd)) = &lanes_dx {
                            // The padded `dY` as it is (each buffer holds one image).
                            let layout = crate::conv::lanes::Layout {
                                image: dyp.len(),
                                ..*layout
                            };
                            let x = (&dyp[..], layout);
                            crate::conv::lanes::forward_into(x, wl, (ep, bd, 1), dx_n, !parallel);
                            continue;
                        }
                        if back.writes_plain() {
                            // Straight into `dx` (no flattened copy), the residual's
                            // gradient added in place while the image is in cache.
                            back.forward_plain(dyp, &wfk, dx_n, !parallel);
                            // SAFETY: `forward_plain` wrote every element of `dx_n`.
                            let dx_n = unsafe { crate::buffer::assume_written(dx_n) };
                            ep.apply_planes(0, dx_n, d.h * d.w);
                        } else {
                            back.forward(dyp, &wfk, &mut s.flat, !parallel);
                            back.unflatten(&s.flat, dx_n, ep);
                        }
                    }
                }
            };
        let scratch = || Scratch {
            xp: Vec::new(),
            dyp: Vec::new(),
            flat: Vec::new(),
            dw_n: Vec::new(),
            tmp: Vec::new(),
        };
        // SAFETY: with `need_dx` each group's `forward_plain` or `unflatten` writes all its
        // images' chunks.
        unsafe { grads_by_group((xlen, chunk), (parallel, need_dx), wlen, scratch, images) }
    }

    /// Stride 2: as [`ConvBnTrain::same_grads`], the norm's input gradient of each image
    /// written once (`g`), flattened for the direct weight gradient, and multiplied by
    /// `W^T` for `col2im_into` (the input gradient).
    fn strided_grads(
        &self,
        (x, w): (&[f32], &[f32]),
        (conv, dy): (&[f32], &[f32]),
        (fcoef, gcoef): Coefs<'_>,
        (need_dx, relu): (bool, bool),
    ) -> (Option<Vec<f32>>, WeightSums) {
        let d = &self.d;
        let (p, cout, k) = (d.p(), d.cout, d.k_all());
        let (parallel, par) = gemm_parallelism(d.n);
        let wlen = w.len();
        let wt = WeightLhs::new(w, (k, cout), (1, k), (1, wlen), d.n);
        let group = self.fwd.images_per_group(d.n);
        // Without `need_dx` the chunks only number the groups.
        let (xlen, chunk) = if need_dx {
            (d.n * d.chw(), group * d.chw())
        } else {
            (d.n, group)
        };
        // `StridedGroup::grads` writes each image's chunk on its thread (`col2im_into`).
        let images = |s: &mut StridedScratch,
                      acc: &mut WeightSum,
                      gi: usize,
                      dx_g: &mut [MaybeUninit<f32>]| {
            let first = gi * group;
            let m = group.min(d.n - first);
            for v in [&mut s.g, &mut s.dyf, &mut s.xp] {
                v.resize_with(m.max(v.len()), Vec::new);
            }
            for i in 0..m {
                let ni = first + i;
                let g = &mut s.g[i];
                g.resize(cout * p, 0.0);
                for (co, g_c) in g.chunks_exact_mut(p).enumerate() {
                    let at = (ni * cout + co) * p;
                    let vg = (&conv[at..at + p], &dy[at..at + p]);
                    kernels::input_grad(g_c, vg, fcoef[co], gcoef[co], relu);
                }
                self.fwd.flatten(g, &mut s.dyf[i]);
                self.fwd
                    .pad(&x[ni * d.chw()..(ni + 1) * d.chw()], &mut s.xp[i]);
            }
            let dys: Vec<&[f32]> = s.g[..m].iter().map(Vec::as_slice).collect();
            let group = StridedGroup {
                xps: &s.xp[..m],
                dyfs: &s.dyf[..m],
                dys: &dys,
            };
            group.grads(
                (&self.fwd, &wt),
                (d, &self.geom),
                need_dx.then_some(dx_g),
                &mut s.dw_n,
                acc,
                par,
            );
        };
        let scratch = || StridedScratch {
            g: Vec::new(),
            dyf: Vec::new(),
            xp: Vec::new(),
            dw_n: Vec::new(),
        };
        // SAFETY: with `need_dx`, `StridedGroup::grads` writes each image's whole chunk.
        unsafe { grads_by_group((xlen, chunk), (parallel, need_dx), wlen, scratch, images) }
    }

    /// The checked inputs of a forward.
    fn inputs<'a>(
        &self,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
        res: Option<(&'a CpuStorage, &Layout)>,
    ) -> candle_core::Result<Inputs<'a>> {
        let d = &self.d;
        let (x, params) = (f32_slice(s1, l1, "conv_bn")?, f32_slice(s2, l2, "conv_bn")?);
        let res = res
            .map(|(s, l)| f32_slice(s, l, "conv_bn").map(|r| (r, l)))
            .transpose()?;
        let res_ok = res.is_none_or(|(_, l)| l.dims() == [d.n, d.cout, d.oh, d.ow]);
        if l1.dims() != [d.n, d.c, d.h, d.w] || params.len() != self.param_lens().1 || !res_ok {
            candle_core::bail!(
                "conv_bn: input {:?}, {} parameters, residual {:?} do not match the op's shapes",
                l1.dims(),
                params.len(),
                res.map(|(_, l)| l.dims().to_vec())
            )
        }
        Ok((x, params, res.map(|(r, _)| r)))
    }

    /// The forward on checked inputs, saving what the backward needs.
    fn run(
        &self,
        x: &[f32],
        params: &[f32],
        res: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = &self.d;
        let y = self.forward_saving(Input::Plain(x), params, res)?;
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.cout, d.oh, d.ow))))
    }

    /// The output for `x` (`(n, c, h, w)`), `[kernel; gamma; beta]` and the residual if any,
    /// saving the statistics and the convolution's output for
    /// [`ConvBnTrain::backward_saved`] (an op within another op, as in
    /// `fused/basic_block.rs`, calls these two).
    pub(crate) fn forward_saving(
        &self,
        x: Input<'_>,
        params: &[f32],
        res: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        match self.forward_saving_to(x, params, res, Output::Plain)? {
            (Some(plain), _) => Ok(plain),
            (None, _) => candle_core::bail!("conv_bn: no plain output written"),
        }
    }

    /// As [`ConvBnTrain::forward_saving`], the output also (`plain`) or only written in the
    /// padded layout of `next`'s input, for `next`'s [`Input::Padded`]; `next` may be `None`
    /// or not take one ([`ConvBnTrain::padded_input`]): then the output is written plainly.
    pub(crate) fn forward_saving_for(
        &self,
        x: Input<'_>,
        params: &[f32],
        res: Option<&[f32]>,
        (next, plain): (Option<&ConvBnTrain>, bool),
    ) -> candle_core::Result<Written> {
        let plan = next
            .filter(|n| n.in_shape() == self.out_shape())
            .and_then(ConvBnTrain::padded_input);
        let out = match (plan, plain) {
            (None, _) => Output::Plain,
            (Some(p), false) => Output::Padded(p),
            (Some(p), true) => Output::Both(p),
        };
        self.forward_saving_to(x, params, res, out)
    }

    /// [`ConvBnTrain::forward_saving`] writing the output as `out` says.
    fn forward_saving_to(
        &self,
        x: Input<'_>,
        params: &[f32],
        res: Option<&[f32]>,
        out: Output<'_>,
    ) -> candle_core::Result<Written> {
        self.check_input(x)?;
        let (y, conv, stats) = self.forward(x, params, res, out);
        if self.stats.set(stats).is_err() || self.conv.set(conv).is_err() {
            candle_core::bail!("conv_bn: a kernel instance ran twice");
        }
        Ok(y)
    }

    /// The plan whose padded layout this op takes its input in ([`Input::Padded`]): the
    /// forward's, when the op runs on the stride-1 direct kernels; else `None` (Winograd and
    /// stride 2 read the input as it is).
    pub(crate) fn padded_input(&self) -> Option<&direct::Plan> {
        (!self.winograd && self.back.is_some() && self.fwd.takes_written_planes())
            .then_some(&self.fwd)
    }

    /// Checks an input's length against the op's shapes (and that a padded one is taken).
    fn check_input(&self, x: Input<'_>) -> candle_core::Result<()> {
        let d = &self.d;
        let ok = match (x, self.padded_input()) {
            (Input::Plain(x), _) => x.len() == d.n * d.chw(),
            (Input::Padded(x), Some(plan)) => x.len() == d.n * plan.padded_len(),
            (Input::Padded(_), None) => false,
        };
        if !ok {
            candle_core::bail!("conv_bn: the input does not match the op's shape or layout")
        }
        Ok(())
    }

    /// (dx if `need_dx`, with `dx_add` added when given; [dkernel; dgamma; dbeta]) for the
    /// gradient `dy` of the norm's output (of the ReLU's when `relu`) after
    /// [`ConvBnTrain::forward_saving`].
    pub(crate) fn backward_saved(
        &self,
        (x, params): (Input<'_>, &[f32]),
        dy: &[f32],
        (need_dx, relu): (bool, bool),
        dx_add: Option<&[f32]>,
    ) -> candle_core::Result<(Option<Vec<f32>>, Vec<f32>)> {
        let Some(conv) = self.conv.get() else {
            candle_core::bail!("conv_bn: backward before forward")
        };
        self.check_input(x)?;
        Ok(self.backward((x, params), conv, dy, (need_dx, relu), dx_add))
    }

    /// (dx, dparams, dres) for the op's output `y` and its gradient `dy`.
    fn grads(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: Option<&Tensor>,
        (y, dy): (&Tensor, &Tensor),
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        use crate::buffer::with_cpu_slice as with;
        let Some(conv) = self.conv.get() else {
            candle_core::bail!("conv_bn: backward before forward")
        };
        // The input of a network needs no gradient: skip the input-gradient convolution.
        let need_dx = x.track_op();
        let (dx, dparams, dres) = with(x, "conv_bn", |xs: &[f32]| {
            with(params, "conv_bn", |ps: &[f32]| {
                with(dy, "conv_bn", |dys: &[f32]| match res {
                    None => {
                        let (dx, dp) = self.backward(
                            (Input::Plain(xs), ps),
                            conv,
                            dys,
                            (need_dx, self.relu),
                            None,
                        );
                        Ok((dx, dp, None))
                    }
                    Some(_) => with(y, "conv_bn", |ys: &[f32]| {
                        // `relu(bn + res)`: the gradient through the ReLU is both the
                        // residual's and the norm's output gradient.
                        let g = if self.relu {
                            kernels::relu_grad(ys, dys)
                        } else {
                            dys.to_vec()
                        };
                        let (dx, dp) =
                            self.backward((Input::Plain(xs), ps), conv, &g, (need_dx, false), None);
                        (dx, dp, Some(g))
                    }),
                })
            })
        })????;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Tensor::from_vec(dparams, params.shape(), dev)?,
            match (dres, res) {
                (Some(g), Some(r)) => Some(Tensor::from_vec(g, r.shape(), dev)?),
                _ => None,
            },
        ))
    }
}

/// [`for_each_image_summed`] over the groups of a backward: `images` gets each group's
/// chunk (`chunk` values) of a new input gradient of `xlen` values; returns that gradient
/// when `need_dx` and the weight gradient's sums.
///
/// # Safety
/// With `need_dx`, `images` must write every value of each chunk it gets.
unsafe fn grads_by_group<S: Send>(
    (xlen, chunk): (usize, usize),
    (parallel, need_dx): (bool, bool),
    wlen: usize,
    scratch: impl Fn() -> S + Sync + Send,
    images: impl Fn(&mut S, &mut WeightSum, usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> (Option<Vec<f32>>, WeightSums) {
    let mut dx: Vec<f32> = Vec::with_capacity(xlen);
    let dw = for_each_image_summed(
        &mut dx.spare_capacity_mut()[..xlen],
        chunk,
        parallel,
        wlen,
        scratch,
        images,
        |_, _| {},
    );
    if need_dx {
        // SAFETY: the groups' chunks cover `xlen`, and the caller guarantees each was
        // written whole.
        unsafe { dx.set_len(xlen) };
    }
    (need_dx.then_some(dx), dw)
}

/// `dx + add` in place, on all threads (where a path cannot add it while writing dx).
fn add_into(dx: Option<Vec<f32>>, add: Option<&[f32]>) -> Option<Vec<f32>> {
    const CHUNK: usize = 1 << 14;
    match (dx, add) {
        (Some(mut dx), Some(add)) => {
            assert_eq!(dx.len(), add.len(), "conv_bn: dx_add size");
            dx.par_chunks_mut(CHUNK)
                .zip(add.par_chunks(CHUNK))
                .for_each(|(d, r)| d.iter_mut().zip(r).for_each(|(d, r)| *d += r));
            Some(dx)
        }
        (dx, _) => dx,
    }
}

/// The norm's per-channel coefficients: the forward's (`norm_coef`) and the input
/// gradient's (`grad_coef`).
type Coefs<'a> = (&'a [(f32, f32, f32)], &'a [(f32, f32, f32, f32)]);

/// A layer's input `x`: as the tensor lays it out, `(n, c, h, w)`; or `n` images in the
/// padded layout of the layer's forward plan ([`ConvBnTrain::padded_input`]), written there
/// by the layer before ([`ConvBnTrain::forward_saving_for`]), so that neither the forward
/// nor the backward pads it.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    Plain(&'a [f32]),
    Padded(&'a [f32]),
}

impl<'a> Input<'a> {
    /// `x` in the padded layout when that copy is given, else as it is.
    pub(crate) fn of(x: &'a [f32], padded: Option<&'a [f32]>) -> Input<'a> {
        padded.map_or(Input::Plain(x), Input::Padded)
    }
}

/// Where a forward writes its output.
#[derive(Clone, Copy)]
enum Output<'a> {
    /// As `(n, cout, oh, ow)`.
    Plain,
    /// Only in the padded layout of the next layer's input, whose forward plan this is.
    Padded(&'a direct::Plan),
    /// Both.
    Both(&'a direct::Plan),
}

/// A forward's output: plainly (`(n, cout, oh, ow)`) and in the padded layout of the next
/// layer's input, each where it was asked for.
pub(crate) type Written = (Option<Vec<f32>>, Option<Vec<f32>>);

/// The op's inputs as slices: `x`, `[kernel; gamma; beta]`, the residual if any.
type Inputs<'a> = (&'a [f32], &'a [f32], Option<&'a [f32]>);

/// One image of the forward: its index, convolution output and per-channel moments.
type ImageOut<'a> = (usize, (&'a mut [MaybeUninit<f32>], &'a mut [(f64, f64)]));

/// Scratch buffers of one stride-2 backward worker, per image of a group: the norm's input
/// gradient `g`, it flattened, the phase-split input; and the group's weight gradient (the
/// patch gradients are in the thread's scratch, `StridedGroup::grads`).
struct StridedScratch {
    g: Vec<Vec<f32>>,
    dyf: Vec<Vec<f32>>,
    xp: Vec<Vec<f32>>,
    dw_n: Vec<f32>,
}

/// Scratch buffers of one backward worker: padded inputs and output gradients of one image
/// group, the flattened input gradient and weight gradient of one image, and one plane.
struct Scratch {
    xp: Vec<Vec<f32>>,
    dyp: Vec<Vec<f32>>,
    flat: Vec<f32>,
    dw_n: Vec<f32>,
    tmp: Vec<f32>,
}

/// `(x, [kernel; gamma; beta])`: `relu?(bn(conv(x)))`.
impl CustomOp2 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "resblock-conv-bn-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, params, _) = self.inputs((s1, l1), (s2, l2), None)?;
        self.run(x, params, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, _) = self.grads(x, params, None, (y, dy))?;
        Ok((dx, Some(dp)))
    }
}

/// `(x, [kernel; gamma; beta], res)`: `relu?(bn(conv(x)) + res)`, the end of a residual
/// block.
impl CustomOp3 for ConvBnTrain {
    fn name(&self) -> &'static str {
        "resblock-conv-bn-add-train"
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
        let (x, params, res) = self.inputs((s1, l1), (s2, l2), Some((s3, l3)))?;
        self.run(x, params, res)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp, dr) = self.grads(x, params, Some(res), (y, dy))?;
        Ok((dx, Some(dp), dr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op takes odd square kernels with `2 * padding = k - 1` at stride 1 ("same") and
    /// stride 2 (where the direct kernels run) and nothing else; the callers fall back to
    /// two ops for the rest.
    #[test]
    fn applies_to_same_convolutions_only() {
        let geom = |padding, stride| ConvGeom {
            padding,
            stride,
            dilation: 1,
            groups: 1,
        };
        let op = |x: &[usize], k: &[usize], g| {
            ConvBnTrain::new(x, k, g, 1e-5, true, Arc::new(OnceLock::new())).is_some()
        };
        let avx2 = direct::Isa::detect().is_some();
        assert_eq!(op(&[3, 5, 7, 9], &[6, 5, 3, 3], geom(1, 1)), avx2);
        assert_eq!(op(&[1, 16, 32, 32], &[16, 16, 3, 3], geom(1, 1)), avx2);
        assert_eq!(op(&[2, 4, 9, 9], &[4, 4, 5, 5], geom(2, 1)), avx2);
        assert_eq!(op(&[3, 5, 8, 8], &[6, 5, 3, 3], geom(1, 2)), avx2);
        assert_eq!(op(&[2, 3, 9, 7], &[4, 3, 7, 7], geom(3, 2)), avx2);
        assert!(!op(&[3, 5, 8, 8], &[6, 5, 3, 3], geom(1, 3)));
        assert!(!op(&[3, 5, 8, 8], &[6, 5, 1, 1], geom(0, 2)));
        assert!(!op(&[3, 5, 8, 8], &[6, 5, 3, 3], geom(0, 1)));
        assert!(!op(&[3, 5, 8, 8], &[6, 5, 3, 3], geom(2, 1)));
        assert!(!op(&[3, 5, 8, 8], &[6, 5, 1, 1], geom(0, 1)));
        assert!(!op(&[3, 5, 8, 8], &[6, 5, 3, 2], geom(1, 1)));
        assert!(!op(&[1, 1024, 8, 8], &[8, 1024, 3, 3], geom(1, 1)));
    }
}

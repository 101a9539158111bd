//! Which kernels a convolution runs on: the direct kernels (`direct/`) where they apply
//! and win, the GEMM path (`gemm.rs`) elsewhere.

use std::mem::MaybeUninit;

use super::direct;
use super::epilogue::Epilogue;
use super::frozen::Forms;
use super::gemm::{
    for_each_image, for_each_image_summed, forward, gemm_parallelism, with_thread_scratch,
    WeightLhs,
};
use super::geom::{ConvGeom, Dims};
use super::pack::col2im_into;
use super::weight_sum::WeightSum;

/// Whether the direct kernels may be used ([`crate::dispatch::Dispatch::direct_conv`]; off for
/// comparison with the GEMM path).
pub(crate) fn direct_enabled() -> bool {
    crate::dispatch::current().direct_conv
}

/// The largest `C_in * kh * kw` the direct kernels take in a backward, and in a forward on
/// AVX2: above it the GEMM path's packed micro-kernels win (measured with AVX2: ResNet-18/50
/// at 224x224, batch 8, ran 10-25% slower with the direct kernels on every stride-1 layer).
pub(crate) const DIRECT_MAX_K: usize = 576;

/// The same for an AVX-512 forward, whose tile feeds twice the FMAs per load: up to 256
/// input channels of a 3x3 kernel (ResNet-18 at 224x224 ran 10-15% faster at batch 1 and
/// 8 with the direct kernel up to here; the 512-channel 7x7 layers ran slower on it).
pub(crate) const DIRECT_MAX_K_AVX512_FORWARD: usize = 2304;

/// The direct forward plan when it applies: f32 (the caller's), stride 1 or 2, no dilation,
/// one group, and not a 1x1 kernel (at stride 1 unpadded that one is a plain GEMM already;
/// at stride 2 the GEMM path's unfolding reads a quarter of the input, the phase split all
/// of it). On the copies layout where that saves enough ([`direct::Plan::preferred`]).
pub(crate) fn direct_plan(d: &Dims, g: &ConvGeom) -> Option<direct::Plan> {
    let plan = direct_plan_up_to(d, g, DIRECT_MAX_K_AVX512_FORWARD)?;
    (d.c * d.kh * d.kw <= direct_forward_max_k(plan.isa(), g.stride)).then(|| plan.preferred())
}

/// The largest `C_in * kh * kw` of an AVX2 stride-2 forward on the direct kernel: above it
/// (64 input channels of a 3x3 kernel) the GEMM path's unfolding of a quarter of the input
/// and one GEMM win. Measured on the Zen 3 host (`winograd-ab ... s2 direct_conv`,
/// interleaved minima): 64 -> 128 channels at 56x56, batch 8, 7.0 ms on the GEMM path (our
/// AVX2 GEMM; 7.6 on the `gemm` crate's) against 9.6 direct, batch 1 0.92 against 1.35; but
/// 32 -> 64 at 16x16, batch 128, 4.38 against 3.67 direct, and 16 -> 32 at 32x32 4.74
/// against 3.41. (Those 3x3 padding-1 layers now run on `conv/lanes`, which [`forward_f32`]
/// asks first, in about a quarter less time than direct, interleaved minima; this limit is
/// for the stride-2 layers it does not take.)
pub(crate) const DIRECT_MAX_K_AVX2_STRIDED_FORWARD: usize = 288;

/// The largest `C_in * kh * kw` a forward at `stride` takes on the direct kernels of `isa`.
fn direct_forward_max_k(isa: direct::Isa, stride: usize) -> usize {
    match isa {
        direct::Isa::Avx512 => DIRECT_MAX_K_AVX512_FORWARD,
        direct::Isa::Avx2 if stride == 2 => DIRECT_MAX_K_AVX2_STRIDED_FORWARD,
        direct::Isa::Avx2 => DIRECT_MAX_K,
    }
}

/// [`direct_plan`] with `C_in * kh * kw` at most `max_k`.
fn direct_plan_up_to(d: &Dims, g: &ConvGeom, max_k: usize) -> Option<direct::Plan> {
    let one_by_one = d.kh * d.kw == 1;
    let strided = g.stride == 2 && !one_by_one;
    if !direct_enabled() || !(g.stride == 1 || strided) || g.dilation != 1 || g.groups != 1 {
        return None;
    }
    if d.direct(g) || d.c * d.kh * d.kw > max_k {
        return None;
    }
    direct::Plan::strided(
        direct::Isa::detect()?,
        (d.c, d.h, d.w),
        d.cout,
        (d.kh, d.kw),
        (g.padding, g.padding),
        g.stride,
    )
}

/// The direct plans of the backward: the forward's (weight gradient) and the input
/// gradient's (`dY` padded by `k - 1 - padding`, flipped kernel), when both apply (stride 1
/// only: at stride 2 the input gradient is not a plain convolution of `dY`).
pub(crate) fn direct_backward_plans(
    d: &Dims,
    g: &ConvGeom,
) -> Option<(direct::Plan, direct::Plan)> {
    if g.stride != 1 {
        return None;
    }
    let fwd = direct_plan_up_to(d, g, DIRECT_MAX_K)?;
    let pad_y = (d.kh - 1).checked_sub(g.padding)?;
    let pad_x = (d.kw - 1).checked_sub(g.padding)?;
    let back = direct::Plan::with_isa(
        fwd.isa(),
        (d.cout, d.oh, d.ow),
        d.c,
        (d.kh, d.kw),
        (pad_y, pad_x),
    )?;
    (back.oh == d.h && back.ow == d.w).then_some((fwd, back))
}

/// The f32 forward: Winograd for wide 3x3 "same" convolutions, other 3x3 ones (stride 1
/// or 2) with the output channels in the lanes (`conv/lanes`) where they apply, direct
/// where it applies, one GEMM over several images for small outputs (`batched.rs`),
/// per-image GEMMs otherwise. `frozen`: the forms of a frozen kernel `w`
/// ([`super::frozen`]).
pub(crate) fn forward_f32(
    x: &[f32],
    w: &[f32],
    frozen: Option<&Forms>,
    ep: Epilogue<'_, f32>,
    d: &Dims,
    g: &ConvGeom,
) -> Vec<f32> {
    let winograd = super::winograd::forward_applies(d, g, frozen.is_some());
    // At stride 1 Winograd, where it applies, does fewer multiplications.
    #[cfg(target_arch = "x86_64")]
    if super::lanes::applies(d, g) && !(g.stride == 1 && winograd) {
        let packed = frozen.map(|f| f.lanes(w, d.cout, d.c));
        return super::lanes::forward(x, (w, packed), ep, d, g.stride);
    }
    if winograd {
        return match frozen {
            Some(forms) => super::winograd::forward_frozen(x, w, forms, ep, d),
            None => super::winograd::forward(x, w, ep, d),
        };
    }
    match direct_plan(d, g) {
        Some(plan) => forward_direct(&plan, x, w, ep, d),
        None if super::batched::applies(d, g) => super::batched::forward(x, w, ep, d, g),
        None => forward(x, w, ep, d, g),
    }
}

pub(crate) fn forward_direct(
    plan: &direct::Plan,
    x: &[f32],
    w: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
) -> Vec<f32> {
    let (parallel, _) = gemm_parallelism(d.n);
    // With images in parallel every image reads all the weights: packed once. Otherwise
    // (fewer images than threads) each channel block packs its own, into its cache.
    let wk = parallel.then(|| plan.pack_weights(w));
    let scratch = || (Vec::new(), Vec::new());
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
        for_each_image(
            y,
            d.cout * d.p(),
            parallel,
            scratch,
            |(xp, flat), ni, y_n| {
                plan.pad(&x[ni * d.chw()..(ni + 1) * d.chw()], xp);
                let ep = ep.image(ni, d.cout * d.p());
                match &wk {
                    // The plain output written directly (no `unflatten` copy), the
                    // epilogue applied in place after.
                    Some(wk) if plan.writes_plain() => {
                        plan.forward_plain(xp, wk, y_n, false);
                        // SAFETY: `forward_plain` wrote every element of `y_n`.
                        let y_n = unsafe { crate::buffer::assume_written(y_n) };
                        ep.apply_planes(0, y_n, d.p());
                    }
                    Some(wk) => {
                        plan.forward(xp, wk, flat, false);
                        plan.unflatten(flat, y_n, ep);
                    }
                    None if plan.writes_plain() => plan.forward_raw_weights_plain(xp, w, y_n, ep),
                    None => {
                        plan.forward_raw_weights(xp, w, flat);
                        plan.unflatten(flat, y_n, ep);
                    }
                }
            },
        );
    };
    // SAFETY: the images' chunks cover `y`, and `unflatten` or the plain forwards write
    // each whole chunk.
    unsafe { crate::buffer::vec_written_by(d.n * d.cout * d.p(), fill) }
}

/// Scratch buffers of one direct backward worker.
#[derive(Default)]
pub(crate) struct DirectScratch {
    xp: Vec<f32>,
    dyf: Vec<f32>,
    dyp: Vec<f32>,
    flat: Vec<f32>,
    dw_n: Vec<f32>,
}

impl DirectScratch {
    /// Adds one image's weight gradient (`wlen` values; input `x_n`, output gradient
    /// `dy_n`) by the forward plan `fwd` to `acc`.
    fn add_weight_grad(
        &mut self,
        fwd: &direct::Plan,
        (x_n, dy_n): (&[f32], &[f32]),
        wlen: usize,
        acc: &mut WeightSum,
    ) {
        fwd.pad(x_n, &mut self.xp);
        self.dw_n.resize(wlen, 0.0);
        fwd.weight_grad_plain(&self.xp, dy_n, &mut self.dyf, &mut self.dw_n);
        acc.add(&self.dw_n);
    }
}

/// (dx, dw) by the direct kernels. `dx` is written image by image into fresh memory: on
/// `conv/lanes` from the plain `dY` where that applies (3x3, padding 1, the input's
/// channels in whole blocks of the tile's: no padded copy of `dY`), else by the input
/// gradient's direct forward straight into its plain layout where the plan writes it
/// ([`direct::Plan::writes_plain`]), else through the flattened scratch and `unflatten`
/// (zero-filling `dx` first and that copy were 7% of a 64-channel 56x56 backward).
pub(crate) fn backward_direct(
    (fwd, back): &(direct::Plan, direct::Plan),
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d: &Dims,
    g: &ConvGeom,
) -> (Vec<f32>, Vec<f32>) {
    let (parallel, _) = gemm_parallelism(d.n);
    let wlen = w.len();
    #[cfg(target_arch = "x86_64")]
    let lanes_dx = super::lanes::input_grad(w, d, g);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = g;
    #[cfg(target_arch = "x86_64")]
    let wfk = flipped_for_direct(back, w, lanes_dx.is_some());
    #[cfg(not(target_arch = "x86_64"))]
    let wfk = flipped_for_direct(back, w, false);
    let ylen = d.cout * d.p();
    let image =
        |s: &mut DirectScratch, acc: &mut WeightSum, ni: usize, dx_n: &mut [MaybeUninit<f32>]| {
            let dy_n = &dy[ni * ylen..(ni + 1) * ylen];
            s.add_weight_grad(fwd, (&x[ni * d.chw()..(ni + 1) * d.chw()], dy_n), wlen, acc);
            #[cfg(target_arch = "x86_64")]
            if let Some((wl, bd)) = &lanes_dx {
                let dy_n = (dy_n, super::lanes::Layout::plain(bd));
                super::lanes::forward_into(dy_n, wl, (Epilogue::NONE, bd, 1), dx_n, !parallel);
                return;
            }
            back.pad(dy_n, &mut s.dyp);
            if back.writes_plain() {
                back.forward_plain(&s.dyp, &wfk, dx_n, !parallel);
            } else {
                back.forward(&s.dyp, &wfk, &mut s.flat, !parallel);
                back.unflatten(&s.flat, dx_n, Epilogue::NONE);
            }
        };
    let scratch = DirectScratch::default;
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        for_each_image_summed(dx, d.chw(), parallel, wlen, scratch, image, |_, _| {})
    };
    // SAFETY: the images' chunks cover `dx`, and `forward_plain` or `unflatten` writes each
    // whole chunk.
    let (dx, dw) = unsafe { crate::buffer::vec_written_with(d.n * d.chw(), fill) };
    (dx, dw.total(0))
}

/// The flipped kernel packed for `back`'s direct input gradient, or nothing where that runs
/// on `conv/lanes` instead (`on_lanes`; [`super::lanes::input_grad`] packs its own).
pub(crate) fn flipped_for_direct(back: &direct::Plan, w: &[f32], on_lanes: bool) -> Vec<f32> {
    if on_lanes {
        Vec::new()
    } else {
        back.pack_flipped_weights(w)
    }
}

/// The weight gradient alone by the direct kernels (the forward plan `fwd`), summed over
/// the images as [`backward_direct`] sums it: for the backward that takes its input
/// gradient from Winograd (`winograd::input_grad_applies`).
pub(crate) fn weight_grad_direct(fwd: &direct::Plan, x: &[f32], dy: &[f32], d: &Dims) -> Vec<f32> {
    let (parallel, _) = gemm_parallelism(d.n);
    let wlen = d.cout * d.k_all();
    let ylen = d.cout * d.p();
    let image = |s: &mut DirectScratch, acc: &mut WeightSum, ni: usize, _: &mut [u8]| {
        let dy_n = &dy[ni * ylen..(ni + 1) * ylen];
        s.add_weight_grad(fwd, (&x[ni * d.chw()..(ni + 1) * d.chw()], dy_n), wlen, acc);
    };
    let scratch = DirectScratch::default;
    // One byte per image: the chunks only number the images.
    let mut images = vec![0u8; d.n];
    for_each_image_summed(&mut images, 1, parallel, wlen, scratch, image, |_, _| {}).total(0)
}

/// The direct forward plan of a stride-2 convolution whose backward runs on
/// [`backward_strided`], when it applies.
pub(crate) fn strided_backward_plan(d: &Dims, g: &ConvGeom) -> Option<direct::Plan> {
    (g.stride == 2)
        .then(|| direct_plan_up_to(d, g, DIRECT_MAX_K))
        .flatten()
}

/// Scratch buffers of one [`backward_strided`] worker: the phase-split inputs and flattened
/// output gradients of one image group, the group's weight gradient (the input gradient's
/// patch matrix is in the thread's scratch, [`StridedGroup::grads`]).
struct StridedScratch {
    xp: Vec<Vec<f32>>,
    dyf: Vec<Vec<f32>>,
    dw_n: Vec<f32>,
}

/// (dx, dw) of a stride-2 convolution: the weight gradient by the direct kernel on the
/// forward's phase-split input (no `im2col`), summed over image groups as the stride-1
/// kernel does; the input gradient as the GEMM path's `dcols = W^T . dY` and `col2im_into`.
pub(crate) fn backward_strided(
    plan: &direct::Plan,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d: &Dims,
    g: &ConvGeom,
) -> (Vec<f32>, Vec<f32>) {
    let (parallel, par) = gemm_parallelism(d.n);
    let (k, ylen) = (d.k_all(), d.cout * d.p());
    let wlen = w.len();
    let wt = WeightLhs::new(w, (k, d.cout), (1, k), (1, wlen), d.n);
    let group = plan.images_per_group(d.n);
    let images =
        |s: &mut StridedScratch, acc: &mut WeightSum, gi: usize, dx_g: &mut [MaybeUninit<f32>]| {
            let (first, m) = (gi * group, dx_g.len() / d.chw());
            s.xp.resize_with(m.max(s.xp.len()), Vec::new);
            s.dyf.resize_with(m.max(s.dyf.len()), Vec::new);
            for (i, (xp, dyf)) in s.xp.iter_mut().zip(&mut s.dyf).take(m).enumerate() {
                let ni = first + i;
                plan.pad(&x[ni * d.chw()..(ni + 1) * d.chw()], xp);
                plan.flatten(&dy[ni * ylen..(ni + 1) * ylen], dyf);
            }
            let dys: Vec<&[f32]> = (first..first + m)
                .map(|ni| &dy[ni * ylen..(ni + 1) * ylen])
                .collect();
            let group = StridedGroup {
                xps: &s.xp[..m],
                dyfs: &s.dyf[..m],
                dys: &dys,
            };
            group.grads((plan, &wt), (d, g), Some(dx_g), &mut s.dw_n, acc, par);
        };
    let scratch = || StridedScratch {
        xp: Vec::new(),
        dyf: Vec::new(),
        dw_n: Vec::new(),
    };
    let chunk = group * d.chw();
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        for_each_image_summed(dx, chunk, parallel, wlen, scratch, images, |_, _| {})
    };
    // SAFETY: the groups' chunks cover `dx`, and `StridedGroup::grads` writes each image's
    // whole chunk (`col2im_into`).
    let (dx, dw) = unsafe { crate::buffer::vec_written_with(d.n * d.chw(), fill) };
    (dx, dw.total(0))
}

/// One image group of a stride-2 backward: each image's phase-split input (`xps`), its
/// output gradient flattened for the direct weight gradient (`dyfs`) and as it is,
/// `(cout, p)` (`dys`). [`backward_strided`] and the fused conv + BN op's stride-2 backward
/// share what follows from these.
pub(crate) struct StridedGroup<'a> {
    pub(crate) xps: &'a [Vec<f32>],
    pub(crate) dyfs: &'a [Vec<f32>],
    pub(crate) dys: &'a [&'a [f32]],
}

impl StridedGroup<'_> {
    /// Adds the group's weight gradient (the direct kernel on the phase-split inputs) to
    /// `acc`, and with `dx_g` writes each image's input gradient: `dcols = W^T . dY` and
    /// `col2im_into` (a stride-2 input gradient is no convolution of `dY`) into the image's
    /// chunk of `dx_g`, every value written (3x3 layers with padding 1 by
    /// [`super::fold_s2`] in one pass; others zeroed just before `col2im_add`'s scatter,
    /// while the chunk is in cache: zero-filling the whole `dx` up front was 3% of a
    /// 64-channel 56x56 stride-2 backward). `dw_n` is the worker's scratch;
    /// `dcols` lives in the thread's ([`with_thread_scratch`]).
    pub(crate) fn grads(
        &self,
        (plan, wt): (&direct::Plan, &WeightLhs<'_, f32>),
        (d, g): (&Dims, &ConvGeom),
        dx_g: Option<&mut [MaybeUninit<f32>]>,
        dw_n: &mut Vec<f32>,
        acc: &mut WeightSum,
        par: gemm::Parallelism,
    ) {
        let xps: Vec<&[f32]> = self.xps.iter().map(Vec::as_slice).collect();
        let dyfs: Vec<&[f32]> = self.dyfs.iter().map(Vec::as_slice).collect();
        dw_n.resize(d.cout * d.k_all(), 0.0);
        plan.weight_grad_images(&xps, &dyfs, dw_n);
        acc.add(dw_n);
        let Some(dx_g) = dx_g else { return };
        // Every value of `dcols` is written by the product before `col2im_into` reads it, so
        // it lives in the thread's scratch memory: a zero-filled one per worker and call
        // (3.6 MB at 128 channels 28x28) was 2.7% of that layer's backward.
        with_thread_scratch(d.k_all() * d.p(), |dcols: &mut [f32]| {
            for (dy_n, dx_n) in self.dys.iter().zip(dx_g.chunks_exact_mut(d.chw())) {
                wt.gemm(0, d.p(), dcols, false, dy_n, (d.p(), 1), par);
                col2im_into(dcols, d, g, dx_n);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward's direct-kernel limits per kernel and stride: on AVX2 a stride-2 layer
    /// with 64 input channels (ResNet-18's first stride-2 3x3 layer) goes to the GEMM path,
    /// one with 32 (CIFAR ResNets') stays direct; stride 1 and AVX-512 keep theirs.
    #[test]
    fn forward_limits_per_kernel_and_stride() {
        let k = |c: usize| c * 9;
        assert!(k(32) <= direct_forward_max_k(direct::Isa::Avx2, 2));
        assert!(k(64) > direct_forward_max_k(direct::Isa::Avx2, 2));
        assert!(k(64) <= direct_forward_max_k(direct::Isa::Avx2, 1));
        assert!(k(128) > direct_forward_max_k(direct::Isa::Avx2, 1));
        for stride in [1, 2] {
            assert!(k(256) <= direct_forward_max_k(direct::Isa::Avx512, stride));
            assert!(k(512) > direct_forward_max_k(direct::Isa::Avx512, stride));
        }
    }
}

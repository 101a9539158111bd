//! The GEMM path of our CPU convolution: forward, input gradient and weight gradient as
//! GEMMs, one image at a time.
//!
//! Candle's CPU conv runs at about a quarter of GEMM speed forward, and its backward computes
//! the input gradient with a direct transposed-convolution loop (4-13x slower than the
//! forward). Here all three products are GEMMs (for f32 on AVX-512 and AVX2 CPUs our own
//! [`crate::sgemm`], else the `gemm` crate, the kernel Candle's own matmul uses) over one image's unfolded input `cols` (K x P; rows `[c, ky, kx]`, columns
//! `[oy, ox]`; K = C/groups * kh * kw per group, P = Hout * Wout), per group g:
//!
//! - forward:         `Y_n[g] = W[g] . cols_n[g]`                 (og x K) . (K x P)
//! - weight gradient: `dW[g] += dY_n[g] . cols_n[g]^T`            (og x P) . (P x K)
//! - input gradient:  `dcols_n[g] = W[g]^T . dY_n[g]`, then col2im (K x og) . (og x P)
//!
//! Images run in parallel (one rayon task each, single-threaded GEMMs), so `cols` is one
//! image's worth (it stays in L2 for CIFAR shapes) and no full-batch im2col is ever built.
//! With fewer images than threads (batch-1 inference) the GEMMs themselves run in parallel.
//! 1x1 stride-1 unpadded convolutions use the input as `cols` directly. Groups are the
//! row blocks of the same `cols` (its rows are channel-major), so a grouped convolution is
//! one pass. The weight gradient sums each image's product in f64: the reduction over the
//! batch is the long one, and f32 partial sums drift from PyTorch's in training.
//! See `../shared/notes/cpu-training-kernels.md`.

use std::mem::MaybeUninit;

use candle_core::{Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::direct;
use super::epilogue::Epilogue;
use super::geom::{ConvGeom, Dims};
use super::pack::{col2im_into, im2col};
use super::weight_sum::{WeightSum, WeightSums};
use crate::matmul::{as_f32, as_f32_mut, as_f32_uninit, gemm_into, gemm_uninit, threads_of};

/// A convolution's weights as the left operand of its per-image GEMMs: one `m x k` matrix
/// per group, `group_stride` apart, read through `strides`. Where [`crate::sgemm`] runs and
/// more than one image uses them they are packed once here rather than once per image (for
/// a 256-channel 3x3 layer the packing cost as much as a third of each image's GEMM).
///
/// For a single image (batch-1 inference) they are not: the GEMM then packs each block of
/// rows on the thread that multiplies it, into its cache, where packing the whole matrix
/// first wrote it out to memory and read it back (as large as the layer's weights, 9.4 MB
/// for a 512-channel 3x3 layer, against 49 output pixels of work per weight).
pub(crate) struct WeightLhs<'a, T> {
    w: &'a [T],
    m: usize,
    k: usize,
    strides: (usize, usize),
    group_stride: usize,
    packed: Vec<crate::sgemm::PackedA>,
}

impl<'a, T: WithDType> WeightLhs<'a, T> {
    /// The weights of GEMMs over `images` images.
    pub(crate) fn new(
        w: &'a [T],
        (m, k): (usize, usize),
        (rs, cs): (usize, usize),
        (groups, group_stride): (usize, usize),
        images: usize,
    ) -> WeightLhs<'a, T> {
        let packed = match as_f32(w) {
            Some(wf) if crate::sgemm::available() && images > 1 => (0..groups)
                .map(|gi| {
                    let a = crate::sgemm::Operand {
                        data: &wf[gi * group_stride..],
                        rs,
                        cs,
                    };
                    crate::sgemm::PackedA::new(a, m, k)
                })
                .collect(),
            _ => Vec::new(),
        };
        WeightLhs {
            w,
            m,
            k,
            strides: (rs, cs),
            group_stride,
            packed,
        }
    }

    /// `dst (m x n) = [dst +] W[gi] . b`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        gi: usize,
        n: usize,
        dst: &mut [T],
        accumulate: bool,
        b: &[T],
        (b_rs, b_cs): (usize, usize),
        par: Parallelism,
    ) {
        if let Some(p) = self.packed.get(gi) {
            if let (Some(dst), Some(b)) = (as_f32_mut(dst), as_f32(b)) {
                let b = crate::sgemm::Operand {
                    data: b,
                    rs: b_rs,
                    cs: b_cs,
                };
                crate::sgemm::sgemm_packed(p, n, dst, accumulate, b, threads_of(par));
                return;
            }
        }
        gemm_into(
            (self.m, n, self.k),
            dst,
            accumulate,
            &self.w[gi * self.group_stride..],
            self.strides,
            b,
            (b_rs, b_cs),
            par,
        );
    }

    /// `dst (m x n) = W[gi] . b` into uninitialised memory ([`gemm_uninit`]), returned
    /// initialised, with whether `finish` was applied (where our `sgemm` runs, in its last
    /// stores); elsewhere the caller applies the epilogue after.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_uninit<'d>(
        &self,
        gi: usize,
        n: usize,
        dst: &'d mut [MaybeUninit<T>],
        b: &[T],
        (b_rs, b_cs): (usize, usize),
        par: Parallelism,
        finish: Option<crate::sgemm::Finish<'_>>,
    ) -> (&'d mut [T], bool) {
        // No depth (no input channels): the product is zeros, which the caller finishes.
        let finish = finish.filter(|_| self.k > 0);
        if let Some(p) = self.packed.get(gi) {
            if let (Some(dstf), Some(bf)) = (as_f32_uninit(dst), as_f32(b)) {
                let b = crate::sgemm::Operand {
                    data: bf,
                    rs: b_rs,
                    cs: b_cs,
                };
                let len = self.m * n;
                let threads = threads_of(par);
                crate::sgemm::sgemm_packed_uninit(p, n, &mut dstf[..len], b, finish, threads);
                // SAFETY: the GEMM wrote the first `m * n` values.
                let out = unsafe { crate::buffer::assume_written(&mut dst[..len]) };
                return (out, finish.is_some());
            }
        }
        gemm_uninit(
            (self.m, n, self.k),
            dst,
            &self.w[gi * self.group_stride..],
            self.strides,
            b,
            (b_rs, b_cs),
            finish,
            par,
        )
    }
}

/// How to split the work: images in parallel, or (with fewer images than threads) the
/// GEMMs.
pub(crate) fn gemm_parallelism(n: usize) -> (bool, Parallelism) {
    let threads = rayon::current_num_threads();
    if n >= threads || threads == 1 {
        (true, Parallelism::None)
    } else {
        (false, Parallelism::Rayon(threads))
    }
}

/// Shares per thread that [`for_each_image`] and [`for_each_image_summed`] let rayon split
/// their images into (the latter only where each share's weight-gradient sum is at most
/// [`SMALL_SUM`] values). On a shared host one core is often slowed by a neighbour (on the
/// 2-core Zen 3 host, one core's in-L1 GEMM kernel ran at 97 GFLOP/s and the other's at
/// 67-69 in the same minute); with one share per thread the fast thread then waited for the
/// slow one. The shares bound how far rayon may split, not how far it does: its adaptive
/// splitter makes about two tasks per thread and splits further only where a thread has
/// run dry and steals. Process against process alternated
/// (`step-profile resnet20 128 8 native 28 1`, the default `train` step): backward
/// 208-280 ms (mean 254) against 258-299 (mean 271), faster in 6 of 8 pairs; ResNet-50
/// inference at batch 8 (`infer-profile resnet50 8 3 unfolded`, the per-image GEMM path's
/// [`for_each_image`]) 584-795 ms against 736-798, 3 of 3.
const SHARES_PER_THREAD: usize = 4;

/// The largest weight-gradient sum (values) for which [`for_each_image_summed`] splits into
/// [`SHARES_PER_THREAD`] shares a thread: every task that runs fills and adds up a sum of
/// its own (f64), which at the widest layers (ResNet-50's 512-channel 3x3: 2.4 M values, 19
/// MB) would cost more than a balanced split saves. 64-channel 3x3 layers have 36 864.
const SMALL_SUM: usize = 1 << 16;

/// The shares of [`for_each_image_summed`] on `threads` threads with weight-gradient sums
/// of `acc_len` values: [`SHARES_PER_THREAD`] a thread up to [`SMALL_SUM`], else one.
fn summed_shares(threads: usize, acc_len: usize) -> usize {
    threads
        * if acc_len <= SMALL_SUM {
            SHARES_PER_THREAD
        } else {
            1
        }
}

/// The `with_min_len` of a parallel loop over `len / chunk` chunks in `shares` shares: one
/// share (of a power-of-two count at least `shares`, as rayon splits in halves), rounded
/// down. Each task makes its own scratch (and, in the backward, a weight-gradient
/// accumulator as large as the weights), so letting rayon split down to single images cost
/// a fresh, zero-filled set of buffers per image.
///
/// Rounded down, not up: rayon halves a range only while `len / 2 >= min_len`, so with the
/// share rounded up an odd number of chunks was never split. 43 groups of three 16x16
/// images on two threads (min 22, and 43 / 2 = 21) ran on one thread, which cost every
/// 32-channel CIFAR layer half its backward.
fn per_worker(len: usize, chunk: usize, shares: usize) -> usize {
    let chunks = len.div_ceil(chunk.max(1));
    (chunks / shares.max(1).next_power_of_two()).max(1)
}

/// Runs `f(scratch, image index, chunk)` over `out`'s per-image chunks, in parallel or not;
/// each worker reuses one scratch value made by `init`.
pub(crate) fn for_each_image<T: Send, S>(
    out: &mut [T],
    chunk: usize,
    parallel: bool,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        let shares = rayon::current_num_threads() * SHARES_PER_THREAD;
        let min_len = per_worker(out.len(), chunk, shares);
        out.par_chunks_mut(chunk)
            .enumerate()
            .with_min_len(min_len)
            .for_each_init(&init, |s, (i, c)| f(s, i, c));
    } else {
        let mut s = init();
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(&mut s, i, c));
    }
}

/// Runs `image(scratch, sum, image index, chunk)` over `out`'s per-image chunks, in parallel
/// or not, each worker adding into its own f64 [`WeightSum`] of `acc_len`, and
/// `finish(scratch, sum)` once at each worker's end (for what its scratch still holds);
/// returns their sum (the backward's weight gradient, summed over the batch in f64).
pub(crate) fn for_each_image_summed<T: Send, S: Send>(
    out: &mut [T],
    chunk: usize,
    parallel: bool,
    acc_len: usize,
    init: impl Fn() -> S + Sync + Send,
    image: impl Fn(&mut S, &mut WeightSum, usize, &mut [T]) + Sync + Send,
    finish: impl Fn(&mut S, &mut WeightSum) + Sync + Send,
) -> WeightSums {
    let worker = || (init(), WeightSum::new(acc_len));
    let sums = if parallel {
        let shares = summed_shares(rayon::current_num_threads(), acc_len);
        let min_len = per_worker(out.len(), chunk, shares);
        out.par_chunks_mut(chunk)
            .enumerate()
            .with_min_len(min_len)
            .fold(worker, |(mut s, mut acc), (i, c)| {
                image(&mut s, &mut acc, i, c);
                (s, acc)
            })
            .map(|(mut s, mut acc)| {
                finish(&mut s, &mut acc);
                acc
            })
            .collect::<Vec<_>>()
    } else {
        let (mut s, mut acc) = worker();
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            image(&mut s, &mut acc, i, c);
        }
        finish(&mut s, &mut acc);
        vec![acc]
    };
    WeightSums(sums)
}

/// Runs `f` on `len` values of this thread's reusable scratch memory, holding whatever an
/// earlier call left there (`f` must write what it reads). Saves zero-filling (and page
/// faults on) a fresh `cols` buffer for every convolution: at batch 1 that was a pass as
/// large as `im2col`'s own. A nested call on the same thread (rayon can run another task
/// while this one waits) gets a fresh buffer.
pub(crate) fn with_thread_scratch<T: WithDType, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    with_thread_scratch_in(ScratchMemory::Work, len, f)
}

/// The separate scratch memories of [`with_thread_scratch_in`], for buffers alive while
/// another scratch user runs on the same thread.
#[derive(Clone, Copy)]
pub(crate) enum ScratchMemory {
    /// Work buffers: `cols`, Winograd's transformed inputs and products.
    Work,
    /// A Winograd forward's transformed weights, held while its work buffers are in use.
    Weights,
    /// A stride-2 `im2col`'s polyphase planes ([`super::pack::im2col_channel`]), held while
    /// its `cols` (in `Work`) are filled.
    Phases,
}

/// [`with_thread_scratch`] in the scratch memory `which`.
pub(crate) fn with_thread_scratch_in<T: WithDType, R>(
    which: ScratchMemory,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    use std::cell::RefCell;
    thread_local! {
        static BUF: [RefCell<Vec<u64>>; 3] = const {
            [RefCell::new(Vec::new()), RefCell::new(Vec::new()), RefCell::new(Vec::new())]
        };
    }
    // 8-byte words: aligned for every dtype Candle has, all of which are plain bits.
    let words = (len * std::mem::size_of::<T>()).div_ceil(8);
    BUF.with(|bufs| match bufs[which as usize].try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < words {
                buf.resize(words, 0);
            }
            // SAFETY: the buffer holds at least `len * size_of::<T>()` initialised bytes,
            // 8-byte aligned; `T` is a Candle dtype (f16/bf16/f32/f64/u8/u32/i64), for
            // which every bit pattern is a value; the borrow is exclusive for `f`'s call.
            let s = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), len) };
            f(s)
        }
        Err(_) => f(&mut vec![T::zero(); len]),
    })
}

/// `y_n = W . cols(x_n)` for one image, per group.
pub(crate) fn forward_image<T: WithDType>(
    img: &[T],
    w: &WeightLhs<'_, T>,
    d: &Dims,
    g: &ConvGeom,
    y_n: &mut [MaybeUninit<T>],
    par: Parallelism,
    ep: Epilogue<'_, T>,
) {
    if d.direct(g) {
        forward_cols(img, w, d, g, y_n, par, ep);
    } else {
        with_thread_scratch(d.k_all() * d.p(), |cols: &mut [T]| {
            im2col(img, d, g, cols, !matches!(par, Parallelism::None));
            forward_cols(cols, w, d, g, y_n, par, ep);
        });
    }
}

/// The weights of [`forward_image`]: per group `og x kg`, row-major.
pub(crate) fn forward_weights<'a, T: WithDType>(
    w: &'a [T],
    d: &Dims,
    g: &ConvGeom,
) -> WeightLhs<'a, T> {
    let (kg, og) = (d.k_all() / g.groups, d.cout / g.groups);
    WeightLhs::new(w, (og, kg), (kg, 1), (g.groups, og * kg), d.n)
}

/// `y_n = ep(W . cols)` per group (`ep` the image's epilogue), every value of `y_n`
/// written (none read).
pub(crate) fn forward_cols<T: WithDType>(
    cols: &[T],
    w: &WeightLhs<'_, T>,
    d: &Dims,
    g: &ConvGeom,
    y_n: &mut [MaybeUninit<T>],
    par: Parallelism,
    ep: Epilogue<'_, T>,
) {
    let (p, kg, og) = (d.p(), d.k_all() / g.groups, d.cout / g.groups);
    for gi in 0..g.groups {
        let (out, finished) = w.gemm_uninit(
            gi,
            p,
            &mut y_n[gi * og * p..(gi + 1) * og * p],
            &cols[gi * kg * p..],
            (p, 1),
            par,
            finish_of(&ep, gi * og, p),
        );
        // The epilogue, while the output is in cache, where the GEMM did not apply it.
        if !finished {
            ep.apply_planes(gi * og, out, p);
        }
    }
}

/// `ep` from output channel `co` on (planes of `p` values) as our `sgemm`'s finish: f32
/// only, and none for the identity.
fn finish_of<'a, T: WithDType>(
    ep: &Epilogue<'a, T>,
    co: usize,
    p: usize,
) -> Option<crate::sgemm::Finish<'a>> {
    if ep.is_identity() || T::DTYPE != candle_core::DType::F32 {
        return None;
    }
    let f32s = |v: &'a [T]| as_f32(v).expect("f32 (checked above)");
    Some(crate::sgemm::Finish {
        scale: ep.scale.map(|v| f32s(&v[co..])),
        bias: ep.bias.map(|v| f32s(&v[co..])),
        residual: ep.residual.map(|v| f32s(&v[co * p..])),
        relu: ep.relu,
    })
}

pub(crate) fn forward<T: WithDType>(
    x: &[T],
    w: &[T],
    ep: Epilogue<'_, T>,
    d: &Dims,
    g: &ConvGeom,
) -> Vec<T> {
    let (parallel, par) = gemm_parallelism(d.n);
    let p = d.p();
    let w = forward_weights(w, d, g);
    let len = d.n * d.cout * p;
    // The GEMMs write each image's output without reading it, so it is never zero-filled
    // (neither `vec![0; len]`, whose `calloc` clears reused heap memory on the calling
    // thread while the others wait, nor per image: 3-5% of a ResNet-50 batch-1 inference).
    let mut y: Vec<T> = Vec::with_capacity(len);
    for_each_image(
        &mut y.spare_capacity_mut()[..len],
        d.cout * p,
        parallel,
        || (),
        |_, ni, y_n| {
            let img = &x[ni * d.chw()..(ni + 1) * d.chw()];
            // The epilogue applied as the output is written, or right after, in cache.
            forward_image(img, &w, d, g, y_n, par, ep.image(ni, d.cout * p));
        },
    );
    // SAFETY: the images' chunks cover the first `len` values, each written by
    // `forward_image` (its groups' GEMMs cover it).
    unsafe { y.set_len(len) };
    y
}

/// How the input gradient of a convolution is computed.
pub(crate) enum InputGrad<T> {
    /// 1x1 stride 1 unpadded: `dx = W^T . dY`, no unfolding.
    Direct,
    /// Stride 1 (square kernel, padding at most the dilated kernel's reach): a forward
    /// convolution of `dY` with the flipped, transposed kernel, so the GEMM's inner dimension
    /// is `C_out * kh * kw` rather than `C_out`, and there is no scatter.
    Flipped {
        /// The flipped kernel, (C_in, C_out/groups, kh, kw).
        w: Vec<T>,
        /// The geometry of that convolution, over dY's dims.
        dims: Dims,
        geom: ConvGeom,
    },
    /// `Flipped` in f32, ungrouped, where the direct kernels run that forward: its plan and
    /// packed weights ([`direct::Plan::pack_flipped_weights`], no flipped copy). For the
    /// 256-channel 3x3 layers `im2col` of `dY` and its packing, 1.8 MB each per image at
    /// 14x14, were a tenth of the backward.
    DirectFlipped { plan: direct::Plan, wk: Vec<f32> },
    /// Otherwise `dcols = W^T . dY`, then col2im.
    Scatter,
}

impl<T: WithDType> InputGrad<T> {
    fn new(w: &[T], d: &Dims, g: &ConvGeom) -> InputGrad<T> {
        if d.direct(g) {
            return InputGrad::Direct;
        }
        let reach = g.dilation * (d.kh - 1);
        if g.stride != 1 || d.kh != d.kw || g.padding > reach {
            return InputGrad::Scatter;
        }
        let dims = Dims {
            n: d.n,
            c: d.cout,
            h: d.oh,
            w: d.ow,
            cout: d.c,
            kh: d.kh,
            kw: d.kw,
            oh: d.h,
            ow: d.w,
        };
        let geom = ConvGeom {
            padding: reach - g.padding,
            ..*g
        };
        if let (1, Some(wf)) = (g.groups, as_f32(w)) {
            if let Some(plan) = super::path::direct_plan(&dims, &geom) {
                let wk = plan.pack_flipped_weights(wf);
                return InputGrad::DirectFlipped { plan, wk };
            }
        }
        InputGrad::Flipped {
            w: flip_kernel(w, d, g),
            dims,
            geom,
        }
    }
}

/// The kernel `(C_out, C_in/groups, kh, kw)` flipped in both spatial dims and transposed
/// per group to `(C_in, C_out/groups, kh, kw)`: the kernel of the stride-1 input gradient.
pub(crate) fn flip_kernel<T: WithDType>(w: &[T], d: &Dims, g: &ConvGeom) -> Vec<T> {
    let (cg, og, kk) = (d.c / g.groups, d.cout / g.groups, d.kh * d.kw);
    let mut wf = vec![T::zero(); d.c * og * kk];
    // Output row `r = gi * cg + ci` in order (its `og` kernels side by side); large kernels
    // on all threads (a 256-channel 3x3 one, serial, was 2% of its backward).
    let row = |(r, dst): (usize, &mut [T])| {
        let (gi, ci) = (r / cg, r % cg);
        for (o, k) in dst.chunks_exact_mut(kk).enumerate() {
            let src = &w[((gi * og + o) * cg + ci) * kk..][..kk];
            for (v, s) in k.iter_mut().zip(src.iter().rev()) {
                *v = *s;
            }
        }
    };
    if wf.len() >= crate::sgemm::PARALLEL_PACK && rayon::current_num_threads() > 1 {
        wf.par_chunks_mut(og * kk).enumerate().for_each(row);
    } else {
        wf.chunks_mut(og * kk).enumerate().for_each(row);
    }
    wf
}

/// Scratch buffers of one backward worker (the unfolded input and the patch gradients are
/// in the thread's scratch, [`with_thread_scratch`]).
pub(crate) struct Scratch<T> {
    /// The weight gradient of the last `pending` images, summed by the GEMM in `T`.
    dw_n: Vec<T>,
    pending: usize,
    /// The direct input gradient's padded `dY` and flattened output (f32 only).
    dyp: Vec<f32>,
    flat: Vec<f32>,
}

/// Images whose weight gradients a worker sums in the GEMM (in the working precision)
/// before adding them to its f64 total: the f64 pass over the weights then runs once per
/// this many images (for a 256-channel 3x3 layer it took a seventh of the backward when it
/// ran per image), while the long reduction over the batch stays in f64.
const DW_IMAGES_PER_FLUSH: usize = 4;

/// Adds a worker's pending weight gradient to its f64 total.
fn flush_dw<T: WithDType>(s: &mut Scratch<T>, acc: &mut WeightSum) {
    if s.pending > 0 {
        acc.add(&s.dw_n);
        s.pending = 0;
    }
}

/// (dx, dw) for the upstream gradient `dy`.
pub(crate) fn backward<T: WithDType>(
    x: &[T],
    w: &[T],
    dy: &[T],
    d: &Dims,
    g: &ConvGeom,
) -> (Vec<T>, Vec<T>) {
    let (p, kg, og) = (d.p(), d.k_all() / g.groups, d.cout / g.groups);
    let (parallel, par) = gemm_parallelism(d.n);
    let wlen = d.cout * kg;
    let input_grad = InputGrad::new(w, d, g);
    // The GEMMs' weights of the input gradient: the flipped kernel's, or W^T per group
    // (kg x og); none on the direct kernels.
    let dx_weights = match &input_grad {
        InputGrad::DirectFlipped { .. } => None,
        InputGrad::Flipped { w, dims, geom } => Some(forward_weights(w, dims, geom)),
        InputGrad::Direct | InputGrad::Scatter => Some(WeightLhs::new(
            w,
            (kg, og),
            (1, kg),
            (g.groups, og * kg),
            d.n,
        )),
    };
    // `dx` is not zero-filled up front: each image's chunk is written whole by its input
    // gradient below (`col2im_into` zeroes it, in cache, only where it scatters). The
    // up-front fill was a pass over all of `dx` in memory.
    let image =
        |s: &mut Scratch<T>, acc: &mut WeightSum, ni: usize, dx_n: &mut [MaybeUninit<T>]| {
            let img = &x[ni * d.chw()..(ni + 1) * d.chw()];
            let dy_n = &dy[ni * d.cout * p..(ni + 1) * d.cout * p];
            s.dw_n.resize(wlen, T::zero());
            let add = s.pending > 0;
            let weight_grad = |dw_n: &mut [T], cols: &[T]| {
                for gi in 0..g.groups {
                    gemm_into(
                        (og, kg, p),
                        &mut dw_n[gi * og * kg..(gi + 1) * og * kg],
                        add,
                        &dy_n[gi * og * p..],
                        (p, 1),
                        &cols[gi * kg * p..],
                        (1, p),
                        par,
                    );
                }
            };
            if d.direct(g) {
                weight_grad(&mut s.dw_n, img);
            } else {
                // The unfolded input in this thread's scratch memory, as in the forward: a
                // worker's own buffer was zero-filled for every backward (1.8 MB per image for
                // a 256-channel 3x3 layer at 14x14) before `im2col` overwrote it.
                with_thread_scratch(d.k_all() * p, |cols: &mut [T]| {
                    im2col(img, d, g, cols, !matches!(par, Parallelism::None));
                    weight_grad(&mut s.dw_n, cols);
                });
            }
            s.pending += 1;
            if s.pending == DW_IMAGES_PER_FLUSH {
                flush_dw(s, acc);
            }
            match (&input_grad, &dx_weights) {
                (InputGrad::DirectFlipped { plan, wk }, _) => {
                    // `T` is f32 here (the variant is only made from f32 weights).
                    let (Some(dyf), Some(dxf)) = (as_f32(dy_n), as_f32_uninit(dx_n)) else {
                        unreachable!("conv backward: direct input gradient on f32 only")
                    };
                    plan.pad(dyf, &mut s.dyp);
                    if plan.writes_plain() {
                        plan.forward_plain(&s.dyp, wk, dxf, !parallel);
                    } else {
                        plan.forward(&s.dyp, wk, &mut s.flat, !parallel);
                        plan.unflatten(&s.flat, dxf, Epilogue::NONE);
                    }
                }
                (InputGrad::Flipped { dims, geom, .. }, Some(dxw)) => {
                    forward_image(dy_n, dxw, dims, geom, dx_n, par, Epilogue::NONE);
                }
                (InputGrad::Direct, Some(dxw)) => {
                    // A 1x1 unpadded kernel: `dx = W^T . dY` per group, written whole.
                    for gi in 0..g.groups {
                        dxw.gemm_uninit(
                            gi,
                            p,
                            &mut dx_n[gi * kg * p..(gi + 1) * kg * p],
                            &dy_n[gi * og * p..],
                            (p, 1),
                            par,
                            None,
                        );
                    }
                }
                (InputGrad::Scatter, Some(dxw)) => {
                    // The patch gradients in this thread's scratch memory (the unfolded input's
                    // above is released by now): the groups' products write every value before
                    // `col2im_into` reads them.
                    with_thread_scratch(d.k_all() * p, |dcols: &mut [T]| {
                        for gi in 0..g.groups {
                            dxw.gemm(
                                gi,
                                p,
                                &mut dcols[gi * kg * p..(gi + 1) * kg * p],
                                false,
                                &dy_n[gi * og * p..],
                                (p, 1),
                                par,
                            );
                        }
                        col2im_into(dcols, d, g, dx_n);
                    });
                }
                (_, None) => unreachable!("conv backward: input-gradient weights made above"),
            }
        };
    let scratch = || Scratch {
        dw_n: Vec::new(),
        pending: 0,
        dyp: Vec::new(),
        flat: Vec::new(),
    };
    let fill = |dx: &mut [MaybeUninit<T>]| {
        for_each_image_summed(dx, d.chw(), parallel, wlen, scratch, image, flush_dw)
    };
    // SAFETY: the images' chunks cover `dx` and every branch above writes its image's
    // chunk whole.
    let (dx, dw) = unsafe { crate::buffer::vec_written_with(d.n * d.chw(), fill) };
    (dx, dw.total(0))
}

/// (dx, dw) as tensors, by `backward` run on the CPU slices of (x, w, dy).
pub(crate) fn backward_tensors<T: WithDType>(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    backward: impl FnOnce(&[T], &[T], &[T]) -> (Vec<T>, Vec<T>),
) -> candle_core::Result<(Tensor, Tensor)> {
    use crate::buffer::with_cpu_slice as with;
    let (dx, dw) = with(x, "conv2d", |x: &[T]| {
        with(w, "conv2d", |w: &[T]| {
            with(dy, "conv2d", |dy: &[T]| backward(x, w, dy))
        })
    })???;
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), dev)?,
        Tensor::from_vec(dw, w.shape(), dev)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tasks rayon makes of `len` items with `min_len`: it halves a range while
    /// `len / 2 >= min_len`.
    fn tasks(len: usize, min_len: usize) -> usize {
        if len / 2 >= min_len {
            tasks(len / 2, min_len) + tasks(len - len / 2, min_len)
        } else {
            1
        }
    }

    #[test]
    fn every_count_of_chunks_splits_into_a_task_per_share() {
        for shares in 1..=32 {
            for chunks in 1..300 {
                let n = tasks(chunks, per_worker(chunks * 5, 5, shares));
                assert!(
                    n >= shares.min(chunks) && n <= 2 * shares.next_power_of_two(),
                    "{chunks} chunks in {shares} shares: {n} tasks"
                );
            }
        }
    }

    /// Small weight-gradient sums split finer than one share a thread; the widest layers'
    /// (each task fills and adds a sum of its own) do not.
    #[test]
    fn only_small_weight_sums_split_finer() {
        // A 64-channel 3x3 layer's sum, and a 512-channel one's (ResNet-50).
        assert_eq!(summed_shares(2, 64 * 64 * 9), 2 * SHARES_PER_THREAD);
        assert_eq!(summed_shares(2, 512 * 512 * 9), 2);
        assert_eq!(summed_shares(3, SMALL_SUM), 3 * SHARES_PER_THREAD);
        assert_eq!(summed_shares(3, SMALL_SUM + 1), 3);
    }

    /// A stride-1 layer too wide for the direct backward (72 * 9 > `DIRECT_MAX_K`) runs its
    /// input gradient on the direct forward kernels in f32: against the f64 GEMM path, at
    /// batch 1 (parallel channel blocks) and 3 (parallel images).
    #[test]
    fn direct_input_gradient_in_the_gemm_backward_matches_f64() {
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
                .collect()
        };
        let to64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        let g = ConvGeom {
            padding: 1,
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        for n in [1, 3] {
            let (c, h, w, cout) = (72, 6, 5, 40);
            let d = Dims::new(&g, &[n, c, h, w], &[cout, c, 3, 3]).expect("valid shape");
            assert!(super::super::path::direct_backward_plans(&d, &g).is_none());
            let k = values(cout * c * 9, 2);
            let direct = matches!(InputGrad::new(&k, &d, &g), InputGrad::DirectFlipped { .. });
            assert_eq!(direct, crate::conv::direct::Isa::detect().is_some());
            let (x, dy) = (values(n * c * h * w, 1), values(n * cout * h * w, 3));
            let (dx, dw) = backward(&x, &k, &dy, &d, &g);
            let (dx64, dw64) = backward(&to64(&x), &to64(&k), &to64(&dy), &d, &g);
            for (what, got, want) in [("dx", &dx, &dx64), ("dw", &dw, &dw64)] {
                let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
                for (a, b) in got.iter().zip(want.iter()) {
                    let e = (f64::from(*a) - b).abs() / scale;
                    assert!(e < 1e-5, "batch {n}: {what} off by {e}");
                }
            }
        }
    }

    #[test]
    fn an_odd_number_of_image_groups_runs_on_both_threads() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a two-thread pool");
        // 43 groups of 3 images, as a 32-channel 16x16 backward at batch 128 makes them.
        let mut out = vec![0u8; 43 * 3];
        let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
        pool.install(|| {
            for_each_image_summed(
                &mut out,
                3,
                true,
                1,
                || (),
                |_, _, _, _| {
                    seen.lock()
                        .expect("not poisoned")
                        .insert(rayon::current_thread_index());
                    std::thread::sleep(std::time::Duration::from_millis(2));
                },
                |_, _| {},
            )
        });
        assert_eq!(seen.into_inner().expect("not poisoned").len(), 2);
    }
}

//! Our CPU convolution: forward, input gradient and weight gradient as GEMMs, one image at a
//! time.
//!
//! Candle's CPU conv runs at about a quarter of GEMM speed forward, and its backward computes
//! the input gradient with a direct transposed-convolution loop (4-13x slower than the
//! forward). Here all three products are GEMMs (the `gemm` crate, the kernel Candle's own
//! matmul uses) over one image's unfolded input `cols` (K x P; rows `[c, ky, kx]`, columns
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

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

use super::direct;

/// Geometry of one convolution (same padding/stride/dilation in both dims).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeom {
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
}

/// Sizes of one convolution call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) cout: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

impl Dims {
    pub(crate) fn new(g: &ConvGeom, x: &[usize], k: &[usize]) -> candle_core::Result<Dims> {
        if x.len() != 4 || k.len() != 4 || k[1] * g.groups != x[1] {
            candle_core::bail!(
                "conv2d: input {x:?} does not fit kernel {k:?}, groups {}",
                g.groups
            )
        }
        let out = |size: usize, k: usize| -> candle_core::Result<usize> {
            let eff = g.dilation * (k - 1) + 1;
            match (size + 2 * g.padding).checked_sub(eff) {
                Some(v) => Ok(v / g.stride + 1),
                None => candle_core::bail!("conv2d: kernel larger than the padded input"),
            }
        };
        Ok(Dims {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            cout: k[0],
            kh: k[2],
            kw: k[3],
            oh: out(x[2], k[2])?,
            ow: out(x[3], k[3])?,
        })
    }
    /// Output pixels per image.
    pub(crate) fn p(&self) -> usize {
        self.oh * self.ow
    }
    /// Rows of `cols` (all groups).
    pub(crate) fn k_all(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub(crate) fn chw(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Whether `cols` is the input itself (1x1, stride 1, no padding).
    pub(crate) fn direct(&self, g: &ConvGeom) -> bool {
        self.kh == 1 && self.kw == 1 && g.stride == 1 && g.padding == 0
    }
}

/// `dst (m x n, row-major) = [dst +] a (m x k) . b (k x n)`, `a` and `b` given by row and
/// column strides into their slices.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() >= m * n, "gemm: destination too small");
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    assert!(a.len() > last(m, k, a_rs, a_cs), "gemm: lhs out of bounds");
    assert!(b.len() > last(k, n, b_rs, b_cs), "gemm: rhs out of bounds");
    // SAFETY: every index the GEMM touches is in bounds (checked above), `dst` does not alias
    // `a` or `b` (a `&mut` and two `&`), and T is f32 or f64 (the callers' dtype match).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// Output columns `ox` whose input column `ox * s + off` lies in `0..w`.
fn valid_range(ow: usize, w: usize, s: usize, off: isize) -> (usize, usize) {
    let lo = if off >= 0 {
        0
    } else {
        ((-off) as usize).div_ceil(s)
    };
    let hi = if (w as isize) <= off {
        0
    } else {
        ((w as isize - off) as usize).div_ceil(s).min(ow)
    };
    (lo.min(hi), hi)
}

/// One image's `cols` (rows `[c, ky, kx]`, columns `[oy, ox]`); the channels in parallel
/// when `parallel` (a single image: nothing else runs in parallel then).
fn im2col<T: WithDType>(img: &[T], d: &Dims, g: &ConvGeom, cols: &mut [T], parallel: bool) {
    let rows = d.kh * d.kw * d.p();
    let plane = d.h * d.w;
    let cols = &mut cols[..d.c * rows];
    if parallel {
        cols.par_chunks_mut(rows)
            .zip(img.par_chunks(plane))
            .for_each(|(r, p)| im2col_channel(p, d, g, r));
    } else {
        cols.chunks_mut(rows)
            .zip(img.chunks(plane))
            .for_each(|(r, p)| im2col_channel(p, d, g, r));
    }
}

/// The `kh * kw` rows of `cols` that one input channel's `plane` gives.
fn im2col_channel<T: WithDType>(plane: &[T], d: &Dims, g: &ConvGeom, rows: &mut [T]) {
    let (p, s) = (d.p(), g.stride);
    let mut r = 0;
    for ky in 0..d.kh {
        for kx in 0..d.kw {
            let row = &mut rows[r * p..(r + 1) * p];
            r += 1;
            let off_x = (kx * g.dilation) as isize - g.padding as isize;
            let (lo, hi) = valid_range(d.ow, d.w, s, off_x);
            for oy in 0..d.oh {
                let out = &mut row[oy * d.ow..(oy + 1) * d.ow];
                let iy = (oy * s + ky * g.dilation) as isize - g.padding as isize;
                if iy < 0 || iy >= d.h as isize || lo >= hi {
                    out.fill(T::zero());
                    continue;
                }
                let src = &plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                out[..lo].fill(T::zero());
                out[hi..].fill(T::zero());
                let start = (lo as isize * s as isize + off_x) as usize;
                if s == 1 {
                    out[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                } else {
                    for (o, v) in out[lo..hi].iter_mut().zip(src[start..].iter().step_by(s)) {
                        *o = *v;
                    }
                }
            }
        }
    }
}

/// Scatter-adds one image's patch gradients `dcols` back into `dx` (zeroed first).
fn col2im<T: WithDType>(dcols: &[T], d: &Dims, g: &ConvGeom, dx: &mut [T]) {
    let (p, s) = (d.p(), g.stride);
    dx.fill(T::zero());
    let mut r = 0;
    for ci in 0..d.c {
        let plane = &mut dx[ci * d.h * d.w..(ci + 1) * d.h * d.w];
        for ky in 0..d.kh {
            for kx in 0..d.kw {
                let row = &dcols[r * p..(r + 1) * p];
                r += 1;
                let off_x = (kx * g.dilation) as isize - g.padding as isize;
                let (lo, hi) = valid_range(d.ow, d.w, s, off_x);
                if lo >= hi {
                    continue;
                }
                for oy in 0..d.oh {
                    let iy = (oy * s + ky * g.dilation) as isize - g.padding as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * d.w..(iy as usize + 1) * d.w];
                    let src = &row[oy * d.ow + lo..oy * d.ow + hi];
                    let start = (lo as isize * s as isize + off_x) as usize;
                    if s == 1 {
                        for (o, v) in dst[start..start + hi - lo].iter_mut().zip(src) {
                            *o += *v;
                        }
                    } else {
                        for (o, v) in dst[start..].iter_mut().step_by(s).zip(src) {
                            *o += *v;
                        }
                    }
                }
            }
        }
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

/// Runs `f(scratch, image index, chunk)` over `out`'s per-image chunks, in parallel or not;
/// each worker reuses one scratch value made by `init`.
fn for_each_image<T: Send, S>(
    out: &mut [T],
    chunk: usize,
    parallel: bool,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each_init(&init, |s, (i, c)| f(s, i, c));
    } else {
        let mut s = init();
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(&mut s, i, c));
    }
}

/// Runs `image(scratch, acc, image index, chunk)` over `out`'s per-image chunks, in parallel
/// or not, each worker adding into its own f64 accumulator of `acc_len`; returns their sum
/// (the backward's weight gradient, summed over the batch in f64).
pub(crate) fn for_each_image_summed<T: Send, S: Send>(
    out: &mut [T],
    chunk: usize,
    parallel: bool,
    acc_len: usize,
    init: impl Fn() -> S + Sync + Send,
    image: impl Fn(&mut S, &mut [f64], usize, &mut [T]) + Sync + Send,
) -> Vec<f64> {
    let worker = || (init(), vec![0f64; acc_len]);
    if parallel {
        out.par_chunks_mut(chunk)
            .enumerate()
            .fold(worker, |(mut s, mut acc), (i, c)| {
                image(&mut s, &mut acc, i, c);
                (s, acc)
            })
            .map(|(_, acc)| acc)
            .reduce(
                || vec![0f64; acc_len],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            )
    } else {
        let (mut s, mut acc) = worker();
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            image(&mut s, &mut acc, i, c);
        }
        acc
    }
}

/// Runs `f` on `len` values of this thread's reusable scratch memory, holding whatever an
/// earlier call left there (`f` must write what it reads). Saves zero-filling (and page
/// faults on) a fresh `cols` buffer for every convolution: at batch 1 that was a pass as
/// large as `im2col`'s own. A nested call on the same thread (rayon can run another task
/// while this one waits) gets a fresh buffer.
fn with_thread_scratch<T: WithDType, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    use std::cell::RefCell;
    thread_local! {
        static BUF: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    }
    // 8-byte words: aligned for every dtype Candle has, all of which are plain bits.
    let words = (len * std::mem::size_of::<T>()).div_ceil(8);
    BUF.with(|cell| match cell.try_borrow_mut() {
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
fn forward_image<T: WithDType>(
    img: &[T],
    w: &[T],
    d: &Dims,
    g: &ConvGeom,
    y_n: &mut [T],
    par: Parallelism,
) {
    if d.direct(g) {
        forward_cols(img, w, d, g, y_n, par);
    } else {
        with_thread_scratch(d.k_all() * d.p(), |cols: &mut [T]| {
            im2col(img, d, g, cols, !matches!(par, Parallelism::None));
            forward_cols(cols, w, d, g, y_n, par);
        });
    }
}

/// `y_n = W . cols` per group.
fn forward_cols<T: WithDType>(
    cols: &[T],
    w: &[T],
    d: &Dims,
    g: &ConvGeom,
    y_n: &mut [T],
    par: Parallelism,
) {
    let (p, kg, og) = (d.p(), d.k_all() / g.groups, d.cout / g.groups);
    for gi in 0..g.groups {
        gemm_into(
            (og, p, kg),
            &mut y_n[gi * og * p..(gi + 1) * og * p],
            false,
            &w[gi * og * kg..],
            (kg, 1),
            &cols[gi * kg * p..],
            (p, 1),
            par,
        );
    }
}

/// What a forward applies to each output value while the image's output is in cache:
/// `relu?(v * scale[c] + bias[c])`, each part optional (a bias; an eval-mode BatchNorm's
/// scale and shift).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a, T> {
    pub scale: Option<&'a [T]>,
    pub bias: Option<&'a [T]>,
    pub relu: bool,
}

impl<'a, T: WithDType> Epilogue<'a, T> {
    /// The plain convolution.
    pub(crate) const NONE: Self = Epilogue {
        scale: None,
        bias: None,
        relu: false,
    };

    pub(crate) fn is_identity(&self) -> bool {
        self.scale.is_none() && self.bias.is_none() && !self.relu
    }

    pub(crate) fn apply_in_place(&self, co: usize, plane: &mut [T]) {
        let s = self.scale.map(|s| s[co]);
        let b = self.bias.map_or(T::zero(), |b| b[co]);
        let zero = T::zero();
        for v in plane {
            let r = match s {
                Some(s) => *v * s + b,
                None => *v + b,
            };
            *v = if self.relu && r < zero { zero } else { r };
        }
    }
}

impl Epilogue<'_, f32> {
    /// Writes the epilogue of output channel `co` applied to the raw values `src` into `dst`.
    pub(crate) fn apply_to<S: crate::buffer::Slot>(&self, co: usize, src: &[f32], dst: &mut [S]) {
        let s = self.scale.map(|s| s[co]);
        let b = self.bias.map_or(0.0, |b| b[co]);
        for (o, v) in dst.iter_mut().zip(src) {
            let r = match s {
                Some(s) => *v * s + b,
                None => *v + b,
            };
            o.put(if self.relu && r < 0.0 { 0.0 } else { r });
        }
    }
}

fn forward<T: WithDType>(x: &[T], w: &[T], ep: Epilogue<'_, T>, d: &Dims, g: &ConvGeom) -> Vec<T> {
    let (parallel, par) = gemm_parallelism(d.n);
    let p = d.p();
    let mut y = vec![T::zero(); d.n * d.cout * p];
    for_each_image(
        &mut y,
        d.cout * p,
        parallel,
        || (),
        |_, ni, y_n| {
            let img = &x[ni * d.chw()..(ni + 1) * d.chw()];
            forward_image(img, w, d, g, y_n, par);
            // The epilogue, while the image's output is in cache.
            if !ep.is_identity() {
                for (o, plane) in y_n.chunks_mut(p).enumerate() {
                    ep.apply_in_place(o, plane);
                }
            }
        },
    );
    y
}

/// How the input gradient of a convolution is computed.
enum InputGrad<T> {
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
        InputGrad::Flipped {
            w: flip_kernel(w, d, g),
            dims: Dims {
                n: d.n,
                c: d.cout,
                h: d.oh,
                w: d.ow,
                cout: d.c,
                kh: d.kh,
                kw: d.kw,
                oh: d.h,
                ow: d.w,
            },
            geom: ConvGeom {
                padding: reach - g.padding,
                ..*g
            },
        }
    }
}

/// The kernel `(C_out, C_in/groups, kh, kw)` flipped in both spatial dims and transposed
/// per group to `(C_in, C_out/groups, kh, kw)`: the kernel of the stride-1 input gradient.
pub(crate) fn flip_kernel<T: WithDType>(w: &[T], d: &Dims, g: &ConvGeom) -> Vec<T> {
    let (cg, og, kk) = (d.c / g.groups, d.cout / g.groups, d.kh * d.kw);
    let mut wf = vec![T::zero(); d.c * og * kk];
    for gi in 0..g.groups {
        for o in 0..og {
            for ci in 0..cg {
                let src = &w[((gi * og + o) * cg + ci) * kk..][..kk];
                let dst = &mut wf[((gi * cg + ci) * og + o) * kk..][..kk];
                for (j, v) in dst.iter_mut().enumerate() {
                    *v = src[kk - 1 - j];
                }
            }
        }
    }
    wf
}

/// Scratch buffers of one backward worker.
struct Scratch<T> {
    cols: Vec<T>,
    dcols: Vec<T>,
    dw_n: Vec<T>,
}

/// (dx, dw) for the upstream gradient `dy`.
fn backward<T: WithDType>(x: &[T], w: &[T], dy: &[T], d: &Dims, g: &ConvGeom) -> (Vec<T>, Vec<T>) {
    let (p, kg, og) = (d.p(), d.k_all() / g.groups, d.cout / g.groups);
    let (parallel, par) = gemm_parallelism(d.n);
    let wlen = d.cout * kg;
    let input_grad = InputGrad::new(w, d, g);
    let mut dx = vec![T::zero(); d.n * d.chw()];
    let image = |s: &mut Scratch<T>, acc: &mut [f64], ni: usize, dx_n: &mut [T]| {
        let img = &x[ni * d.chw()..(ni + 1) * d.chw()];
        let dy_n = &dy[ni * d.cout * p..(ni + 1) * d.cout * p];
        let cols: &[T] = if d.direct(g) {
            img
        } else {
            s.cols.resize(d.k_all() * p, T::zero());
            im2col(img, d, g, &mut s.cols, !matches!(par, Parallelism::None));
            &s.cols
        };
        s.dw_n.resize(wlen, T::zero());
        for gi in 0..g.groups {
            gemm_into(
                (og, kg, p),
                &mut s.dw_n[gi * og * kg..(gi + 1) * og * kg],
                false,
                &dy_n[gi * og * p..],
                (p, 1),
                &cols[gi * kg * p..],
                (1, p),
                par,
            );
        }
        for (a, v) in acc.iter_mut().zip(&s.dw_n) {
            *a += v.to_f64();
        }
        match &input_grad {
            InputGrad::Flipped { w, dims, geom } => {
                forward_image(dy_n, w, dims, geom, dx_n, par);
            }
            InputGrad::Direct | InputGrad::Scatter => {
                let direct = matches!(input_grad, InputGrad::Direct);
                if !direct {
                    s.dcols.resize(d.k_all() * p, T::zero());
                }
                let dcols: &mut [T] = if direct { dx_n } else { &mut s.dcols };
                for gi in 0..g.groups {
                    gemm_into(
                        (kg, p, og),
                        &mut dcols[gi * kg * p..(gi + 1) * kg * p],
                        false,
                        &w[gi * og * kg..],
                        (1, kg),
                        &dy_n[gi * og * p..],
                        (p, 1),
                        par,
                    );
                }
                if !direct {
                    col2im(&s.dcols, d, g, dx_n);
                }
            }
        }
    };
    let scratch = || Scratch {
        cols: Vec::new(),
        dcols: Vec::new(),
        dw_n: Vec::new(),
    };
    let dw64 = for_each_image_summed(&mut dx, d.chw(), parallel, wlen, scratch, image);
    (dx, dw64.into_iter().map(T::from_f64).collect())
}

/// (dx, dw) as tensors, by `backward` run on the CPU slices of (x, w, dy).
fn backward_tensors<T: WithDType>(
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

/// Whether the direct kernels may be used ([`crate::dispatch::Dispatch::direct_conv`]; off for
/// comparison with the GEMM path).
fn direct_enabled() -> bool {
    crate::dispatch::current().direct_conv
}

/// The largest `C_in * kh * kw` the direct kernels take: above it the GEMM path's packed
/// micro-kernels win (measured: ResNet-18/50 at 224x224, batch 8, ran 10-25% slower with the
/// direct kernels on every stride-1 layer).
const DIRECT_MAX_K: usize = 576;

/// The direct forward plan when it applies: f32 (the caller's), stride 1, no dilation, one
/// group, and not a 1x1 unpadded convolution (that one is a plain GEMM already).
fn direct_plan(d: &Dims, g: &ConvGeom) -> Option<direct::Plan> {
    if !direct_enabled() || g.stride != 1 || g.dilation != 1 || g.groups != 1 || d.direct(g) {
        return None;
    }
    if d.c * d.kh * d.kw > DIRECT_MAX_K {
        return None;
    }
    direct::Plan::new(
        (d.c, d.h, d.w),
        d.cout,
        (d.kh, d.kw),
        (g.padding, g.padding),
    )
}

/// The direct plans of the backward: the forward's (weight gradient) and the input
/// gradient's (`dY` padded by `k - 1 - padding`, flipped kernel), when both apply.
pub(crate) fn direct_backward_plans(
    d: &Dims,
    g: &ConvGeom,
) -> Option<(direct::Plan, direct::Plan)> {
    let fwd = direct_plan(d, g)?;
    let pad_y = (d.kh - 1).checked_sub(g.padding)?;
    let pad_x = (d.kw - 1).checked_sub(g.padding)?;
    let back = direct::Plan::new((d.cout, d.oh, d.ow), d.c, (d.kh, d.kw), (pad_y, pad_x))?;
    (back.oh == d.h && back.ow == d.w).then_some((fwd, back))
}

/// The f32 forward: direct when it applies, per-image GEMMs otherwise.
fn forward_f32(x: &[f32], w: &[f32], ep: Epilogue<'_, f32>, d: &Dims, g: &ConvGeom) -> Vec<f32> {
    match direct_plan(d, g) {
        Some(plan) => forward_direct(&plan, x, w, ep, d),
        None => forward(x, w, ep, d, g),
    }
}

fn forward_direct(
    plan: &direct::Plan,
    x: &[f32],
    w: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
) -> Vec<f32> {
    let (parallel, _) = gemm_parallelism(d.n);
    let wk = plan.pack_weights(w);
    let scratch = || (Vec::new(), Vec::new());
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
        for_each_image(
            y,
            d.cout * d.p(),
            parallel,
            scratch,
            |(xp, flat), ni, y_n| {
                plan.pad(&x[ni * d.chw()..(ni + 1) * d.chw()], xp);
                plan.forward(xp, &wk, flat, !parallel);
                plan.unflatten(flat, y_n, ep);
            },
        );
    };
    // SAFETY: the images' chunks cover `y`, and `unflatten` writes the whole chunk.
    unsafe { crate::buffer::vec_written_by(d.n * d.cout * d.p(), fill) }
}

/// Scratch buffers of one direct backward worker.
struct DirectScratch {
    xp: Vec<f32>,
    dyf: Vec<f32>,
    dyp: Vec<f32>,
    flat: Vec<f32>,
    dw_n: Vec<f32>,
}

/// (dx, dw) by the direct kernels.
fn backward_direct(
    (fwd, back): &(direct::Plan, direct::Plan),
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d: &Dims,
    g: &ConvGeom,
) -> (Vec<f32>, Vec<f32>) {
    let (parallel, _) = gemm_parallelism(d.n);
    let wlen = w.len();
    let wfk = back.pack_weights(&flip_kernel(w, d, g));
    let ylen = d.cout * d.p();
    let mut dx = vec![0f32; d.n * d.chw()];
    let image = |s: &mut DirectScratch, acc: &mut [f64], ni: usize, dx_n: &mut [f32]| {
        let dy_n = &dy[ni * ylen..(ni + 1) * ylen];
        fwd.pad(&x[ni * d.chw()..(ni + 1) * d.chw()], &mut s.xp);
        fwd.flatten(dy_n, &mut s.dyf);
        s.dw_n.resize(wlen, 0.0);
        fwd.weight_grad(&s.xp, &s.dyf, &mut s.dw_n);
        for (a, v) in acc.iter_mut().zip(&s.dw_n) {
            *a += f64::from(*v);
        }
        back.pad(dy_n, &mut s.dyp);
        back.forward(&s.dyp, &wfk, &mut s.flat, !parallel);
        back.unflatten(&s.flat, dx_n, Epilogue::NONE);
    };
    let scratch = || DirectScratch {
        xp: Vec::new(),
        dyf: Vec::new(),
        dyp: Vec::new(),
        flat: Vec::new(),
        dw_n: Vec::new(),
    };
    let dw64 = for_each_image_summed(&mut dx, d.chw(), parallel, wlen, scratch, image);
    (dx, dw64.into_iter().map(|v| v as f32).collect())
}

/// Per-channel sums of `dy` (N, C, H, W), f64 accumulated: a bias gradient.
fn channel_sums<T: WithDType>(dy: &Tensor) -> candle_core::Result<Tensor> {
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
}

/// See [`NativeConv2d`].
pub(crate) struct NativeConv2dBias {
    pub geom: ConvGeom,
    pub relu: bool,
}

fn slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::buffer::contiguous_slice(s, l, "conv2d")
}

/// What the third input of a convolution op holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Affine {
    /// A bias, (C_out).
    Bias,
    /// `[scale; shift]`, (2 * C_out): an eval-mode BatchNorm applied in the epilogue.
    ScaleShift,
}

/// The epilogue for an optional third input of kind `affine`.
fn epilogue<'a, T>(third: Option<&'a [T]>, affine: Affine, relu: bool) -> Epilogue<'a, T> {
    match (third, affine) {
        (None, _) => Epilogue {
            scale: None,
            bias: None,
            relu,
        },
        (Some(b), Affine::Bias) => Epilogue {
            scale: None,
            bias: Some(b),
            relu,
        },
        (Some(ss), Affine::ScaleShift) => {
            let (scale, shift) = ss.split_at(ss.len() / 2);
            Epilogue {
                scale: Some(scale),
                bias: Some(shift),
                relu,
            }
        }
    }
}

/// The forward on CPU storages, with an optional third input (see [`Affine`]).
fn cpu_forward(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    third: Option<((&CpuStorage, &Layout), Affine)>,
    relu: bool,
    g: &ConvGeom,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let d = Dims::new(g, l1.dims(), l2.dims())?;
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
    let third_layout = third.map(|t| (t.0).1);
    let out = match (s1, s2, third.map(|t| (t.0).0)) {
        (CpuStorage::F32(a), CpuStorage::F32(b), c) => {
            let c = match (c, third_layout) {
                (Some(CpuStorage::F32(c)), Some(l)) => Some(slice(c, l)?),
                (None, _) => None,
                _ => candle_core::bail!("conv2d: the native kernel takes inputs of one dtype"),
            };
            CpuStorage::F32(forward_f32(
                slice(a, l1)?,
                slice(b, l2)?,
                epilogue(c, affine, relu),
                &d,
                g,
            ))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b), c) => {
            let c = match (c, third_layout) {
                (Some(CpuStorage::F64(c)), Some(l)) => Some(slice(c, l)?),
                (None, _) => None,
                _ => candle_core::bail!("conv2d: the native kernel takes inputs of one dtype"),
            };
            CpuStorage::F64(forward(
                slice(a, l1)?,
                slice(b, l2)?,
                epilogue(c, affine, relu),
                &d,
                g,
            ))
        }
        _ => candle_core::bail!("conv2d: the native kernel takes f32 or f64 of one dtype"),
    };
    Ok((out, shape))
}

/// (dx, dw, db if `with_bias`) for the upstream gradient `dy` of `y`.
fn cpu_backward(
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

fn backward_typed<T: WithDType>(
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
    // f32: the direct kernels when they apply; otherwise per-image GEMMs.
    let plans = (T::DTYPE == candle_core::DType::F32)
        .then(|| direct_backward_plans(&d, g))
        .flatten();
    let (dx, dw) = match plans {
        Some(plans) => backward_tensors::<f32>(x, w, &dy, |x, w, dy| {
            backward_direct(&plans, x, w, dy, &d, g)
        })?,
        None => backward_tensors::<T>(x, w, &dy, |x, w, dy| backward(x, w, dy, &d, g))?,
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
        cpu_forward((s1, l1), (s2, l2), None, self.relu, &self.geom)
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
            self.relu,
            &self.geom,
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
            self.relu,
            &self.geom,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    /// and of 3 (parallel images).
    #[test]
    fn direct_kernels_match_the_gemm_path() {
        let shapes = [
            // (n, c, h, w, cout, kh, kw, padding)
            (3, 16, 8, 8, 16, 3, 3, 1),
            (1, 3, 7, 9, 5, 3, 3, 1),
            (3, 5, 9, 6, 7, 3, 3, 0),
            (2, 4, 6, 11, 9, 5, 3, 1),
            (1, 3, 10, 10, 6, 7, 7, 3),
            (3, 2, 5, 5, 3, 1, 1, 1),
            (2, 6, 13, 5, 4, 3, 3, 2),
        ];
        for (i, &(n, c, h, w, cout, kh, kw, padding)) in shapes.iter().enumerate() {
            let g = ConvGeom {
                padding,
                stride: 1,
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
            for (bias, scale, relu) in [
                (false, false, false),
                (true, false, true),
                (false, false, true),
                (true, true, true),
                (true, true, false),
            ] {
                let ep64 = Epilogue {
                    scale: scale.then_some(&sc64[..]),
                    bias: bias.then_some(&b64[..]),
                    relu,
                };
                let ep = Epilogue {
                    scale: scale.then_some(&sc[..]),
                    bias: bias.then_some(&b[..]),
                    relu,
                };
                let want = forward(&x64, &k64, ep64, &d, &g);
                let got = forward_direct(&plan, &x, &k, ep, &d);
                let e = rel_err(&got, &want);
                assert!(
                    e < 1e-5,
                    "shape {i} bias {bias} scale {scale} relu {relu}: forward off by {e}"
                );
            }
            // The input gradient's plan exists exactly when the padding is below the kernel.
            let plans = direct_backward_plans(&d, &g);
            assert_eq!(plans.is_some(), padding < kh.min(kw), "shape {i}");
            let Some(plans) = plans else { continue };
            let (dx64, dw64) = backward(&x64, &k64, &dy64, &d, &g);
            let (dx, dw) = backward_direct(&plans, &x, &k, &dy, &d, &g);
            let (ex, ew) = (rel_err(&dx, &dx64), rel_err(&dw, &dw64));
            assert!(
                ex < 1e-5 && ew < 1e-5,
                "shape {i}: dx off by {ex}, dw by {ew}"
            );
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

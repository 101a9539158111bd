//! 2-D max pooling with any kernel, stride, padding and dilation, with a backward pass.
//!
//! Candle's `max_pool2d_with_stride` has no padding and refuses to backpropagate when the
//! kernel differs from the stride, so torchvision's stem pooling (3x3, stride 2, padding 1)
//! cannot be trained with it. On the CPU this module runs its own kernel (a custom op whose
//! backward is a second custom op, both parallel over the N*C planes); on other devices it
//! falls back to a composition of Candle ops (pad with -inf, gather the k*k strided window
//! views, max over them) whose backward Candle derives itself.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::buffer::Map2;
use crate::error::{Error, Result};

/// Geometry of a 2-D pooling window, each pair as (height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dConfig {
    /// Window size.
    pub kernel: (usize, usize),
    /// Step between windows.
    pub stride: (usize, usize),
    /// Implicit -inf padding on each side.
    pub padding: (usize, usize),
    /// Spacing between window taps.
    pub dilation: (usize, usize),
}

impl Pool2dConfig {
    /// A square window `k` with stride `s` and padding `p`, no dilation (PyTorch's
    /// `nn.MaxPool2d(k, s, p)`).
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel: (kernel, kernel),
            stride: (stride, stride),
            padding: (padding, padding),
            dilation: (1, 1),
        }
    }

    fn out_dim(size: usize, k: usize, s: usize, p: usize, d: usize) -> Option<usize> {
        let eff = d * (k - 1) + 1;
        let padded = size + 2 * p;
        (padded >= eff).then(|| (padded - eff) / s + 1)
    }

    /// Output (height, width) for an input of (h, w) (PyTorch's floor mode).
    ///
    /// # Errors
    /// Zero kernel/stride/dilation, padding over half the kernel (PyTorch's rule) or a window
    /// larger than the padded input.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        let (dh, dw) = self.dilation;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || dh == 0 || dw == 0 {
            return Err(Error::config(format!(
                "max_pool2d: kernel, stride and dilation must be positive, got {self:?}"
            )));
        }
        if 2 * ph > kh || 2 * pw > kw {
            return Err(Error::config(format!(
                "max_pool2d: padding {:?} must be at most half the kernel {:?}",
                self.padding, self.kernel
            )));
        }
        match (
            Self::out_dim(h, kh, sh, ph, dh),
            Self::out_dim(w, kw, sw, pw, dw),
        ) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => Err(Error::Shape {
                op: "max_pool2d",
                expected: format!("a padded input at least as large as the window {self:?}"),
                got: vec![h, w],
            }),
        }
    }
}

/// Max pooling over the last two dims of an (N, C, H, W) tensor.
///
/// # Shapes
/// - input: (N, C, H, W)
/// - output: (N, C, H_out, W_out), H_out = floor((H + 2p - d(k-1) - 1) / s) + 1
///
/// Matches `torch.nn.functional.max_pool2d` (floor mode): padding acts as -inf, the
/// gradient of each window goes to its first maximum (to its last NaN where it holds any,
/// as PyTorch's CPU kernel), NaN propagates.
///
/// # Errors
/// A non-4-D input or a window that does not fit (see [`Pool2dConfig::output_size`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use resblock_kernels::{max_pool2d, Pool2dConfig};
/// let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
/// let y = max_pool2d(&x, Pool2dConfig::new(3, 2, 1))?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [5., 7., 13., 15.]);
/// # Ok::<(), resblock_kernels::Error>(())
/// ```
pub fn max_pool2d(x: &Tensor, cfg: Pool2dConfig) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4().map_err(|_| Error::Shape {
        op: "max_pool2d",
        expected: "a 4-D (N, C, H, W) input".into(),
        got: x.dims().to_vec(),
    })?;
    cfg.output_size(h, w)?;
    if x.device().is_cpu() && crate::dispatch::kernels() == crate::dispatch::Kernels::Native {
        Ok(x.contiguous()?.apply_op1(MaxPool2d(cfg))?)
    } else {
        max_pool2d_generic(x, cfg)
    }
}

/// The device-generic path of [`max_pool2d`], used off the CPU: pad with -inf, take the k*k
/// strided window views, max over them. Candle differentiates this itself; unlike PyTorch,
/// tied maxima share the gradient.
///
/// # Errors
/// As [`max_pool2d`].
pub fn max_pool2d_generic(x: &Tensor, cfg: Pool2dConfig) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = cfg.output_size(h, w)?;
    if n * c == 0 {
        // Nothing to pool (Candle's max refuses empty tensors).
        return Ok(Tensor::zeros((n, c, oh, ow), x.dtype(), x.device())?);
    }
    let (ph, pw) = cfg.padding;
    let neg = |hh: usize, ww: usize| -> candle_core::Result<Tensor> {
        Tensor::full(f32::NEG_INFINITY, (n, c, hh, ww), x.device())?.to_dtype(x.dtype())
    };
    let mut xp = x.clone();
    if ph > 0 {
        xp = Tensor::cat(&[&neg(ph, w)?, &xp, &neg(ph, w)?], 2)?;
    }
    if pw > 0 {
        let hh = h + 2 * ph;
        xp = Tensor::cat(&[&neg(hh, pw)?, &xp, &neg(hh, pw)?], 3)?;
    }
    let mut views = Vec::with_capacity(cfg.kernel.0 * cfg.kernel.1);
    for i in 0..cfg.kernel.0 {
        for j in 0..cfg.kernel.1 {
            let r0 = i * cfg.dilation.0;
            let c0 = j * cfg.dilation.1;
            let v = xp.narrow(2, r0, (oh - 1) * cfg.stride.0 + 1)?.narrow(
                3,
                c0,
                (ow - 1) * cfg.stride.1 + 1,
            )?;
            views.push(crate::shortcut::subsample2d(
                &v,
                cfg.stride.0,
                cfg.stride.1,
            )?);
        }
    }
    Ok(Tensor::stack(&views, 0)?.max(0)?)
}

struct MaxPool2d(Pool2dConfig);

/// For every output cell of one plane, the flat input index of its first maximum (of its
/// last NaN where it holds any, as PyTorch's CPU kernel), or `usize::MAX` when the window
/// holds only padding. `maxima` is the plane's forward ([`plane_max`]).
///
/// The windows wholly inside the plane (all but a border one window wide) take their taps
/// at fixed offsets from the window's corner, with no bounds checks per tap and, for the
/// 3 x 3 window of ResNet's stem, unrolled ([`first_max`]); the border windows skip the
/// taps outside the plane. One checked tap at a time, ResNet-50's stem pooling backward
/// (batch 32) was 5% of a training step, four times PyTorch's time for it.
fn plane_argmax<T: WithDType>(
    plane: &[T],
    maxima: &[T],
    (h, w): (usize, usize),
    cfg: &Pool2dConfig,
    (oh, ow): (usize, usize),
    mut emit: impl FnMut(usize, usize),
) {
    let (kh, kw) = cfg.kernel;
    let (sh, sw) = cfg.stride;
    let (ph, pw) = cfg.padding;
    let (dh, dw) = cfg.dilation;
    // The outputs `lo..hi` along one axis whose windows lie wholly inside it.
    let inside = |o_n: usize, s: usize, p: usize, d: usize, k: usize, size: usize| {
        let lo = p.div_ceil(s);
        let reach = (k - 1) * d;
        // o * s - p + reach < size  <=>  o * s < size + p - reach
        let hi = if size + p > reach {
            ((size + p - reach - 1) / s + 1).min(o_n)
        } else {
            0
        };
        lo..hi.max(lo)
    };
    let rows_in = inside(oh, sh, ph, dh, kh, h);
    let cols_in = inside(ow, sw, pw, dw, kw, w);
    let offsets: Vec<usize> = (0..kh)
        .flat_map(|ky| (0..kw).map(move |kx| ky * dh * w + kx * dw))
        .collect();
    let checked = |oy: usize, ox: usize| {
        let mut best = usize::MAX;
        let mut best_v = T::zero();
        for ky in 0..kh {
            let y = (oy * sh + ky * dh) as isize - ph as isize;
            if y < 0 || y >= h as isize {
                continue;
            }
            for kx in 0..kw {
                let x = (ox * sw + kx * dw) as isize - pw as isize;
                if x < 0 || x >= w as isize {
                    continue;
                }
                let idx = y as usize * w + x as usize;
                let v = plane[idx];
                // As PyTorch's CPU kernel: strictly greater keeps the first maximum; every
                // NaN wins, so the last NaN.
                #[allow(clippy::eq_op)]
                let is_nan = v != v;
                if best == usize::MAX || v > best_v || is_nan {
                    best = idx;
                    best_v = v;
                }
            }
        }
        best
    };
    let nine = <&[usize; 9]>::try_from(&offsets[..]).ok();
    for oy in 0..oh {
        let row_in = rows_in.contains(&oy);
        for ox in 0..ow {
            let best = if row_in && cols_in.contains(&ox) {
                let corner = (oy * sh - ph) * w + ox * sw - pw;
                let win = &plane[corner..];
                let m = maxima[oy * ow + ox];
                corner
                    + match nine {
                        Some(off) => first_equal(win, off, m),
                        None => first_equal(win, &offsets, m),
                    }
            } else {
                checked(oy, ox)
            };
            emit(oy * ow + ox, best);
        }
    }
}

/// The offset in `off` of the first tap of `win[off[..]]` equal to the window's maximum `m`,
/// or of its last NaN where `m` is NaN, as [`plane_argmax`]'s checked taps choose; each
/// tap's test is independent of the others instead of one chain of compare-and-keep
/// through the window.
#[inline(always)]
fn first_equal<T: WithDType>(win: &[T], off: &[usize], m: T) -> usize {
    #[allow(clippy::eq_op)]
    let nan = |v: T| v != v;
    if nan(m) {
        let mut last = off[0];
        for &o in off {
            if nan(win[o]) {
                last = o;
            }
        }
        return last;
    }
    let mut first = off[off.len() - 1];
    for &o in off[..off.len() - 1].iter().rev() {
        if win[o] == m {
            first = o;
        }
    }
    first
}

fn pool_fwd<T: WithDType + Send + Sync>(
    src: &[T],
    n_planes: usize,
    h: usize,
    w: usize,
    cfg: &Pool2dConfig,
) -> Result<(Vec<T>, usize, usize)> {
    let (oh, ow) = cfg.output_size(h, w)?;
    let mut out = vec![T::zero(); n_planes * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(src.par_chunks(h * w))
        .for_each_init(Vec::new, |rows, (dst, plane)| {
            plane_max(plane, (h, w), cfg, (oh, ow), rows, dst)
        });
    Ok((out, oh, ow))
}

/// `a` unless `b` is larger or NaN: the running maximum that keeps the first of equal values
/// and lets NaN win, as PyTorch's.
fn max_keep_first<T: WithDType>(a: T, b: T) -> T {
    #[allow(clippy::eq_op)]
    let b_nan = b != b;
    if b > a || b_nan {
        b
    } else {
        a
    }
}

/// One plane's forward values (no indices): the maximum along each input row's windows
/// first (`rows`: h x ow scratch), then down each window's rows, so a k x k window costs
/// 2k comparisons instead of k^2 with bounds checks. Visiting taps row by row, left to
/// right, keeps the first maximum, as [`plane_argmax`] does.
///
/// Both passes run along contiguous values so that they vectorise: along a row, the
/// maximum of every window of `kw` taps starting at each column (`full`), from which the
/// windows wholly inside the row are picked (the few at the borders take their in-bounds
/// taps one by one); down the rows, whole output rows at a time. One value at a time, the
/// stem pooling of a batch-1 ResNet-18 took 5% of its inference.
fn plane_max<T: WithDType>(
    plane: &[T],
    (h, w): (usize, usize),
    cfg: &Pool2dConfig,
    (_, ow): (usize, usize),
    rows: &mut Vec<T>,
    dst: &mut [T],
) {
    let (kh, kw) = cfg.kernel;
    let (sh, sw) = cfg.stride;
    let (ph, pw) = cfg.padding;
    let (dh, dw) = cfg.dilation;
    let neg = T::from_f64(f64::NEG_INFINITY);
    // The in-bounds taps of a window starting at `start - pad`: (first, count).
    let taps = |o: usize, s: usize, pad: usize, d: usize, k: usize, size: usize| {
        let lo = (o * s) as isize - pad as isize;
        let first = (0..k).find(|&t| lo + (t * d) as isize >= 0);
        let first = first.unwrap_or(k);
        let last = (0..k)
            .rev()
            .find(|&t| lo + ((t * d) as isize) < size as isize);
        let count = last.map_or(0, |l| (l + 1).saturating_sub(first));
        ((lo + (first * d) as isize).max(0) as usize, count)
    };
    let cols: Vec<(usize, usize)> = (0..ow).map(|ox| taps(ox, sw, pw, dw, kw, w)).collect();
    // Windows of all `kw` taps start at columns `0..span` of a row.
    let span = (w + 1).saturating_sub((kw - 1) * dw + 1);
    rows.clear();
    rows.resize(h * ow + span, neg);
    let (rows, full) = rows.split_at_mut(h * ow);
    for (row, src) in rows.chunks_exact_mut(ow).zip(plane.chunks_exact(w)) {
        if span > 0 {
            full.copy_from_slice(&src[..span]);
            for t in 1..kw {
                for (m, v) in full.iter_mut().zip(&src[t * dw..t * dw + span]) {
                    *m = max_keep_first(*m, *v);
                }
            }
        }
        for (r, &(x0, n)) in row.iter_mut().zip(&cols) {
            if n == kw {
                *r = full[x0];
                continue;
            }
            let mut m = neg;
            for t in 0..n {
                let v = src[x0 + t * dw];
                m = if t == 0 { v } else { max_keep_first(m, v) };
            }
            *r = m;
        }
    }
    for (oy, out) in dst.chunks_exact_mut(ow).enumerate() {
        let (y0, n) = taps(oy, sh, ph, dh, kh, h);
        if n == 0 {
            out.fill(neg);
            continue;
        }
        out.copy_from_slice(&rows[y0 * ow..(y0 + 1) * ow]);
        for t in 1..n {
            let y = y0 + t * dh;
            for (o, v) in out.iter_mut().zip(&rows[y * ow..(y + 1) * ow]) {
                *o = max_keep_first(*o, *v);
            }
        }
        // A window with no in-bounds column is all padding.
        for (o, &(_, nc)) in out.iter_mut().zip(&cols) {
            if nc == 0 {
                *o = neg;
            }
        }
    }
}

fn pool_bwd<T: WithDType + Send + Sync>(
    src: &[T],
    grad: &[T],
    n_planes: usize,
    h: usize,
    w: usize,
    cfg: &Pool2dConfig,
) -> Result<Vec<T>> {
    let (oh, ow) = cfg.output_size(h, w)?;
    // Each plane is zeroed just before its gradients are summed into it, while it is in
    // cache: a zeroed allocation of the whole batch was the kernel clearing fresh pages,
    // as long again as the rest of the backward.
    let fill = |dx: &mut [std::mem::MaybeUninit<T>]| {
        dx.par_chunks_mut(h * w)
            .zip(src.par_chunks(h * w))
            .zip(grad.par_chunks(oh * ow))
            .for_each_init(
                || (Vec::new(), vec![T::zero(); oh * ow]),
                |(rows, maxima), ((dst, plane), g)| {
                    dst.fill(std::mem::MaybeUninit::new(T::zero()));
                    // SAFETY: every element was just written.
                    let dst = unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
                    plane_max(plane, (h, w), cfg, (oh, ow), rows, maxima);
                    plane_argmax(plane, maxima, (h, w), cfg, (oh, ow), |o, i| {
                        if i != usize::MAX {
                            dst[i] += g[o];
                        }
                    })
                },
            );
    };
    // SAFETY: `fill` writes every plane, and the planes cover the vector.
    let dx = unsafe { crate::buffer::vec_written_by(n_planes * h * w, fill) };
    Ok(dx)
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    crate::buffer::contiguous_slice(s, l, "max_pool2d")
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "resblock-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let (storage, oh, ow) = match s {
            CpuStorage::F32(v) => {
                let (o, oh, ow) = pool_fwd(contiguous(v, l)?, n * c, h, w, &self.0)?;
                (CpuStorage::F32(o), oh, ow)
            }
            CpuStorage::F64(v) => {
                let (o, oh, ow) = pool_fwd(contiguous(v, l)?, n * c, h, w, &self.0)?;
                (CpuStorage::F64(o), oh, ow)
            }
            other => candle_core::bail!("max_pool2d: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, Shape::from((n, c, oh, ow))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &MaxPool2dBackward(self.0))?))
    }
}

struct MaxPool2dBackward(Pool2dConfig);

impl Map2 for MaxPool2dBackward {
    const OP: &'static str = "max_pool2d backward";
    fn f<T: WithDType>(
        &self,
        x: &[T],
        lx: &Layout,
        g: &[T],
        _: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let (n, c, h, w) = lx.shape().dims4()?;
        Ok(pool_bwd(x, g, n * c, h, w, &self.0)?)
    }
}

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "resblock-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.map(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's max pooling of one plane by definition: taps visited row by row, left to
    /// right, a tap replacing the maximum when larger or NaN (so the last NaN). Each output's
    /// value and the flat index of the tap it came from (`usize::MAX` for a window of padding
    /// only).
    fn reference_with_index(
        plane: &[f32],
        (h, w): (usize, usize),
        cfg: &Pool2dConfig,
    ) -> Vec<(f32, usize)> {
        let (oh, ow) = cfg.output_size(h, w).expect("valid test geometry");
        let mut out = vec![(f32::NEG_INFINITY, usize::MAX); oh * ow];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = f32::NEG_INFINITY;
                let mut at = usize::MAX;
                for ky in 0..cfg.kernel.0 {
                    for kx in 0..cfg.kernel.1 {
                        let y = (oy * cfg.stride.0 + ky * cfg.dilation.0) as isize
                            - cfg.padding.0 as isize;
                        let x = (ox * cfg.stride.1 + kx * cfg.dilation.1) as isize
                            - cfg.padding.1 as isize;
                        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                            continue;
                        }
                        let i = y as usize * w + x as usize;
                        let v = plane[i];
                        if at == usize::MAX || v > m || v.is_nan() {
                            m = v;
                            at = i;
                        }
                    }
                }
                out[oy * ow + ox] = (m, at);
            }
        }
        out
    }

    fn reference(plane: &[f32], hw: (usize, usize), cfg: &Pool2dConfig) -> Vec<f32> {
        reference_with_index(plane, hw, cfg)
            .into_iter()
            .map(|(m, _)| m)
            .collect()
    }

    /// Planes with NaNs, ties and signed zeros (`nans`), or ties only.
    fn test_plane(h: usize, w: usize, nans: bool) -> Vec<f32> {
        (0..h * w)
            .map(|i| match (i * 37) % 11 {
                0 if nans => f32::NAN,
                1 => -0.0,
                2 => 0.0,
                k => (k % 4) as f32 - 1.5,
            })
            .collect()
    }

    /// Every kernel, stride, padding and dilation the tests try on a plane of `h x w`.
    fn configs(h: usize, w: usize) -> impl Iterator<Item = (Pool2dConfig, (usize, usize))> {
        (1..=4).flat_map(move |k| {
            (1..=3).flat_map(move |s| {
                (0..=k / 2).flat_map(move |p| {
                    (1..=2).flat_map(move |d| {
                        // Square kernels, and one a column narrower.
                        [(k, k), (k, k.max(2) - 1)]
                            .into_iter()
                            .filter_map(move |kernel| {
                                let cfg = Pool2dConfig {
                                    kernel,
                                    stride: (s, s),
                                    padding: (p.min(kernel.0 / 2), p.min(kernel.1 / 2)),
                                    dilation: (d, d),
                                };
                                cfg.output_size(h, w).ok().map(|o| (cfg, o))
                            })
                    })
                })
            })
        })
    }

    /// The backward's argmax (fixed offsets and the forward's maxima inside the plane,
    /// checked taps at its border) is the definition's first maximum, NaNs and ties
    /// included, for every window shape and every way a window can meet the border.
    #[test]
    fn plane_argmax_is_the_first_maximum() {
        for (h, w) in [(1, 1), (5, 7), (9, 4), (12, 13)] {
            for nans in [true, false] {
                let plane = test_plane(h, w, nans);
                for (cfg, (oh, ow)) in configs(h, w) {
                    let mut maxima = vec![0f32; oh * ow];
                    plane_max(&plane, (h, w), &cfg, (oh, ow), &mut Vec::new(), &mut maxima);
                    let mut got = vec![0; oh * ow];
                    plane_argmax(&plane, &maxima, (h, w), &cfg, (oh, ow), |o, i| got[o] = i);
                    let want: Vec<usize> = reference_with_index(&plane, (h, w), &cfg)
                        .into_iter()
                        .map(|(_, i)| i)
                        .collect();
                    assert_eq!(got, want, "{h}x{w} {cfg:?} nans {nans}");
                }
            }
        }
    }

    /// The vectorised forward against the definition, bit for bit, on planes with NaNs,
    /// ties and signed zeros, for kernels, strides, paddings and dilations that leave
    /// border windows of every kind.
    #[test]
    fn plane_max_is_the_definition_bit_for_bit() {
        for (h, w) in [(1, 1), (5, 7), (9, 4), (12, 13)] {
            let plane = test_plane(h, w, true);
            for (cfg, (oh, ow)) in configs(h, w) {
                let mut got = vec![0f32; oh * ow];
                plane_max(&plane, (h, w), &cfg, (oh, ow), &mut Vec::new(), &mut got);
                let want = reference(&plane, (h, w), &cfg);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                // NaNs compare by being NaN (their payload may differ).
                let canon = |v: &[f32]| {
                    bits(
                        &v.iter()
                            .map(|x| if x.is_nan() { f32::NAN } else { *x })
                            .collect::<Vec<_>>(),
                    )
                };
                assert_eq!(canon(&got), canon(&want), "{h}x{w} {cfg:?}");
            }
        }
    }
}

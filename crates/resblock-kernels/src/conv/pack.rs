//! Unfolding an image into GEMM columns (`im2col`, rows `[c, ky, kx]`, columns `[oy, ox]`)
//! and folding column gradients back (`col2im_add`, `col2im_into`).

use candle_core::WithDType;
use rayon::prelude::*;

use super::geom::{ConvGeom, Dims};

/// Output columns `ox` whose input column `ox * s + off` lies in `0..w`.
pub(crate) fn valid_range(ow: usize, w: usize, s: usize, off: isize) -> (usize, usize) {
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
pub(crate) fn im2col<T: WithDType>(
    img: &[T],
    d: &Dims,
    g: &ConvGeom,
    cols: &mut [T],
    parallel: bool,
) {
    let rows = d.kh * d.kw * d.p();
    let plane = d.h * d.w;
    let cols = &mut cols[..d.c * rows];
    if parallel {
        cols.par_chunks_mut(rows)
            .zip(img.par_chunks(plane))
            .for_each(|(r, p)| im2col_channel(p, d, g, r, d.p()));
    } else {
        cols.chunks_mut(rows)
            .zip(img.chunks(plane))
            .for_each(|(r, p)| im2col_channel(p, d, g, r, d.p()));
    }
}

/// The `kh * kw` rows of `cols` that one input channel's `plane` gives, `row_stride`
/// apart in `rows` (`d.p()` for one image's `cols`; more where several images' columns
/// lie side by side, see `conv/batched.rs`).
pub(crate) fn im2col_channel<T: WithDType>(
    plane: &[T],
    d: &Dims,
    g: &ConvGeom,
    rows: &mut [T],
    row_stride: usize,
) {
    let (p, s) = (d.p(), g.stride);
    let mut r = 0;
    for ky in 0..d.kh {
        for kx in 0..d.kw {
            let row = &mut rows[r * row_stride..r * row_stride + p];
            r += 1;
            let off_x = (kx * g.dilation) as isize - g.padding as isize;
            let (lo, hi) = valid_range(d.ow, d.w, s, off_x);
            if s == 1 && d.ow == d.w {
                shifted_plane(
                    plane,
                    d,
                    (ky * g.dilation) as isize - g.padding as isize,
                    off_x,
                    (lo, hi),
                    row,
                );
                continue;
            }
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
                let n = hi - lo;
                if s == 1 {
                    out[lo..hi].copy_from_slice(&src[start..start + n]);
                } else if s == 2 {
                    // Pairs, so the compiler sees a fixed stride (a shuffle per vector),
                    // then the last value, whose pair may end past the row.
                    let src = &src[start..start + 2 * n - 1];
                    for (o, pair) in out[lo..hi - 1].iter_mut().zip(src.chunks_exact(2)) {
                        *o = pair[0];
                    }
                    out[hi - 1] = src[2 * n - 2];
                } else {
                    for (o, v) in out[lo..hi].iter_mut().zip(src[start..].iter().step_by(s)) {
                        *o = *v;
                    }
                }
            }
        }
    }
}

/// One row of `cols` at stride 1 when the output is as wide as the input (every "same"
/// convolution): the input plane shifted by `off_y` rows and `off_x` columns, which is one
/// contiguous copy of the rows in range (the columns that wrap to a neighbouring row
/// zeroed after it), not a copy and two fills per output row. At 14x14 and 7x7 those
/// per-row calls cost more than the values they moved.
fn shifted_plane<T: WithDType>(
    plane: &[T],
    d: &Dims,
    off_y: isize,
    off_x: isize,
    (lo, hi): (usize, usize),
    row: &mut [T],
) {
    let w = d.w;
    // Output rows whose input row `oy + off_y` is in the plane.
    let y0 = (-off_y).clamp(0, d.oh as isize) as usize;
    let y1 = (d.h as isize - off_y).clamp(y0 as isize, d.oh as isize) as usize;
    row[..y0 * w].fill(T::zero());
    row[y1 * w..].fill(T::zero());
    if y0 == y1 {
        return;
    }
    // Output index `t` (in rows y0..y1) reads input `t + shift`; the ends that would read
    // before or past the plane are in the zeroed columns below.
    let shift = off_y * w as isize + off_x;
    let t0 = (y0 * w).max((-shift).max(0) as usize);
    let t1 = (y1 * w).min((plane.len() as isize - shift).max(0) as usize);
    if t0 < t1 {
        let from = (t0 as isize + shift) as usize;
        row[t0..t1].copy_from_slice(&plane[from..from + (t1 - t0)]);
    }
    for oy in y0..y1 {
        let (left, rest) = row[oy * w..(oy + 1) * w].split_at_mut(lo);
        for v in left.iter_mut().chain(rest[hi - lo..].iter_mut()) {
            *v = T::zero();
        }
    }
}

/// One image's input gradient `dx` from its patch gradients `dcols`, every value written:
/// [`super::fold_s2`] where it applies (f32), else zeroed and [`col2im_add`].
pub(crate) fn col2im_into<T: WithDType>(
    dcols: &[T],
    d: &Dims,
    g: &ConvGeom,
    dx: &mut [std::mem::MaybeUninit<T>],
) {
    if super::fold_s2::applies(d, g) {
        if let (Some(dcols), Some(dx)) = (
            crate::matmul::as_f32(dcols),
            crate::matmul::as_f32_uninit(dx),
        ) {
            super::fold_s2::fold(dcols, d, g, dx, crate::dispatch::simd_in_use());
            return;
        }
    }
    col2im_add(dcols, d, g, crate::buffer::zeroed(dx));
}

/// Scatter-adds one image's patch gradients `dcols` into `dx`, which the callers hand over
/// zeroed: each zeroes its whole buffer once, on the thread that fills it, and a fill here
/// as well was a second pass over every input gradient of a stride-2 layer.
pub(crate) fn col2im_add<T: WithDType>(dcols: &[T], d: &Dims, g: &ConvGeom, dx: &mut [T]) {
    let (p, s) = (d.p(), g.stride);
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
                    } else if s == 2 {
                        // As in `im2col_channel`: pairs, then the last value.
                        let n = hi - lo;
                        let dst = &mut dst[start..start + 2 * n - 1];
                        for (pair, v) in dst.chunks_exact_mut(2).zip(&src[..n - 1]) {
                            pair[0] += *v;
                        }
                        dst[2 * n - 2] += src[n - 1];
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

#[cfg(test)]
mod tests {
    use super::im2col;
    use crate::conv::geom::{ConvGeom, Dims};

    /// `im2col` against its definition, `cols[(c, ky, kx), (oy, ox)] = x[c, oy * s + ky * dil
    /// - p, ox * s + kx * dil - p]` (zero outside), over the shifted-plane path (stride 1,
    /// output as wide as the input: paddings of `dil * (k - 1) / 2`) and the per-row one.
    #[test]
    fn unfolds_as_defined() {
        // (c, h, w, k, padding, stride, dilation)
        let cases = [
            (2, 7, 7, 3, 1, 1, 1),
            (3, 5, 9, 5, 2, 1, 1),
            (2, 6, 6, 3, 2, 1, 2),
            (1, 4, 3, 3, 1, 1, 1),
            (2, 7, 7, 3, 1, 2, 1),
            (2, 8, 5, 3, 0, 1, 1),
            (1, 3, 3, 3, 3, 1, 1),
        ];
        for (c, h, w, k, padding, stride, dilation) in cases {
            let g = ConvGeom {
                padding,
                stride,
                dilation,
                groups: 1,
            };
            let d = Dims::new(&g, &[1, c, h, w], &[1, c, k, k]).expect("dims");
            let x: Vec<f32> = (0..c * h * w).map(|i| i as f32 + 1.).collect();
            for parallel in [false, true] {
                let mut cols = vec![f32::NAN; c * k * k * d.p()];
                im2col(&x, &d, &g, &mut cols, parallel);
                for ci in 0..c {
                    for ky in 0..k {
                        for kx in 0..k {
                            for oy in 0..d.oh {
                                for ox in 0..d.ow {
                                    let iy =
                                        (oy * stride + ky * dilation) as isize - padding as isize;
                                    let ix =
                                        (ox * stride + kx * dilation) as isize - padding as isize;
                                    let want =
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                        {
                                            0.
                                        } else {
                                            x[(ci * h + iy as usize) * w + ix as usize]
                                        };
                                    let r = (ci * k + ky) * k + kx;
                                    let got = cols[r * d.p() + oy * d.ow + ox];
                                    assert_eq!(
                                        got,
                                        want,
                                        "case {:?}: row {r}, ({oy}, {ox})",
                                        (c, h, w, k, padding, stride, dilation)
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

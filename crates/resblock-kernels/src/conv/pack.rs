//! Unfolding an image into GEMM columns (`im2col`, rows `[c, ky, kx]`, columns `[oy, ox]`)
//! and folding column gradients back (`col2im`).

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
            .for_each(|(r, p)| im2col_channel(p, d, g, r));
    } else {
        cols.chunks_mut(rows)
            .zip(img.chunks(plane))
            .for_each(|(r, p)| im2col_channel(p, d, g, r));
    }
}

/// The `kh * kw` rows of `cols` that one input channel's `plane` gives.
pub(crate) fn im2col_channel<T: WithDType>(plane: &[T], d: &Dims, g: &ConvGeom, rows: &mut [T]) {
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

/// Scatter-adds one image's patch gradients `dcols` back into `dx` (zeroed first).
pub(crate) fn col2im<T: WithDType>(dcols: &[T], d: &Dims, g: &ConvGeom, dx: &mut [T]) {
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

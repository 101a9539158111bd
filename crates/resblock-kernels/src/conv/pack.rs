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
    if polyphase(d, g) {
        return im2col_channel_s2(plane, d, g, rows, row_stride);
    }
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

/// Whether [`im2col_channel`] unfolds through the plane's polyphase components
/// ([`im2col_channel_s2`]): stride 2, no dilation, a kernel at least 2 x 2 (so that every
/// component is used: a 1x1 reads one of the four, and splitting all of them made a
/// 256-channel 56x56 unfolding three times slower), and each component's rows no wider
/// than the output's (every padding of at least `(k - 1) / 2`: ResNets' 3x3 and 7x7
/// stride-2 layers).
fn polyphase(d: &Dims, g: &ConvGeom) -> bool {
    g.stride == 2
        && g.dilation == 1
        && d.kh >= 2
        && d.kw >= 2
        && d.w.div_ceil(2) <= d.ow
        && d.oh > 0
}

/// [`im2col_channel`] at stride 2 ([`polyphase`]): the plane split once into its four
/// polyphase components (`x[2i + py, 2j + px]`, each stored `ow` wide), then every row of
/// `cols` is one component shifted by at most a row and a column ([`shifted_plane`]: one
/// contiguous copy and the edges zeroed). Row by row, gathering every other value, the
/// unfolding cost a short copy and two fills per output row and tap, 16 128 of them for
/// a 64-channel 56x56 image (28 values each): four times the time per value of the
/// stride-1 unfolding. One such image on one thread (minimum of 200, the same core):
/// 119-158 against 146-231 us (the split 54 us of it, the copies the rest); ResNet-50's
/// 7x7 stem 288-350 against 400-588 us. The 64 -> 128-channel 56x56 stride-2 forward at
/// batch 8 (the GEMM path on AVX2, `winograd-ab 8 64 56 128 20 s2`, 8 alternated process
/// pairs): minima 5.91-6.24 against 6.08-6.34 ms, lower in 8 of 8; medians the same.
/// ResNet-18 at batch 1 (`infer-profile`, 6 pairs): mean minimum 25.9 against 26.7 ms,
/// median lower in 6 of 6; ResNet-50 at batch 8: 391.3 against 394.0 ms, 5 of 6.
fn im2col_channel_s2<T: WithDType>(
    plane: &[T],
    d: &Dims,
    g: &ConvGeom,
    rows: &mut [T],
    row_stride: usize,
) {
    let (h, w, ow) = (d.h, d.w, d.ow);
    // Component (py, px) holds `(h - py).div_ceil(2)` rows of `(w - px).div_ceil(2)`
    // values, `ow` apart; each gets the room of the largest.
    let len = h.div_ceil(2) * ow;
    super::gemm::with_thread_scratch_in(
        super::gemm::ScratchMemory::Phases,
        4 * len,
        |phases: &mut [T]| {
            for (y, src) in plane.chunks_exact(w).enumerate() {
                let at = (y / 2) * ow;
                let (even, odd) = phases[2 * (y % 2) * len..][..2 * len].split_at_mut(len);
                for ((e, o), pair) in even[at..]
                    .iter_mut()
                    .zip(&mut odd[at..])
                    .zip(src.chunks_exact(2))
                {
                    *e = pair[0];
                    *o = pair[1];
                }
                if w % 2 == 1 {
                    even[at + w / 2] = src[w - 1];
                }
            }
            let pad = g.padding as isize;
            for ky in 0..d.kh {
                let (py, dy) = parity(ky as isize - pad);
                let hp = (h - py.min(h)).div_ceil(2);
                for kx in 0..d.kw {
                    let (px, dx) = parity(kx as isize - pad);
                    let wp = (w - px.min(w)).div_ceil(2);
                    let r = ky * d.kw + kx;
                    let row = &mut rows[r * row_stride..r * row_stride + d.p()];
                    let comp = &phases[(2 * py + px) * len..][..hp * ow];
                    // The component as a plane `ow` wide: the output's own width.
                    let cd = Dims { h: hp, w: ow, ..*d };
                    shifted_plane(comp, &cd, dy, dx, valid_range(ow, wp, 1, dx), row);
                }
            }
        },
    );
}

/// `a` as `2 * q + r` with `r` in `0..2`: the polyphase component (`r`) and the shift
/// within it (`q`) of an input offset at stride 2.
fn parity(a: isize) -> (usize, isize) {
    (a.rem_euclid(2) as usize, a.div_euclid(2))
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

    /// `im2col` against its definition: `cols[(c, ky, kx), (oy, ox)]` is `x[c, iy, ix]` at
    /// `iy = oy * s + ky * dil - p`, `ix = ox * s + kx * dil - p` (zero outside), over the
    /// shifted-plane path (stride 1, output as wide as the input: paddings of
    /// `dil * (k - 1) / 2`), the polyphase one (stride 2) and the per-row one. The columns
    /// start as NaN and the scratch holds earlier cases' values, so a value not written,
    /// or read from a stale component, shows.
    #[test]
    fn unfolds_as_defined() {
        // (c, h, w, k, padding, stride, dilation, on the polyphase components)
        let cases = [
            (2, 7, 7, 3, 1, 1, 1, false),
            (3, 5, 9, 5, 2, 1, 1, false),
            (2, 6, 6, 3, 2, 1, 2, false),
            (1, 4, 3, 3, 1, 1, 1, false),
            (2, 7, 7, 3, 1, 2, 1, true),
            (2, 8, 5, 3, 0, 1, 1, false),
            (1, 3, 3, 3, 3, 1, 1, false),
            // Stride 2 on the polyphase components (even and odd sizes, 7x7, 2x2, a
            // padding past the kernel's reach, one-row planes) and where it does not apply
            // (1x1; no padding on a 3x3: the components are wider than the output;
            // dilation).
            (2, 8, 8, 3, 1, 2, 1, true),
            (2, 9, 6, 3, 1, 2, 1, true),
            (3, 8, 7, 1, 0, 2, 1, false),
            (1, 15, 14, 7, 3, 2, 1, true),
            (2, 5, 5, 5, 2, 2, 1, true),
            (1, 4, 6, 2, 0, 2, 1, true),
            (1, 1, 5, 3, 1, 2, 1, true),
            (1, 2, 3, 3, 3, 2, 1, true),
            (2, 7, 7, 3, 0, 2, 1, false),
            (2, 9, 9, 3, 2, 2, 2, false),
        ];
        for (c, h, w, k, padding, stride, dilation, phases) in cases {
            let g = ConvGeom {
                padding,
                stride,
                dilation,
                groups: 1,
            };
            let d = Dims::new(&g, &[1, c, h, w], &[1, c, k, k]).expect("dims");
            let x: Vec<f32> = (0..c * h * w).map(|i| i as f32 + 1.).collect();
            assert_eq!(super::polyphase(&d, &g), phases, "{:?}", (c, h, w, k));
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

//! The input gradient of a 3x3 stride-2 convolution with padding 1 (ResNet's downsampling
//! layers) folded from its patch gradients `dcols = W^T . dY` in one write pass.
//!
//! [`super::pack::col2im_add`] adds each of the 9 rows of a channel into its plane, one
//! tap at a time: the plane must be zeroed first, and at stride 2 each row lands on every
//! other value (a read, an add and a write per value, none of them whole vectors). That
//! fill and scatter were 11-13% of a 64-to-128-channel 56x56 stride-2 backward. Here each
//! row `iy = 2 oy + ky - 1` of the plane is summed from the (one or two) kernel rows that
//! reach it, into its even columns `2 j` (tap column 1, `ox = j`) and odd ones `2 j + 1`
//! (tap column 0 at `ox = j + 1`, column 2 at `ox = j`) as contiguous runs, then written
//! once, the two runs interleaved.

use std::mem::MaybeUninit;

use super::geom::{ConvGeom, Dims};
use crate::dispatch::Simd;
use crate::simd::with_simd;

/// Whether [`fold`] computes this layer's input gradient: 3x3, stride 2, padding 1, no
/// dilation.
pub(crate) fn applies(d: &Dims, g: &ConvGeom) -> bool {
    (d.kh, d.kw, g.stride, g.padding, g.dilation) == (3, 3, 2, 1, 1)
}

/// One image's input gradient `dx` `(c, h, w)` from its patch gradients `dcols` (rows
/// `[c, ky, kx]`, columns `[oy, ox]`), every value written; `simd` the widest level to
/// compile the loops for.
///
/// # Panics
/// Unless [`applies`], or if the slices do not hold those sizes.
pub(crate) fn fold(dcols: &[f32], d: &Dims, g: &ConvGeom, dx: &mut [MaybeUninit<f32>], simd: Simd) {
    assert!(applies(d, g), "fold_s2: not a 3x3 stride-2 padding-1 layer");
    let (p, plane) = (d.oh * d.ow, d.h * d.w);
    assert!(
        dcols.len() >= d.c * 9 * p && dx.len() == d.c * plane,
        "fold_s2: buffer sizes"
    );
    // The sums of one row's even columns, then of its odd ones.
    let mut eo = vec![0f32; d.w];
    let dims = (d.h, d.w, d.oh, d.ow);
    for (rows, dst) in dcols.chunks_exact(9 * p).zip(dx.chunks_exact_mut(plane)) {
        let eo = &mut eo[..];
        with_simd!(simd, fold_plane(rows: &[f32], dims: (usize, usize, usize, usize), dst: &mut [MaybeUninit<f32>], eo: &mut [f32]));
    }
}

/// One channel's plane `dst` `(h, w)` from its 9 rows of `dcols` (`oh * ow` each, tap-major);
/// `eo` is `w` values of scratch.
#[inline(always)]
fn fold_plane(
    rows: &[f32],
    (h, w, oh, ow): (usize, usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    eo: &mut [f32],
) {
    let p = oh * ow;
    let row = |ky: usize, kx: usize, oy: usize| &rows[(ky * 3 + kx) * p + oy * ow..][..ow];
    // `ow = ceil(w / 2)` even columns (`2 j`, `j < ow`), `floor(w / 2)` odd ones.
    let (e, o) = eo.split_at_mut(w.div_ceil(2));
    for iy in 0..h {
        e.fill(0.0);
        o.fill(0.0);
        // The kernel rows reaching `iy = 2 oy + ky - 1`, as (ky, oy); an even row has one
        // (the second pair, `oy = oh`, is left out by the filter below, as is a last odd
        // row's `oy = m + 1 = oh`).
        let m = iy / 2;
        let terms = if iy % 2 == 0 {
            [(1, m), (1, oh)]
        } else {
            [(0, m + 1), (2, m)]
        };
        for (ky, oy) in terms.into_iter().filter(|&(_, oy)| oy < oh) {
            for (a, b) in e.iter_mut().zip(row(ky, 1, oy)) {
                *a += *b;
            }
            for (a, b) in o.iter_mut().zip(&row(ky, 0, oy)[1..]) {
                *a += *b;
            }
            for (a, b) in o.iter_mut().zip(row(ky, 2, oy)) {
                *a += *b;
            }
        }
        let out = &mut dst[iy * w..(iy + 1) * w];
        for (pair, (a, b)) in out.chunks_exact_mut(2).zip(e.iter().zip(o.iter())) {
            pair[0].write(*a);
            pair[1].write(*b);
        }
        if w % 2 == 1 {
            out[w - 1].write(e[e.len() - 1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{applies, fold};
    use crate::conv::geom::{ConvGeom, Dims};
    use crate::conv::pack::col2im_add;
    use crate::dispatch::Simd;

    /// [`fold`] against `col2im_add` into a zeroed plane, bit for bit (both add the same
    /// values in the same order: tap column 1 alone, or column 0 then 2, per kernel row,
    /// ky = 0 before 2), at every SIMD level, at even and odd sizes, one-row outputs and
    /// planes narrower than a vector.
    #[test]
    fn matches_col2im_add() {
        let g = ConvGeom {
            padding: 1,
            stride: 2,
            dilation: 1,
            groups: 1,
        };
        for (c, h, w) in [
            (2, 8, 8),
            (3, 7, 9),
            (1, 1, 1),
            (2, 2, 3),
            (2, 56, 56),
            (1, 35, 34),
        ] {
            let d = Dims::new(&g, &[1, c, h, w], &[4, c, 3, 3]).expect("dims");
            assert!(applies(&d, &g));
            let dcols: Vec<f32> = (0..c * 9 * d.oh * d.ow)
                .map(|i| ((i * 7919) % 1013) as f32 / 101.0 - 5.0)
                .collect();
            let mut want = vec![0f32; c * h * w];
            col2im_add(&dcols, &d, &g, &mut want);
            for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
                let mut got = vec![std::mem::MaybeUninit::new(f32::NAN); c * h * w];
                fold(&dcols, &d, &g, &mut got, simd);
                // SAFETY: `fold` wrote every value (and they started initialised anyway).
                let got: Vec<f32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{c}x{h}x{w} {simd:?}");
            }
        }
    }
}

//! The GEMM-path forward with several images' columns side by side in one GEMM, for small
//! outputs at batch sizes above 1.
//!
//! The GEMM's AVX-512 micro-kernel fills 32 columns at a time (16 for a short last panel),
//! so one image's 7x7 output, 49 columns, costs 64: a quarter of a per-image GEMM's work is
//! wasted. Eight images' 392 columns cost 400. (The AVX2 kernel's 16 columns, 8 for a short
//! last panel, cost 56: an eighth, still above [`MIN_WASTE`].) Per group of images this unfolds each
//! image's input into its columns of one `K x (images * P)` buffer (a 1x1 stride-1
//! convolution copies its planes there), runs one GEMM on all threads, and copies each
//! output plane to its place with the epilogue. On the Zen 4 host a 2048 -> 512 1x1
//! convolution at 7x7 and batch 8 ran 5.9 ms as per-image GEMMs and 4.4 ms as one.

use std::mem::MaybeUninit;

use gemm::Parallelism;
use rayon::prelude::*;

use super::epilogue::Epilogue;
use super::gemm::with_thread_scratch;
use super::geom::{ConvGeom, Dims};
use super::pack::im2col_channel;
use crate::matmul::gemm_into;
use crate::sgemm::computed_columns;

/// The smallest share of a per-image GEMM's columns wasted on padding its last panel for
/// which the images share a GEMM (a 7x7 output wastes 23%, 14x14 6%, 28x28 and 56x56
/// none).
const MIN_WASTE: f64 = 0.1;
/// The most unfolded input (bytes) of one group of images.
const GROUP_BYTES: usize = 16 << 20;

/// Whether an f32 convolution's forward runs here: one group, more than one image, and
/// per-image GEMMs that would waste at least [`MIN_WASTE`] of their columns.
pub(crate) fn applies(d: &Dims, g: &ConvGeom) -> bool {
    let p = d.p();
    g.groups == 1
        && d.n > 1
        && p > 0
        && crate::sgemm::available()
        && (computed_columns(p) - p) as f64 >= MIN_WASTE * computed_columns(p) as f64
}

/// `y` `(n, cout, oh, ow)` = the convolution of `x` with `w` `(cout, c, kh, kw)`, the
/// epilogue applied, as one GEMM per group of images.
///
/// # Panics
/// If a slice does not match `d`.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
    g: &ConvGeom,
) -> Vec<f32> {
    forward_in_groups(x, w, ep, (d, g), GROUP_BYTES)
}

/// [`forward`] with groups of images whose unfolded input takes at most `group_bytes`.
fn forward_in_groups(
    x: &[f32],
    w: &[f32],
    ep: Epilogue<'_, f32>,
    (d, g): (&Dims, &ConvGeom),
    group_bytes: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), d.n * d.chw(), "batched conv: input size");
    let (k, p, cout) = (d.k_all(), d.p(), d.cout);
    assert_eq!(w.len(), cout * k, "batched conv: weight size");
    let group = (group_bytes / (4 * k * p)).clamp(1, d.n);
    let threads = rayon::current_num_threads();
    let len = d.n * cout * p;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    let out = &mut y.spare_capacity_mut()[..len];
    with_thread_scratch((k + cout) * group * p, |scratch: &mut [f32]| {
        for first in (0..d.n).step_by(group) {
            let imgs = group.min(d.n - first);
            let cols_n = imgs * p;
            let (cols, yb) = scratch.split_at_mut(k * cols_n);
            let yb = &mut yb[..cout * cols_n];
            // Each input channel's rows for all images of the group, in parallel.
            let rows = d.kh * d.kw * cols_n;
            cols.par_chunks_mut(rows).enumerate().for_each(|(c, r)| {
                for i in 0..imgs {
                    let plane = &x[((first + i) * d.c + c) * d.h * d.w..][..d.h * d.w];
                    if d.direct(g) {
                        r[i * p..(i + 1) * p].copy_from_slice(plane);
                    } else {
                        im2col_channel(plane, d, g, &mut r[i * p..], cols_n);
                    }
                }
            });
            gemm_into(
                (cout, cols_n, k),
                yb,
                false,
                w,
                (k, 1),
                cols,
                (cols_n, 1),
                Parallelism::Rayon(threads),
            );
            // Each output plane from its image's columns, with the epilogue.
            let yb = &*yb;
            let planes = &mut out[first * cout * p..(first + imgs) * cout * p];
            planes.par_chunks_mut(p).enumerate().for_each(|(j, plane)| {
                let (i, co) = (j / cout, j % cout);
                let src = &yb[co * cols_n + i * p..][..p];
                for (o, v) in plane.iter_mut().zip(src) {
                    o.write(*v);
                }
                // SAFETY: every element of `plane` was just initialised, and
                // `MaybeUninit<f32>` has `f32`'s layout.
                let plane = unsafe { &mut *(plane as *mut [MaybeUninit<f32>] as *mut [f32]) };
                ep.image(first + i, cout * p).apply_in_place(co, plane);
            });
        }
    });
    // SAFETY: the groups' planes cover the first `len` values, each initialised above.
    unsafe { y.set_len(len) };
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// Against the per-image GEMM path (which the plain convolution tests check against
    /// f64 references): 1x1, padded 3x3 at stride 1 and 2, the epilogue, groups of images.
    #[test]
    fn matches_the_per_image_gemms() {
        for (n, c, cout, hw, k, s, pad) in [
            (3, 5, 7, 7, 1, 1, 0),
            (4, 6, 5, 7, 3, 1, 1),
            (2, 4, 3, 14, 3, 2, 1),
            (5, 3, 4, 13, 1, 2, 0),
        ] {
            let g = ConvGeom {
                padding: pad,
                stride: s,
                dilation: 1,
                groups: 1,
            };
            let d = Dims::new(&g, &[n, c, hw, hw], &[cout, c, k, k]).expect("valid shape");
            assert!(
                applies(&d, &g) || !crate::sgemm::available(),
                "{n}x{c}x{hw} k{k}"
            );
            let (x, w) = (values(n * c * hw * hw, 1), values(cout * c * k * k, 2));
            let (scale, shift) = (values(cout, 3), values(cout, 4));
            let residual = values(n * cout * d.p(), 5);
            for ep in [
                Epilogue::NONE,
                Epilogue {
                    scale: Some(&scale),
                    bias: Some(&shift),
                    relu: true,
                    residual: Some(&residual),
                },
            ] {
                let want = super::super::gemm::forward(&x, &w, ep, &d, &g);
                let got = forward(&x, &w, ep, &d, &g);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{n}x{c}x{hw} k{k} s{s}: {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Groups of two images and a last group of one, with the epilogue's residual.
    #[test]
    fn groups_of_images_agree() {
        let g = ConvGeom {
            padding: 1,
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        let (n, c, cout, hw) = (5, 6, 4, 7);
        let d = Dims::new(&g, &[n, c, hw, hw], &[cout, c, 3, 3]).expect("valid shape");
        let (x, w) = (values(n * c * hw * hw, 6), values(cout * c * 9, 7));
        let residual = values(n * cout * d.p(), 8);
        let ep = Epilogue {
            residual: Some(&residual),
            ..Epilogue::NONE
        };
        let want = super::super::gemm::forward(&x, &w, ep, &d, &g);
        let two_images = 2 * 4 * d.k_all() * d.p();
        let got = forward_in_groups(&x, &w, ep, (&d, &g), two_images);
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5 * scale, "{a} vs {b}");
        }
    }
}

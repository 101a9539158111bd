//! The forward (and so the input gradient) of narrow layers in blocks that stay in one
//! core's cache: each thread takes whole images, and an image a band of tile rows at a
//! time, through all three steps (input transform, GEMMs, output transform).
//!
//! The grouped forward ([`super::forward_into`]) runs each step over a group of images on
//! all threads, so its transformed input and products (each 36 values per tile and channel:
//! 7 MB for four 56x56 x 64-channel images) go out to memory between steps, and half of
//! what a thread reads was written by the other core. At 64 channels the GEMMs are short
//! (64 deep) and those passes were most of the time: in a 56x56 x 64-channel forward at
//! batch 8, the input transform took 36% of the samples and the GEMM kernel 29%.
//!
//! A band here is at most [`BAND_BYTES`] of transformed input and products, and the weights
//! of every position are packed once per call for the micro-kernel ([`PackedA`]), so a
//! band's 36 GEMMs pack only their few tiles. That needs the weights small enough to stay in
//! cache beside the band ([`WEIGHT_BYTES`]) and our GEMM ([`sgemm::available`]); wider
//! layers, a batch too small to give every thread images, and the serial forward keep the
//! grouped steps.

use rayon::prelude::*;

use super::{Algo, Tiles};
use crate::buffer::Slot;
use crate::conv::epilogue::Epilogue;
use crate::conv::gemm::with_thread_scratch;
use crate::conv::geom::Dims;
use crate::sgemm::{self, Operand, PackedA};

/// The most transformed weights (bytes, all positions) a blocked forward takes: 64 x 64
/// channels on F(4x4) are 590 KB.
const WEIGHT_BYTES: usize = 1 << 20;

/// The most transformed input and products (bytes) of one band of tile rows: with the
/// weights, within a core's 2 MB L2.
const BAND_BYTES: usize = 1 << 20;

/// Whether the forward of `d` on `A` runs in blocks on `threads` threads: our GEMM runs,
/// the weights are small ([`WEIGHT_BYTES`]), and the batch gives every thread images
/// (as many each, or at least four).
pub(super) fn pays<A: Algo>(d: &Dims, threads: usize) -> bool {
    let threads = threads.max(1);
    sgemm::available()
        && A::POS * d.c * d.cout * 4 <= WEIGHT_BYTES
        && d.n >= threads
        && (d.n.is_multiple_of(threads) || d.n >= 4 * threads)
}

/// The tile rows of one band for `pos` positions and tile rows `tw` tiles wide: as many as
/// [`BAND_BYTES`] holds, at least one (before the limit of the image's tile rows).
pub(super) fn band_rows_for(pos: usize, d: &Dims, tw: usize) -> usize {
    (BAND_BYTES / (pos * (d.c + d.cout) * 4 * tw).max(1)).max(1)
}

/// [`super::forward_into`] in blocks (see the module's notes), on all threads.
///
/// # Panics
/// If a slice does not match `d` (the caller checks), or [`sgemm::available`] is false.
pub(super) fn forward<A: Algo, S: Slot>(
    x: &[f32],
    u: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
    y: &mut [S],
) {
    let (c, cout) = (d.c, d.cout);
    let tiles = Tiles::of::<A>(d);
    let band = band_rows_for(A::POS, d, tiles.tw).min(tiles.th.max(1));
    // `u[co][ξ][ci]`: position ξ's weights are `cout x c`, rows `POS c` apart.
    let packed: Vec<PackedA> = (0..A::POS)
        .into_par_iter()
        .map(|xi| {
            let a = Operand {
                data: &u[xi * c..],
                rs: A::POS * c,
                cs: 1,
            };
            PackedA::new(a, cout, c)
        })
        .collect();
    let plane = d.p();
    let t_band = band * tiles.tw;
    let (v_len, m_len) = (c * A::POS * t_band, A::POS * cout * t_band);
    y.par_chunks_mut(cout * plane)
        .enumerate()
        .for_each(|(k, y_img)| {
            with_thread_scratch(v_len + m_len, |scratch: &mut [f32]| {
                let (v, m) = scratch.split_at_mut(v_len);
                let mut pp = Vec::new();
                for ty0 in (0..tiles.th).step_by(band) {
                    let bt = Tiles {
                        th: band.min(tiles.th - ty0),
                        ..tiles
                    };
                    let t = bt.per_image();
                    let mut rows = A::rows(bt);
                    // The input transform, `v[ci][ξ][t]` over the band's tiles.
                    let v = &mut v[..c * A::POS * t];
                    for (ci, vc) in v.chunks_exact_mut(A::POS * t).enumerate() {
                        let xp = &x[(k * c + ci) * d.h * d.w..][..d.h * d.w];
                        bt.pad_rows(xp, (d.h, d.w), A::M * ty0, &mut pp);
                        A::input_tiles(&mut rows, &pp, vc, (t, 0));
                    }
                    // One GEMM per position, `m[ξ][co][t]`.
                    let m = &mut m[..A::POS * cout * t];
                    for (xi, mx) in m.chunks_exact_mut(cout * t).enumerate() {
                        let b = Operand {
                            data: &v[xi * t..],
                            rs: A::POS * t,
                            cs: 1,
                        };
                        sgemm::sgemm_packed(&packed[xi], t, mx, false, b, 1);
                    }
                    // The output transform into the band's rows of every output plane.
                    let oy0 = A::M * ty0;
                    let h = (A::M * bt.th).min(d.h - oy0);
                    for (co, out) in y_img.chunks_exact_mut(plane).enumerate() {
                        let out = &mut out[oy0 * d.w..(oy0 + h) * d.w];
                        A::output_tiles(&mut rows, m, (co, cout, t, 0), out, (h, d.w));
                    }
                }
            });
            // SAFETY: the bands' output transforms wrote every value of the image.
            let y_img = unsafe { S::written(y_img) };
            ep.image(k, cout * plane).apply_planes(0, y_img, plane);
        });
}

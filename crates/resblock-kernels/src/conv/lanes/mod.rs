//! The forward of 3x3 convolutions (padding 1, stride 1 or 2) on AVX-512 (x86-64 only)
//! with the output channels in the vector lanes: a tile is up to 14 output pixels of one
//! row by 32 output channels ([`avx512::tile`]), the weights packed per block of 32 output
//! channels as `[ci][tap][32]`, the input values broadcast straight from the plain NCHW
//! input.
//!
//! The direct kernels of `conv/direct` put the pixels in the lanes, and at stride 2 their
//! vector loads need the input split into its four phases first (the polyphase layout):
//! that copy, the junk column it computes and the copy back of the flattened output were
//! 13% of the 64-to-128-channel 56x56 forward, and its tile, loading its inputs from L2 one
//! plane apart for every block of 8 output channels, ran at about 77% of the FMA peak. Here
//! a tile's input rows (3 per input channel, 2 P + 1 values each) stay in L1 over all the
//! output channel blocks, and the weights stream in order from L2.
//!
//! It applies ([`applies`]) where AVX-512 runs and the dispatch allows it
//! ([`crate::dispatch::Dispatch::channel_lanes`]), to whole blocks of 32 output channels
//! and, at stride 2, even input widths (so that no tap reads right of the row); the rest
//! keeps the direct or GEMM path. At stride 1 the caller takes Winograd where that applies.

//!
//! `mod.rs` the entry points and the input layouts, `pack.rs` the weights, `work.rs` the
//! work items, `avx512.rs` the tile.

mod avx512;
mod pack;
#[cfg(test)]
mod tests;
mod work;

use std::cell::RefCell;

pub(crate) use pack::Packed;

use avx512::CO;
use pack::{pack_weights, packs_per_block, Weights};
use work::{run, Out};

use super::epilogue::Epilogue;
use super::geom::{ConvGeom, Dims};

thread_local! {
    /// The calling thread's packed weights, kept between calls (up to 4.5 MiB for a
    /// 256-to-512-channel layer: a fresh buffer would be a fresh mapping every call).
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`forward`] takes this convolution: f32 (the caller's), a 3x3 kernel, stride 1
/// or 2 (with an even input width), padding 1, no dilation, one group, an input of at
/// least 2x2, whole blocks of 32 output channels, AVX-512 in use and the dispatch's
/// `direct_conv` and `channel_lanes` on.
pub(crate) fn applies(d: &Dims, g: &ConvGeom) -> bool {
    let dispatch = crate::dispatch::current();
    let stride_ok = match g.stride {
        1 => true,
        2 => d.w.is_multiple_of(2),
        _ => false,
    };
    crate::dispatch::avx512()
        && dispatch.direct_conv
        && dispatch.channel_lanes
        && stride_ok
        && (g.padding, g.dilation, g.groups) == (1, 1, 1)
        && (d.kh, d.kw) == (3, 3)
        && d.w >= 2
        && d.h >= 2
        && d.c > 0
        && d.cout.is_multiple_of(CO)
        && d.cout > 0
}

/// Where the input's values lie: image `ni`'s channel `ci`, row `iy`, column `ix` at
/// `ni * image + origin + ci * plane + iy * row + ix`. The plain NCHW input, or (stride 1)
/// a direct plan's padded layout with zero rows above and below each plane
/// (`zero_rows`: the taps of rows -1 and `h` are read there, not skipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) image: usize,
    pub(crate) origin: usize,
    pub(crate) plane: usize,
    pub(crate) row: usize,
    pub(crate) zero_rows: bool,
}

impl Layout {
    /// The plain input of `d`.
    pub(crate) fn plain(d: &Dims) -> Layout {
        Layout {
            image: d.chw(),
            origin: 0,
            plane: d.h * d.w,
            row: d.w,
            zero_rows: false,
        }
    }
}

/// The convolution `(n, c, h, w) * (cout, c, 3, 3)`, stride `stride`, padding 1, finished
/// by `ep`; the kernel `w`, or `packed` beforehand ([`Packed`]).
///
/// # Panics
/// If [`applies`] does not hold (the caller checks it), or an operand or the epilogue's
/// parts are shorter than the dimensions say.
pub(crate) fn forward(
    x: &[f32],
    w: (&[f32], Option<&[f32]>),
    ep: Epilogue<'_, f32>,
    d: &Dims,
    stride: usize,
) -> Vec<f32> {
    forward_in((x, Layout::plain(d)), w, ep, d, stride)
}

/// [`forward`] from an input laid out as `layout` says.
///
/// # Panics
/// As [`forward`], and if a padded layout comes at stride 2, its rows are narrower than
/// the input's or its images do not hold their planes (and, with `zero_rows`, the rows
/// above and below).
pub(crate) fn forward_in(
    (x, layout): (&[f32], Layout),
    (w, packed): (&[f32], Option<&[f32]>),
    ep: Epilogue<'_, f32>,
    d: &Dims,
    stride: usize,
) -> Vec<f32> {
    check((x, layout), ep, d, stride);
    PACKED.with(|cell| {
        let mut own = Vec::new();
        // Busy when this thread runs a nested call while it waits on its own work items.
        let mut held = cell.try_borrow_mut();
        let buf = match held.as_mut() {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        let wk = match packed {
            Some(p) => Weights::Packed(p),
            None if packs_per_block(d) => Weights::Raw(w),
            None => Weights::Packed(pack_weights(w, d.cout, d.c, buf)),
        };
        wk.check(d);
        // SAFETY: the work items write every value of the output (each row of pixels of
        // each image, for every block of output channels).
        unsafe {
            crate::buffer::vec_written_by(d.n * d.cout * d.p(), |y| {
                run(
                    (x, layout),
                    wk,
                    ep,
                    (d, stride),
                    (Out(y.as_mut_ptr().cast()), true),
                );
            })
        }
    })
}

/// [`forward_in`] into `out` (`n * cout * oh * ow` values, each written) with the weights
/// packed beforehand ([`Packed`]), on the calling thread alone unless `parallel`: for a
/// caller that runs its own images in parallel (a training op's input gradient).
///
/// # Panics
/// As [`forward_in`], and if `out` or `wk` is not as long as the shapes say.
pub(crate) fn forward_into(
    x: (&[f32], Layout),
    wk: &[f32],
    (ep, d, stride): (Epilogue<'_, f32>, &Dims, usize),
    out: &mut [std::mem::MaybeUninit<f32>],
    parallel: bool,
) {
    check(x, ep, d, stride);
    let wk = Weights::Packed(wk);
    wk.check(d);
    assert_eq!(out.len(), d.n * d.cout * d.p(), "lanes: output length");
    run(
        x,
        wk,
        ep,
        (d, stride),
        (Out(out.as_mut_ptr().cast()), parallel),
    );
}

/// Panics unless [`forward_in`]'s operands fit the shapes (see there).
fn check((x, layout): (&[f32], Layout), ep: Epilogue<'_, f32>, d: &Dims, stride: usize) {
    assert!(
        crate::dispatch::avx512(),
        "lanes: AVX-512 kernel called without AVX-512"
    );
    assert!((d.kh, d.kw) == (3, 3) && d.cout.is_multiple_of(CO));
    match stride {
        1 => assert_eq!((d.oh, d.ow), (d.h, d.w)),
        2 => assert!(d.w.is_multiple_of(2) && (d.oh, d.ow) == ((d.h - 1) / 2 + 1, d.w / 2)),
        _ => panic!("lanes: stride {stride}"),
    }
    assert!(
        x.len() >= d.n * layout.image,
        "lanes: input shorter than its shape"
    );
    if layout != Layout::plain(d) {
        // The last value any tap reads: row `h` (or `h - 1`), column `w - 1` (`RIGHT` skips
        // column `w`), of the last channel.
        let rows = if layout.zero_rows { d.h } else { d.h - 1 };
        let last = layout.origin + (d.c - 1) * layout.plane + rows * layout.row + d.w - 1;
        assert!(
            stride == 1 && layout.row >= d.w && layout.origin > layout.row && last < layout.image,
            "lanes: a padded input layout that does not hold the input: {layout:?}"
        );
    }
    let per_co = |v: Option<&[f32]>| v.is_none_or(|v| v.len() >= d.cout);
    assert!(
        per_co(ep.scale) && per_co(ep.bias),
        "lanes: short scale or bias"
    );
    assert!(
        ep.residual.is_none_or(|r| r.len() >= d.n * d.cout * d.p()),
        "lanes: short residual"
    );
}

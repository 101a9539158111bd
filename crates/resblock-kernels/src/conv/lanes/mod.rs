//! The forward of 3x3 convolutions (padding 1, stride 1 or 2) on AVX-512 or AVX2 (x86-64
//! only) with the output channels in the vector lanes: a tile is up to 14 output pixels of
//! one row by 32 output channels on AVX-512 (`avx512.rs`; up to 16 pixels by 16 channels
//! where a layer's channels are not whole blocks of 32), up to 6 by 16 on AVX2
//! (`avx2.rs`), the weights packed per block of a tile's output channels (`co`) as
//! `[ci][tap][co]`, the input values broadcast straight from the plain NCHW input.
//!
//! The direct kernels of `conv/direct` put the pixels in the lanes, and at stride 2 their
//! vector loads need the input split into its four phases first (the polyphase layout):
//! that copy, the junk column it computes and the copy back of the flattened output were
//! 13% of the 64-to-128-channel 56x56 forward, and its tile, loading its inputs from L2 one
//! plane apart for every block of 8 output channels, ran at about 77% of the FMA peak. Here
//! a tile's input rows (3 per input channel, 2 P + 1 values each) stay in L1 over all the
//! output channel blocks, and the weights stream in order from L2.
//!
//! It applies ([`applies`]) where AVX-512 or AVX2 runs and the dispatch allows it
//! ([`crate::dispatch::Dispatch::channel_lanes`]), to whole blocks of the tile's output
//! channels and, at stride 2, even input widths (so that no tap reads right of the row);
//! the rest keeps the direct or GEMM path. At stride 1 the caller takes Winograd where
//! that applies. A stride-1 input gradient is such a convolution too, of `dY` with the
//! flipped kernel ([`input_grad`]): the direct backward's and the fused conv + BN op's run
//! here where it applies.

//!
//! `mod.rs` the entry points, the choice of tile and the input layouts, `pack.rs` the
//! weights, `work.rs` the work items, `tile.rs` what every tile takes, `avx512.rs` and
//! `avx2.rs` the tiles.

mod avx2;
mod avx512;
mod pack;
#[cfg(test)]
mod tests;
mod tile;
mod work;

use std::cell::RefCell;

pub(crate) use pack::Packed;

use avx2::Avx2;
use avx512::Avx512;
use pack::{pack_weights, packs_per_block, Weights};
use tile::Kernel;
use work::{run, Out};

use super::epilogue::Epilogue;
use super::geom::{ConvGeom, Dims};
use crate::conv::direct::Isa;

/// A tile of [`forward`]: AVX-512's of 32 output channels ([`Avx512`]`<2>`) or of 16
/// (`Avx512<1>`), or AVX2's of 16 ([`Avx2`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    Avx512,
    Avx512Half,
    Avx2,
}

impl Tile {
    /// The tile for a layer of `cout` output channels on `isa` (the tile that runs is the
    /// one for [`Isa::detect`]: the widest the dispatch allows and the CPU has): on AVX-512
    /// the 32-channel tile where the channels are whole blocks of 32, else the 16-channel
    /// one (CIFAR ResNets' 16-channel stage, 48 channels).
    pub(crate) fn for_layer(isa: Isa, cout: usize) -> Tile {
        match isa {
            Isa::Avx512 if cout.is_multiple_of(Avx512::<2>::CO) => Tile::Avx512,
            Isa::Avx512 => Tile::Avx512Half,
            Isa::Avx2 => Tile::Avx2,
        }
    }

    /// The output channels of one block of the tile.
    pub(crate) fn co(self) -> usize {
        match self {
            Tile::Avx512 => Avx512::<2>::CO,
            Tile::Avx512Half => Avx512::<1>::CO,
            Tile::Avx2 => Avx2::CO,
        }
    }
}

thread_local! {
    /// The calling thread's packed weights, kept between calls (up to 4.5 MiB for a
    /// 256-to-512-channel layer: a fresh buffer would be a fresh mapping every call).
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`forward`] takes this convolution: f32 (the caller's), a 3x3 kernel, stride 1
/// or 2 (with an even input width), padding 1, no dilation, one group, an input of at
/// least 2x2, whole blocks of the tile's output channels (multiples of 16, see
/// [`Tile::for_layer`]; for AVX-512's 16-channel tile, at least [`HALF_TILE_MIN_C`] input
/// channels), a tile for this CPU ([`Isa::detect`]) and the dispatch's `direct_conv` and
/// `channel_lanes` on.
pub(crate) fn applies(d: &Dims, g: &ConvGeom) -> bool {
    let Some(isa) = Isa::detect() else {
        return false;
    };
    let dispatch = crate::dispatch::current();
    let stride_ok = match g.stride {
        1 => true,
        2 => d.w.is_multiple_of(2),
        _ => false,
    };
    dispatch.direct_conv
        && dispatch.channel_lanes
        && stride_ok
        && (g.padding, g.dilation, g.groups) == (1, 1, 1)
        && (d.kh, d.kw) == (3, 3)
        && d.w >= 2
        && d.h >= 2
        && d.c > 0
        && d.cout > 0
        && match Tile::for_layer(isa, d.cout) {
            Tile::Avx512Half => d.cout.is_multiple_of(16) && d.c >= HALF_TILE_MIN_C,
            tile => d.cout.is_multiple_of(tile.co()),
        }
}

/// The fewest input channels for AVX-512's 16-channel tile: on a stem of one input channel
/// (`train`'s MNIST ResNet: 128 x 1 x 28x28 -> 16) it took 0.32 ms against the direct
/// kernel's 0.19, on three the same time (0.46 against 0.47 ms at 128 x 3 x 32x32); from
/// 16 channels on (CIFAR ResNets' first stage, 128 x 16 x 32x32 -> 16) 1.83 against 2.25.
const HALF_TILE_MIN_C: usize = 16;

/// The input gradient of the stride-1 convolution `d` (3x3, padding 1) on [`forward_into`]
/// where that applies: `dX = dY * W` flipped and transposed, a 3x3 padding-1 convolution
/// of `dY` with `d.c` output channels (whole blocks of the tile's). The flipped kernel
/// packed and that convolution's dimensions for one image (`1 x cout x oh x ow`).
pub(crate) fn input_grad(w: &[f32], d: &Dims, g: &ConvGeom) -> Option<(Packed, Dims)> {
    if g.stride != 1 {
        return None;
    }
    let bd = Dims::new(g, &[1, d.cout, d.oh, d.ow], &[d.c, d.cout, d.kh, d.kw]).ok()?;
    let same = (bd.oh, bd.ow) == (d.h, d.w);
    (same && applies(&bd, g)).then(|| (Packed::flipped(w, d.cout, d.c), bd))
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
/// by `ep`; the kernel `w`, and `packed` beforehand where there is ([`Packed`]: used where
/// it was packed for the tile that runs).
///
/// # Panics
/// If [`applies`] does not hold (the caller checks it), or an operand or the epilogue's
/// parts are shorter than the dimensions say.
pub(crate) fn forward(
    x: &[f32],
    w: (&[f32], Option<&Packed>),
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
    x: (&[f32], Layout),
    w: (&[f32], Option<&Packed>),
    ep: Epilogue<'_, f32>,
    d: &Dims,
    stride: usize,
) -> Vec<f32> {
    forward_on_tile(Tile::for_layer(tile_isa(), d.cout), x, w, ep, d, stride)
}

/// [`forward_in`] on `tile` (the tests run every tile the CPU has).
fn forward_on_tile(
    tile: Tile,
    x: (&[f32], Layout),
    w: (&[f32], Option<&Packed>),
    ep: Epilogue<'_, f32>,
    d: &Dims,
    stride: usize,
) -> Vec<f32> {
    match tile {
        Tile::Avx512 => forward_with::<Avx512<2>>(x, w, ep, d, stride),
        Tile::Avx512Half => forward_with::<Avx512<1>>(x, w, ep, d, stride),
        Tile::Avx2 => forward_with::<Avx2>(x, w, ep, d, stride),
    }
}

/// The instruction set of the tiles that run.
///
/// # Panics
/// Without one (the callers check [`applies`]).
fn tile_isa() -> Isa {
    Isa::detect().expect("lanes: called on a CPU or dispatch without AVX2")
}

/// [`forward_in`] on the tile `K`.
///
/// # Panics
/// As [`forward_in`], and if `K`'s instruction set does not run.
fn forward_with<K: Kernel>(
    (x, layout): (&[f32], Layout),
    (w, packed): (&[f32], Option<&Packed>),
    ep: Epilogue<'_, f32>,
    d: &Dims,
    stride: usize,
) -> Vec<f32> {
    check::<K>((x, layout), ep, d, stride);
    PACKED.with(|cell| {
        let mut own = Vec::new();
        // Busy when this thread runs a nested call while it waits on its own work items.
        let mut held = cell.try_borrow_mut();
        let buf = match held.as_mut() {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        let wk = match packed.and_then(|p| p.values_for(K::CO)) {
            Some(p) => Weights::Packed(p),
            None if packs_per_block(d) => Weights::Raw(w),
            None => Weights::Packed(pack_weights(w, (d.cout, K::CO), d.c, buf)),
        };
        wk.check(d);
        // SAFETY: the work items write every value of the output (each row of pixels of
        // each image, for every block of output channels).
        unsafe {
            crate::buffer::vec_written_by(d.n * d.cout * d.p(), |y| {
                run::<K>(
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
/// packed beforehand ([`Packed`], for the tile that runs), on the calling thread alone
/// unless `parallel`: for a caller that runs its own images in parallel (a training op's
/// input gradient).
///
/// # Panics
/// As [`forward_in`], and if `out` or `wk` is not as long as the shapes say or `wk` was
/// packed for another tile.
pub(crate) fn forward_into(
    x: (&[f32], Layout),
    wk: &Packed,
    (ep, d, stride): (Epilogue<'_, f32>, &Dims, usize),
    out: &mut [std::mem::MaybeUninit<f32>],
    parallel: bool,
) {
    fn on<K: Kernel>(
        x: (&[f32], Layout),
        wk: &Packed,
        (ep, d, stride): (Epilogue<'_, f32>, &Dims, usize),
        out: &mut [std::mem::MaybeUninit<f32>],
        parallel: bool,
    ) {
        check::<K>(x, ep, d, stride);
        let wk = Weights::Packed(
            wk.values_for(K::CO)
                .expect("lanes: weights packed for another tile"),
        );
        wk.check(d);
        assert_eq!(out.len(), d.n * d.cout * d.p(), "lanes: output length");
        run::<K>(
            x,
            wk,
            ep,
            (d, stride),
            (Out(out.as_mut_ptr().cast()), parallel),
        );
    }
    match Tile::for_layer(tile_isa(), d.cout) {
        Tile::Avx512 => on::<Avx512<2>>(x, wk, (ep, d, stride), out, parallel),
        Tile::Avx512Half => on::<Avx512<1>>(x, wk, (ep, d, stride), out, parallel),
        Tile::Avx2 => on::<Avx2>(x, wk, (ep, d, stride), out, parallel),
    }
}

/// Panics unless [`forward_in`]'s operands fit the shapes (see there).
fn check<K: Kernel>((x, layout): (&[f32], Layout), ep: Epilogue<'_, f32>, d: &Dims, stride: usize) {
    assert!(
        K::ISA.supported(),
        "lanes: a tile called where its instruction set does not run"
    );
    assert!((d.kh, d.kw) == (3, 3) && d.cout.is_multiple_of(K::CO));
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

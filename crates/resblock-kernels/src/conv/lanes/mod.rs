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

mod avx512;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

use rayon::prelude::*;

use avx512::{Dst, Part, Src, CO, MAX_P};

use super::epilogue::Epilogue;
use super::geom::{ConvGeom, Dims};
use crate::aligned::aligned_mut;

/// Packed weights of at least this many floats are packed on all threads.
const PARALLEL_PACK: usize = 1 << 16;

thread_local! {
    /// The calling thread's packed weights, kept between calls (up to 4.5 MiB for a
    /// 256-to-512-channel layer: a fresh buffer would be a fresh mapping every call).
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`forward`] takes this convolution: f32 (the caller's), a 3x3 kernel, stride 1
/// or 2 (with an even input width), padding 1, no dilation, one group, whole blocks of 32
/// output channels, AVX-512 in use and the dispatch's `direct_conv` and `channel_lanes` on.
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

/// The tiles of an output row `ow` wide: `(first pixel, pixels)`, as few as fit
/// [`MAX_P`] and as even as can be (28: 14 + 14; 16: 8 + 8).
fn tiles(ow: usize) -> Vec<(usize, usize)> {
    let count = ow.div_ceil(MAX_P);
    let (base, extra) = (ow / count, ow % count);
    let mut first = 0;
    (0..count)
        .map(|t| {
            let p = base + usize::from(t < extra);
            let tile = (first, p);
            first += p;
            tile
        })
        .collect()
}

/// Weights packed for [`forward`] once (a frozen kernel's form): the packed values from a
/// cache line on.
pub(crate) struct Packed {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Packed {
    /// `w` (`cout x c x 3 x 3`) packed as [`pack_weights`] packs it.
    pub(crate) fn new(w: &[f32], cout: usize, c: usize) -> Packed {
        let mut buf = Vec::new();
        let len = pack_weights(w, cout, c, &mut buf).len();
        // `aligned_mut` returns the slice from the buffer's first cache line.
        let start = buf.as_ptr().align_offset(64).min(15);
        Packed { buf, start, len }
    }

    /// The input gradient's kernel of a stride-1 convolution with kernel `w` (`cout x c x
    /// 3 x 3`): `w` flipped in both axes with its channels swapped (`c x cout x 3 x 3`),
    /// packed.
    pub(crate) fn flipped(w: &[f32], cout: usize, c: usize) -> Packed {
        assert_eq!(w.len(), cout * c * 9, "lanes: weights of the wrong length");
        let mut f = vec![0f32; w.len()];
        for co in 0..cout {
            for ci in 0..c {
                for t in 0..9 {
                    f[(ci * cout + co) * 9 + 8 - t] = w[(co * c + ci) * 9 + t];
                }
            }
        }
        Packed::new(&f, c, cout)
    }

    pub(crate) fn values(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// `w` (`cout x c x 3 x 3`) packed per block of [`CO`] output channels as
/// `[block][ci * 9 + tap][CO]` into `dst` (from a cache line on).
fn pack_weights<'d>(w: &[f32], cout: usize, c: usize, dst: &'d mut Vec<f32>) -> &'d [f32] {
    let k = c * 9;
    assert_eq!(w.len(), cout * k, "lanes: weights of the wrong length");
    let dst = aligned_mut(dst, cout * k);
    let pack = |(b, block): (usize, &mut [f32])| {
        let rows: [&[f32]; CO] = std::array::from_fn(|j| &w[(b * CO + j) * k..][..k]);
        crate::interleave::interleave_rows(rows, block);
    };
    if cout * k >= PARALLEL_PACK && rayon::current_num_threads() > 1 {
        dst.par_chunks_exact_mut(CO * k).enumerate().for_each(pack);
    } else {
        dst.chunks_exact_mut(CO * k).enumerate().for_each(pack);
    }
    dst
}

/// The output's base pointer, shared by the work items (each writes its own values).
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the work items that share it write disjoint elements.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

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

/// Input channels per pass over the output channel blocks: 16 keep a block's weights for
/// them (18 KiB) and the input rows a work item reads for them in L1 together.
const CHANNELS_PER_PASS: usize = 16;
/// The output pixels a work item aims at: its rows read each weight once from L2 (`36 *
/// cin * cout` bytes for `9 * cin * cout / 32` cycles of FMAs per pixel), so 56 pixels
/// read about 2.3 bytes per cycle.
const PIXELS_PER_ITEM: usize = 56;

thread_local! {
    /// Each worker's partial sums, kept between calls.
    static PARTS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `len` items split into `parts` runs as even as can be: run `i`'s range.
fn share(len: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / parts, len % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// The work items of [`forward`]: runs of output rows of one image, about
/// [`PIXELS_PER_ITEM`] pixels each, over all the output channel blocks, or, where there
/// are too few to share among the threads (a batch-1 7x7 output), over part of them.
fn run(
    x: (&[f32], Layout),
    wk: Weights<'_>,
    ep: Epilogue<'_, f32>,
    (d, stride): (&Dims, usize),
    (out, parallel): (Out, bool),
) {
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let blocks = d.cout / CO;
    let row_runs = row_runs(d);
    let runs = d.n * row_runs;
    let groups = if threads <= 1 || runs >= 4 * threads {
        1
    } else {
        (4 * threads).div_ceil(runs).min(blocks)
    };
    let tiles = tiles(d.ow);
    let item = |it: usize| {
        let (run, g) = (it / groups, it % groups);
        let (ni, r) = (run / row_runs, run % row_runs);
        let work = Work {
            stride,
            ni,
            rows: share(d.oh, row_runs, r),
            blocks: share(blocks, groups, g),
        };
        PARTS.with(|scratch| {
            let (parts, block) = &mut *scratch.borrow_mut();
            work.run(x, (wk, block), ep, d, out, &tiles, parts);
        });
    };
    if threads > 1 {
        (0..runs * groups).into_par_iter().for_each(item);
    } else {
        (0..runs * groups).for_each(item);
    }
}

/// The weights as [`run`] takes them: packed whole ([`pack_weights`]), or as they are, each
/// work item packing a block's weights for a pass as it comes to them.
#[derive(Clone, Copy)]
enum Weights<'a> {
    Packed(&'a [f32]),
    Raw(&'a [f32]),
}

impl Weights<'_> {
    /// Panics unless the weights are as long as `d` says.
    fn check(&self, d: &Dims) {
        let (Weights::Packed(w) | Weights::Raw(w)) = self;
        assert_eq!(w.len(), d.cout * d.c * 9, "lanes: weights' length");
    }
}

/// Whether [`forward_in`] leaves unpacked weights to the work items ([`Weights::Raw`]): where
/// few of them read each block of output channels (at batch 1, up to 14x14 outputs). Packed
/// whole, the weights go out to memory and come back; at batch 1 that was an eighth of a
/// ResNet-18 inference.
fn packs_per_block(d: &Dims) -> bool {
    d.n * row_runs(d) <= RAW_MAX_RUNS
}

/// The runs of output rows of one image that the work items take: about
/// [`PIXELS_PER_ITEM`] pixels each.
fn row_runs(d: &Dims) -> usize {
    d.oh.div_ceil(PIXELS_PER_ITEM.div_ceil(d.ow).min(d.oh))
}

/// The most runs of rows (over the batch) for which the work items pack their own blocks.
const RAW_MAX_RUNS: usize = 4;

/// One work item: output rows `rows` of image `ni`, channel blocks `blocks`, at `stride`.
struct Work {
    stride: usize,
    ni: usize,
    rows: std::ops::Range<usize>,
    blocks: std::ops::Range<usize>,
}

impl Work {
    /// The item's tiles, [`CHANNELS_PER_PASS`] input channels at a time: per pass, per
    /// channel block, every tile of every row (the block's weights for the pass stay in
    /// L1), the sums kept in `parts` between passes and finished into the output by the
    /// last.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        x: (&[f32], Layout),
        (wk, block): (Weights<'_>, &mut Vec<f32>),
        ep: Epilogue<'_, f32>,
        d: &Dims,
        out: Out,
        tiles: &[(usize, usize)],
        parts: &mut Vec<f32>,
    ) {
        let p = d.p();
        let (x, layout) = x;
        let image = &x[self.ni * layout.image..(self.ni + 1) * layout.image];
        let ep = ep.image(self.ni, d.cout * p);
        let k = d.c * 9;
        let slot = MAX_P * CO;
        let nb = self.blocks.len();
        let passes = d.c.div_ceil(CHANNELS_PER_PASS);
        let parts = if passes > 1 {
            aligned_mut(parts, self.rows.len() * tiles.len() * nb * slot)
        } else {
            &mut []
        };
        let ptr = |v: Option<&[f32]>, off: usize| v.map_or(std::ptr::null(), |v| v[off..].as_ptr());
        let s = self.stride;
        for pass in 0..passes {
            let ch0 = pass * CHANNELS_PER_PASS;
            let cc = CHANNELS_PER_PASS.min(d.c - ch0);
            for (bi, b) in self.blocks.clone().enumerate() {
                // The block's weights for the pass: `[ci][tap][CO]`, `cc` channels.
                let wb: &[f32] = match wk {
                    Weights::Packed(wk) => &wk[(b * k + ch0 * 9) * CO..][..cc * 9 * CO],
                    Weights::Raw(w) => {
                        let len = cc * 9;
                        let rows: [&[f32]; CO] =
                            std::array::from_fn(|j| &w[(b * CO + j) * k + ch0 * 9..][..len]);
                        let block = aligned_mut(block, len * CO);
                        crate::interleave::interleave_rows(rows, block);
                        block
                    }
                };
                for (ri, oy) in self.rows.clone().enumerate() {
                    // Kernel rows `ky0..ky1` read input rows `s oy - 1 + ky` inside `0..h`
                    // (or the zero rows of a padded layout).
                    let (ky0, ky1) = if layout.zero_rows {
                        (0, 3)
                    } else {
                        (usize::from(oy == 0), 3.min(d.h + 1 - s * oy))
                    };
                    let w = &wb[ky0 * 3 * CO..];
                    for (t, &(ox0, pw)) in tiles.iter().enumerate() {
                        // Channel `ch0`, row `s oy - 1 + ky0`, column `s ox0 - 1` (one
                        // before the row where `ox0 = 0`, or its padding column).
                        let row = layout.row;
                        let at = layout.origin + ch0 * layout.plane + (s * oy + ky0) * row;
                        let src = Src {
                            x: image
                                .as_ptr()
                                .wrapping_add(at + s * ox0)
                                .wrapping_sub(row + 1),
                            plane: layout.plane,
                            w: row,
                            rows: ky1 - ky0,
                        };
                        let at_part = ((ri * tiles.len() + t) * nb + bi) * slot;
                        let part = Part {
                            from: if pass == 0 {
                                std::ptr::null()
                            } else {
                                parts[at_part..].as_ptr()
                            },
                            to: if pass + 1 == passes {
                                std::ptr::null_mut()
                            } else {
                                parts[at_part..].as_mut_ptr()
                            },
                        };
                        let first = b * CO * p + oy * d.ow + ox0;
                        let dst = Dst {
                            out: out.0.wrapping_add(self.ni * d.cout * p + first),
                            plane: p,
                            finish: !ep.is_identity(),
                            scale: ptr(ep.scale, b * CO),
                            bias: ptr(ep.bias, b * CO),
                            residual: ptr(ep.residual, first),
                            relu: ep.relu,
                        };
                        // SAFETY: AVX-512 runs (`forward`'s assert). Reads: pixel `i < pw` of
                        // kernel row `r < rows` reads `x[ci * plane + r * row + s i + kx]`
                        // from `src.x`, that is input channel `ch0 + ci < c` of this image,
                        // row `s oy - 1 + ky0 + r` in `0..h` (`ky0`, `ky1` above; -1 and `h`
                        // on a padded layout, inside the image by `forward_in`'s check) and column
                        // `s (ox0 + i) + kx - 1` in `0..w` (column -1 only for `ox0 = 0`,
                        // `i = 0`, `kx = 0`, which `LEFT` skips; column `w` only at stride 1
                        // for the row's last pixel and `kx = 2`, which `RIGHT` skips: at
                        // stride 2 `w` is even, so `2 (ow - 1) + 1 = w - 1`); the weights
                        // hold `k * CO` floats per block, the pass's from channel `ch0`,
                        // kernel row `ky0` on; `parts` holds a `MAX_P * CO` slot per (row,
                        // tile, block) of the item. Writes: channel `b * CO + j` (`b < cout
                        // / CO`), pixel `oy * ow + ox0 + i < p` of image `ni < n` in the
                        // `n * cout * p` output, and the residual (checked as long as the
                        // output) and scale and bias (`cout` long) at the same places.
                        let edges = (ox0 == 0, s == 1 && ox0 + pw == d.ow);
                        unsafe { tile((pw, s), edges, src, cc, w.as_ptr(), part, dst) };
                    }
                }
            }
        }
    }
}

/// [`avx512::tile`] for `pw` pixels at stride `s`, with `LEFT` and `RIGHT` as `edges`
/// say (`RIGHT` only at stride 1).
///
/// # Safety
/// As [`avx512::tile`], with `1 <= pw <= MAX_P`.
unsafe fn tile(
    (pw, s): (usize, usize),
    edges: (bool, bool),
    src: Src,
    c: usize,
    wk: *const f32,
    part: Part,
    d: Dst,
) {
    macro_rules! widths {
        ($($p:literal)*) => {
            match (pw, s, edges) {
                $(
                    // SAFETY (each arm): the caller's contract.
                    ($p, 2, (true, false)) => unsafe { avx512::tile::<$p, 2, true, false>(src, c, wk, part, d) },
                    ($p, 2, (false, false)) => unsafe { avx512::tile::<$p, 2, false, false>(src, c, wk, part, d) },
                    ($p, 1, (true, true)) => unsafe { avx512::tile::<$p, 1, true, true>(src, c, wk, part, d) },
                    ($p, 1, (true, false)) => unsafe { avx512::tile::<$p, 1, true, false>(src, c, wk, part, d) },
                    ($p, 1, (false, true)) => unsafe { avx512::tile::<$p, 1, false, true>(src, c, wk, part, d) },
                    ($p, 1, (false, false)) => unsafe { avx512::tile::<$p, 1, false, false>(src, c, wk, part, d) },
                )*
                _ => unreachable!("lanes: a tile of {pw} pixels at stride {s}, edges {edges:?}"),
            }
        };
    }
    widths!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
}

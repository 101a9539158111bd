//! The forward of 3x3 stride-2 convolutions (padding 1) on AVX-512 (x86-64 only) with the output
//! channels in the vector lanes: a tile is up to 14 output pixels of one row by 32 output
//! channels ([`avx512::tile`]), the weights packed per block of 32 output channels as
//! `[ci][tap][32]`, the input values broadcast straight from the plain NCHW input.
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
//! ([`crate::dispatch::Dispatch::s2_lanes`]), to even input widths (so that no tap reads
//! right of the row) and whole blocks of 32 output channels; the rest keeps the direct or
//! GEMM path.

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

/// Whether [`forward`] takes this convolution: f32 (the caller's), a 3x3 kernel, stride 2,
/// padding 1, no dilation, one group, an even input width, whole blocks of 32 output
/// channels, AVX-512 in use and the dispatch's `direct_conv` and `s2_lanes` on.
pub(crate) fn applies(d: &Dims, g: &ConvGeom) -> bool {
    let dispatch = crate::dispatch::current();
    crate::dispatch::avx512()
        && dispatch.direct_conv
        && dispatch.s2_lanes
        && (g.stride, g.padding, g.dilation, g.groups) == (2, 1, 1, 1)
        && (d.kh, d.kw) == (3, 3)
        && d.w.is_multiple_of(2)
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

/// `w` (`cout x c x 3 x 3`) packed per block of [`CO`] output channels as
/// `[block][ci * 9 + tap][CO]` into `dst` (from a cache line on).
fn pack_weights<'d>(w: &[f32], cout: usize, c: usize, dst: &'d mut Vec<f32>) -> &'d [f32] {
    let k = c * 9;
    assert_eq!(w.len(), cout * k, "s2_lanes: weights of the wrong length");
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

/// The convolution `(n, c, h, w) * (cout, c, 3, 3)`, stride 2, padding 1, finished by `ep`.
///
/// # Panics
/// If [`applies`] does not hold (the caller checks it), or an operand or the epilogue's
/// parts are shorter than the dimensions say.
pub(crate) fn forward(x: &[f32], w: &[f32], ep: Epilogue<'_, f32>, d: &Dims) -> Vec<f32> {
    assert!(
        crate::dispatch::avx512(),
        "s2_lanes: AVX-512 kernel called without AVX-512"
    );
    assert!((d.kh, d.kw) == (3, 3) && d.w.is_multiple_of(2) && d.cout.is_multiple_of(CO));
    assert_eq!((d.oh, d.ow), ((d.h - 1) / 2 + 1, d.w / 2));
    assert!(
        x.len() >= d.n * d.chw(),
        "s2_lanes: input shorter than its shape"
    );
    let p = d.p();
    let len = d.n * d.cout * p;
    let per_co = |v: Option<&[f32]>| v.is_none_or(|v| v.len() >= d.cout);
    assert!(
        per_co(ep.scale) && per_co(ep.bias),
        "s2_lanes: short scale or bias"
    );
    assert!(
        ep.residual.is_none_or(|r| r.len() >= len),
        "s2_lanes: short residual"
    );
    PACKED.with(|cell| {
        let mut own = Vec::new();
        // Busy when this thread runs a nested call while it waits on its own work items.
        let mut held = cell.try_borrow_mut();
        let buf = match held.as_mut() {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        let wk = pack_weights(w, d.cout, d.c, buf);
        // SAFETY: the work items write every value of the output (each row of pixels of
        // each image, for every block of output channels).
        unsafe {
            crate::buffer::vec_written_by(len, |y| {
                run(x, wk, ep, d, Out(y.as_mut_ptr().cast()));
            })
        }
    })
}

/// Input channels per pass over the output channel blocks: 16 keep a block's weights for
/// them (18 KiB) and the input rows a work item reads for them in L1 together.
const CHANNELS_PER_PASS: usize = 16;
/// The output pixels a work item aims at: its rows read each weight once from L2, so a
/// work item of at least 32 pixels reads at most 4 bytes of weights per cycle of FMAs.
const PIXELS_PER_ITEM: usize = 56;

thread_local! {
    /// Each worker's partial sums, kept between calls.
    static PARTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
fn run(x: &[f32], wk: &[f32], ep: Epilogue<'_, f32>, d: &Dims, out: Out) {
    let threads = rayon::current_num_threads();
    let blocks = d.cout / CO;
    let row_runs = d.oh.div_ceil(PIXELS_PER_ITEM.div_ceil(d.ow).min(d.oh));
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
            ni,
            rows: share(d.oh, row_runs, r),
            blocks: share(blocks, groups, g),
        };
        PARTS.with(|parts| work.run(x, wk, ep, d, out, &tiles, &mut parts.borrow_mut()));
    };
    if threads > 1 {
        (0..runs * groups).into_par_iter().for_each(item);
    } else {
        (0..runs * groups).for_each(item);
    }
}

/// One work item: output rows `rows` of image `ni`, channel blocks `blocks`.
struct Work {
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
        x: &[f32],
        wk: &[f32],
        ep: Epilogue<'_, f32>,
        d: &Dims,
        out: Out,
        tiles: &[(usize, usize)],
        parts: &mut Vec<f32>,
    ) {
        let p = d.p();
        let image = &x[self.ni * d.chw()..(self.ni + 1) * d.chw()];
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
        for pass in 0..passes {
            let ch0 = pass * CHANNELS_PER_PASS;
            let cc = CHANNELS_PER_PASS.min(d.c - ch0);
            for (bi, b) in self.blocks.clone().enumerate() {
                for (ri, oy) in self.rows.clone().enumerate() {
                    // Kernel rows `ky0..ky1` read input rows `2 oy - 1 + ky` inside `0..h`.
                    let ky0 = usize::from(oy == 0);
                    let ky1 = 3.min(d.h + 1 - 2 * oy);
                    let w = &wk[(b * k + ch0 * 9 + ky0 * 3) * CO..];
                    for (t, &(ox0, pw)) in tiles.iter().enumerate() {
                        // Channel `ch0`, row `2 oy - 1 + ky0`, column `2 ox0 - 1` (one
                        // before the row where `ox0 = 0`).
                        let at = (ch0 * d.h + 2 * oy + ky0 - 1) * d.w + 2 * ox0;
                        let src = Src {
                            x: image.as_ptr().wrapping_add(at).wrapping_sub(1),
                            plane: d.h * d.w,
                            w: d.w,
                            rows: ky1 - ky0,
                        };
                        let s = ((ri * tiles.len() + t) * nb + bi) * slot;
                        let part = Part {
                            from: if pass == 0 {
                                std::ptr::null()
                            } else {
                                parts[s..].as_ptr()
                            },
                            to: if pass + 1 == passes {
                                std::ptr::null_mut()
                            } else {
                                parts[s..].as_mut_ptr()
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
                        // kernel row `r < rows` reads `x[ci * plane + r * w + 2 i + kx]` from
                        // `src.x`, that is input channel `ch0 + ci < c` of this image, row
                        // `2 oy - 1 + ky0 + r` in `0..h` (`ky0`, `ky1` above) and column
                        // `2 (ox0 + i) + kx - 1` in `0..w` (`w` even; column -1 only for
                        // `ox0 = 0`, `i = 0`, `kx = 0`, which `LEFT` skips); the weights
                        // hold `k * CO` floats per block, the pass's from channel `ch0`,
                        // kernel row `ky0` on; `parts` holds a `MAX_P * CO` slot per (row,
                        // tile, block) of the item. Writes: channel `b * CO + j` (`b < cout
                        // / CO`), pixel `oy * ow + ox0 + i < p` of image `ni < n` in the
                        // `n * cout * p` output, and the residual (checked as long as the
                        // output) and scale and bias (`cout` long) at the same places.
                        unsafe { tile(pw, ox0 == 0, src, cc, w.as_ptr(), part, dst) };
                    }
                }
            }
        }
    }
}

/// [`avx512::tile`] for `pw` pixels, with `LEFT` where the tile starts its row.
///
/// # Safety
/// As [`avx512::tile`], with `1 <= pw <= MAX_P`.
unsafe fn tile(pw: usize, left: bool, s: Src, c: usize, wk: *const f32, part: Part, d: Dst) {
    macro_rules! widths {
        ($($p:literal)*) => {
            match (pw, left) {
                $(
                    // SAFETY: the caller's contract.
                    ($p, true) => unsafe { avx512::tile::<$p, true>(s, c, wk, part, d) },
                    // SAFETY: the caller's contract.
                    ($p, false) => unsafe { avx512::tile::<$p, false>(s, c, wk, part, d) },
                )*
                _ => unreachable!("s2_lanes: a tile of {pw} pixels"),
            }
        };
    }
    widths!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
}

//! The work items of [`super::forward`]: runs of output rows of one image over the
//! output channel blocks, [`CHANNELS_PER_PASS`] input channels at a time, tile by tile.

use std::cell::RefCell;

use rayon::prelude::*;

use super::pack::{interleave_block, Weights};
use super::tile::{Dst, Kernel, Part, Src};
use super::Layout;
use crate::aligned::aligned_mut;
use crate::conv::epilogue::Epilogue;
use crate::conv::geom::Dims;

/// Input channels per pass over the output channel blocks: 16 keep a block's weights for them
/// (18 KiB at 32 channels a block, 9 at 16) and the input rows a work item reads for them in L1
/// together.
const CHANNELS_PER_PASS: usize = 16;

/// The output pixels a work item aims at: its rows read each weight once from L2 (`36 *
/// cin * cout` bytes for `9 * cin * cout / 32` cycles of FMAs per pixel), so 56 pixels
/// read about 2.3 bytes per cycle.
const PIXELS_PER_ITEM: usize = 56;

thread_local! {
    /// Each worker's partial sums, and the weights of the block and pass it is on where it
    /// packs them itself ([`Weights::Raw`]), kept between calls.
    static PARTS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `len` items split into `parts` runs as even as can be: run `i`'s range.
fn share(len: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / parts, len % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// The runs of output rows of one image that the work items take: about
/// [`PIXELS_PER_ITEM`] pixels each.
pub(super) fn row_runs(d: &Dims) -> usize {
    d.oh.div_ceil(PIXELS_PER_ITEM.div_ceil(d.ow).min(d.oh))
}

/// The output's base pointer, shared by the work items (each writes its own values).
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: the work items that share it write disjoint elements.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// The work items of [`super::forward`]: runs of output rows of one image, about
/// [`PIXELS_PER_ITEM`] pixels each, over all the output channel blocks, or, where there
/// are too few to share among the threads (a batch-1 7x7 output), over part of them.
pub(super) fn run<K: Kernel>(
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
    let blocks = d.cout / K::CO;
    let row_runs = row_runs(d);
    let runs = d.n * row_runs;
    let groups = if threads <= 1 || runs >= 4 * threads {
        1
    } else {
        (4 * threads).div_ceil(runs).min(blocks)
    };
    let tiles = tiles(d.ow, (K::MAX_P, K::MAX_P_ROW));
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
            work.run::<K>(x, (wk, block), ep, d, out, &tiles, parts);
        });
    };
    if threads > 1 {
        (0..runs * groups).into_par_iter().for_each(item);
    } else {
        (0..runs * groups).for_each(item);
    }
}

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
    fn run<K: Kernel>(
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
        let (co, slot) = (K::CO, K::MAX_P * K::CO);
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
                // The block's weights for the pass: `[ci][tap][co]`, `cc` channels.
                let wb: &[f32] = match wk {
                    Weights::Packed(wk) => &wk[(b * k + ch0 * 9) * co..][..cc * 9 * co],
                    Weights::Raw(w) => {
                        let block = aligned_mut(block, cc * 9 * co);
                        interleave_block(w, (k, co), (b * co, ch0 * 9), block);
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
                    let w = &wb[ky0 * 3 * co..];
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
                        // The tile's partial sums (one pointer for both ends: the tile
                        // reads them, then writes them).
                        let sums = if passes > 1 {
                            parts[((ri * tiles.len() + t) * nb + bi) * slot..].as_mut_ptr()
                        } else {
                            std::ptr::null_mut()
                        };
                        let part = Part {
                            from: if pass == 0 {
                                std::ptr::null()
                            } else {
                                sums.cast_const()
                            },
                            to: if pass + 1 == passes {
                                std::ptr::null_mut()
                            } else {
                                sums
                            },
                        };
                        let first = b * co * p + oy * d.ow + ox0;
                        let dst = Dst {
                            out: out.0.wrapping_add(self.ni * d.cout * p + first),
                            plane: p,
                            finish: !ep.is_identity(),
                            scale: ptr(ep.scale, b * co),
                            bias: ptr(ep.bias, b * co),
                            residual: ptr(ep.residual, first),
                            relu: ep.relu,
                        };
                        // SAFETY: `K`'s instruction set runs (`check`'s assert, the caller's).
                        // Reads: pixel `i < pw` of kernel row `r < rows` reads `x[ci * plane +
                        // r * row + s i + kx]` from `src.x`, that is input channel `ch0 + ci <
                        // c` of this image, row `s oy - 1 + ky0 + r` in `0..h` (`ky0`, `ky1`
                        // above; -1 and `h` on a padded layout, inside the image by
                        // `forward_in`'s check) and column `s (ox0 + i) + kx - 1` in `0..w`
                        // (column -1 only for `ox0 = 0`, `i = 0`, `kx = 0`, which `LEFT` skips;
                        // column `w` only at stride 1 for the row's last pixel and `kx = 2`,
                        // which `RIGHT` skips: at stride 2 `w` is even, so `2 (ow - 1) + 1 = w
                        // - 1`); the pass's weights `wb` hold `cc * 9 * co` floats, read from
                        // kernel row `ky0` on; `parts` holds a `MAX_P * co` slot per (row,
                        // tile, block) of the item where there are several passes. Writes:
                        // channel `b * co + j` (`b < cout / co`), pixel `oy * ow + ox0 + i < p`
                        // of image `ni < n` in the `n * cout * p` output, and the residual
                        // (checked as long as the output) and scale and bias (`cout` long) at
                        // the same places. `1 <= pw <= MAX_P`, `MAX_P_ROW` for a whole row
                        // ([`tiles`]).
                        let edges = (ox0 == 0, s == 1 && ox0 + pw == d.ow);
                        unsafe { K::tile((pw, s), edges, src, cc, w.as_ptr(), part, dst) };
                    }
                }
            }
        }
    }
}

/// The tiles of an output row `ow` wide: `(first pixel, pixels)`, as few as fit
/// `max_p` pixels and as even as can be (`max_p` 14: 28 as 14 + 14, 16 as 8 + 8), and at
/// least two where the row is wider than `max_row` (see [`Kernel::MAX_P_ROW`]).
pub(super) fn tiles(ow: usize, (max_p, max_row): (usize, usize)) -> Vec<(usize, usize)> {
    let count = ow.div_ceil(max_p).max(if ow > max_row { 2 } else { 1 });
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

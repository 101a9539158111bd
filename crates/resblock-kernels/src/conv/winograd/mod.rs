//! Winograd convolutions for f32 3x3 convolutions with stride 1 and padding 1 between wide
//! layers (at least [`MIN_CHANNELS`] on each side): F(2x2, 3x3) ([`f2`], 16 multiplies per
//! 2x2 outputs and input channel where the direct kernel does 36) and F(4x4, 3x3) ([`f4`],
//! 36 per 4x4 outputs where the direct kernel does 144).
//!
//! Lavin & Gray's minimal filtering: with `B^T`, `G`, `A^T` the F(m, 3) matrices, one m x m
//! output tile is `A^T [ sum_ci (G g G^T) ⊙ (B^T d B) ] A` for its (m + 2) x (m + 2) input
//! tile `d` (neighbouring tiles overlap by 2). Summing over input channels at each of the
//! `(m + 2)^2` positions `ξ` of the transformed tile is a GEMM, so a convolution becomes
//!
//! 1. the weights transformed once per call, `u[co][ξ][ci]`;
//! 2. the input transformed, `v[ci][ξ][t]` over the tiles `t` of a group of images;
//! 3. one GEMM per position, `m[ξ] (cout x tiles) = u[.][ξ][.] . v[.][ξ][.]`, on
//!    [`gemm_into`] (our own GEMM where it runs), one per task;
//! 4. the output transform, each output plane written once with the epilogue applied while
//!    it is in cache.
//!
//! Steps 2-4 run either each over a group of images on all threads ([`grouped`]), or, for
//! narrow layers whose weights stay in cache, per thread on a band of one image's tile rows
//! at a time, so that the transformed input and products never leave the core ([`blocked`]).
//!
//! [`forward`] and the input gradient run F(4x4, 3x3) ([`F4`]) on wide outputs with many
//! pixels per weight, F(2x2, 3x3) ([`F2`]) otherwise; the weight gradient runs the dual of
//! F(2x2, 3x3), see [`backward`]. F(2x2)'s transforms multiply only by
//! halves (exact in binary); F(4x4)'s by 2, 4, 5, 8 and sixths, which costs about one
//! decimal digit: both are tested against an f64 direct convolution.
//!
//! The transforms run over whole rows of tiles: the vertical half combines the `m + 2` image
//! rows element by element, the horizontal half reads the result's columns split by their
//! phase (column mod `m`), so every loop is a plain vectorisable loop over a row's tiles.

use gemm::Parallelism;
use rayon::prelude::*;

use super::epilogue::Epilogue;
use super::frozen::Forms;
use super::gemm::{with_thread_scratch, with_thread_scratch_in, ScratchMemory};
use super::geom::{ConvGeom, Dims};
use crate::buffer::Slot;
use crate::matmul::gemm_into;

mod blocked;
mod f2;
mod f4;
pub(crate) mod plane;
#[cfg(test)]
mod tests;

pub(crate) use f2::F2;
pub(crate) use f4::F4;

/// One Winograd algorithm F(m x m, 3x3): its tile and its transforms, each over a row of
/// tiles of one plane.
pub(crate) trait Algo {
    /// The side of an output tile (its input tile's is `M + 2`).
    const M: usize;
    /// The positions of a transformed tile, `(M + 2)^2`.
    const POS: usize;
    /// Buffers for one row of tiles.
    type Rows;

    /// The row buffers for tile rows of `tiles`.
    fn rows(tiles: Tiles) -> Self::Rows;

    /// `G g G^T` of one 3x3 kernel `g` (row-major) into `u[..POS]`. Inlined into
    /// [`Algo::weight_row`]'s SIMD loops, so no closures (they would be compiled without
    /// the level's features).
    fn weight_tile(g: &[f32; 9], u: &mut [f32; 36]);

    /// One output channel's weights `k` `(c, 3, 3)` transformed into `dst[ξ * c + ci]`,
    /// compiled for the widest SIMD level (a `with_simd!` of [`weight_lanes`]).
    fn weight_row(k: &[f32], dst: &mut [f32], c: usize);

    /// The transformed input tiles of one plane, read from its padded copy `pp` (see
    /// [`Tiles::pad`]): position `ξ` of the plane's tile `t` into `v[ξ * t_all + t0 + t]`,
    /// `at` being `(t_all, t0)`.
    fn input_tiles(rows: &mut Self::Rows, pp: &[f32], v: &mut [f32], at: (usize, usize));

    /// Output channel `co` of one image from the GEMMs' output `m[ξ][co][t]` (`cout` rows
    /// of `t_all` per position; the image's tiles from `t0`) into its plane `out` `(h, w)`;
    /// `at` is `(co, cout, t_all, t0)`, `hw` is `(h, w)`.
    fn output_tiles<S: Slot>(
        rows: &mut Self::Rows,
        m: &[f32],
        at: (usize, usize, usize, usize),
        out: &mut [S],
        hw: (usize, usize),
    );
}
/// The fewest input and output channels Winograd runs for: below it the GEMMs are too
/// small to pay for the transforms.
pub(crate) const MIN_CHANNELS: usize = 64;
/// The fewest 2x2 output tiles (over the batch) Winograd runs for: the weight transform
/// writes 16 values per weight pair of channels, which a batch-1 7x7 or 14x14 output (16 or
/// 49 tiles) does not pay back (ResNet-18 at batch 1 ran 10% slower on Winograd there).
const MIN_TILES: usize = 100;
/// The narrowest output Winograd runs for: the transforms loop over the tiles of a row,
/// and rows of 4 tiles (an 8x8 or 7x7 output) spend more on loop set-up than they save
/// (a ResNet-20 step ran 10% slower with its 8x8 layers on Winograd).
const MIN_WIDTH: usize = 14;
/// The most transformed input (bytes) of one group of images: groups keep the transformed
/// input and the GEMMs' output bounded however large the batch. Each group costs a pass of
/// its own (the weight gradient writes and sums a `(16, cout, c)` product per group), so
/// the bound is wide enough that a batch of 8 at 56x56 x 64 channels or 14x14 x 256 channels
/// is one group: at 8 MB both were two (4 + 4 and 5 + 3 images), and the 64-channel
/// forward ran 3-4% slower, the 256-channel backward 12-15% ([`group_of`]).
const GROUP_BYTES: usize = 16 << 20;

/// The fewest input channels for which a forward runs on Winograd below [`MIN_WIDTH`]
/// ([`forward_applies`]): with 256 channels or more the GEMMs are long enough to carry the
/// short rows of a 7x7 output (ResNet-18's 512-channel 7x7 layer at batch 8: 12.2 ms
/// direct, 10.8 on F(2x2)).
const NARROW_MIN_CHANNELS: usize = 256;
/// The fewest output pixels (over the batch) per weight for which [`forward`] runs
/// F(4x4, 3x3) rather than F(2x2, 3x3): its weight transform writes 36 values per pair of
/// channels, not 16, which a 28x28 output at batch 1 does not pay back (1.09 ms on
/// F(4x4), 0.9 on F(2x2) for 128 channels) and a 56x56 one does (0.80 against 0.87 ms).
const F4_MIN_PIXELS: usize = 3000;
/// [`F4_MIN_PIXELS`] for a frozen kernel, whose transform is made once: a 28x28 output at
/// batch 1 runs F(4x4, 3x3). Chosen with the rest of the frozen path, not timed alone: a
/// trial with it and the one-tile threshold together took ResNet-18 at batch 1, folded,
/// from 19.5 to 15.1 ms.
const FROZEN_F4_MIN_PIXELS: usize = 700;
/// The narrowest output F(4x4, 3x3) runs for: a 14x14 output is cut into 4x4 tiles that
/// cover 16x16 (on a 256-channel layer at batch 8 F(4x4) was no faster than F(2x2)).
const F4_MIN_WIDTH: usize = 28;

/// Whether Winograd pays on this CPU for every shape the other thresholds allow: not where
/// 512-bit FMAs run at full width ([`crate::peak::full_width_fma`]), where it pays only for
/// [`forward_pays_at_full_width`]'s and [`backward_pays_at_full_width`]'s shapes;
/// `RESBLOCK_WINOGRAD=1` (or, in this crate's tests, [`force_for_tests`]) asks for it
/// everywhere anyway.
fn pays_on_this_cpu() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    #[cfg(test)]
    if FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    *PAYS.get_or_init(|| {
        std::env::var("RESBLOCK_WINOGRAD").is_ok_and(|v| v == "1") || !crate::peak::full_width_fma()
    })
}

/// Whether the convolution op's forward pays on Winograd for `d` on a CPU that runs 512-bit
/// FMAs at full width, where the direct kernels reach 75-80% of the FMA peak: for outputs
/// at least [`MIN_WIDTH`] wide (no 7x7 outputs, [`NARROW_MIN_CHANNELS`]), the other
/// thresholds as elsewhere. Measured on the Intel Xeon host (two 512-bit FMA units;
/// `winograd-ab`, interleaved minima of 10-20 calls), with the input transform reading
/// whole vectors (before it, 64 channels at 56x56 and 128 at 28x28 at batch 1 were no
/// faster or slower on Winograd):
///
/// | layer (forward) | direct | Winograd |
/// |---|---|---|
/// | 64 ch 56x56, batch 8 (F(4x4)) | 5.86 / 5.80 ms | 5.14 / 5.17 ms |
/// | 64 ch 56x56, batch 1 (F(4x4)) | 0.84 ms | 0.69 ms |
/// | 128 ch 28x28, batch 8 (F(4x4)) | 6.33 ms | 4.51 ms |
/// | 128 ch 28x28, batch 1 (F(2x2)) | 0.81 / 0.79 ms | 0.75 / 0.75 ms |
/// | 256 ch 14x14, batch 8 (F(2x2)) | 7.26 ms | 5.67 ms |
/// | 256 ch 14x14, batch 2 (98 tiles, below [`MIN_TILES`]) | 1.98 ms | 2.04 ms |
/// | 512 ch 7x7, batch 8 (F(2x2)) | 7.23 ms | 8.77 ms |
///
/// A frozen kernel at batch 1 (ResNet-18 folded, interleaved minima of 40 calls, two runs):
/// 13.4 / 12.8 ms against 15.0 / 13.6 ms direct.
fn forward_pays_at_full_width(d: &Dims) -> bool {
    d.ow >= MIN_WIDTH
}

/// The fewest input and output channels for which the backward pays on Winograd where
/// 512-bit FMAs run at full width ...
const FULL_WIDTH_BACKWARD_MIN_CHANNELS: usize = 128;
/// ... with at least this many 2x2 output tiles over the batch (as [`MIN_TILES`]).
const FULL_WIDTH_BACKWARD_MIN_TILES: usize = 300;

/// Whether the convolution op's backward (both gradients for a given `dY`) and the fused
/// conv + BatchNorm training op pay on Winograd for `d` where 512-bit FMAs run at full
/// width ([`applies`]): from [`FULL_WIDTH_BACKWARD_MIN_CHANNELS`] channels with
/// [`FULL_WIDTH_BACKWARD_MIN_TILES`] tiles (the weight gradient, F(3x3, 2x2), gains less
/// than the forward). Measured as [`forward_pays_at_full_width`], backward: 128 channels
/// 28x28 batch 8 9.97 against 13.08 ms, 256 channels 14x14 batch 8 13.3 against 15.6 ms,
/// but 64 channels 56x56 batch 8 11.1-12.0 against 10.9-11.8 ms and batch 32 50.2 against
/// 48.0 ms. The ResNet-50 batch-32 training step (its fused ops; `step-profile`, two
/// interleaved pairs, fastest steps): 3.80 / 4.46 s against 4.43 / 4.92 s direct.
fn backward_pays_at_full_width(d: &Dims) -> bool {
    d.c >= FULL_WIDTH_BACKWARD_MIN_CHANNELS
        && d.cout >= FULL_WIDTH_BACKWARD_MIN_CHANNELS
        && d.ow >= MIN_WIDTH
        && d.n * Tiles::of::<F2>(d).per_image() >= FULL_WIDTH_BACKWARD_MIN_TILES
}

/// The narrowest output for which the convolution op's input gradient alone pays on
/// Winograd where 512-bit FMAs run at full width (see [`input_grad_applies`]).
const FULL_WIDTH_INPUT_GRAD_MIN_WIDTH: usize = 56;

/// Whether the convolution op's backward, where [`applies`] does not hold (512-bit FMAs at
/// full width, fewer than [`FULL_WIDTH_BACKWARD_MIN_CHANNELS`] channels; elsewhere it holds
/// for these shapes and comes first), takes its input gradient from [`input_grad`] and its
/// weight gradient from the direct kernels: for outputs at least
/// [`FULL_WIDTH_INPUT_GRAD_MIN_WIDTH`] wide, the other thresholds as elsewhere. The
/// input gradient is a forward of `dY` (F(4x4, 3x3) at those sizes), which pays there as
/// the forward does; F(3x3, 2x2)'s weight gradient does not. Measured (`winograd-ab`,
/// interleaved minima of 15-30 calls), 64 channels, backward against the direct one: 56x56
/// batch 8 9.54-10.11 against 10.43-11.24 ms, batch 2 2.84 against 2.93 ms, batch 1 2.07
/// against 2.44 ms; but 28x28 batch 8 3.21 against 3.15 ms and 14x14 batch 4 0.70 against
/// 0.51 ms.
pub(crate) fn input_grad_applies(d: &Dims, g: &ConvGeom) -> bool {
    input_grad_pays(d) && shape_allows(d, g, MIN_TILES, |_| true)
}

/// [`input_grad_applies`]'s width rule.
fn input_grad_pays(d: &Dims) -> bool {
    d.ow >= FULL_WIDTH_INPUT_GRAD_MIN_WIDTH
}

/// Set by [`force_for_tests`].
#[cfg(test)]
static FORCED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets Winograd run wherever its shapes allow, on any CPU, for the rest of this test
/// process (so that its tests cover it on every host; every path is correct, so other
/// tests running meanwhile only change which one they check).
#[cfg(test)]
pub(crate) fn force_for_tests() {
    FORCED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether a convolution runs on Winograd: allowed ([`crate::dispatch::Dispatch::winograd`]),
/// 3x3, stride 1, padding 1, no dilation, one group, with enough channels, a wide enough
/// output and enough tiles.
pub(crate) fn applies(d: &Dims, g: &ConvGeom) -> bool {
    d.ow >= MIN_WIDTH && shape_allows(d, g, MIN_TILES, backward_pays_at_full_width)
}

/// [`applies`] for the convolution op's forward (`path::forward_f32`): also 7x7 outputs of
/// wide layers ([`NARROW_MIN_CHANNELS`]), measured faster at inference, and where 512-bit
/// FMAs run at full width [`forward_pays_at_full_width`]'s shapes. The backward and the
/// fused training ops keep to [`applies`] (at full width, [`backward_pays_at_full_width`]).
/// A `frozen` kernel's transform is made once ([`super::frozen`]), so any number of tiles
/// pays.
pub(crate) fn forward_applies(d: &Dims, g: &ConvGeom, frozen: bool) -> bool {
    let min_tiles = if frozen { 1 } else { MIN_TILES };
    (d.ow >= MIN_WIDTH || d.c >= NARROW_MIN_CHANNELS)
        && shape_allows(d, g, min_tiles, forward_pays_at_full_width)
}

/// [`applies`] but for the width, with at least `min_tiles` F(2x2) tiles over the batch;
/// where Winograd does not pay for every shape ([`pays_on_this_cpu`]), only for those of
/// `full_width_pays`.
fn shape_allows(
    d: &Dims,
    g: &ConvGeom,
    min_tiles: usize,
    full_width_pays: fn(&Dims) -> bool,
) -> bool {
    crate::dispatch::current().winograd
        && (pays_on_this_cpu() || full_width_pays(d))
        && (d.kh, d.kw) == (3, 3)
        && d.n * Tiles::of::<F2>(d).per_image() >= min_tiles
        && (g.stride, g.padding, g.dilation, g.groups) == (1, 1, 1, 1)
        && d.c >= MIN_CHANNELS
        && d.cout >= MIN_CHANNELS
}

/// Whether [`forward`] (and the input gradient), or with `frozen` [`forward_frozen`], runs
/// F(4x4, 3x3) for `d`.
fn uses_f4(d: &Dims, frozen: bool) -> bool {
    let min_pixels = if frozen {
        FROZEN_F4_MIN_PIXELS
    } else {
        F4_MIN_PIXELS
    };
    d.ow >= F4_MIN_WIDTH && d.n * d.p() >= min_pixels
}

/// The weights `(cout, c, 3, 3)` transformed for algorithm `A`,
/// `u[co][ξ][ci] = (G g[co][ci] G^T)[ξ]`.
pub(crate) fn transform_weights<A: Algo>(w: &[f32], cout: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; cout * A::POS * c];
    transform_weights_into::<A>(w, cout, c, &mut u);
    u
}

/// [`transform_weights`] into `u`, every value of which it writes.
fn transform_weights_into<A: Algo>(w: &[f32], cout: usize, c: usize, u: &mut [f32]) {
    assert_eq!(w.len(), cout * c * 9, "winograd: weight size");
    assert_eq!(
        u.len(),
        cout * A::POS * c,
        "winograd: transformed weight size"
    );
    let one = |(co, dst): (usize, &mut [f32])| A::weight_row(&w[co * c * 9..][..c * 9], dst, c);
    if u.len() >= crate::sgemm::PARALLEL_PACK && rayon::current_num_threads() > 1 {
        u.par_chunks_mut(A::POS * c).enumerate().for_each(one);
    } else {
        u.chunks_mut(A::POS * c).enumerate().for_each(one);
    }
}

/// Input channels per step of [`weight_lanes`].
const WEIGHT_LANES: usize = 16;

/// [`Algo::weight_row`]'s loop: [`WEIGHT_LANES`] input channels at a time through local
/// arrays, so each position's values are stored contiguously (one kernel at a time
/// scattered 16 or 36 values `c` apart).
#[inline(always)]
pub(crate) fn weight_lanes<A: Algo, const POS: usize>(k: &[f32], dst: &mut [f32], c: usize) {
    const L: usize = WEIGHT_LANES;
    let mut ci = 0;
    while ci < c {
        let n = L.min(c - ci);
        let mut g = [[0f32; 9]; L];
        for (l, g) in g.iter_mut().enumerate().take(n) {
            *g = k[(ci + l) * 9..][..9].try_into().expect("9 values");
        }
        let mut u = [[0f32; L]; POS];
        for (l, g) in g.iter().enumerate() {
            let mut tile = [0f32; 36];
            A::weight_tile(g, &mut tile);
            for (xi, u) in u.iter_mut().enumerate() {
                u[l] = tile[xi];
            }
        }
        for (xi, u) in u.iter().enumerate() {
            if n == L {
                // A fixed-size copy: one of `n` values is a `memcpy` call per position
                // (4% of a 256-channel 14x14 forward).
                let row: &mut [f32; L] =
                    (&mut dst[xi * c + ci..][..L]).try_into().expect("L values");
                *row = *u;
            } else {
                dst[xi * c + ci..][..n].copy_from_slice(&u[..n]);
            }
        }
        ci += L;
    }
}

/// Runs `f(i, chunk)` on every `len`-long chunk of `data`, on all threads when `parallel`.
fn each_chunk<T: Send>(
    parallel: bool,
    data: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    each_chunk_with(parallel, data, len, || (), |_, i, c| f(i, c));
}

/// [`each_chunk`] with a state made by `init` once per run of chunks on one thread (rayon's
/// `for_each_init`), not once per chunk: the transforms' buffers.
fn each_chunk_with<T: Send, S>(
    parallel: bool,
    data: &mut [T],
    len: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        data.par_chunks_mut(len)
            .enumerate()
            .for_each_init(&init, |s, (i, c)| f(s, i, c));
    } else {
        let mut s = init();
        data.chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(&mut s, i, c));
    }
}

/// The tiles of one image: rows and columns of m x m output tiles.
#[derive(Clone, Copy)]
pub(crate) struct Tiles {
    m: usize,
    th: usize,
    tw: usize,
}

impl Tiles {
    fn of<A: Algo>(d: &Dims) -> Tiles {
        Tiles {
            m: A::M,
            th: d.oh.div_ceil(A::M),
            tw: d.ow.div_ceil(A::M),
        }
    }

    /// The width of a padded plane: the image with a zero column before it and as many
    /// after as make `tw + 1` groups of `m` (the last tile's input reaches 2 columns past
    /// its output).
    fn padded_width(self) -> usize {
        self.m * (self.tw + 1)
    }

    fn per_image(self) -> usize {
        self.th * self.tw
    }

    /// Plane `(h, w)` into `pp` with its zero border: `m th + 2` rows (and a vector's worth)
    /// of [`Tiles::padded_width`], image column `x` at `x + 1`, row `y` at `y + 1`, zero
    /// elsewhere.
    fn pad(self, plane: &[f32], hw: (usize, usize), pp: &mut Vec<f32>) {
        self.pad_rows(plane, hw, 0, pp);
    }

    /// [`Tiles::pad`]'s rows `first..first + m th + 2` of plane `(h, w)`, for the `th` tile
    /// rows from tile row `first / m` (a band of [`blocked`]'s): padded row `r` is image row
    /// `first + r - 1`, zero where that is outside the image. The columns outside the image
    /// are zero-filled when `pp` takes this length, and never written after.
    fn pad_rows(self, plane: &[f32], (h, w): (usize, usize), first: usize, pp: &mut Vec<f32>) {
        let pw = self.padded_width();
        let rows = self.m * self.th + 2;
        // A vector's worth past the last row: the input transform reads whole vectors
        // (F(4x4) 2 values past the row's end at least) and discards what it makes of the
        // values past it.
        let len = rows * pw + plane::LANES;
        if pp.len() != len {
            pp.clear();
            pp.resize(len, 0.0);
        }
        for r in 0..rows {
            let dst = &mut pp[r * pw + 1..][..w];
            match (first + r).checked_sub(1).filter(|&y| y < h) {
                Some(y) => dst.copy_from_slice(&plane[y * w..][..w]),
                None => dst.fill(0.0),
            }
        }
    }
}

/// `y` `(n, cout, h, w)` = the convolution of `x` `(n, c, h, w)` with the weights `u`
/// (from [`transform_weights`] for `A`), the epilogue `ep` applied. With `parallel`, on all
/// threads, in blocks per thread where those pay ([`blocked`]), else each step over a group
/// of images on all threads ([`grouped`]); otherwise on this one (a worker of an outer
/// parallel loop).
///
/// # Panics
/// If a slice does not match `d`, or `d` is not a convolution Winograd runs (`applies`).
pub(crate) fn forward_into<A: Algo, S: Slot>(
    x: &[f32],
    u: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
    y: &mut [S],
    parallel: bool,
) {
    assert!(
        (d.kh, d.kw) == (3, 3) && (d.oh, d.ow) == (d.h, d.w),
        "winograd: a 3x3 'same' convolution"
    );
    assert_eq!(x.len(), d.n * d.chw(), "winograd: input size");
    assert_eq!(
        u.len(),
        d.cout * A::POS * d.c,
        "winograd: transformed weight size"
    );
    assert_eq!(y.len(), d.n * d.cout * d.p(), "winograd: output size");
    if parallel && blocked::pays::<A>(d, rayon::current_num_threads()) {
        blocked::forward::<A, S>(x, u, ep, d, y);
    } else {
        grouped::<A, S>(x, u, ep, d, y, parallel);
    }
}

/// [`forward_into`] a group of images at a time, each step over the group on all threads
/// when `parallel`.
fn grouped<A: Algo, S: Slot>(
    x: &[f32],
    u: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
    y: &mut [S],
    parallel: bool,
) {
    let tiles = Tiles::of::<A>(d);
    let tp = tiles.per_image();
    let group = group_of(A::POS * tp * d.c * 4, d.n);
    let t_group = group * tp;
    // The transformed input and the GEMMs' output in this thread's scratch memory, both
    // wholly written before they are read: zero-filling fresh buffers was 5% of a
    // 256-channel layer's time.
    let (v_len, m_len) = (d.c * A::POS * t_group, A::POS * d.cout * t_group);
    with_thread_scratch(v_len + m_len, |scratch: &mut [f32]| {
        let (v, m) = scratch.split_at_mut(v_len);
        for first in (0..d.n).step_by(group) {
            let imgs = group.min(d.n - first);
            let t_all = imgs * tp;
            let (v, m) = (
                &mut v[..d.c * A::POS * t_all],
                &mut m[..A::POS * d.cout * t_all],
            );
            // The input transform, one input channel of the group per task.
            transform_inputs::<A>(x, d, (first, imgs), v, parallel);
            // One GEMM per position.
            let (c, cout) = (d.c, d.cout);
            let v = &*v;
            each_chunk(parallel, m, cout * t_all, |xi, mx| {
                gemm_into(
                    (cout, t_all, c),
                    mx,
                    false,
                    &u[xi * c..],
                    (A::POS * c, 1),
                    &v[xi * t_all..],
                    (A::POS * t_all, 1),
                    Parallelism::None,
                );
            });
            // The output transform and the epilogue, one output plane per task.
            let plane = d.p();
            let y_group = &mut y[first * cout * plane..(first + imgs) * cout * plane];
            let m = &*m;
            let rows = || A::rows(tiles);
            each_chunk_with(parallel, y_group, plane, rows, |rows, i, out| {
                let (k, co) = (i / cout, i % cout);
                let t0 = k * tp;
                A::output_tiles(rows, m, (co, cout, t_all, t0), out, (d.h, d.w));
                // SAFETY: `output_tiles` wrote every value of the plane.
                let out = unsafe { S::written(out) };
                ep.image(first + k, cout * plane).apply_in_place(co, out);
            });
        }
    });
}

/// The images per group of a batch of `n` whose transformed input takes `per_image` bytes an
/// image: as few groups as [`GROUP_BYTES`] allows, of equal size but for the last (8 images
/// in at most 5 a group are 4 + 4, not 5 + 3, so no group is a short pass of its own).
fn group_of(per_image: usize, n: usize) -> usize {
    let most = (GROUP_BYTES / per_image.max(1)).clamp(1, n.max(1));
    n.max(1).div_ceil(n.max(1).div_ceil(most))
}

/// The input transform of images `first..first + imgs` of `x` `(n, c, h, w)` into `v`
/// `[ci][ξ][t]`, one input channel per task.
fn transform_inputs<A: Algo>(
    x: &[f32],
    d: &Dims,
    (first, imgs): (usize, usize),
    v: &mut [f32],
    parallel: bool,
) {
    let tiles = Tiles::of::<A>(d);
    let t_all = imgs * tiles.per_image();
    let init = || (A::rows(tiles), Vec::new());
    each_chunk_with(parallel, v, A::POS * t_all, init, |(rows, pp), ci, vc| {
        for k in 0..imgs {
            let plane = &x[((first + k) * d.c + ci) * d.h * d.w..][..d.h * d.w];
            tiles.pad(plane, (d.h, d.w), pp);
            A::input_tiles(rows, pp, vc, (t_all, k * tiles.per_image()));
        }
    });
}

/// The input and weight gradients `(dx, dw)` of the convolution `d` (one Winograd runs,
/// see [`applies`]) for the output gradient `dy`.
///
/// - `dx` is the forward of `dy` with the flipped, transposed kernel (a "same" 3x3
///   convolution too), over the whole batch.
/// - `dw` uses the dual algorithm F(3x3, 2x2): a 3x3 weight gradient is the correlation of
///   each 4x4 input tile with its 2x2 output-gradient tile, so with the same input
///   transform `V = B^T d B`, the gradient's `A dY A^T` and the output transform `G^T . G`,
///   `dw[co][ci] = G^T [ sum_t (A dY_t[co] A^T) ⊙ V_t[ci] ] G`: 16 GEMMs
///   `(cout x tiles) . (tiles x c)` where the GEMM path's weight gradient multiplies
///   `(cout x pixels) . (pixels x 9 c)`, 2.25 times the products. Each group of images
///   sums over its tiles in f32 (as the GEMM path sums an image's pixels) and the groups
///   are added in f64.
pub(crate) fn backward(x: &[f32], w: &[f32], dy: &[f32], d: &Dims) -> (Vec<f32>, Vec<f32>) {
    (input_grad(w, dy, d), weight_grad(x, dy, d))
}

/// The input gradient of [`backward`].
pub(crate) fn input_grad(w: &[f32], dy: &[f32], d: &Dims) -> Vec<f32> {
    let g = ConvGeom {
        padding: 1,
        stride: 1,
        dilation: 1,
        groups: 1,
    };
    let back = Dims {
        c: d.cout,
        cout: d.c,
        ..*d
    };
    forward(
        dy,
        &super::gemm::flip_kernel(w, d, &g),
        Epilogue::NONE,
        &back,
    )
}

/// The weight gradient `(cout, c, 3, 3)` of [`backward`].
pub(crate) fn weight_grad(x: &[f32], dy: &[f32], d: &Dims) -> Vec<f32> {
    assert_eq!(x.len(), d.n * d.chw(), "winograd: input size");
    assert_eq!(
        dy.len(),
        d.n * d.cout * d.p(),
        "winograd: output gradient size"
    );
    let (c, cout) = (d.c, d.cout);
    const POS: usize = F2::POS;
    let tiles = Tiles::of::<F2>(d);
    let tp = tiles.per_image();
    let group = group_of(POS * tp * (c + cout) * 4, d.n);
    let t_group = group * tp;
    let (v_len, y_len, m_len) = (c * POS * t_group, cout * POS * t_group, POS * cout * c);
    let mut total = super::weight_sum::WeightSum::new(cout * c * 9);
    let mut dw = vec![0f32; cout * c * 9];
    with_thread_scratch(v_len + y_len + m_len, |scratch: &mut [f32]| {
        let (v, rest) = scratch.split_at_mut(v_len);
        let (yv, m) = rest.split_at_mut(y_len);
        for first in (0..d.n).step_by(group) {
            let imgs = group.min(d.n - first);
            let t_all = imgs * tp;
            let (v, yv) = (&mut v[..c * POS * t_all], &mut yv[..cout * POS * t_all]);
            transform_inputs::<F2>(x, d, (first, imgs), v, true);
            // The output gradient's transform, one output channel per task.
            each_chunk(true, yv, POS * t_all, |co, yc| {
                let mut rows = F2::rows(tiles);
                for k in 0..imgs {
                    let plane = &dy[((first + k) * cout + co) * d.p()..][..d.p()];
                    rows.grad_tiles(plane, (d.h, d.w), yc, (t_all, k * tp));
                }
            });
            // m[ξ] (cout x c) = Y[ξ] (cout x tiles) . V[ξ]^T (tiles x c).
            let (v, yv) = (&*v, &*yv);
            each_chunk(true, m, cout * c, |xi, mx| {
                gemm_into(
                    (cout, c, t_all),
                    mx,
                    false,
                    &yv[xi * t_all..],
                    (POS * t_all, 1),
                    &v[xi * t_all..],
                    (1, POS * t_all),
                    Parallelism::None,
                );
            });
            // dw[co][ci] = G^T m G, one output channel per task.
            let m = &*m;
            each_chunk(true, &mut dw, c * 9, |co, out| {
                let mrow = |xi: usize| &m[(xi * cout + co) * c..][..c];
                let mx: [&[f32]; POS] = std::array::from_fn(mrow);
                for (ci, k) in out.chunks_exact_mut(9).enumerate() {
                    // G^T M: rows m0 + (m1 + m2) / 2, (m1 - m2) / 2, (m1 + m2) / 2 + m3
                    // (of 4); then . G along each.
                    let at = |i: usize, j: usize| mx[i * 4 + j][ci];
                    let t: [[f32; 4]; 3] = [
                        std::array::from_fn(|j| at(0, j) + 0.5 * (at(1, j) + at(2, j))),
                        std::array::from_fn(|j| 0.5 * (at(1, j) - at(2, j))),
                        std::array::from_fn(|j| 0.5 * (at(1, j) + at(2, j)) + at(3, j)),
                    ];
                    for (i, r) in t.iter().enumerate() {
                        k[i * 3] = r[0] + 0.5 * (r[1] + r[2]);
                        k[i * 3 + 1] = 0.5 * (r[1] - r[2]);
                        k[i * 3 + 2] = 0.5 * (r[1] + r[2]) + r[3];
                    }
                }
            });
            if group < d.n {
                total.add(&dw);
            }
        }
    });
    if group < d.n {
        super::weight_sum::WeightSums(vec![total]).total(0)
    } else {
        dw
    }
}

/// [`forward_into`] into a new buffer, weights as given `(cout, c, 3, 3)`: on F(4x4, 3x3)
/// for wide outputs with many pixels ([`F4_MIN_WIDTH`], [`F4_MIN_PIXELS`]), else on
/// F(2x2, 3x3).
pub(crate) fn forward(x: &[f32], w: &[f32], ep: Epilogue<'_, f32>, d: &Dims) -> Vec<f32> {
    if uses_f4(d, false) {
        forward_with::<F4>(x, w, ep, d)
    } else {
        forward_with::<F2>(x, w, ep, d)
    }
}

/// [`forward`] for a frozen kernel `w`: its transformed weights from `forms`, made there
/// on the first call.
pub(crate) fn forward_frozen(
    x: &[f32],
    w: &[f32],
    forms: &Forms,
    ep: Epilogue<'_, f32>,
    d: &Dims,
) -> Vec<f32> {
    if uses_f4(d, true) {
        forward_transformed::<F4>(x, forms.winograd::<F4>(w, d.cout, d.c), ep, d)
    } else {
        forward_transformed::<F2>(x, forms.winograd::<F2>(w, d.cout, d.c), ep, d)
    }
}

/// [`forward_into`] on algorithm `A` into a new buffer.
///
/// The transformed weights go to this thread's weight scratch
/// ([`ScratchMemory::Weights`]), which `transform_weights_into` overwrites whole: a new
/// zero-filled vector per call was 1.5% of a ResNet-18 batch-1 inference (unfolded; a
/// frozen kernel keeps its transform). The scratch keeps the largest such transform the
/// thread has made (4 MB for a 256-channel layer on F(2x2, 3x3), 17 MB for 512 channels).
pub(crate) fn forward_with<A: Algo>(
    x: &[f32],
    w: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
) -> Vec<f32> {
    let len = d.cout * A::POS * d.c;
    with_thread_scratch_in(ScratchMemory::Weights, len, |u: &mut [f32]| {
        transform_weights_into::<A>(w, d.cout, d.c, u);
        forward_transformed::<A>(x, u, ep, d)
    })
}

/// [`forward_into`] on algorithm `A`, with weights `u` already transformed, into a new
/// buffer.
///
/// The buffer is not zero-filled: every value is written. Zeroed, an output of 4 MiB or
/// more was a fresh mapping whose huge pages the kernel cleared as the output transform
/// first wrote them (`clear_page_erms`, 4.5% of a ResNet-18 batch-8 inference), and a
/// smaller one a `memset` by `calloc`.
fn forward_transformed<A: Algo>(x: &[f32], u: &[f32], ep: Epilogue<'_, f32>, d: &Dims) -> Vec<f32> {
    let fill = |y: &mut [std::mem::MaybeUninit<f32>]| forward_into::<A, _>(x, u, ep, d, y, true);
    // SAFETY: `forward_into` writes every plane of `y` whole (`output_tiles`).
    unsafe { crate::buffer::vec_written_by(d.n * d.cout * d.p(), fill) }
}

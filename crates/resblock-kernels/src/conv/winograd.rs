//! Winograd F(2x2, 3x3) for f32 3x3 convolutions with stride 1 and padding 1 between wide
//! layers (at least [`MIN_CHANNELS`] on each side): 16 multiplies per 2x2 outputs and input
//! channel where the direct kernel does 36.
//!
//! Lavin & Gray's minimal filtering: with `B^T`, `G`, `A^T` the F(2, 3) matrices, one 2x2
//! output tile is `A^T [ sum_ci (G g G^T) ⊙ (B^T d B) ] A` for its 4x4 input tile `d`
//! (neighbouring tiles overlap by 2). Summing over input channels at each of the 16
//! positions `ξ` of the transformed tile is a GEMM, so a convolution becomes
//!
//! 1. the weights transformed once per call, `u[co][ξ][ci]`;
//! 2. the input transformed, `v[ci][ξ][t]` over the tiles `t` of a group of images;
//! 3. 16 GEMMs `m[ξ] (cout x tiles) = u[.][ξ][.] . v[.][ξ][.]` on [`gemm_into`] (our
//!    AVX-512 GEMM where it runs), one per task;
//! 4. the output transform, each output plane written once with the epilogue applied while
//!    it is in cache.
//!
//! The transforms' only multiplies are the weight transform's halves (exact in binary), so
//! the error is that of summing the products in another order: tested against an f64
//! direct convolution to the same bound as the direct kernels.
//!
//! Both transforms run over whole rows of tiles: the vertical half of a transform combines
//! four image rows element by element, the horizontal half reads the result's even and
//! odd columns, so every loop is a plain vectorisable loop over the tiles of a row.

use gemm::Parallelism;
use rayon::prelude::*;

use super::epilogue::Epilogue;
use super::gemm::with_thread_scratch;
use super::geom::{ConvGeom, Dims};
use crate::matmul::gemm_into;

/// Positions of a transformed 4x4 tile.
const POS: usize = 16;
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
/// input and the GEMMs' output a few MB each, however large the batch.
const GROUP_BYTES: usize = 8 << 20;

/// Whether a convolution runs on Winograd: allowed ([`crate::dispatch::Dispatch::winograd`]),
/// 3x3, stride 1, padding 1, no dilation, one group, with enough channels, a wide enough
/// output and enough tiles.
pub(crate) fn applies(d: &Dims, g: &ConvGeom) -> bool {
    crate::dispatch::current().winograd
        && (d.kh, d.kw) == (3, 3)
        && d.ow >= MIN_WIDTH
        && d.n * Tiles::of(d).per_image() >= MIN_TILES
        && (g.stride, g.padding, g.dilation, g.groups) == (1, 1, 1, 1)
        && d.c >= MIN_CHANNELS
        && d.cout >= MIN_CHANNELS
}

/// The weights `(cout, c, 3, 3)` transformed, `u[co][ξ][ci] = (G g[co][ci] G^T)[ξ]`.
pub(crate) fn transform_weights(w: &[f32], cout: usize, c: usize) -> Vec<f32> {
    assert_eq!(w.len(), cout * c * 9, "winograd: weight size");
    let mut u = vec![0f32; cout * POS * c];
    let one = |(co, dst): (usize, &mut [f32])| {
        for ci in 0..c {
            let g = &w[(co * c + ci) * 9..][..9];
            // G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2 (of 3 values each).
            let row = |r: usize| [g[r * 3], g[r * 3 + 1], g[r * 3 + 2]];
            let (g0, g1, g2) = (row(0), row(1), row(2));
            let gg: [[f32; 3]; 4] = [
                g0,
                std::array::from_fn(|j| (g0[j] + g1[j] + g2[j]) * 0.5),
                std::array::from_fn(|j| (g0[j] - g1[j] + g2[j]) * 0.5),
                g2,
            ];
            // (G g) G^T: the same combination along each row.
            for (i, r) in gg.iter().enumerate() {
                let t = [
                    r[0],
                    (r[0] + r[1] + r[2]) * 0.5,
                    (r[0] - r[1] + r[2]) * 0.5,
                    r[2],
                ];
                for (j, v) in t.into_iter().enumerate() {
                    dst[(i * 4 + j) * c + ci] = v;
                }
            }
        }
    };
    if u.len() >= crate::sgemm::PARALLEL_PACK && rayon::current_num_threads() > 1 {
        u.par_chunks_mut(POS * c).enumerate().for_each(one);
    } else {
        u.chunks_mut(POS * c).enumerate().for_each(one);
    }
    u
}

/// Runs `f(i, chunk)` on every `len`-long chunk of `data`, on all threads when `parallel`.
fn each_chunk<T: Send>(
    parallel: bool,
    data: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        data.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// The tiles of one image: rows and columns of 2x2 output tiles.
#[derive(Clone, Copy)]
struct Tiles {
    th: usize,
    tw: usize,
}

impl Tiles {
    fn of(d: &Dims) -> Tiles {
        Tiles {
            th: d.oh.div_ceil(2),
            tw: d.ow.div_ceil(2),
        }
    }

    fn per_image(self) -> usize {
        self.th * self.tw
    }

    /// Plane `(h, w)` into `pp` with its zero border (see [`Rows::input_tiles`]); the
    /// border is written once, by the first plane.
    fn pad(self, plane: &[f32], (h, w): (usize, usize), pp: &mut Vec<f32>) {
        let pw = 2 * self.tw + 2;
        let len = (2 * self.th + 2) * pw;
        if pp.len() != len {
            pp.clear();
            pp.resize(len, 0.0);
        }
        for (y, src) in plane.chunks_exact(w).take(h).enumerate() {
            pp[(y + 1) * pw + 1..][..w].copy_from_slice(src);
        }
    }
}

/// `y` `(n, cout, h, w)` = the convolution of `x` `(n, c, h, w)` with the weights `u`
/// (from [`transform_weights`]), the epilogue `ep` applied. With `parallel`, every phase
/// runs on all threads; otherwise on this one (a worker of an outer parallel loop).
///
/// # Panics
/// If a slice does not match `d`, or `d` is not a convolution Winograd runs (`applies`).
pub(crate) fn forward_into(
    x: &[f32],
    u: &[f32],
    ep: Epilogue<'_, f32>,
    d: &Dims,
    y: &mut [f32],
    parallel: bool,
) {
    assert!(
        (d.kh, d.kw) == (3, 3) && (d.oh, d.ow) == (d.h, d.w),
        "winograd: a 3x3 'same' convolution"
    );
    assert_eq!(x.len(), d.n * d.chw(), "winograd: input size");
    assert_eq!(
        u.len(),
        d.cout * POS * d.c,
        "winograd: transformed weight size"
    );
    assert_eq!(y.len(), d.n * d.cout * d.p(), "winograd: output size");
    let tiles = Tiles::of(d);
    let tp = tiles.per_image();
    let group = (GROUP_BYTES / (POS * tp * d.c * 4)).clamp(1, d.n.max(1));
    let t_group = group * tp;
    // The transformed input and the GEMMs' output in this thread's scratch memory, both
    // wholly written before they are read: zero-filling fresh buffers was 5% of a
    // 256-channel layer's time.
    let (v_len, m_len) = (d.c * POS * t_group, POS * d.cout * t_group);
    with_thread_scratch(v_len + m_len, |scratch: &mut [f32]| {
        let (v, m) = scratch.split_at_mut(v_len);
        for first in (0..d.n).step_by(group) {
            let imgs = group.min(d.n - first);
            let t_all = imgs * tp;
            let (v, m) = (&mut v[..d.c * POS * t_all], &mut m[..POS * d.cout * t_all]);
            // The input transform, one input channel of the group per task.
            transform_inputs(x, d, (first, imgs), v, parallel);
            // The 16 GEMMs.
            let (c, cout) = (d.c, d.cout);
            let v = &*v;
            each_chunk(parallel, m, cout * t_all, |xi, mx| {
                gemm_into(
                    (cout, t_all, c),
                    mx,
                    false,
                    &u[xi * c..],
                    (POS * c, 1),
                    &v[xi * t_all..],
                    (POS * t_all, 1),
                    Parallelism::None,
                );
            });
            // The output transform and the epilogue, one output plane per task.
            let plane = d.p();
            let y_group = &mut y[first * cout * plane..(first + imgs) * cout * plane];
            let m = &*m;
            each_chunk(parallel, y_group, plane, |i, out| {
                let (k, co) = (i / cout, i % cout);
                let mut rows = Rows::new(tiles);
                for ty in 0..tiles.th {
                    let t0 = (k * tiles.th + ty) * tiles.tw;
                    rows.output_tiles(m, (co, cout, t_all, t0), out, (d.h, d.w), ty);
                }
                ep.image(first + k, cout * plane).apply_in_place(co, out);
            });
        }
    });
}

/// The input transform of images `first..first + imgs` of `x` `(n, c, h, w)` into `v`
/// `[ci][ξ][t]`, one input channel per task.
fn transform_inputs(
    x: &[f32],
    d: &Dims,
    (first, imgs): (usize, usize),
    v: &mut [f32],
    parallel: bool,
) {
    let tiles = Tiles::of(d);
    let t_all = imgs * tiles.per_image();
    each_chunk(parallel, v, POS * t_all, |ci, vc| {
        let (mut rows, mut pp) = (Rows::new(tiles), Vec::new());
        for k in 0..imgs {
            let plane = &x[((first + k) * d.c + ci) * d.h * d.w..][..d.h * d.w];
            tiles.pad(plane, (d.h, d.w), &mut pp);
            for ty in 0..tiles.th {
                rows.input_tiles(&pp, ty, vc, t_all, (k * tiles.th + ty) * tiles.tw);
            }
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
    let u = transform_weights(&super::gemm::flip_kernel(w, d, &g), d.c, d.cout);
    let mut dx = vec![0f32; d.n * d.chw()];
    forward_into(dy, &u, Epilogue::NONE, &back, &mut dx, true);
    dx
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
    let tiles = Tiles::of(d);
    let tp = tiles.per_image();
    let group = (GROUP_BYTES / (POS * tp * (c + cout) * 4)).clamp(1, d.n.max(1));
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
            transform_inputs(x, d, (first, imgs), v, true);
            // The output gradient's transform, one output channel per task.
            each_chunk(true, yv, POS * t_all, |co, yc| {
                let mut rows = Rows::new(tiles);
                for k in 0..imgs {
                    let plane = &dy[((first + k) * cout + co) * d.p()..][..d.p()];
                    for ty in 0..tiles.th {
                        let t0 = (k * tiles.th + ty) * tiles.tw;
                        rows.grad_tiles(plane, (d.h, d.w), ty, yc, (t_all, t0));
                    }
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

/// [`forward_into`] into a new buffer, weights as given `(cout, c, 3, 3)`.
pub(crate) fn forward(x: &[f32], w: &[f32], ep: Epilogue<'_, f32>, d: &Dims) -> Vec<f32> {
    let u = transform_weights(w, d.cout, d.c);
    let mut y = vec![0f32; d.n * d.cout * d.p()];
    forward_into(x, &u, ep, d, &mut y, true);
    y
}

/// The (even, odd) column pairs of a row.
fn pairs(r: &[f32]) -> impl Iterator<Item = (f32, f32)> + '_ {
    r.chunks_exact(2).map(|p| (p[0], p[1]))
}

/// Row buffers of the transforms: one row of tiles at a time.
struct Rows {
    tiles: Tiles,
    /// The even columns of the four combined rows of the input transform (in the output
    /// transform, the output rows' even and odd columns).
    r: [Vec<f32>; 4],
    /// Their odd columns.
    s: [Vec<f32>; 4],
}

impl Rows {
    fn new(tiles: Tiles) -> Rows {
        let len = tiles.tw + 1;
        Rows {
            tiles,
            r: std::array::from_fn(|_| vec![0f32; len]),
            s: std::array::from_fn(|_| vec![0f32; len]),
        }
    }

    /// The transformed input tiles of tile row `ty` of one plane, read from its padded copy
    /// `pp` (`2 th + 2` rows of `2 tw + 2`, image column `x` at `x + 1`, row `y` at
    /// `y + 1`, zero elsewhere): position `ξ` of tile `tx` into `v[ξ * t_all + t0 + tx]`.
    fn input_tiles(&mut self, pp: &[f32], ty: usize, v: &mut [f32], t_all: usize, t0: usize) {
        let tw = self.tiles.tw;
        let pw = 2 * tw + 2;
        let row = |r: usize| &pp[(2 * ty + r) * pw..][..pw];
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        // B^T d: the rows r0 - r2, r1 + r2, r2 - r1, r1 - r3, split into their even and
        // odd columns (e_i, o_i); then d B along each from those.
        let [e0, e1, e2, e3] = &mut self.r;
        let [o0, o1, o2, o3] = &mut self.s;
        let it = pairs(r0).zip(pairs(r1)).zip(pairs(r2)).zip(pairs(r3));
        for (k, (((a, b), c), d)) in it.enumerate() {
            e0[k] = a.0 - c.0;
            o0[k] = a.1 - c.1;
            e1[k] = b.0 + c.0;
            o1[k] = b.1 + c.1;
            e2[k] = c.0 - b.0;
            o2[k] = c.1 - b.1;
            e3[k] = b.0 - d.0;
            o3[k] = b.1 - d.1;
        }
        for (i, (e, o)) in [(&*e0, &*o0), (&*e1, &*o1), (&*e2, &*o2), (&*e3, &*o3)]
            .into_iter()
            .enumerate()
        {
            let (e, o) = (&e[..=tw], &o[..=tw]);
            let at = |j: usize| (i * 4 + j) * t_all + t0;
            let (d0, rest) = v[at(0)..at(3) + tw].split_at_mut(t_all);
            let (d1, rest) = rest.split_at_mut(t_all);
            let (d2, d3) = rest.split_at_mut(t_all);
            for tx in 0..tw {
                d0[tx] = e[tx] - e[tx + 1];
                d1[tx] = o[tx] + e[tx + 1];
                d2[tx] = e[tx + 1] - o[tx];
                d3[tx] = o[tx] - o[tx + 1];
            }
        }
    }

    /// The transformed output-gradient tiles `A dY A^T` of tile row `ty` of one plane
    /// `(h, w)` (zero past its edges): position `ξ` of tile `tx` into
    /// `yv[ξ * t_all + t0 + tx]`.
    fn grad_tiles(
        &mut self,
        plane: &[f32],
        (h, w): (usize, usize),
        ty: usize,
        yv: &mut [f32],
        (t_all, t0): (usize, usize),
    ) {
        let tw = self.tiles.tw;
        // The even and odd columns of rows 2 ty and 2 ty + 1.
        let [e0, e1, ..] = &mut self.r;
        let [o0, o1, ..] = &mut self.s;
        for (r, (e, o)) in [(&mut *e0, &mut *o0), (&mut *e1, &mut *o1)]
            .into_iter()
            .enumerate()
        {
            let y = 2 * ty + r;
            e[..tw].fill(0.0);
            o[..tw].fill(0.0);
            if y < h {
                let row = &plane[y * w..(y + 1) * w];
                for (k, p) in row.chunks(2).enumerate() {
                    e[k] = p[0];
                    if let Some(v) = p.get(1) {
                        o[k] = *v;
                    }
                }
            }
        }
        // A dY: the rows y0, y0 + y1, y0 - y1, -y1; then . A^T along each: e, e + o,
        // e - o, -o.
        for i in 0..4 {
            let at = |j: usize| (i * 4 + j) * t_all + t0;
            let (d0, rest) = yv[at(0)..at(3) + tw].split_at_mut(t_all);
            let (d1, rest) = rest.split_at_mut(t_all);
            let (d2, d3) = rest.split_at_mut(t_all);
            for tx in 0..tw {
                let (e, o) = match i {
                    0 => (e0[tx], o0[tx]),
                    1 => (e0[tx] + e1[tx], o0[tx] + o1[tx]),
                    2 => (e0[tx] - e1[tx], o0[tx] - o1[tx]),
                    _ => (-e1[tx], -o1[tx]),
                };
                d0[tx] = e;
                d1[tx] = e + o;
                d2[tx] = e - o;
                d3[tx] = -o;
            }
        }
    }

    /// Tile row `ty` of output channel `co` from the GEMMs' output `m[ξ][co][t]` (`cout`
    /// rows of `t_all` per position), tiles `t0..t0 + tw`, into `out` `(h, w)`.
    fn output_tiles(
        &mut self,
        m: &[f32],
        (co, cout, t_all, t0): (usize, usize, usize, usize),
        out: &mut [f32],
        (h, w): (usize, usize),
        ty: usize,
    ) {
        let tw = self.tiles.tw;
        let mrow = |xi: usize| &m[(xi * cout + co) * t_all + t0..][..tw];
        // A^T M: for each column j, s0 = m0j + m1j + m2j and s1 = m1j - m2j - m3j (`mij`
        // at position 4 i + j); then (A^T M) A along each: the two output rows' even
        // (y0e, y1e) and odd (y0o, y1o) columns.
        let [y0e, y0o, y1e, y1o] = &mut self.r;
        let (m0, m1, m2, m3) = (mrow(0), mrow(1), mrow(2), mrow(3));
        let (m4, m5, m6, m7) = (mrow(4), mrow(5), mrow(6), mrow(7));
        let (m8, m9, m10, m11) = (mrow(8), mrow(9), mrow(10), mrow(11));
        let (m12, m13, m14, m15) = (mrow(12), mrow(13), mrow(14), mrow(15));
        for tx in 0..tw {
            let s0 = [
                m0[tx] + m4[tx] + m8[tx],
                m1[tx] + m5[tx] + m9[tx],
                m2[tx] + m6[tx] + m10[tx],
                m3[tx] + m7[tx] + m11[tx],
            ];
            let s1 = [
                m4[tx] - m8[tx] - m12[tx],
                m5[tx] - m9[tx] - m13[tx],
                m6[tx] - m10[tx] - m14[tx],
                m7[tx] - m11[tx] - m15[tx],
            ];
            y0e[tx] = s0[0] + s0[1] + s0[2];
            y0o[tx] = s0[1] - s0[2] - s0[3];
            y1e[tx] = s1[0] + s1[1] + s1[2];
            y1o[tx] = s1[1] - s1[2] - s1[3];
        }
        for (r, (ye, yo)) in [(0, (&*y0e, &*y0o)), (1, (&*y1e, &*y1o))] {
            let oy = 2 * ty + r;
            if oy >= h {
                break;
            }
            let row = &mut out[oy * w..(oy + 1) * w];
            let mut pairs = row.chunks_exact_mut(2);
            for ((p, e), o) in (&mut pairs).zip(&ye[..tw]).zip(&yo[..tw]) {
                p[0] = *e;
                p[1] = *o;
            }
            if let [last] = pairs.into_remainder() {
                *last = ye[tw - 1];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    fn dims(n: usize, c: usize, cout: usize, h: usize, w: usize) -> Dims {
        let g = ConvGeom {
            padding: 1,
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        Dims::new(&g, &[n, c, h, w], &[cout, c, 3, 3]).expect("valid test shape")
    }

    /// The 3x3, padding-1 convolution in f64.
    fn conv_ref(x: &[f32], w: &[f32], d: &Dims) -> Vec<f64> {
        let mut y = vec![0f64; d.n * d.cout * d.p()];
        for n in 0..d.n {
            for o in 0..d.cout {
                for c in 0..d.c {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let wv = f64::from(w[((o * d.c + c) * 3 + ky) * 3 + kx]);
                            for oy in 0..d.h {
                                for ox in 0..d.w {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < 1 || ix < 1 || iy > d.h || ix > d.w {
                                        continue;
                                    }
                                    let xi = ((n * d.c + c) * d.h + iy - 1) * d.w + ix - 1;
                                    y[((n * d.cout + o) * d.h + oy) * d.w + ox] +=
                                        wv * f64::from(x[xi]);
                                }
                            }
                        }
                    }
                }
            }
        }
        y
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let e = (f64::from(*g) - w).abs() / scale;
            assert!(e < 1e-5, "{what}: element {i} is {g}, want {w}");
        }
    }

    /// Odd and even sizes (a last tile row or column half outside the image), one-pixel
    /// images, and a batch split into several groups of images.
    #[test]
    fn matches_a_plain_convolution() {
        for (n, c, cout, h, w) in [
            (2, 3, 5, 7, 9),
            (1, 4, 6, 6, 6),
            (3, 2, 3, 1, 1),
            (2, 5, 4, 8, 3),
            (1, 2, 2, 2, 5),
            (10, 64, 3, 32, 32),
        ] {
            let d = dims(n, c, cout, h, w);
            let (x, k) = (values(n * c * h * w, 1), values(cout * c * 9, 2));
            let got = forward(&x, &k, Epilogue::NONE, &d);
            assert_close(
                &format!("{n}x{c}x{h}x{w} -> {cout}"),
                &got,
                &conv_ref(&x, &k, &d),
            );
        }
        let d = dims(10, 64, 3, 32, 32);
        assert!(GROUP_BYTES / (POS * Tiles::of(&d).per_image() * d.c * 4) < d.n);
    }

    /// Both gradients against f64 sums, for odd and even sizes and a batch split into
    /// several groups of images (whose weight gradients are added in f64).
    #[test]
    fn backward_matches_plain_gradients() {
        for (n, c, cout, h, w) in [
            (2, 3, 5, 7, 9),
            (1, 4, 2, 6, 6),
            (3, 2, 3, 1, 2),
            (9, 70, 2, 32, 31),
        ] {
            let d = dims(n, c, cout, h, w);
            let (x, k) = (values(n * c * h * w, 1), values(cout * c * 9, 2));
            let dy = values(n * cout * d.p(), 3);
            let (dx, dw) = backward(&x, &k, &dy, &d);
            let mut want_dx = vec![0f64; x.len()];
            let mut want_dw = vec![0f64; k.len()];
            for i in 0..n {
                for o in 0..cout {
                    for oy in 0..h {
                        for ox in 0..w {
                            let g = f64::from(dy[((i * cout + o) * h + oy) * w + ox]);
                            for ci in 0..c {
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let (iy, ix) = (oy + ky, ox + kx);
                                        if iy < 1 || ix < 1 || iy > h || ix > w {
                                            continue;
                                        }
                                        let xi = ((i * c + ci) * h + iy - 1) * w + ix - 1;
                                        let wi = ((o * c + ci) * 3 + ky) * 3 + kx;
                                        want_dx[xi] += g * f64::from(k[wi]);
                                        want_dw[wi] += g * f64::from(x[xi]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let name = format!("{n}x{c}x{h}x{w} -> {cout}");
            assert_close(&format!("{name} dx"), &dx, &want_dx);
            assert_close(&format!("{name} dw"), &dw, &want_dw);
        }
        let d = dims(9, 70, 2, 32, 31);
        let per_image = POS * Tiles::of(&d).per_image() * (d.c + d.cout) * 4;
        assert!(
            GROUP_BYTES / per_image < d.n,
            "the last case has several groups"
        );
    }

    /// On one thread (inside an outer parallel loop) the result is the same, bit for bit,
    /// and the epilogue (scale, shift, residual, ReLU) is that of the other paths.
    #[test]
    fn serial_and_epilogue_agree() {
        let (n, c, cout, h, w) = (3, 6, 5, 5, 7);
        let d = dims(n, c, cout, h, w);
        let (x, k) = (values(n * c * h * w, 3), values(cout * c * 9, 4));
        let u = transform_weights(&k, cout, c);
        let plain = forward(&x, &k, Epilogue::NONE, &d);
        let mut serial = vec![0f32; plain.len()];
        forward_into(&x, &u, Epilogue::NONE, &d, &mut serial, false);
        assert_eq!(plain, serial);
        let (scale, shift) = (values(cout, 5), values(cout, 6));
        let residual = values(plain.len(), 7);
        let ep = Epilogue {
            scale: Some(&scale),
            bias: Some(&shift),
            relu: true,
            residual: Some(&residual),
        };
        let got = forward(&x, &k, ep, &d);
        let mut want = plain.clone();
        for (i, plane) in want.chunks_exact_mut(d.p()).enumerate() {
            ep.image(i / cout, cout * d.p())
                .apply_in_place(i % cout, plane);
        }
        assert_eq!(got, want);
    }
}

//! F(4x4, 3x3): 4x4 output tiles from 6x6 input tiles, 36 positions (interpolation points
//! 0, 1, -1, 2, -2 and infinity). 2.25 multiplies per output and input channel in the
//! GEMMs where F(2x2, 3x3) does 4 and the direct kernel 9.
//!
//! - `B^T` = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
//!   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]];
//! - `G` = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6],
//!   [1/24, -1/12, 1/6], [0, 0, 1]];
//! - `A^T` = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
//!   [0, 1, -1, 8, -8, 1]].
//!
//! Each transform's loops are compiled for the widest SIMD level the CPU has
//! ([`with_simd!`]): the vertical half over whole padded rows, the horizontal half over the
//! tiles of a row (reading each tile's six columns at a stride of 4).

use super::{Algo, Tiles};
use crate::simd::with_simd;

/// F(4x4, 3x3), the algorithm of [`super::forward`] and of the input gradient.
pub(crate) struct F4;

/// Row buffers: the six rows of `B^T d` (input transform), or the 16 output rows and
/// columns of a row of tiles (output transform).
pub(crate) struct Rows {
    tiles: Tiles,
    buf: Vec<f32>,
}

/// `B^T a`.
#[inline(always)]
fn bt(a: [f32; 6]) -> [f32; 6] {
    [
        4.0 * a[0] - 5.0 * a[2] + a[4],
        -4.0 * (a[1] + a[2]) + a[3] + a[4],
        4.0 * (a[1] - a[2]) - a[3] + a[4],
        2.0 * (a[3] - a[1]) - a[2] + a[4],
        2.0 * (a[1] - a[3]) - a[2] + a[4],
        4.0 * a[1] - 5.0 * a[3] + a[5],
    ]
}

/// `A^T a`.
#[inline(always)]
fn at(a: [f32; 6]) -> [f32; 4] {
    let (s12, d12) = (a[1] + a[2], a[1] - a[2]);
    let (s34, d34) = (a[3] + a[4], a[3] - a[4]);
    [
        a[0] + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + a[5],
    ]
}

/// `G a`.
#[inline(always)]
fn g(a: [f32; 3]) -> [f32; 6] {
    let s = a[0] + a[2];
    let t = a[0] / 24.0 + a[2] / 6.0;
    [
        a[0] / 4.0,
        -(s + a[1]) / 6.0,
        -(s - a[1]) / 6.0,
        t + a[1] / 12.0,
        t - a[1] / 12.0,
        a[2],
    ]
}

/// [`Algo::weight_row`]'s body.
#[inline(always)]
pub(super) fn weight_row(k: &[f32], dst: &mut [f32], c: usize) {
    super::weight_lanes::<F4>(k, dst, c);
}

/// `N` slices of `len` at a stride of `stride` from the start of `v`.
fn strided<const N: usize>(v: &mut [f32], stride: usize, len: usize) -> [&mut [f32]; N] {
    let mut rest = v;
    std::array::from_fn(|_| {
        let r = std::mem::take(&mut rest);
        let (head, tail) = r.split_at_mut(stride.min(r.len()));
        rest = tail;
        &mut head[..len]
    })
}

impl Algo for F4 {
    const M: usize = 4;
    const POS: usize = 36;
    type Rows = Rows;

    fn rows(tiles: Tiles) -> Rows {
        let (th, tw) = (tiles.th, tiles.tw);
        let input = 6 * (th * tiles.padded_width() + 2) + 36 * th * (tw + 1);
        Rows {
            tiles,
            buf: vec![0f32; input.max(16 * th * tw)],
        }
    }

    #[inline(always)]
    fn weight_tile(k: &[f32; 9], u: &mut [f32; 36]) {
        // G k: column by column; then (G k) G^T: G along each row.
        let mut cols = [[0f32; 6]; 3];
        for (j, col) in cols.iter_mut().enumerate() {
            *col = g([k[j], k[3 + j], k[6 + j]]);
        }
        for i in 0..6 {
            let row = g([cols[0][i], cols[1][i], cols[2][i]]);
            u[i * 6..(i + 1) * 6].copy_from_slice(&row);
        }
    }

    fn weight_row(k: &[f32], dst: &mut [f32], c: usize) {
        let simd = crate::dispatch::current().simd;
        with_simd!(simd, weight_row(k: &[f32], dst: &mut [f32], c: usize));
    }

    fn input_tiles(rows: &mut Rows, pp: &[f32], v: &mut [f32], (t_all, t0): (usize, usize)) {
        let Tiles { th, tw, .. } = rows.tiles;
        let simd = crate::dispatch::current().simd;
        let buf = rows.buf.as_mut_slice();
        with_simd!(simd, input_plane(pp: &[f32], buf: &mut [f32], th: usize, tw: usize));
        // The plane's tiles into `v`, leaving out the junk column of tiles.
        let (jn, tiles) = (th * (tw + 1), &buf[6 * (th * (4 * tw + 4) + 2)..]);
        for xi in 0..36 {
            let src = &tiles[xi * jn..][..jn];
            let dst = &mut v[xi * t_all + t0..][..th * tw];
            for (d, s) in dst.chunks_exact_mut(tw).zip(src.chunks_exact(tw + 1)) {
                d.copy_from_slice(&s[..tw]);
            }
        }
    }

    fn output_tiles(
        rows: &mut Rows,
        m: &[f32],
        (co, cout, t_all, t0): (usize, usize, usize, usize),
        out: &mut [f32],
        (h, w): (usize, usize),
    ) {
        let Tiles { th, tw, .. } = rows.tiles;
        let tp = th * tw;
        let m = &m[co * t_all + t0..];
        let stride = cout * t_all;
        let buf = &mut rows.buf[..16 * tp];
        let simd = crate::dispatch::current().simd;
        with_simd!(simd, output_row(m: &[f32], stride: usize, buf: &mut [f32], tp: usize));
        // Each tile's rows into the plane, cut at its edges.
        for (oy, row) in out.chunks_exact_mut(w).take(h).enumerate() {
            let (ty, i) = (oy / 4, oy % 4);
            let ys: [&[f32]; 4] = std::array::from_fn(|q| &buf[(i * 4 + q) * tp + ty * tw..][..tw]);
            let mut quads = row.chunks_exact_mut(4);
            for (tx, o) in (&mut quads).enumerate() {
                o.copy_from_slice(&[ys[0][tx], ys[1][tx], ys[2][tx], ys[3][tx]]);
            }
            let rest = quads.into_remainder();
            let last = w / 4;
            for (q, o) in rest.iter_mut().enumerate() {
                *o = ys[q][last];
            }
        }
    }
}

/// The input transform of one padded plane `pp` (`4 th + 2` rows of `pw = 4 (tw + 1)`,
/// then 2 more values): `B^T d` of each tile row's six rows into the first
/// `6 (th pw + 2)` values of `buf` (row `i` of tile row `ty` at `i (th pw + 2) + ty pw`),
/// then `B^T d B` of every tile into the rest (position `ξ` of tile `(ty, tx)` at
/// `ξ th (tw + 1) + ty (tw + 1) + tx`; `tx = tw` is junk, the tile past the row's end). A
/// tile starts 4 values after the one before it, across rows too, so the horizontal half
/// is one loop over the plane's tiles.
#[inline(always)]
pub(super) fn input_plane(pp: &[f32], buf: &mut [f32], th: usize, tw: usize) {
    let pw = 4 * (tw + 1);
    let len = th * pw + 2;
    let (vert, tiles) = buf.split_at_mut(6 * len);
    {
        let [b0, b1, b2, b3, b4, b5] = strided::<6>(vert, len, len);
        for ty in 0..th {
            let r: [&[f32]; 6] = std::array::from_fn(|i| &pp[(4 * ty + i) * pw..][..pw]);
            let o = ty * pw;
            let (b0, b1, b2) = (&mut b0[o..o + pw], &mut b1[o..o + pw], &mut b2[o..o + pw]);
            let (b3, b4, b5) = (&mut b3[o..o + pw], &mut b4[o..o + pw], &mut b5[o..o + pw]);
            for c in 0..pw {
                let b = bt([r[0][c], r[1][c], r[2][c], r[3][c], r[4][c], r[5][c]]);
                b0[c] = b[0];
                b1[c] = b[1];
                b2[c] = b[2];
                b3[c] = b[3];
                b4[c] = b[4];
                b5[c] = b[5];
            }
        }
        // The last tile's reads past the last row: zero, as the padding.
        for b in [b0, b1, b2, b3, b4, b5] {
            b[th * pw..].fill(0.0);
        }
    }
    let jn = th * (tw + 1);
    for i in 0..6 {
        let row = &vert[i * len..][..4 * jn + 2];
        let [d0, d1, d2, d3, d4, d5] = strided::<6>(&mut tiles[i * 6 * jn..], jn, jn);
        for j in 0..jn {
            let q = &row[4 * j..4 * j + 6];
            let b = bt([q[0], q[1], q[2], q[3], q[4], q[5]]);
            d0[j] = b[0];
            d1[j] = b[1];
            d2[j] = b[2];
            d3[j] = b[3];
            d4[j] = b[4];
            d5[j] = b[5];
        }
    }
}

/// Tiles per step of [`output_row`]: one AVX-512 vector of each position.
const LANES: usize = 16;

/// The output transform of `tp` tiles: `A^T M A` of each tile, from `m` (position `ξ` of
/// tile `t` at `m[ξ * stride + t]`), output row `i` and column `q` of each tile into
/// `buf[(4 i + q) * tp + t]`. [`LANES`] tiles at a time through local arrays: with 36 input
/// and 16 output slices the compiler does not vectorise the plain loop (too many pairs to
/// check for overlap).
#[inline(always)]
pub(super) fn output_row(m: &[f32], stride: usize, buf: &mut [f32], tp: usize) {
    let mut t = 0;
    while t < tp {
        let n = LANES.min(tp - t);
        let mut x = [[0f32; LANES]; 36];
        for (xi, x) in x.iter_mut().enumerate() {
            let src = &m[xi * stride + t..];
            if n == LANES {
                *x = src[..LANES].try_into().expect("LANES values");
            } else {
                x[..n].copy_from_slice(&src[..n]);
            }
        }
        let y = output_lanes(&x);
        for (r, y) in y.iter().enumerate() {
            let dst = &mut buf[r * tp + t..];
            if n == LANES {
                dst[..LANES].copy_from_slice(y);
            } else {
                dst[..n].copy_from_slice(&y[..n]);
            }
        }
        t += LANES;
    }
}

/// `A^T M A` of [`LANES`] tiles, `x[ξ][lane]`, into `y[4 i + q][lane]`.
#[inline(always)]
fn output_lanes(x: &[[f32; LANES]; 36]) -> [[f32; LANES]; 16] {
    let mut y = [[0f32; LANES]; 16];
    for l in 0..LANES {
        // A^T M: column j of the 4x6 product from column j of M.
        let mut s = [[0f32; 4]; 6];
        for (j, s) in s.iter_mut().enumerate() {
            *s = at([
                x[j][l],
                x[6 + j][l],
                x[12 + j][l],
                x[18 + j][l],
                x[24 + j][l],
                x[30 + j][l],
            ]);
        }
        // (A^T M) A: row i from row i of A^T M.
        for i in 0..4 {
            let r = at([s[0][i], s[1][i], s[2][i], s[3][i], s[4][i], s[5][i]]);
            for q in 0..4 {
                y[i * 4 + q][l] = r[q];
            }
        }
    }
    y
}

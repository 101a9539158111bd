//! F(2x2, 3x3): 2x2 output tiles from 4x4 input tiles, 16 positions.
//!
//! `B^T` = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
//! `G` = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
//! `A^T` = [[1, 1, 1, 0], [0, 1, -1, -1]]. The forward's transforms are [`plane`]'s with
//! these, compiled for the widest SIMD level the CPU has ([`with_simd!`]).

use super::plane::{self, Buffers, Lines};
use super::{Algo, Tiles};
use crate::buffer::Slot;
use crate::simd::with_simd;

/// [`Algo::weight_row`]'s body.
#[inline(always)]
pub(super) fn weight_row(k: &[f32], dst: &mut [f32], c: usize) {
    super::weight_lanes::<F2, 16>(k, dst, c);
}

plane::plane_transforms!(F2, 4, 2, 16, 4);

/// F(2x2, 3x3); also the algorithm whose dual the weight gradient runs
/// ([`super::weight_grad`], with [`Rows::grad_tiles`]).
pub(crate) struct F2;

impl Algo for F2 {
    const M: usize = 2;
    const POS: usize = 16;
    type Rows = Rows;

    fn rows(tiles: Tiles) -> Rows {
        Rows::new(tiles)
    }

    #[inline(always)]
    fn weight_tile(g: &[f32; 9], u: &mut [f32; 36]) {
        // G g, column by column: g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2 (of the
        // kernel's rows).
        let mut gg = [[0f32; 3]; 4];
        for j in 0..3 {
            let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
            gg[0][j] = a;
            gg[1][j] = (a + b + c) * 0.5;
            gg[2][j] = (a - b + c) * 0.5;
            gg[3][j] = c;
        }
        // (G g) G^T: the same combination along each row.
        for (i, r) in gg.iter().enumerate() {
            u[i * 4] = r[0];
            u[i * 4 + 1] = (r[0] + r[1] + r[2]) * 0.5;
            u[i * 4 + 2] = (r[0] - r[1] + r[2]) * 0.5;
            u[i * 4 + 3] = r[2];
        }
    }

    fn weight_row(k: &[f32], dst: &mut [f32], c: usize) {
        let simd = crate::dispatch::current().simd;
        with_simd!(simd, weight_row(k: &[f32], dst: &mut [f32], c: usize));
    }

    fn input_tiles(rows: &mut Rows, pp: &[f32], v: &mut [f32], at: (usize, usize)) {
        rows.plane.input_tiles(4, pp, (v, at), input_simd);
    }

    fn output_tiles<S: Slot>(
        rows: &mut Rows,
        m: &[f32],
        at: (usize, usize, usize, usize),
        out: &mut [S],
        hw: (usize, usize),
    ) {
        rows.plane
            .output_tiles::<2, S>(m, at, (out, hw), output_simd);
    }
}

impl Lines<4, 2> for F2 {
    #[inline(always)]
    fn bt(a: [f32; 4]) -> [f32; 4] {
        [a[0] - a[2], a[1] + a[2], a[2] - a[1], a[1] - a[3]]
    }

    #[inline(always)]
    fn at(a: [f32; 4]) -> [f32; 2] {
        [a[0] + a[1] + a[2], a[1] - a[2] - a[3]]
    }
}

/// The transforms' buffers: [`plane`]'s, and the weight gradient's rows.
pub(crate) struct Rows {
    plane: Buffers,
    /// The even columns of the output gradient's even and odd rows, tile row after tile
    /// row ([`Rows::grad_tiles`]).
    r: [Vec<f32>; 2],
    /// Their odd columns.
    s: [Vec<f32>; 2],
}

impl Rows {
    fn new(tiles: Tiles) -> Rows {
        let tp = tiles.per_image();
        Rows {
            plane: Buffers::new(tiles),
            r: std::array::from_fn(|_| vec![0f32; tp]),
            s: std::array::from_fn(|_| vec![0f32; tp]),
        }
    }

    /// The transformed output-gradient tiles `A dY A^T` of one plane `(h, w)` (zero past
    /// its edges): position `ξ` of tile `t` into `yv[ξ * t_all + t0 + t]`.
    pub(super) fn grad_tiles(
        &mut self,
        plane: &[f32],
        hw: (usize, usize),
        yv: &mut [f32],
        at: (usize, usize),
    ) {
        let tiles = self.plane.tiles;
        let [e0, e1] = &mut self.r;
        let [o0, o1] = &mut self.s;
        let cols = [&mut e0[..], &mut e1[..], &mut o0[..], &mut o1[..]];
        let tiles = (tiles.th, tiles.tw);
        let simd = crate::dispatch::current().simd;
        with_simd!(simd, grad_tile_plane(plane: &[f32], hw: (usize, usize), tiles: (usize, usize), cols: [&mut [f32]; 4], yv: &mut [f32], at: (usize, usize)));
    }
}

/// [`Rows::grad_tiles`]' body, compiled for the SIMD level in use (no closures: they would
/// be compiled without the level's features): the even and odd columns of rows `2 ty` and
/// `2 ty + 1` of each tile row `ty` into `cols` = `[e0, e1, o0, o1]` (`tw` values a tile
/// row, zero past the plane), then `A dY A^T` of every tile of the plane in one loop (tile
/// row by tile row, a 14x14 plane's 7 tiles a row made loops too short to vectorise).
#[inline(always)]
fn grad_tile_plane(
    plane: &[f32],
    (h, w): (usize, usize),
    (th, tw): (usize, usize),
    [e0, e1, o0, o1]: [&mut [f32]; 4],
    yv: &mut [f32],
    (t_all, t0): (usize, usize),
) {
    let tp = th * tw;
    for ty in 0..th {
        let cols = ty * tw..(ty + 1) * tw;
        for (r, (e, o)) in [(&mut *e0, &mut *o0), (&mut *e1, &mut *o1)]
            .into_iter()
            .enumerate()
        {
            let (e, o) = (&mut e[cols.clone()], &mut o[cols.clone()]);
            let y = 2 * ty + r;
            if y < h {
                split_even_odd(&plane[y * w..(y + 1) * w], e, o);
            } else {
                e.fill(0.0);
                o.fill(0.0);
            }
        }
    }
    let (e0, e1, o0, o1) = (&e0[..tp], &e1[..tp], &o0[..tp], &o1[..tp]);
    // A dY: the rows y0, y0 + y1, y0 - y1, -y1; then . A^T along each: e, e + o, e - o,
    // -o. One loop per row of `A dY`, each a plain elementwise loop.
    for i in 0..4 {
        let at = |j: usize| (i * 4 + j) * t_all + t0;
        let (d0, rest) = yv[at(0)..at(3) + tp].split_at_mut(t_all);
        let (d1, rest) = rest.split_at_mut(t_all);
        let (d2, d3) = rest.split_at_mut(t_all);
        let (d0, d1, d2, d3) = (&mut d0[..tp], &mut d1[..tp], &mut d2[..tp], &mut d3[..tp]);
        match i {
            0 => {
                for t in 0..tp {
                    put((d0, d1, d2, d3), t, e0[t], o0[t]);
                }
            }
            1 => {
                for t in 0..tp {
                    put((d0, d1, d2, d3), t, e0[t] + e1[t], o0[t] + o1[t]);
                }
            }
            2 => {
                for t in 0..tp {
                    put((d0, d1, d2, d3), t, e0[t] - e1[t], o0[t] - o1[t]);
                }
            }
            _ => {
                for t in 0..tp {
                    put((d0, d1, d2, d3), t, -e1[t], -o1[t]);
                }
            }
        }
    }
}

/// One tile's row of `A dY A^T` from its row of `A dY`, even column `e`, odd column `o`.
#[inline(always)]
fn put(
    (d0, d1, d2, d3): (&mut [f32], &mut [f32], &mut [f32], &mut [f32]),
    tx: usize,
    e: f32,
    o: f32,
) {
    d0[tx] = e;
    d1[tx] = e + o;
    d2[tx] = e - o;
    d3[tx] = -o;
}

/// `e[k] = row[2 k]`, `o[k] = row[2 k + 1]` (zero past the row) for `k < e.len()`: steps
/// of [`plane::LANES`] pairs from two whole vectors of the row (fixed positions, which the
/// compiler turns into shuffles), then one value at a time.
#[inline(always)]
fn split_even_odd(row: &[f32], e: &mut [f32], o: &mut [f32]) {
    const L: usize = plane::LANES;
    let n = e.len();
    let mut k = 0;
    while k + L <= n && 2 * (k + L) <= row.len() {
        let win: [f32; 2 * L] = row[2 * k..2 * (k + L)].try_into().expect("2 L values");
        let (mut ev, mut ov) = ([0f32; L], [0f32; L]);
        for l in 0..L {
            ev[l] = win[2 * l];
            ov[l] = win[2 * l + 1];
        }
        e[k..k + L].copy_from_slice(&ev);
        o[k..k + L].copy_from_slice(&ov);
        k += L;
    }
    for k in k..n {
        e[k] = row.get(2 * k).copied().unwrap_or(0.0);
        o[k] = row.get(2 * k + 1).copied().unwrap_or(0.0);
    }
}

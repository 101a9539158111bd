//! F(2x2, 3x3): 2x2 output tiles from 4x4 input tiles, 16 positions.
//!
//! `B^T` = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
//! `G` = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
//! `A^T` = [[1, 1, 1, 0], [0, 1, -1, -1]]. The padded rows (see [`Tiles::pad`]) are split
//! into their even and odd columns.

use super::{Algo, Tiles};
use crate::simd::with_simd;

/// [`Algo::weight_row`]'s body.
#[inline(always)]
pub(super) fn weight_row(k: &[f32], dst: &mut [f32], c: usize) {
    super::weight_lanes::<F2>(k, dst, c);
}

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

    fn input_tiles(rows: &mut Rows, pp: &[f32], v: &mut [f32], (t_all, t0): (usize, usize)) {
        let tw = rows.tiles.tw;
        for ty in 0..rows.tiles.th {
            rows.input_tiles(pp, ty, v, t_all, t0 + ty * tw);
        }
    }

    fn output_tiles(
        rows: &mut Rows,
        m: &[f32],
        (co, cout, t_all, t0): (usize, usize, usize, usize),
        out: &mut [f32],
        hw: (usize, usize),
    ) {
        let tw = rows.tiles.tw;
        for ty in 0..rows.tiles.th {
            rows.output_tiles(m, (co, cout, t_all, t0 + ty * tw), out, hw, ty);
        }
    }
}

/// The (even, odd) column pairs of a row.
fn pairs(r: &[f32]) -> impl Iterator<Item = (f32, f32)> + '_ {
    r.chunks_exact(2).map(|p| (p[0], p[1]))
}

/// Row buffers of the transforms: one row of tiles at a time.
pub(crate) struct Rows {
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

    /// [`Algo::input_tiles`] for tile row `ty`, its first tile at `t0`.
    fn input_tiles(&mut self, pp: &[f32], ty: usize, v: &mut [f32], t_all: usize, t0: usize) {
        let tw = self.tiles.tw;
        let pw = self.tiles.padded_width();
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
    pub(super) fn grad_tiles(
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

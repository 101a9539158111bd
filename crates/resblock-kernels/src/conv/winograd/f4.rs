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
//! The transforms are [`plane`]'s with this algorithm's `B^T` and `A^T`, compiled for the
//! widest SIMD level the CPU has ([`with_simd!`]).

use super::plane::{self, Buffers, Lines};
use super::{Algo, Tiles};
use crate::buffer::Slot;
use crate::simd::with_simd;

/// F(4x4, 3x3), the algorithm of [`super::forward`] and of the input gradient.
pub(crate) struct F4;

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
    super::weight_lanes::<F4, 36>(k, dst, c);
}

impl Algo for F4 {
    const M: usize = 4;
    const POS: usize = 36;
    type Rows = Buffers;

    fn rows(tiles: Tiles) -> Buffers {
        Buffers::new(tiles)
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

    fn input_tiles(rows: &mut Buffers, pp: &[f32], v: &mut [f32], at: (usize, usize)) {
        rows.input_tiles(6, pp, (v, at), input_simd);
    }

    fn output_tiles<S: Slot>(
        rows: &mut Buffers,
        m: &[f32],
        at: (usize, usize, usize, usize),
        out: &mut [S],
        hw: (usize, usize),
    ) {
        rows.output_tiles::<4, S>(m, at, (out, hw), output_simd);
    }
}

impl Lines<6, 4> for F4 {
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
}

plane::plane_transforms!(F4, 6, 4, 36, 16);

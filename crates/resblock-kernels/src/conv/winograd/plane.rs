//! The input and output transforms of one plane, for any F(m x m, 3x3) given its 1-D
//! transforms ([`Lines`]): `n = m + 2` input values per tile side.
//!
//! Every loop runs [`LANES`] tiles (or columns) at a time through local arrays: loaded
//! with fixed-size copies, combined lane by lane, stored with fixed-size copies. The
//! compiler vectorises those where it does not vectorise a plain loop with a dozen input
//! and output slices (too many pairs to check for overlap). The output transform takes a
//! plane's tiles in one loop however short its rows (a 7x7 output has rows of 2 or 4
//! tiles); the input transform's horizontal half goes tile row by tile row, reading each
//! step's tiles from whole vectors (see [`input_plane`]). The callers
//! compile these for the widest SIMD level (`with_simd!`), so nothing generic here is a
//! closure (a closure would be compiled without the level's features); [`x86`]'s
//! intrinsics are compiled for AVX-512 whatever the caller.

use crate::buffer::Slot;

/// Tiles or columns per step: one AVX-512 vector.
pub(super) const LANES: usize = 16;
const L: usize = LANES;

/// The 1-D transforms of F(m, 3): `B^T a` of `N = m + 2` values, `A^T a` to `M = m`.
pub(crate) trait Lines<const N: usize, const M: usize> {
    fn bt(a: [f32; N]) -> [f32; N];
    fn at(a: [f32; N]) -> [f32; M];
}

/// `count` values from `src` into `dst`: a fixed-size copy for a whole step.
#[inline(always)]
fn load(dst: &mut [f32; L], src: &[f32], count: usize) {
    if count == L {
        *dst = src[..L].try_into().expect("LANES values");
    } else {
        dst[..count].copy_from_slice(&src[..count]);
    }
}

/// `count` values of `src` into `dst`.
#[inline(always)]
fn store(dst: &mut [f32], src: &[f32; L], count: usize) {
    if count == L {
        dst[..L].copy_from_slice(src);
    } else {
        dst[..count].copy_from_slice(&src[..count]);
    }
}

/// `B^T` of each lane's `N` values `a[.][lane]`.
#[inline(always)]
fn bt_lanes<T: Lines<N, M>, const N: usize, const M: usize>(a: &[[f32; L]; N]) -> [[f32; L]; N] {
    let mut b = [[0f32; L]; N];
    for l in 0..L {
        let mut col = [0f32; N];
        for (k, v) in col.iter_mut().enumerate() {
            *v = a[k][l];
        }
        let t = T::bt(col);
        for (i, v) in t.into_iter().enumerate() {
            b[i][l] = v;
        }
    }
    b
}

/// The buffers of one thread's transforms, sized on first use (an output transform needs
/// only `m^2` values per tile, and the same buffers serve every plane a thread takes).
pub(crate) struct Buffers {
    pub(super) tiles: super::Tiles,
    pub(super) buf: Vec<f32>,
}

impl Buffers {
    pub(super) fn new(tiles: super::Tiles) -> Buffers {
        Buffers {
            tiles,
            buf: Vec::new(),
        }
    }

    /// Ready for [`input_plane`] with `n` values per tile side.
    fn for_input(&mut self, n: usize) {
        let super::Tiles { m, th, tw } = self.tiles;
        self.grow(input_buffer_len(n, m, th, tw));
    }

    /// At least `len` values in `buf`.
    fn grow(&mut self, len: usize) {
        if self.buf.len() < len {
            self.buf.resize(len, 0.0);
        }
    }

    /// `Algo::input_tiles` for `n` values per tile side: `run` is the algorithm's
    /// [`input_plane`] compiled for the SIMD level in use.
    pub(super) fn input_tiles(
        &mut self,
        n: usize,
        pp: &[f32],
        (v, (t_all, t0)): (&mut [f32], (usize, usize)),
        run: InputPlane,
    ) {
        self.for_input(n);
        let super::Tiles { th, tw, .. } = self.tiles;
        run(pp, &mut self.buf, (th, tw), &mut v[t0..], t_all);
    }

    /// `Algo::output_tiles` for `M x M` output tiles: `run` is the algorithm's
    /// [`output_plane`] compiled for the SIMD level in use.
    pub(super) fn output_tiles<const M: usize, S: Slot>(
        &mut self,
        mt: &[f32],
        (co, cout, t_all, t0): (usize, usize, usize, usize),
        (out, hw): (&mut [S], (usize, usize)),
        run: OutputPlane,
    ) {
        let super::Tiles { th, tw, .. } = self.tiles;
        let tp = th * tw;
        self.grow(M * M * tp);
        let buf = &mut self.buf[..M * M * tp];
        run(&mt[co * t_all + t0..], cout * t_all, buf, tp);
        scatter_rows::<M, S>(buf, (th, tw), out, hw);
    }
}

/// An algorithm's [`input_plane`] on the SIMD level in use:
/// `(pp, buf, (th, tw), v, t_all)`.
pub(super) type InputPlane = fn(&[f32], &mut [f32], (usize, usize), &mut [f32], usize);

/// An algorithm's [`output_plane`] on the SIMD level in use: `(mt, stride, buf, tp)`.
pub(super) type OutputPlane = fn(&[f32], usize, &mut [f32], usize);

/// The length of [`input_plane`]'s buffer for tiles `th x tw`: `n` combined rows of
/// [`combined_row_len`] values.
pub(super) fn input_buffer_len(n: usize, m: usize, th: usize, tw: usize) -> usize {
    n * combined_row_len(m, th, tw)
}

/// The values of one tile row's window from its first tile: `L` tiles `m` apart and the
/// `n - m` more the last one reads (`n <= 2 m` for F(2x2) and F(4x4)), read as whole steps
/// of `L`: the largest, F(4x4)'s, `4 (L + 1)` rounded up to 5 steps.
const WINDOW: usize = WINDOW_STEPS * L;
/// [`WINDOW`] in steps of `L`.
const WINDOW_STEPS: usize = 5;

/// The length of one of [`input_plane`]'s combined rows: `th pw + 2` values, and
/// [`WINDOW`] more so that every tile row's window lies inside it.
fn combined_row_len(m: usize, th: usize, tw: usize) -> usize {
    th * (tw + 1) * m + 2 + WINDOW
}

/// The input transform of one padded plane `pp` (`m th + 2` rows of `pw = m (tw + 1)`, then
/// at least 2 more values, best a vector's worth; see `Tiles::pad`): `B^T d` of each tile
/// row's `N` rows into `buf` (row `i` of tile row `ty` at `i len + ty pw`, `len` =
/// [`combined_row_len`]), then `B^T d B` of every tile into `v`, position `ξ` of the plane's
/// tile `t` at `v[ξ * t_all + t]`.
/// Tile `(ty, tx)` starts at `ty pw + m tx` in each combined row. `wide`: compiled for
/// AVX-512, so the horizontal steps gather their tiles with its shuffles ([`x86`]).
#[inline(always)]
pub(super) fn input_plane<T: Lines<N, M>, const N: usize, const M: usize>(
    pp: &[f32],
    buf: &mut [f32],
    (th, tw): (usize, usize),
    v: &mut [f32],
    t_all: usize,
    wide: bool,
) {
    // Only where the CPU has AVX-512, whatever the caller says: [`x86`]'s gather runs its
    // instructions.
    let wide = wide && crate::dispatch::cpu().avx512;
    let pw = M * (tw + 1);
    let len = combined_row_len(M, th, tw);
    let vert = &mut buf[..N * len];
    for ty in 0..th {
        let mut c = 0;
        while c < pw {
            // Whole vectors wherever the plane has `L` values from here (a copy of `count`
            // values is a `memcpy` call: 11% of a 64-channel 56x56 forward's samples). The
            // lanes past `count` are the next row's first values; stored, they land on the
            // start of the next tile row's combined row, which is written after, or past
            // the last one, in the buffer's slack ([`combined_row_len`]).
            let count = L.min(pw - c);
            let mut a = [[0f32; L]; N];
            for (k, a) in a.iter_mut().enumerate() {
                let src = &pp[(M * ty + k) * pw + c..];
                load(a, src, if src.len() >= L { L } else { count });
            }
            let b = bt_lanes::<T, N, M>(&a);
            for (i, b) in b.iter().enumerate() {
                store(&mut vert[i * len + ty * pw + c..], b, L);
            }
            c += L;
        }
    }
    // The horizontal half: tile `tx` of tile row `ty` starts at `ty pw + M tx` in each
    // combined row, and a step of `L` tiles reads a window of whole vectors from its first
    // ([`horizontal_step`]); tile row by tile row, or whole tile rows per step where they
    // fit ([`horizontal_rows`]).
    let steps = (M * (L + 1)).div_ceil(L);
    assert!(N <= 2 * M && steps <= WINDOW_STEPS);
    match tw + 1 {
        // A padded row holds `tw + 1` tiles' worth (the last one past the image): where
        // that divides a step, one step covers whole tile rows ([`horizontal_rows`]).
        4 => horizontal_rows::<T, N, M, 3>(vert, len, th, (v, t_all), steps, wide),
        8 => horizontal_rows::<T, N, M, 7>(vert, len, th, (v, t_all), steps, wide),
        _ => {
            let tp = th * tw;
            for i in 0..N {
                let row = &vert[i * len..(i + 1) * len];
                for ty in 0..th {
                    let mut tx = 0;
                    while tx < tw {
                        let count = L.min(tw - tx);
                        let start = ty * pw + M * tx;
                        let b = horizontal_step::<T, N, M>(row, start, steps, wide);
                        let t = ty * tw + tx;
                        // Whole vectors but for the plane's last step: the lanes past
                        // `count` are this plane's next tiles, which the next step writes
                        // (with a short row, a copy of `count` values was a `memcpy` call
                        // per step and position).
                        let n = if t + L < tp { L } else { count };
                        for (k, b) in b.iter().enumerate() {
                            store(&mut v[(i * N + k) * t_all + t..], b, n);
                        }
                        tx += L;
                    }
                }
            }
        }
    }
}

/// `B^T` along a combined row (the horizontal half of `B^T d B`) of the `L` tiles whose
/// windows start `M` apart from `row[start]`: value `k` of tile `l` is the window's value
/// `M l + k`, fixed positions, which the compiler turns into shuffles of the window's
/// vectors. (Gathered tile by tile through a table of tile offsets, the values went
/// through the stack one at a time: a fifth of a 256-channel 14x14 forward.) `steps`
/// vectors of the window are read; `start + WINDOW` must lie inside the row. With `wide`
/// (compiled for AVX-512), F(4x4) gathers with [`x86`]'s shuffles: the compiler built some
/// of those fixed positions one value at a time on the stack, and reading them
/// back as vectors stalled on the partial writes (41% of the F(4x4) input transform's
/// samples on one load).
#[inline(always)]
fn horizontal_step<T: Lines<N, M>, const N: usize, const M: usize>(
    row: &[f32],
    start: usize,
    steps: usize,
    wide: bool,
) -> [[f32; L]; N] {
    let win = &row[start..start + WINDOW];
    let mut w = [[0f32; L]; WINDOW_STEPS];
    for (s, w) in w.iter_mut().enumerate().take(steps) {
        *w = win[s * L..(s + 1) * L].try_into().expect("L values");
    }
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` holds only where the CPU has AVX-512 ([`input_plane`] checks).
        if let Some(a) = unsafe { x86::gather::<N, M>(&w) } {
            return bt_lanes::<T, N, M>(&a);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = wide;
    let mut a = [[0f32; L]; N];
    for (k, a) in a.iter_mut().enumerate() {
        for (l, a) in a.iter_mut().enumerate() {
            let at = M * l + k;
            *a = w[at / L][at % L];
        }
    }
    bt_lanes::<T, N, M>(&a)
}

/// The horizontal half for planes `TW` tiles wide, `s = TW + 1` dividing [`LANES`]: tile
/// row `ty`'s windows start at `ty pw = M s ty`, so the combined row is `s` tiles per tile
/// row `M` apart, the last of each past the image, and one step takes `L / s` whole tile
/// rows. The lanes past the image are squeezed out with fixed positions (shuffles), and the
/// step stored as whole vectors: its last `L / s` lanes land on the next step's first tiles,
/// which the next step overwrites; the plane's last step stores only its own tiles. At
/// 14x14 (7 tiles a row) this is 4 steps a row of `B^T d` where one per tile row took 7.
/// (Stored as one copy of `s` lanes per tile row, the compiler took the step apart into
/// single values.)
#[inline(always)]
fn horizontal_rows<T: Lines<N, M>, const N: usize, const M: usize, const TW: usize>(
    vert: &[f32],
    len: usize,
    th: usize,
    (v, t_all): (&mut [f32], usize),
    steps: usize,
    wide: bool,
) {
    let (tw, s) = (TW, TW + 1);
    let tp = th * tw;
    for i in 0..N {
        let row = &vert[i * len..(i + 1) * len];
        for ty0 in (0..th).step_by(L / s) {
            // Inside the row: `M s ty0 + WINDOW <= (th - 1) pw + WINDOW < len`.
            let b = horizontal_step::<T, N, M>(row, M * s * ty0, steps, wide);
            let t = ty0 * tw;
            let n = L.min(tp - t);
            for (k, b) in b.iter().enumerate() {
                // Lane `l` of the squeezed step is tile `l` of the step's tiles, lane
                // `l + l / tw` of the window's.
                let mut c = [0f32; L];
                for (l, c) in c.iter_mut().enumerate() {
                    let from = l + l / tw;
                    *c = if from < L { b[from] } else { 0.0 };
                }
                store(&mut v[(i * N + k) * t_all + t..], &c, n);
            }
        }
    }
}

/// The output transform of `tp` tiles: `A^T M A` of each, from `mt` (position `ξ` of tile
/// `t` at `mt[ξ * stride + t]`), output row `i` and column `q` of each tile into
/// `buf[(M i + q) * tp + t]`. `P` is `N^2` and `Q` is `M^2` (the local arrays' sizes:
/// zero-filling unused rows of fixed 36 and 16 cost more than the F(2x2) transform).
#[inline(always)]
pub(super) fn output_plane<
    T: Lines<N, M>,
    const N: usize,
    const M: usize,
    const P: usize,
    const Q: usize,
>(
    mt: &[f32],
    stride: usize,
    buf: &mut [f32],
    tp: usize,
) {
    let mut t = 0;
    while t < tp {
        let count = L.min(tp - t);
        let mut x = [[0f32; L]; P];
        for (xi, x) in x.iter_mut().enumerate() {
            load(x, &mt[xi * stride + t..], count);
        }
        let mut y = [[0f32; L]; Q];
        for l in 0..L {
            // A^T M: column j of the M x N product from column j of M.
            let mut s = [[0f32; M]; N];
            for (j, s) in s.iter_mut().enumerate() {
                let mut col = [0f32; N];
                for (k, v) in col.iter_mut().enumerate() {
                    *v = x[k * N + j][l];
                }
                *s = T::at(col);
            }
            // (A^T M) A: row i from row i of A^T M.
            for i in 0..M {
                let mut row = [0f32; N];
                for (j, v) in row.iter_mut().enumerate() {
                    *v = s[j][i];
                }
                for (q, v) in T::at(row).into_iter().enumerate() {
                    y[i * M + q][l] = v;
                }
            }
        }
        for (r, y) in y.iter().enumerate() {
            store(&mut buf[r * tp + t..], y, count);
        }
        t += L;
    }
}

/// [`output_plane`]'s values into the output plane `out` `(h, w)`, cut at its edges.
pub(super) fn scatter_rows<const M: usize, S: Slot>(
    buf: &[f32],
    (th, tw): (usize, usize),
    out: &mut [S],
    (h, w): (usize, usize),
) {
    let tp = th * tw;
    for (oy, row) in out.chunks_exact_mut(w).take(h).enumerate() {
        let (ty, i) = (oy / M, oy % M);
        let mut ys: [&[f32]; M] = [&[]; M];
        for (q, y) in ys.iter_mut().enumerate() {
            *y = &buf[(i * M + q) * tp + ty * tw..][..tw];
        }
        let mut tiles = row.chunks_exact_mut(M);
        for (tx, o) in (&mut tiles).enumerate() {
            for (q, o) in o.iter_mut().enumerate() {
                o.put(ys[q][tx]);
            }
        }
        for (q, o) in tiles.into_remainder().iter_mut().enumerate() {
            o.put(ys[q][w / M]);
        }
    }
}

/// An algorithm's plane transforms for `with_simd!` and for [`Buffers`]: `input_plane` and
/// `output_row` (the inlined bodies, [`input_plane`] and [`output_plane`] for this
/// algorithm), and `input_simd` / `output_simd` (those on the SIMD level in use, the
/// [`InputPlane`] and [`OutputPlane`] that `Algo::input_tiles` and `Algo::output_tiles`
/// hand to [`Buffers`]). Arguments: the algorithm, `N`, `M`, `N^2`, `M^2`.
macro_rules! plane_transforms {
    ($algo:ty, $n:literal, $m:literal, $p:literal, $q:literal) => {
        /// The input transform of one padded plane ([`plane::input_plane`]).
        #[inline(always)]
        pub(super) fn input_plane(
            pp: &[f32],
            buf: &mut [f32],
            tiles: (usize, usize),
            v: &mut [f32],
            t_all: usize,
            wide: bool,
        ) {
            $crate::conv::winograd::plane::input_plane::<$algo, $n, $m>(
                pp, buf, tiles, v, t_all, wide,
            );
        }

        /// The output transform of `tp` tiles ([`plane::output_plane`]).
        #[inline(always)]
        pub(super) fn output_row(m: &[f32], stride: usize, buf: &mut [f32], tp: usize) {
            $crate::conv::winograd::plane::output_plane::<$algo, $n, $m, $p, $q>(
                m, stride, buf, tp,
            );
        }

        /// [`input_plane`] on the SIMD level in use ([`plane::InputPlane`]).
        fn input_simd(
            pp: &[f32],
            buf: &mut [f32],
            tiles: (usize, usize),
            v: &mut [f32],
            t_all: usize,
        ) {
            let simd = $crate::dispatch::current().simd;
            // The level `with_simd!` compiles the transform for.
            let wide = $crate::dispatch::usable(simd) == $crate::dispatch::Simd::Avx512;
            $crate::simd::with_simd!(simd, input_plane(pp: &[f32], buf: &mut [f32], tiles: (usize, usize), v: &mut [f32], t_all: usize, wide: bool));
        }

        /// [`output_row`] on the SIMD level in use ([`plane::OutputPlane`]).
        fn output_simd(m: &[f32], stride: usize, buf: &mut [f32], tp: usize) {
            let simd = $crate::dispatch::current().simd;
            $crate::simd::with_simd!(simd, output_row(m: &[f32], stride: usize, buf: &mut [f32], tp: usize));
        }
    };
}
pub(super) use plane_transforms;

/// The horizontal steps' gather on AVX-512 ([`horizontal_step`]).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{L, WINDOW_STEPS};

    /// Value `k` of each of the `L` tiles whose windows start `M` apart, `a[k][l] = w[M l +
    /// k]` over the window's vectors `w`, for F(4x4) (`N = 6`, `M = 4`); `None` for another
    /// algorithm. (F(2x2)'s even and odd values the compiler shuffles well: with this
    /// module's shuffles its 14x14 layers ran 3-5% slower.)
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    pub(super) unsafe fn gather<const N: usize, const M: usize>(
        w: &[[f32; L]; WINDOW_STEPS],
    ) -> Option<[[f32; L]; N]> {
        if (N, M) != (6, 4) {
            return None;
        }
        // SAFETY: the caller's.
        let a = unsafe { stride4(w) };
        Some(std::array::from_fn(|k| a[k]))
    }

    /// `a[k][l] = w[4 l + k]`, `k < 6`: lanes 0-7 of `a[k]`, `k < 4`, from the first 32
    /// values and lanes 8-15 from the next 32; then `a[4]` and `a[5]`, `a[0]` and `a[1]`
    /// shifted down one lane (one tile), their last lanes the window's values 64 and 65.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn stride4(w: &[[f32; L]; WINDOW_STEPS]) -> [[f32; L]; 6] {
        let v = |s: usize| -> __m512 {
            // SAFETY: `w[s]` holds 16 values.
            unsafe { _mm512_loadu_ps(w[s].as_ptr()) }
        };
        let (w0, w1, w2, w3, w4) = (v(0), v(1), v(2), v(3), v(4));
        let base = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
        let a = |k: i32| {
            let idx = _mm512_add_epi32(base, _mm512_set1_epi32(k));
            let lo = _mm512_permutex2var_ps(w0, idx, w1);
            let hi = _mm512_permutex2var_ps(w2, idx, w3);
            _mm512_mask_blend_ps(0xFF00, lo, hi)
        };
        let shift = |a: __m512, j: i32| {
            let idx = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 + j);
            _mm512_permutex2var_ps(a, idx, w4)
        };
        let (a0, a1) = (a(0), a(1));
        let mut out = [[0f32; L]; 6];
        for (o, v) in out
            .iter_mut()
            .zip([a0, a1, a(2), a(3), shift(a0, 0), shift(a1, 1)])
        {
            // SAFETY: `o` holds 16 values.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
        }
        out
    }
}

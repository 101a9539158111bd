//! The AVX-512 micro-kernels of the direct convolution: 8 output channels by 2 vectors of 16
//! pixels (forward: 16 accumulators of the 32 registers), 8 channels by 3 taps (weight
//! gradient: 24 accumulators).
//!
//! Against the AVX2 tile (4 x 2 vectors of 8) each broadcast weight feeds twice the pixels and
//! each loaded input vector twice the channels, so a step issues half the loads per FMA and
//! twice as many independent accumulators hide the FMA latency. (On CPUs that execute a
//! 512-bit FMA as two 256-bit halves, such as AMD Zen 4, that is where the gain comes from:
//! the peak FMA rate is the same as AVX2's.)

use std::arch::x86_64::*;

use super::{Isa, MAX_CB, TB};

/// Output channels per micro-tile.
const CB: usize = Isa::Avx512.cb();
/// f32 lanes of one register.
const LANES: usize = Isa::Avx512.lanes();

/// Where a tile's taps read: the input planes `x` (`ps` apart), the tap offsets `taps`
/// (row-major, `kw` per kernel row), and the lane masks of the tile's pixels, the mask of
/// kernel column `kx` for the 16 pixels starting `16 v` into the tile at `masks[kx * nq +
/// 2 v]` (a lane whose bit is clear reads zero: on the masked layout that is a tap that
/// would wrap into the neighbouring row, see `Plan::masked`).
#[derive(Clone, Copy)]
pub(crate) struct Reads<'a> {
    pub(crate) x: *const f32,
    pub(crate) ps: usize,
    pub(crate) taps: &'a [usize],
    pub(crate) kw: usize,
    pub(crate) masks: *const u16,
    pub(crate) nq: usize,
}

/// With `TQ = LANES * V` pixels (`V` vectors: 2 for the full tiles, 1 for a tail):
/// `out[j * qlen + 0..TQ] = sum_ci sum_tap w[ci, tap, j] * x[ci * ps + taps[tap] + 0..TQ]`,
/// each loaded vector masked by its tap column's mask.
///
/// # Safety
/// AVX-512 F and VL must be available; `x` must be readable for `(c - 1) * ps + max(taps) + TQ`
/// floats, `masks` for `(kw - 1) * nq + 2 * V - 1` values, `taps.len()` a multiple of
/// `kw`, `w` readable for `c * taps.len() * CB`, and `out` writable for
/// `(CB - 1) * qlen + TQ`.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn fwd_tile<const V: usize>(
    r: Reads<'_>,
    c: usize,
    w: *const f32,
    out: *mut f32,
    qlen: usize,
) {
    // SAFETY: the caller's contract covers every pointer formed here. (No closures: they
    // would not inherit the target features.)
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; CB];
        let mut wp = w;
        for ci in 0..c {
            let xc = r.x.add(ci * r.ps);
            for row in r.taps.chunks_exact(r.kw) {
                for (kx, &off) in row.iter().enumerate() {
                    let m = r.masks.add(kx * r.nq);
                    let k: [__mmask16; V] = std::array::from_fn(|v| *m.add(2 * v));
                    tap(&mut acc, xc.add(off), k, wp);
                    wp = wp.add(CB);
                }
            }
        }
        store(&acc, out, qlen);
    }
}

/// One tap of a forward tile: `V` vectors loaded from `p` under the masks `k`, each times
/// the `CB` weights at `w` into the accumulators `acc`.
///
/// # Safety
/// AVX-512 F and VL must be available, `p` readable for `V * 16` floats (where the masks
/// are set) and `w` for `CB`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn tap<const V: usize>(
    acc: &mut [[__m512; V]; CB],
    p: *const f32,
    k: [__mmask16; V],
    w: *const f32,
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        let xv: [__m512; V] =
            std::array::from_fn(|v| _mm512_maskz_loadu_ps(k[v], p.add(v * LANES)));
        for (j, row) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*w.add(j));
            for (a, xv) in row.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(*xv, b, *a);
            }
        }
    }
}

/// A forward tile's accumulators into `out[j * qlen + 0..16 V]`.
///
/// # Safety
/// AVX-512 F must be available and `out` writable for `(CB - 1) * qlen + 16 V` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn store<const V: usize>(acc: &[[__m512; V]; CB], out: *mut f32, qlen: usize) {
    for (j, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { _mm512_storeu_ps(out.add(j * qlen + v * LANES), *a) };
        }
    }
}

/// [`fwd_tile`] for kernels 3 wide (`kw = 3`), with the column loop unrolled and the tile's
/// `3 * V` masks loaded once, before the loop over input channels, rather than once per tap.
///
/// With `PREFETCH`, each input channel's step first prefetches the next channel's rows of
/// the tile (`V + 1` cache lines per kernel row, one plane on): where a tile's rows over all
/// input channels do not fit in L1 (see `PREFETCH_MIN_BYTES` in `mod.rs`) they come from
/// L2 one plane apart, a stride the hardware prefetchers did not cover. (The last channel's
/// prefetches point past the input; a prefetch never faults.)
///
/// # Safety
/// As [`fwd_tile`] with `kw = 3`.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn fwd_tile_k3<const V: usize, const PREFETCH: bool>(
    r: Reads<'_>,
    c: usize,
    w: *const f32,
    out: *mut f32,
    qlen: usize,
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        let mut k = [[0 as __mmask16; V]; 3];
        for (kx, kv) in k.iter_mut().enumerate() {
            for (v, m) in kv.iter_mut().enumerate() {
                *m = *r.masks.add(kx * r.nq + 2 * v);
            }
        }
        let mut acc = [[_mm512_setzero_ps(); V]; CB];
        let mut wp = w;
        for ci in 0..c {
            let xc = r.x.add(ci * r.ps);
            if PREFETCH {
                let next = xc.wrapping_add(r.ps);
                for row in r.taps.chunks_exact(3) {
                    for l in 0..=V {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(row[0] + l * LANES).cast());
                    }
                    // On the polyphase layout (stride 2) the middle column reads another
                    // phase: its rows too.
                    if row[1] != row[0] + 1 {
                        for l in 0..=V {
                            _mm_prefetch::<_MM_HINT_T0>(
                                next.wrapping_add(row[1] + l * LANES).cast(),
                            );
                        }
                    }
                }
            }
            for row in r.taps.chunks_exact(3) {
                let offs = [row[0], row[1], row[2]];
                for (off, kv) in offs.iter().zip(&k) {
                    tap(&mut acc, xc.add(*off), *kv, wp);
                    wp = wp.add(CB);
                }
            }
        }
        store(&acc, out, qlen);
    }
}

/// [`fwd_tile`] for the half-vector tile that ends a flattened row of `16 k + 8` pixels:
/// `out[j * qlen + 0..8]` from 256-bit vectors (AVX-512 VL reaches all 32 registers at that
/// width), 8 accumulators. A 512-bit tile there would do twice the FMAs for the same outputs.
///
/// # Safety
/// As [`fwd_tile`] with `TQ = 8` (the low 8 bits of each mask).
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn fwd_tile_half(
    r: Reads<'_>,
    c: usize,
    w: *const f32,
    out: *mut f32,
    qlen: usize,
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); CB];
        let mut wp = w;
        for ci in 0..c {
            let xc = r.x.add(ci * r.ps);
            for row in r.taps.chunks_exact(r.kw) {
                for (kx, &off) in row.iter().enumerate() {
                    let k = *r.masks.add(kx * r.nq) as __mmask8;
                    let xv = _mm256_maskz_loadu_ps(k, xc.add(off));
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(xv, _mm256_set1_ps(*wp.add(j)), *a);
                    }
                    wp = wp.add(CB);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(j * qlen), *a);
        }
    }
}

/// `sums[j][t] = sum_i sum_{q < qlen} dys[i][j * stride + q] * xs[i][offs[t] + q]` for every
/// `j < CB`: all `CB` rows by `TB` taps in 24 accumulators, summed over the images before
/// one reduction; each loaded input vector feeds 8 FMAs and each `dY` vector 3. The input
/// vector of tap `t` at `q` is masked by `masks[t][q / 8]` (see [`Reads`]).
///
/// The accumulators are named variables (a macro writes them out). Without AVX-512VL in the
/// target features, 128- and 256-bit instructions (the zeroing idiom, the halves of the
/// final reduction) reach only registers 0-15, so LLVM kept the accumulators there and
/// spilled 8 of them: hence VL is required.
///
/// # Safety
/// AVX-512 F and VL must be available, `qlen` a multiple of 8 (a last half vector is read
/// with masked loads), every `xs[i]` readable for `max(offs) + qlen` floats, every
/// `dys[i]` for `(CB - 1) * stride + qlen`, and every `masks[t]` for `qlen / 8` values.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn wgrad_tile(
    (xs, dys): (&[*const f32], &[*const f32]),
    offs: [usize; TB],
    masks: [*const u16; TB],
    stride: usize,
    qlen: usize,
    sums: &mut [[f32; TB]; MAX_CB],
) {
    const _: () = assert!(CB == 8 && TB == 3);
    macro_rules! kernel {
        ($($j:literal: $a0:ident $a1:ident $a2:ident),*) => {
            // SAFETY: the caller's contract covers every pointer formed here.
            unsafe {
                $(let (mut $a0, mut $a1, mut $a2) =
                    (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());)*
                for (&x, &dy) in xs.iter().zip(dys) {
                    let (x0, x1, x2) = (x.add(offs[0]), x.add(offs[1]), x.add(offs[2]));
                    let mut q = 0;
                    let (m0, m1, m2) = (masks[0], masks[1], masks[2]);
                    while q + LANES <= qlen {
                        let i = q / 8;
                        let (v0, v1, v2) = (
                            _mm512_maskz_loadu_ps(*m0.add(i), x0.add(q)),
                            _mm512_maskz_loadu_ps(*m1.add(i), x1.add(q)),
                            _mm512_maskz_loadu_ps(*m2.add(i), x2.add(q)),
                        );
                        $(
                            let d = _mm512_loadu_ps(dy.add($j * stride + q));
                            $a0 = _mm512_fmadd_ps(v0, d, $a0);
                            $a1 = _mm512_fmadd_ps(v1, d, $a1);
                            $a2 = _mm512_fmadd_ps(v2, d, $a2);
                        )*
                        q += LANES;
                    }
                    if q < qlen {
                        // The last half vector: the masked lanes read as zeros (and are
                        // not read at all, so past the end is never touched).
                        let (k, i): (__mmask16, usize) = (0x00ff, q / 8);
                        let (v0, v1, v2) = (
                            _mm512_maskz_loadu_ps(k & *m0.add(i), x0.add(q)),
                            _mm512_maskz_loadu_ps(k & *m1.add(i), x1.add(q)),
                            _mm512_maskz_loadu_ps(k & *m2.add(i), x2.add(q)),
                        );
                        $(
                            let d = _mm512_maskz_loadu_ps(k, dy.add($j * stride + q));
                            $a0 = _mm512_fmadd_ps(v0, d, $a0);
                            $a1 = _mm512_fmadd_ps(v1, d, $a1);
                            $a2 = _mm512_fmadd_ps(v2, d, $a2);
                        )*
                    }
                }
                // Per tap, the 8 channels' accumulators reduced together.
                let taps = [
                    sum8([$(fold($a0)),*]),
                    sum8([$(fold($a1)),*]),
                    sum8([$(fold($a2)),*]),
                ];
                for (j, row) in sums.iter_mut().enumerate().take(CB) {
                    *row = [taps[0][j], taps[1][j], taps[2][j]];
                }
            }
        };
    }
    kernel!(
        0: a00 a01 a02, 1: a10 a11 a12, 2: a20 a21 a22, 3: a30 a31 a32,
        4: a40 a41 a42, 5: a50 a51 a52, 6: a60 a61 a62, 7: a70 a71 a72
    );
}

/// The two 256-bit halves of `a` added: 8 partial sums of its 16 lanes.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn fold(a: __m512) -> __m256 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
    _mm256_add_ps(_mm512_castps512_ps256(a), hi)
}

/// `out[j]` = the sum of `v[j]`'s 8 lanes, for the 8 vectors at once: pairwise horizontal
/// adds, then the two 128-bit halves. One `_mm512_reduce_add_ps` per accumulator cost about
/// 8 shuffles and adds each, 192 for a tile's 24, a twentieth of the kernel's time at 28x28
/// (one image per call: 51 vector steps per reduction); this is 48 + 27.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn sum8(v: [__m256; CB]) -> [f32; CB] {
    // Lane pairs: h01 = [v0 v0 v1 v1 | v0 v0 v1 v1] partial sums, and so on.
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h45 = _mm256_hadd_ps(v[4], v[5]);
    let h67 = _mm256_hadd_ps(v[6], v[7]);
    // [v0 v1 v2 v3 | v0 v1 v2 v3]: each 128-bit half one partial sum per vector.
    let h0123 = _mm256_hadd_ps(h01, h23);
    let h4567 = _mm256_hadd_ps(h45, h67);
    let lo = _mm256_permute2f128_ps::<0x20>(h0123, h4567);
    let hi = _mm256_permute2f128_ps::<0x31>(h0123, h4567);
    let mut out = [0f32; CB];
    // SAFETY: `out` holds 8 floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi)) };
    out
}

/// The transposed weight gradient of a 3x3 "same" convolution on the masked layout, for
/// `NC` input channels and 16 output channels: `out[(c * 9 + tap) * 16 + j] += sum_q
/// dyt[q * co_stride + j] * x[c * ps + q + ky * w + kx]` over the `oh * w` pixels `q = oy *
/// w + ox`, leaving out the taps that would wrap into the neighbouring row (`kx = 0` at `ox
/// = 0`, `kx = 2` at `ox = w - 1`).
///
/// One vector holds the 16 output channels' `dY` of a pixel and each input value is
/// broadcast (an embedded-broadcast operand of its FMA): one vector load and `9 NC` scalar
/// loads per `9 NC` FMAs, against [`wgrad_tile`]'s 11 vector loads per 24 FMAs, whose load
/// bandwidth bounds it on a CPU with two full-width FMA units. No reduction across lanes:
/// the lanes are the output channels.
///
/// # Safety
/// AVX-512 F and VL must be available; `x` readable at `c * ps + q + 2 * w + 2` for `c <
/// NC`, `q < oh * w` (the masked layout's planes), `dyt` at `q * co_stride + 0..16`, and
/// `out` readable and writable for `NC * 9 * 16` floats.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn wgrad_t_tile<const NC: usize>(
    (x, ps): (*const f32, usize),
    (w, oh): (usize, usize),
    (dyt, co_stride): (*const f32, usize),
    out: *mut f32,
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 9]; NC];
        for oy in 0..oh {
            let row = oy * w;
            // The interior pixels: every tap reads inside its row.
            for q in row + 1..row + w.saturating_sub(1) {
                wgrad_t_step::<NC, true>(
                    &mut acc,
                    (x, ps, w),
                    dyt.add(q * co_stride),
                    q,
                    [true; 3],
                );
            }
            // The two edge pixels (one when `w = 1`), without their wrapping taps.
            let first = [false, true, w > 1];
            wgrad_t_step::<NC, false>(&mut acc, (x, ps, w), dyt.add(row * co_stride), row, first);
            if w > 1 {
                let q = row + w - 1;
                let last = [true, true, false];
                wgrad_t_step::<NC, false>(&mut acc, (x, ps, w), dyt.add(q * co_stride), q, last);
            }
        }
        for (c, taps) in acc.iter().enumerate() {
            for (t, a) in taps.iter().enumerate() {
                let p = out.add((c * 9 + t) * LANES);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *a));
            }
        }
    }
}

/// One pixel `q` of [`wgrad_t_tile`]: its `dY` vector at `d` times the input values of
/// its taps; with `ALL` every tap, else those whose column `kx` has `cols[kx]`.
///
/// # Safety
/// As [`wgrad_t_tile`] for the pixel `q`.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn wgrad_t_step<const NC: usize, const ALL: bool>(
    acc: &mut [[__m512; 9]; NC],
    (x, ps, w): (*const f32, usize, usize),
    d: *const f32,
    q: usize,
    cols: [bool; 3],
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        let d = _mm512_loadu_ps(d);
        for (c, taps) in acc.iter_mut().enumerate() {
            let b = x.add(c * ps + q);
            for ky in 0..3 {
                for kx in 0..3 {
                    if ALL || cols[kx] {
                        let a = &mut taps[ky * 3 + kx];
                        *a = _mm512_fmadd_ps(d, _mm512_set1_ps(*b.add(ky * w + kx)), *a);
                    }
                }
            }
        }
    }
}

/// [`wgrad_t_tile`] for the stride-2 polyphase layout, whose junk columns and tail have
/// zero `dY`: `out[(c * 9 + t) * 16 + j] += sum_q dyt[q * co_stride + j] * x[c * ps + q +
/// tap(t)]` over every flattened pixel `q < pix`, with no edge cases (the junk pixels add
/// zeros). Kernel row `ky` reads two phases: its taps are `rows[2 ky]`, `rows[2 ky + 1]`
/// and `rows[2 ky] + 1` (columns 0, 1, 2).
///
/// The loads are addressed as a phase row's start plus the channel's offset plus a column
/// of 0 or 1: the compiler keeps 18 pointers (6 rows by `NC` = 3 channels), 7 of them
/// reloaded from the stack on every pixel, 35 loads per 27 FMAs. Written with the 27 taps'
/// own offsets it kept 27, 14 reloaded (42 loads); two channels per pass (12 pointers)
/// measured the same as three.
///
/// # Safety
/// AVX-512 F and VL must be available; `x` readable at `c * ps + q + rows[r] + 1` for `c <
/// NC`, `q < pix`, `dyt` at `q * co_stride + 0..16`, and `out` readable and writable for
/// `NC * 9 * 16` floats.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn wgrad_s2_tile<const NC: usize>(
    (x, ps): (*const f32, usize),
    rows: &[usize; 6],
    pix: usize,
    (dyt, co_stride): (*const f32, usize),
    out: *mut f32,
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 9]; NC];
        let base: [*const f32; 6] = std::array::from_fn(|r| x.add(rows[r]));
        for q in 0..pix {
            let d = _mm512_loadu_ps(dyt.add(q * co_stride));
            for (c, taps) in acc.iter_mut().enumerate() {
                let at = c * ps + q;
                for ky in 0..3 {
                    let (a, b) = (base[2 * ky].add(at), base[2 * ky + 1].add(at));
                    for (kx, p) in [a, b, a.add(1)].into_iter().enumerate() {
                        let t = &mut taps[ky * 3 + kx];
                        *t = _mm512_fmadd_ps(d, _mm512_set1_ps(*p), *t);
                    }
                }
            }
        }
        for (c, taps) in acc.iter().enumerate() {
            for (t, a) in taps.iter().enumerate() {
                let p = out.add((c * 9 + t) * LANES);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *a));
            }
        }
    }
}

/// `dst[q * rows + r] = src[r * stride + q]` for `r < rows`, `q < pix`: the `dY` rows of
/// [`wgrad_t_tile`] transposed to one row of `rows` output channels per pixel, in 8x8
/// blocks through registers (a scalar loop's strided stores cost a third of the kernel).
///
/// # Safety
/// AVX2 must be available; `rows` a multiple of 8, `src` readable at `r * stride + q` and
/// `dst` writable for `pix * rows` floats.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn transpose_rows(
    (src, stride): (*const f32, usize),
    (rows, pix): (usize, usize),
    dst: *mut f32,
) {
    // SAFETY: the caller's contract covers every pointer formed here.
    unsafe {
        for r0 in (0..rows).step_by(8) {
            let mut q0 = 0;
            while q0 + 8 <= pix {
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(src.add((r0 + i) * stride + q0)));
                // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
                let t: [__m256; 8] = std::array::from_fn(|i| {
                    let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                    if i % 2 == 0 {
                        _mm256_unpacklo_ps(a, b)
                    } else {
                        _mm256_unpackhi_ps(a, b)
                    }
                });
                let s: [__m256; 8] = std::array::from_fn(|i| {
                    // i = 4 h + 2 u + v: rows 4h..4h+4, unpack half u, column pair v.
                    let (h, u, v) = (i / 4, i / 2 % 2, i % 2);
                    let (a, b) = (t[4 * h + u], t[4 * h + 2 + u]);
                    if v == 0 {
                        _mm256_shuffle_ps::<0x44>(a, b)
                    } else {
                        _mm256_shuffle_ps::<0xEE>(a, b)
                    }
                });
                // s[j] holds column j of rows 0-3 in its low half and column 4 + j in its
                // high half; s[4 + j] the same of rows 4-7.
                for k in 0..8 {
                    let j = k % 4;
                    let o = if k < 4 {
                        _mm256_permute2f128_ps::<0x20>(s[j], s[4 + j])
                    } else {
                        _mm256_permute2f128_ps::<0x31>(s[j], s[4 + j])
                    };
                    _mm256_storeu_ps(dst.add((q0 + k) * rows + r0), o);
                }
                q0 += 8;
            }
            for q in q0..pix {
                for i in 0..8 {
                    *dst.add(q * rows + r0 + i) = *src.add((r0 + i) * stride + q);
                }
            }
        }
    }
}

//! Interleaving `R` rows into `R`-wide columns: `dst[p * R + j] = rows[j][p]`, the layout
//! the packers write (the direct convolution's `[ci][tap][cb]` weight blocks, the GEMM's
//! `MR`-row panels of `A`, and its `NR`-column panels of a column-major `B`).
//!
//! One value at a time this is a gather the compiler does not vectorise, and at batch 1,
//! where the weights are packed for every call, it was a tenth of a ResNet-18 inference.
//! Where `R` is a multiple of 8 and AVX2 runs, each `8 x 8` piece (8 rows, 8 values each) is
//! transposed in registers (unpack, shuffle and 128-bit permute steps); elsewhere (and
//! as the reference) the portable version runs in `R x 8` pieces, `R` contiguous loads of 8
//! and the transposed stores, which the compiler turns into shuffles for small `R` but
//! spilled value by value for `R = 32` (the `B` panels: 5% of a 256-channel 3x3 backward).

/// Values per row of one piece.
const PIECE: usize = 8;

/// `dst[p * R + j] = rows[j][p]` for `p < len`, where `len` is the common length of the
/// rows and `dst` is `len * R` long.
///
/// # Panics
/// If a row is not `len` long or `dst` is not `len * R` long.
pub(crate) fn interleave_rows<const R: usize>(rows: [&[f32]; R], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if R.is_multiple_of(PIECE) && crate::dispatch::avx2_fma() {
        // SAFETY: AVX2 runs on this CPU (`avx2_fma`).
        unsafe { x86::interleave_rows(rows, dst) };
        return;
    }
    interleave_rows_portable(rows, dst);
}

/// The portable [`interleave_rows`].
fn interleave_rows_portable<const R: usize>(rows: [&[f32]; R], dst: &mut [f32]) {
    let len = check(&rows, dst);
    let whole = len / PIECE * PIECE;
    for p0 in (0..whole).step_by(PIECE) {
        let piece: [[f32; PIECE]; R] = std::array::from_fn(|j| {
            let mut v = [0f32; PIECE];
            v.copy_from_slice(&rows[j][p0..p0 + PIECE]);
            v
        });
        for (i, out) in dst[p0 * R..(p0 + PIECE) * R]
            .chunks_exact_mut(R)
            .enumerate()
        {
            for (o, v) in out.iter_mut().zip(&piece) {
                *o = v[i];
            }
        }
    }
    tail(&rows, dst, whole);
}

/// The rows' common length, after checking them and `dst`.
fn check<const R: usize>(rows: &[&[f32]; R], dst: &[f32]) -> usize {
    let len = rows[0].len();
    assert!(
        rows.iter().all(|r| r.len() == len) && dst.len() == len * R,
        "interleave: row or destination length"
    );
    len
}

/// Values `from..len` one at a time.
fn tail<const R: usize>(rows: &[&[f32]; R], dst: &mut [f32], from: usize) {
    let len = rows[0].len();
    for p in from..len {
        for (o, row) in dst[p * R..(p + 1) * R].iter_mut().zip(rows) {
            *o = row[p];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{check, tail, PIECE};

    /// [`super::interleave_rows`] in `8 x 8` register transposes, for `R` a multiple of 8.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interleave_rows<const R: usize>(rows: [&[f32]; R], dst: &mut [f32]) {
        let len = check(&rows, dst);
        assert!(R.is_multiple_of(PIECE));
        let whole = len / PIECE * PIECE;
        for p0 in (0..whole).step_by(PIECE) {
            for j0 in (0..R).step_by(PIECE) {
                // SAFETY: rows `j0..j0 + 8` (`R` is a multiple of 8) are `len` long and
                // `p0 + 8 <= whole <= len`; the stores write `dst[(p0 + i) * R + j0..][..8]`
                // with `(p0 + 7) * R + j0 + 8 <= len * R = dst.len()`.
                unsafe {
                    let v: [__m256; PIECE] =
                        std::array::from_fn(|i| _mm256_loadu_ps(rows[j0 + i][p0..].as_ptr()));
                    let t = transpose8(v);
                    let out = dst.as_mut_ptr().add(p0 * R + j0);
                    for (i, t) in t.iter().enumerate() {
                        _mm256_storeu_ps(out.add(i * R), *t);
                    }
                }
            }
        }
        tail(&rows, dst, whole);
    }

    /// The transpose of 8 rows of 8: `out[i]` lane `j` is `v[j]` lane `i`.
    #[target_feature(enable = "avx2")]
    fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
        // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
        let a0 = _mm256_unpacklo_ps(v[0], v[1]);
        let a1 = _mm256_unpackhi_ps(v[0], v[1]);
        let a2 = _mm256_unpacklo_ps(v[2], v[3]);
        let a3 = _mm256_unpackhi_ps(v[2], v[3]);
        let a4 = _mm256_unpacklo_ps(v[4], v[5]);
        let a5 = _mm256_unpackhi_ps(v[4], v[5]);
        let a6 = _mm256_unpacklo_ps(v[6], v[7]);
        let a7 = _mm256_unpackhi_ps(v[6], v[7]);
        let b0 = _mm256_shuffle_ps::<0x44>(a0, a2);
        let b1 = _mm256_shuffle_ps::<0xee>(a0, a2);
        let b2 = _mm256_shuffle_ps::<0x44>(a1, a3);
        let b3 = _mm256_shuffle_ps::<0xee>(a1, a3);
        let b4 = _mm256_shuffle_ps::<0x44>(a4, a6);
        let b5 = _mm256_shuffle_ps::<0xee>(a4, a6);
        let b6 = _mm256_shuffle_ps::<0x44>(a5, a7);
        let b7 = _mm256_shuffle_ps::<0xee>(a5, a7);
        [
            _mm256_permute2f128_ps::<0x20>(b0, b4),
            _mm256_permute2f128_ps::<0x20>(b1, b5),
            _mm256_permute2f128_ps::<0x20>(b2, b6),
            _mm256_permute2f128_ps::<0x20>(b3, b7),
            _mm256_permute2f128_ps::<0x31>(b0, b4),
            _mm256_permute2f128_ps::<0x31>(b1, b5),
            _mm256_permute2f128_ps::<0x31>(b2, b6),
            _mm256_permute2f128_ps::<0x31>(b3, b7),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path the CPU has, for `R` rows of every length class.
    fn check_all<const R: usize>() {
        for len in [0, 1, 7, 8, 9, 16, 23, 147] {
            let data: Vec<f32> = (0..R * len).map(|v| v as f32).collect();
            let rows: [&[f32]; R] = std::array::from_fn(|j| &data[j * len..(j + 1) * len]);
            type Path<const R: usize> = (&'static str, fn([&[f32]; R], &mut [f32]));
            let mut paths: Vec<Path<R>> = vec![("portable", interleave_rows_portable::<R>)];
            #[cfg(target_arch = "x86_64")]
            if R.is_multiple_of(PIECE) && crate::dispatch::cpu().avx2_fma {
                // SAFETY: the CPU has AVX2.
                paths.push(("avx2", |r, d| unsafe { x86::interleave_rows(r, d) }));
            }
            paths.push(("dispatched", interleave_rows::<R>));
            for (name, f) in paths {
                let mut dst = vec![f32::NAN; R * len];
                f(rows, &mut dst);
                for p in 0..len {
                    for j in 0..R {
                        assert_eq!(
                            dst[p * R + j],
                            rows[j][p],
                            "{name}: R {R}, len {len}, p {p}, row {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn interleaves_every_length_as_defined() {
        check_all::<4>();
        check_all::<8>();
        check_all::<32>();
    }
}

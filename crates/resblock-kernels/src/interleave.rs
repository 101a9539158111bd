//! Interleaving `R` rows into `R`-wide columns: `dst[p * R + j] = rows[j][p]`, the layout
//! both weight packers write (the direct convolution's `[ci][tap][cb]` blocks and the GEMM's
//! `MR`-row panels).
//!
//! One value at a time this is a gather the compiler does not vectorise, and at batch 1,
//! where the weights are packed for every call, it was a tenth of a ResNet-18 inference.
//! Here it runs in `R x 8` pieces: `R` contiguous loads of 8, then the transposed stores,
//! which the compiler turns into register shuffles.

/// Values per row of one piece.
const PIECE: usize = 8;

/// `dst[p * R + j] = rows[j][p]` for `p < len`, where `len` is the common length of the
/// rows and `dst` is `len * R` long.
///
/// # Panics
/// If a row is not `len` long or `dst` is not `len * R` long.
pub(crate) fn interleave_rows<const R: usize>(rows: [&[f32]; R], dst: &mut [f32]) {
    let len = rows[0].len();
    assert!(
        rows.iter().all(|r| r.len() == len) && dst.len() == len * R,
        "interleave: row or destination length"
    );
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
    for p in whole..len {
        for (o, row) in dst[p * R..(p + 1) * R].iter_mut().zip(&rows) {
            *o = row[p];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_every_length_as_defined() {
        for len in [0, 1, 7, 8, 9, 16, 23, 147] {
            let data: Vec<f32> = (0..4 * len).map(|v| v as f32).collect();
            let rows: [&[f32]; 4] = std::array::from_fn(|j| &data[j * len..(j + 1) * len]);
            let mut dst = vec![f32::NAN; 4 * len];
            interleave_rows(rows, &mut dst);
            for p in 0..len {
                for j in 0..4 {
                    assert_eq!(dst[p * 4 + j], rows[j][p], "len {len}, p {p}, row {j}");
                }
            }
        }
    }
}

//! Scratch buffers whose start is on a cache line (64 bytes), for the packed operands that
//! kernels read with full 512-bit loads.
//!
//! `Vec<f32>` storage is only as aligned as the allocator makes it (glibc: 16 bytes), so a
//! 64-byte vector load from it crosses a cache line three times in four, and a split load
//! costs two of the L1's load slots. Packed GEMM panels are read only with such loads: with
//! the panels aligned, our AVX-512 GEMM ran 3-10% faster on one thread of the Intel Xeon
//! host (ARCHITECTURE.md, nineteenth session).

/// `f32` values per cache line.
const LINE: usize = 16;

/// `len` values of `buf` starting at its first 64-byte boundary, `buf` grown as needed
/// (which may move it). The values are whatever `buf` held there.
pub(crate) fn aligned_mut(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    let off = offset(buf, len);
    &mut buf[off..off + len]
}

/// Grows `buf` to hold `len` values after its first 64-byte boundary; that boundary's index.
fn offset(buf: &mut Vec<f32>, len: usize) -> usize {
    // Grown first: the offset is of the final address.
    if buf.len() < len + LINE - 1 {
        buf.resize(len + LINE - 1, 0.0);
    }
    first_line(buf)
}

/// The index of `buf`'s first value on a 64-byte boundary, where [`aligned_mut`]'s slice
/// starts (while `buf` is not moved).
pub(crate) fn first_line(buf: &[f32]) -> usize {
    // `align_offset` may answer `usize::MAX` where it cannot compute an offset; an
    // unaligned start is then only slower.
    buf.as_ptr().align_offset(64).min(LINE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_start_on_a_cache_line_and_keep_their_values() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut buf = Vec::new();
            let s = aligned_mut(&mut buf, len);
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % 64, 0);
            for (i, v) in s.iter_mut().enumerate() {
                *v = i as f32;
            }
            // A smaller request later (no growth) keeps the same start.
            let again = aligned_mut(&mut buf, len / 2);
            assert!(again.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
    }
}

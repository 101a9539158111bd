//! The transposed weight gradient of the AVX-512 direct convolutions (3x3 "same" layers on
//! the masked layout, and 3x3 stride-2 layers on the polyphase one, output channels in whole
//! blocks of 16): each image's `dY` is transposed to one row of output channels per pixel,
//! so that one vector holds 16 output channels and the input values are broadcast
//! ([`avx512::wgrad_t_tile`], [`avx512::wgrad_s2_tile`]). Per 27 FMAs it loads one vector
//! and 27 floats, where the per-tap tile ([`avx512::wgrad_tile`]) loads 11 vectors per 24
//! FMAs; on a CPU with two full-width FMA units that tile is bound by its loads
//! (ARCHITECTURE.md, eighteenth session; for stride 2, twenty-fifth).

use std::cell::RefCell;

use super::{avx512, Isa, Plan};
use crate::aligned::aligned_mut;

thread_local! {
    /// Each thread's transposed `dY` and channel-block sums, kept between calls (one call
    /// per image group of every layer: at 28x28 a fresh zeroed `dY` copy was 50 KiB per
    /// image, all of it overwritten by the transpose).
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Plan {
    /// Whether [`Plan::weight_grad_rows`] runs the transposed kernels: a 3x3 "same"
    /// convolution on the masked layout ([`avx512::wgrad_t_tile`]) or a 3x3 stride-2 one
    /// ([`avx512::wgrad_s2_tile`]), with whole blocks of 16 output channels, unless
    /// [`crate::dispatch::Dispatch::transposed_wgrad`] is off.
    pub(super) fn takes_transposed_weight_grad(&self) -> bool {
        let same = self.masked && (self.pad_y, self.pad_x) == (1, 1);
        self.isa == Isa::Avx512
            && (same || self.stride == 2)
            && (self.kh, self.kw) == (3, 3)
            && self.cout.is_multiple_of(16)
            && crate::dispatch::current().transposed_wgrad
    }

    /// [`Plan::weight_grad_rows`] on [`avx512::wgrad_t_tile`]: each image's `dY` transposed
    /// to one row of `cout` values per pixel, then per block of 16 output channels and 3
    /// input channels one pass over the pixels; the sums of all images land in `dw` at the
    /// end.
    pub(super) fn weight_grad_transposed(
        &self,
        xps: &[&[f32]],
        dys: &[&[f32]],
        row_stride: usize,
        dw: &mut [f32],
    ) {
        const NC: usize = 3;
        let (c, cout, w, oh) = (self.c, self.cout, self.w, self.oh);
        // The masked layout's pixels are the output's; the polyphase layout's include the
        // junk columns and the tail, where `dY` is zero.
        let pix = if self.masked { oh * w } else { self.qlen };
        // The stride-2 kernel's phase rows: columns 0 and 1 of each kernel row (column 2
        // reads column 0's phase one value on).
        let t = &self.taps;
        let rows = [t[0], t[1], t[3], t[4], t[6], t[7]];
        assert!(self.masked || (0..3).all(|ky| t[3 * ky + 2] == t[3 * ky] + 1));
        let rows = &rows;
        assert!(self.takes_transposed_weight_grad() && pix <= self.qlen);
        let blocks = cout / 16;
        SCRATCH.with(|s| {
            let (dyt, sums) = &mut *s.borrow_mut();
            // Both from a cache line on, so that the kernel's vector loads and stores of 16
            // channels never split one. Every value of `dyt` is written by the transpose
            // before it is read.
            let dyt = aligned_mut(dyt, pix * cout);
            // `sums[((b * c + ci) * 9 + tap) * 16 + j]`: output channel `16 b + j`.
            let sums = aligned_mut(sums, cout * c * 9);
            sums.fill(0.0);
            for (xp, dy) in xps.iter().zip(dys) {
                // Bounds (checked by the caller's asserts): `dy` holds `cout_r` rows of `qlen`
                // values `row_stride` apart, `xp` `c` planes of `ps` values, and every tap of a
                // pixel `q < pix <= qlen` reads below `q + max_tap < ps` in its plane (the
                // stride-2 kernel's column-2 taps, a phase row plus one, are taps too).
                assert!(dy.len() >= (cout - 1) * row_stride + pix && xp.len() >= c * self.ps);
                // SAFETY: AVX-512 (the plan's instruction set, `Plan::strided`); the reads and
                // writes stay inside `dy`, `xp`, `dyt` and `sums` by the bounds above.
                unsafe {
                    avx512::transpose_rows(
                        (dy.as_ptr(), row_stride),
                        (cout, pix),
                        dyt.as_mut_ptr(),
                    );
                    for b in 0..blocks {
                        let d = (dyt[b * 16..].as_ptr(), cout);
                        for ci in (0..c).step_by(NC) {
                            let x = (xp[ci * self.ps..].as_ptr(), self.ps);
                            let out = sums[(b * c + ci) * 9 * 16..].as_mut_ptr();
                            match (self.masked, NC.min(c - ci)) {
                                (true, 3) => avx512::wgrad_t_tile::<3>(x, (w, oh), d, out),
                                (true, 2) => avx512::wgrad_t_tile::<2>(x, (w, oh), d, out),
                                (true, _) => avx512::wgrad_t_tile::<1>(x, (w, oh), d, out),
                                (false, 3) => avx512::wgrad_s2_tile::<3>(x, rows, pix, d, out),
                                (false, 2) => avx512::wgrad_s2_tile::<2>(x, rows, pix, d, out),
                                (false, _) => avx512::wgrad_s2_tile::<1>(x, rows, pix, d, out),
                            }
                        }
                    }
                }
            }
            for (co, dw_co) in dw.chunks_exact_mut(c * 9).enumerate() {
                let (b, j) = (co / 16, co % 16);
                for (ci, dw_ci) in dw_co.chunks_exact_mut(9).enumerate() {
                    for (t, d) in dw_ci.iter_mut().enumerate() {
                        *d = sums[((b * c + ci) * 9 + t) * 16 + j];
                    }
                }
            }
        });
    }
}

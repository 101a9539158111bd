//! Direct stride-1 and stride-2 convolution for f32 on x86-64 with AVX-512 or AVX2 + FMA: no `im2col`, no
//! GEMM packing. The micro-kernels are in `avx512.rs` (16 lanes, 32 registers) and `avx2.rs`
//! (8 lanes, 16 registers); a [`Plan`] is made for the widest the CPU has and
//! [`crate::dispatch`] allows, and lays its buffers out for that kernel's tile.
//!
//! The per-image GEMMs of the parent module spend as much time unfolding the input (`im2col`
//! writes `kh * kw` copies of it) and packing operands as multiplying, and at the 16- and
//! 32-channel layers of CIFAR ResNets their M = C_out is too small for the GEMM crate's
//! micro-kernels to pay back that cost. Here a convolution reads a zero-padded copy of each
//! input plane directly.
//!
//! The trick that makes every row width and padding one code path: with the input planes
//! padded to width `wp`, output pixel `(oy, ox)` at the *flattened* index `q = oy * wp + ox`
//! reads input `q + ky * wp + kx` for tap `(ky, kx)`. So one output plane is a 1-D correlation
//! of the flattened padded plane with `kh * kw` fixed offsets, computed over all
//! `q < oh * wp` (the columns `ox >= ow` are junk and dropped when the result is copied out).
//! At stride 1 the rows share their padding (`wp = w + pad_x`: one row's right border is the
//! next one's left border), so a 3x3 "same" convolution computes `w + 1` columns per row for
//! `w` outputs. On AVX-512 a "same" convolution drops even that column (the *masked*
//! layout, see [`Plan::strided`]): the rows are `w` apart, and the lanes of a tap that would
//! read the neighbouring row's edge are loaded as zeros with masked loads, one 16-bit mask
//! per tap column and vector from a table the plan holds.
//!
//! Stride 2 is the same code on a polyphase layout: each padded input plane is stored as its
//! four phases `(y % 2, x % 2)`, each `ceil(hp / 2) x ceil(wp / 2)`, one after the other.
//! Output `(oy, ox)` at tap `(ky, kx)` reads padded `(2 oy + ky, 2 ox + kx)`, which is phase
//! `(ky % 2, kx % 2)` at `(oy + ky / 2, ox + kx / 2)`: with the flattened index
//! `q = oy * wq + ox` (`wq` the phase width) that is `q` plus a fixed offset per tap (the
//! phase's start included), so the micro-kernels run unchanged. The phase split replaces the
//! padding copy; `im2col` would write the input `kh * kw / 4` times over.
//!
//! - Forward (and the input gradient, which for stride 1 is the forward convolution of the
//!   padded `dY` with the flipped, transposed kernel): a micro-tile holds `cb` output channels
//!   by `tq` flattened pixels in `cb * QV` vector registers (AVX2: 4 x 2 of 8 lanes, AVX-512:
//!   8 x 2 of 16); each step loads `QV` vectors of one input plane at one tap offset,
//!   broadcasts `cb` weights and does `cb * QV` FMAs. A flattened row is a multiple of 8
//!   pixels ([`QUANTUM`]); on AVX-512 one that ends in half a vector ends with a tile of
//!   256-bit vectors (`fwd_tile_half`), and the weight gradient reads that half with
//!   masked loads.
//! - Weight gradient: `dW[co, ci, tap] = sum_q dY[co, q] * x[ci, q + offset(tap)]` with `dY`
//!   flattened the same way and zero in the junk columns; a micro-tile holds `cb` output
//!   channels by `TB` taps as vector partial sums over `q`. On AVX-512, 3x3 "same" layers
//!   on the masked layout and 3x3 stride-2 layers, with output channels in blocks of 16,
//!   transpose `dY` instead and hold 16 output channels per vector (`transposed.rs`).
//!
//! Each image is summed in f32 (as the GEMM path does) and the caller adds images in f64.

use rayon::prelude::*;

use super::epilogue::Epilogue;
use crate::buffer::Slot;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod transposed;

/// Vectors per micro-tile along the flattened pixels (forward); a flattened row whose length
/// is an odd number of vectors ends with a one-vector tile.
const QV: usize = 2;
/// Taps per weight-gradient micro-tile.
const TB: usize = 3;
/// The most output channels of one micro-tile (AVX-512's).
const MAX_CB: usize = 8;
/// Flattened pixels per forward cache block: the loop over output-channel blocks runs inside
/// a block of this many pixels, so the input rows the block reads stay in cache.
const BLOCK_PIXELS: usize = 128;
/// [`Plan::prefetches`] from this many bytes of a tile's input rows (a third of the 48 KiB
/// L1 of the host it was measured on: the rows share it with the weights and the next
/// tiles').
#[cfg(target_arch = "x86_64")]
const PREFETCH_MIN_BYTES: usize = 16 << 10;
/// Planes are padded to a multiple of this many floats (the widest vector).
const PLANE_ALIGN: usize = 16;
/// Flattened outputs are a multiple of this many pixels: one AVX2 vector, half an AVX-512
/// one (whose kernels end such a row with a half-width tile). Rounding to whole AVX-512
/// vectors made a 7x7 output 64 pixels for 56 (8 rows of the shared-padding pitch), an
/// eighth of its FMAs spent on nothing.
const QUANTUM: usize = 8;
/// [`Plan::preferred`] takes the copies layout from this many output channels up ...
const COPIES_MIN_COUT: usize = 64;
/// ... when it saves at least this fraction of the flattened pixels.
const COPIES_MIN_SAVING: f64 = 0.03;

/// The kernel set a plan runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest the CPU has and the dispatch allows, if any.
    pub(crate) fn detect() -> Option<Isa> {
        if crate::dispatch::avx512() {
            Some(Isa::Avx512)
        } else if crate::dispatch::avx2_fma() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }

    /// Whether this CPU can run these kernels (whatever the dispatch says).
    pub(crate) fn supported(self) -> bool {
        crate::dispatch::cpu().has(match self {
            Isa::Avx2 => crate::dispatch::Simd::Avx2,
            Isa::Avx512 => crate::dispatch::Simd::Avx512,
        })
    }

    /// f32 lanes of one vector register.
    const fn lanes(self) -> usize {
        match self {
            Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }

    /// Output channels per micro-tile.
    const fn cb(self) -> usize {
        match self {
            Isa::Avx2 => 4,
            Isa::Avx512 => MAX_CB,
        }
    }

    /// Flattened pixels per forward micro-tile.
    const fn tq(self) -> usize {
        self.lanes() * QV
    }
}

/// The geometry of one stride-1 or stride-2, undilated, ungrouped convolution in the
/// flattened form.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The micro-kernels (and so the tile sizes) of this plan.
    isa: Isa,
    /// Input channels, height, width.
    c: usize,
    h: usize,
    w: usize,
    /// Output channels, and that rounded up to a multiple of the tile's channels.
    cout: usize,
    cout_r: usize,
    kh: usize,
    kw: usize,
    pad_y: usize,
    pad_x: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    /// The width of a padded input row in the layout: `w + pad_x` at stride 1 (the rows
    /// share their padding columns, see [`Plan::unmasked`]), `w` on the masked and copies
    /// layouts, `w + 2 * pad_x` at stride 2.
    wp: usize,
    /// 1 or 2.
    stride: usize,
    /// Row pitch of the flattened output and of the (phase) planes the taps read: `wp` at
    /// stride 1, the phase width `ceil(wp / 2)` at stride 2.
    pitch: usize,
    /// Stride 2: the distance between the phases of one input plane (0 at stride 1).
    phase_len: usize,
    /// The largest tap offset.
    max_tap: usize,
    /// Flattened output length: `oh * pitch` rounded up to a multiple of [`QUANTUM`] (not
    /// of a whole tile: at 8x8 that was 96 for 80, a third of the FMAs spent on junk).
    qlen: usize,
    /// Stride between padded input planes: `qlen` plus the largest tap offset, so every read
    /// of a tile stays inside its plane.
    ps: usize,
    /// `ky * wp + kx` for every tap, row-major (on the copies layout, `kx * copy_len` more).
    taps: Vec<usize>,
    /// The copies layout ([`Plan::with_copies`]): the distance between the `kw` copies of a
    /// plane; 0 on the shared-padding layout.
    copy_len: usize,
    /// The masked layout (AVX-512, stride 1, "same"; see [`Plan::strided`]): rows `w`
    /// apart with no padding columns, the taps that would wrap into the neighbouring row
    /// masked off.
    masked: bool,
    /// AVX-512 plans: the lane masks of the taps, `kw` rows of `qlen / 8`: entry `i` of row
    /// `kx` has bit `b` set when tap column `kx` of flattened pixel `8 i + b` reads the
    /// input (all set but on the masked layout). Empty on AVX2.
    masks: Vec<u16>,
}

impl Plan {
    /// The stride-1 plan for input `(c, h, w)`, `cout` outputs, a `kh x kw` kernel and the
    /// given zero padding on the kernels `isa` (the pair of a backward must share them;
    /// [`Isa::detect`] gives the widest allowed), or `None` when this CPU lacks them or the
    /// output is empty.
    pub(crate) fn with_isa(
        isa: Isa,
        input: (usize, usize, usize),
        cout: usize,
        kernel: (usize, usize),
        padding: (usize, usize),
    ) -> Option<Plan> {
        Plan::strided(isa, input, cout, kernel, padding, 1)
    }

    /// As [`Plan::with_isa`] with stride 1 or 2 (`None` for others).
    ///
    /// On AVX-512 a stride-1 "same" convolution (`2 * pad_x + 1 = kw`) takes the *masked*
    /// layout: the rows are `w` apart with no padding column, so the flattened output has
    /// no junk columns at all (the shared-padding layout computes `w + pad_x` columns per
    /// `w` outputs: 4% of the FMAs at 28x28, 10% at 14x14, 14% at 7x7). Tap `(ky, kx)` of
    /// output `q = oy * w + ox` reads `q + ky * w + kx` past the plane's start (each plane
    /// has `pad_y` zero rows and `pad_x` zeros before its values), which for `ox + kx <
    /// pad_x` or `ox + kx >= w + pad_x` is a value of the row above or below: the kernels
    /// load those lanes as zeros with AVX-512's masked loads, which cost what a plain load
    /// does. AVX2 has no such load; its plans keep the shared-padding layout (or the copies
    /// one, see [`Plan::with_copies`]).
    pub(crate) fn strided(
        isa: Isa,
        input: (usize, usize, usize),
        cout: usize,
        kernel: (usize, usize),
        padding: (usize, usize),
        stride: usize,
    ) -> Option<Plan> {
        let plan = Plan::unmasked(isa, input, cout, kernel, padding, stride)?;
        Some(match plan.with_masks() {
            Some(p) if crate::dispatch::current().masked_taps => p,
            _ => plan,
        })
    }

    /// [`Plan::strided`] on the shared-padding (stride 1) or polyphase (stride 2) layout.
    pub(crate) fn unmasked(
        isa: Isa,
        (c, h, w): (usize, usize, usize),
        cout: usize,
        (kh, kw): (usize, usize),
        (pad_y, pad_x): (usize, usize),
        stride: usize,
    ) -> Option<Plan> {
        if !isa.supported()
            || c == 0
            || cout == 0
            || kh == 0
            || kw == 0
            || !(1..=2).contains(&stride)
        {
            return None;
        }
        let (hp, wp) = (h + 2 * pad_y, w + 2 * pad_x);
        if hp < kh || wp < kw {
            return None;
        }
        let (oh, ow) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
        // Stride 1: the rows of a plane share their padding columns. The taps of output
        // column `ox` read input columns `ox + kx - pad_x`, which span `-pad_x..w + pad_x`;
        // with rows `w + pad_x` apart, one row's right padding is the next row's left
        // padding, so `pad_x` zero columns between rows serve both (when `pad_x < kw`,
        // as in every "same" convolution; else, and at stride 2, the full `wp`).
        let wp = if stride == 1 && pad_x < kw {
            w + pad_x
        } else {
            wp
        };
        let pitch = if stride == 1 { wp } else { wp.div_ceil(2) };
        let qlen = (oh * pitch).div_ceil(QUANTUM) * QUANTUM;
        // Stride 2: one phase holds `ceil(hp / 2)` rows of `pitch`.
        let phase_len = if stride == 1 {
            0
        } else {
            (hp.div_ceil(2) * pitch).div_ceil(PLANE_ALIGN) * PLANE_ALIGN
        };
        let tap = |ky: usize, kx: usize| {
            let phase = (ky % stride) * stride + kx % stride;
            phase * phase_len + (ky / stride) * pitch + kx / stride
        };
        let taps: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| tap(ky, kx)))
            .collect();
        let max_tap = taps.iter().copied().max().unwrap_or(0);
        // A plane holds its phases (stride 2), and every tile's reads stay inside it.
        let held = (stride * stride - 1) * phase_len + hp.div_ceil(stride) * pitch;
        Some(
            Plan {
                isa,
                c,
                h,
                w,
                cout,
                cout_r: cout.div_ceil(isa.cb()) * isa.cb(),
                kh,
                kw,
                pad_y,
                pad_x,
                oh,
                ow,
                wp,
                stride,
                pitch,
                phase_len,
                max_tap,
                qlen,
                ps: (qlen + max_tap).max(held).div_ceil(PLANE_ALIGN) * PLANE_ALIGN,
                taps,
                copy_len: 0,
                masked: false,
                masks: Vec::new(),
            }
            .with_mask_table(),
        )
    }

    /// This plan on the masked layout (see [`Plan::strided`]): AVX-512, a stride-1 "same"
    /// convolution; `None` for others.
    fn with_masks(&self) -> Option<Plan> {
        let (h, w, kh, kw) = (self.h, self.w, self.kh, self.kw);
        if self.isa != Isa::Avx512
            || self.stride != 1
            || 2 * self.pad_x + 1 != kw
            || self.pad_x >= w
            || self.ow != w
        {
            return None;
        }
        let qlen = (self.oh * w).div_ceil(QUANTUM) * QUANTUM;
        let taps: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| ky * w + kx))
            .collect();
        let max_tap = (kh - 1) * w + kw - 1;
        let held = 2 * self.pad_x + (h + 2 * self.pad_y) * w;
        Some(
            Plan {
                wp: w,
                pitch: w,
                max_tap,
                qlen,
                ps: (qlen + max_tap).max(held).div_ceil(PLANE_ALIGN) * PLANE_ALIGN,
                taps,
                copy_len: 0,
                masked: true,
                ..self.clone()
            }
            .with_mask_table(),
        )
    }

    /// This plan with its [`Plan::masks`] filled in for its layout.
    fn with_mask_table(self) -> Plan {
        if self.isa != Isa::Avx512 {
            return Plan {
                masks: Vec::new(),
                ..self
            };
        }
        let nq = self.qlen / QUANTUM;
        let (w, pad_x) = (self.w, self.pad_x);
        let reads = |kx: usize, q: usize| {
            let col = q % w + kx;
            !self.masked || (col >= pad_x && col < w + pad_x)
        };
        let masks = (0..self.kw)
            .flat_map(|kx| {
                (0..nq).map(move |i| {
                    (0..16).fold(0u16, |m, b| {
                        m | (u16::from(reads(kx, QUANTUM * i + b)) << b)
                    })
                })
            })
            .collect();
        Plan { masks, ..self }
    }

    /// This plan on the copies layout when that saves at least [`COPIES_MIN_SAVING`] of the
    /// flattened pixels and the output has [`COPIES_MIN_COUT`] channels or more (so that
    /// the FMAs saved outweigh writing each input plane `kw` times); else this plan.
    pub(crate) fn preferred(self) -> Plan {
        if self.masked {
            return self;
        }
        match self.with_copies() {
            Some(p)
                if self.cout >= COPIES_MIN_COUT
                    && p.qlen as f64 <= self.qlen as f64 * (1.0 - COPIES_MIN_SAVING) =>
            {
                p
            }
            _ => self,
        }
    }

    /// This stride-1 "same" convolution (`2 * pad_x + 1 = kw`, so `ow = w`) on the
    /// *copies* layout, `None` for others.
    ///
    /// The shared-padding layout spends `pad_x` junk columns per row (at 14x14, 15 flattened
    /// pixels per 14 outputs; rounded to whole vectors, 224 per 196). Here the rows are `w`
    /// apart with no padding column at all, and a tap whose column offset `d = kx - pad_x`
    /// is not 0 would wrap into the neighbouring row at the edges: output `(oy, 0)` at
    /// `d = -1` reads `(oy - 1, w - 1)`'s place. So each plane is stored `kw` times, copy
    /// `kx` with the columns such reads reach set to zero (the last `-d` columns for
    /// `d < 0`, the first `d` for `d > 0`) and read only by the taps of column `kx`; no read
    /// that does not wrap reaches those columns. Each copy has `pad_y` zero rows above and
    /// below and `pad_x` zeros before, so tap `(ky, kx)` of output `q = oy * w + ox` is at
    /// `kx * copy_len + ky * w + kx + q`, a fixed offset again, and the micro-kernels run
    /// unchanged. At 14x14 the flattened output is 208 pixels per 196 outputs.
    pub(crate) fn with_copies(&self) -> Option<Plan> {
        let (h, w, kh, kw) = (self.h, self.w, self.kh, self.kw);
        if self.stride != 1 || 2 * self.pad_x + 1 != kw || self.pad_x >= w || self.ow != w {
            return None;
        }
        let qlen = (self.oh * w).div_ceil(QUANTUM) * QUANTUM;
        let held = 2 * self.pad_x + (h + 2 * self.pad_y) * w;
        let copy_len = (qlen + (kh - 1) * w + kw - 1)
            .max(held)
            .div_ceil(PLANE_ALIGN)
            * PLANE_ALIGN;
        let taps: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| kx * copy_len + ky * w + kx))
            .collect();
        Some(
            Plan {
                wp: w,
                pitch: w,
                max_tap: (kw - 1) * copy_len + (kh - 1) * w + kw - 1,
                qlen,
                ps: kw * copy_len,
                taps,
                copy_len,
                masked: false,
                ..self.clone()
            }
            .with_mask_table(),
        )
    }

    /// Copies one input plane `src` `(h, w)` into its `kw` copies in `plane` (see
    /// [`Plan::with_copies`]), each with its wrapping columns zero.
    fn pad_copies(&self, plane: &mut [f32], src: &[f32]) {
        let (w, len) = (self.w, self.h * self.w);
        for (kx, copy) in plane.chunks_exact_mut(self.copy_len).enumerate() {
            let interior = &mut copy[self.pad_x + self.pad_y * w..][..len];
            interior.copy_from_slice(src);
            let zero = if kx < self.pad_x {
                w - (self.pad_x - kx)..w
            } else {
                0..kx - self.pad_x
            };
            if !zero.is_empty() {
                for row in interior.chunks_exact_mut(w) {
                    row[zero.clone()].fill(0.0);
                }
            }
        }
    }

    /// Output channels per micro-tile.
    fn cb(&self) -> usize {
        self.isa.cb()
    }

    /// Output channels rounded up to whole micro-tiles: the planes a padded `dY` buffer
    /// for [`Plan::weight_grad_padded`] needs (see [`Plan::padded_buffer`]).
    pub(crate) fn cout_rounded(&self) -> usize {
        self.cout_r
    }

    /// The kernels this plan runs on.
    pub(crate) fn isa(&self) -> Isa {
        self.isa
    }

    /// Length of a padded image (`c` planes of `ps`).
    pub(crate) fn padded_len(&self) -> usize {
        self.c * self.ps
    }

    /// Length of a flattened output (`cout_r` rows of `qlen`).
    fn flat_len(&self) -> usize {
        self.cout_r * self.qlen
    }

    /// The distance between the planes of a padded image.
    pub(crate) fn plane_stride(&self) -> usize {
        self.ps
    }

    /// This plan's padded input as `conv/lanes` reads it (x86-64), for a 3x3 stride-1
    /// convolution with padding 1 on the masked or shared-padding layout: each image's
    /// planes `ps` apart, rows `wp` apart from `pad_y * wp + pad_x` on, zero rows above and
    /// below.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn lanes_layout(&self) -> Option<crate::conv::lanes::Layout> {
        let ok = self.takes_written_planes()
            && (self.kh, self.kw, self.pad_y, self.pad_x) == (3, 3, 1, 1);
        ok.then(|| crate::conv::lanes::Layout {
            image: self.padded_len(),
            origin: self.pad_y * self.wp + self.pad_x,
            plane: self.ps,
            row: self.wp,
            zero_rows: true,
        })
    }

    /// Whether an input can be written straight into this plan's layout by
    /// [`Plan::write_padded_plane`] (stride 1, shared padding).
    pub(crate) fn takes_written_planes(&self) -> bool {
        self.stride == 1 && self.copy_len == 0
    }

    /// Writes one input plane (`ps` values, as [`Plan::pad`] lays it out): the `h * w` values
    /// at the front of `src` and, when `fresh` (memory not yet written), the zero border;
    /// otherwise the border must be zero already (a [`Plan::padded_buffer`], or a plane
    /// written before), and only the padding between rows is rewritten. `src` should run
    /// at least [`ROW_SLACK`] values past the plane's values, so that the last row is copied
    /// in whole pieces too (see [`copy_row`]).
    ///
    /// A layer whose output only this convolution reads can write its planes here from a
    /// thread's scratch in cache, rather than write them plainly for [`Plan::pad`] to read
    /// back from memory; and rows of 7 to 28 values, each written by its own call, ran
    /// scalar.
    pub(crate) fn write_padded_plane<S: Slot>(&self, plane: &mut [S], src: &[f32], fresh: bool) {
        assert!(
            self.takes_written_planes() && plane.len() == self.ps && src.len() >= self.h * self.w,
            "direct conv: a written plane of a stride-1 plan on the shared-padding layout"
        );
        self.pad_plane(plane, src, fresh);
    }

    /// Copies one image `(c, h, w)` into `dst` as zero-padded planes of stride `ps` (at
    /// stride 2, each as its four phases).
    ///
    /// `dst` must be empty or have been filled by this plan before: only the interior is
    /// written, so the zero border of the first call is kept for the next images (zeroing
    /// the whole buffer per image was the largest memset of a training step).
    pub(crate) fn pad(&self, img: &[f32], dst: &mut Vec<f32>) {
        assert_eq!(
            img.len(),
            self.c * self.h * self.w,
            "direct conv: image size"
        );
        let plane_in = self.h * self.w;
        let shared = self.stride == 1 && self.copy_len == 0;
        if dst.len() != self.padded_len() && shared {
            // A new buffer on the shared-padding layout: its border written as zeros with
            // the rows, rather than the whole buffer zero-filled before the interior is
            // copied over it (at batch 1 that fill ran for every convolution, on the
            // calling thread: 1.8% of a ResNet-18 inference).
            let fill = |planes: &mut [std::mem::MaybeUninit<f32>]| {
                for (ci, plane) in planes.chunks_exact_mut(self.ps).enumerate() {
                    self.pad_plane(plane, &img[ci * plane_in..], true);
                }
            };
            // SAFETY: `pad_plane` with `fresh` writes every value of each plane, and the
            // planes cover the buffer.
            *dst = unsafe { crate::buffer::vec_written_by(self.padded_len(), fill) };
            return;
        }
        if dst.len() != self.padded_len() {
            dst.clear();
            dst.resize(self.padded_len(), 0.0);
        }
        for (ci, plane) in dst.chunks_exact_mut(self.ps).enumerate() {
            // From this plane on: `pad_plane` reads past the plane (see there).
            let rest = &img[ci * plane_in..];
            let src = &rest[..plane_in];
            if self.copy_len > 0 {
                self.pad_copies(plane, src);
            } else if shared {
                self.pad_plane(plane, rest, false);
            } else {
                for (y, row) in src.chunks_exact(self.w).enumerate() {
                    self.split_row(plane, y + self.pad_y, row);
                }
            }
        }
    }

    /// One plane of the stride-1 shared-padding layout: each of the `h` rows at the front of
    /// `src` and the zeros after it up to the next row. With `fresh` (a new buffer) every
    /// value is written: the zeros before the first row and after the last too. Otherwise
    /// the border is already zero and only what the last row's piece wrote past it is
    /// restored.
    ///
    /// `src` runs on past the plane where the image has more planes: [`copy_row`] copies
    /// whole pieces only where the source is long enough for the last one, and given each
    /// row alone it called `memcpy` for every row not a multiple of 8 long (2.3% of a
    /// default `train` epoch).
    fn pad_plane<S: Slot>(&self, plane: &mut [S], src: &[f32], fresh: bool) {
        let zero = |vals: &mut [S]| vals.iter_mut().for_each(|v| v.put(0.0));
        let first = self.pad_y * self.wp + self.pad_x;
        if fresh {
            zero(&mut plane[..first]);
        }
        if self.masked {
            // The rows are contiguous: one copy, then (fresh) the zeros after.
            let len = self.h * self.w;
            for (d, s) in plane[first..first + len].iter_mut().zip(&src[..len]) {
                d.put(*s);
            }
            if fresh {
                zero(&mut plane[first + len..]);
            }
            return;
        }
        for y in 0..self.h {
            let at = first + y * self.wp;
            // The piece may run past the row, into the padding after it and the next row's
            // interior (copied next): the padding is written as zeros here.
            let over = copy_row(&mut plane[at..], &src[y * self.w..], self.w, self.wp);
            let end = if y + 1 < self.h {
                at + self.wp
            } else if fresh {
                plane.len()
            } else {
                at + self.w + over
            };
            let gap = at + self.w..end;
            if gap.len() <= ROW_PIECE && gap.start + ROW_PIECE <= plane.len() {
                // One whole piece of zeros, a store rather than a `memset` call for one or
                // two values (1% of a ResNet-20 training step). What it writes past the gap
                // is the next rows' (written after) or the border (zero).
                let piece = &mut plane[gap.start..gap.start + ROW_PIECE];
                piece.iter_mut().for_each(|v| v.put(0.0));
            } else {
                zero(&mut plane[gap]);
            }
        }
    }

    /// Stride 2: padded row `py` of one plane, `row` its interior, into its two phases
    /// (even and odd padded columns) of phase row `py / 2`.
    fn split_row(&self, plane: &mut [f32], py: usize, row: &[f32]) {
        let start = (py % 2) * 2 * self.phase_len + (py / 2) * self.pitch;
        // Interior column `x` is padded column `x + pad_x`: phase `(x + pad_x) % 2`, at
        // `(x + pad_x) / 2` in it. The even `x` go to one phase, the odd ones to the other.
        let (even, odd) = (self.pad_x, self.pad_x + 1);
        let (ne, no) = (row.len().div_ceil(2), row.len() / 2);
        let (p0, p1) = plane[start..].split_at_mut(self.phase_len);
        let (e, o) = if even % 2 == 0 {
            (&mut p0[even / 2..][..ne], &mut p1[odd / 2..][..no])
        } else {
            (&mut p1[even / 2..][..ne], &mut p0[odd / 2..][..no])
        };
        for ((e, o), pair) in e.iter_mut().zip(o.iter_mut()).zip(row.chunks_exact(2)) {
            *e = pair[0];
            *o = pair[1];
        }
        if ne > no {
            e[ne - 1] = row[row.len() - 1];
        }
    }

    /// The weights `(cout, c, kh, kw)` repacked as `[cout block][ci][tap][cb]`, zero for the
    /// output channels past `cout`. Large layers pack their blocks in parallel: at batch 1
    /// this pass (a read and a write of all the weights) was 8% of a ResNet-18 inference.
    pub(crate) fn pack_weights(&self, w: &[f32]) -> Vec<f32> {
        let row = self.c * self.kh * self.kw;
        assert_eq!(w.len(), self.cout * row, "direct conv: weight size");
        let mut out = vec![0f32; self.cout_r * row];
        let pack = |(blk, dst): (usize, &mut [f32])| self.pack_block(w, blk, dst);
        let cb = self.cb();
        if out.len() >= crate::sgemm::PARALLEL_PACK && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(cb * row).enumerate().for_each(pack);
        } else {
            out.chunks_mut(cb * row).enumerate().for_each(pack);
        }
        out
    }

    /// [`Plan::pack_weights`] of the flipped, transposed kernel of an input gradient, read
    /// straight from the forward kernel `w` `(c, cout, kh, kw)` (this plan's input and
    /// output channels swapped): output channel `co`, input channel `ci`, tap `t` is
    /// `w[ci, co, kh * kw - 1 - t]`. Each block's values for one `ci` come from one
    /// contiguous run of `w`, so this is one pass where flipping first and packing the
    /// result took two (5% of a 256-channel 3x3 backward); per `ci` it is an interleave of
    /// those runs (see `interleave.rs`) with the taps' order reversed after.
    pub(crate) fn pack_flipped_weights(&self, w: &[f32]) -> Vec<f32> {
        let nt = self.kh * self.kw;
        assert_eq!(w.len(), self.c * self.cout * nt, "direct conv: weight size");
        let cb = self.cb();
        let mut out = vec![0f32; self.cout_r * self.c * nt];
        let pack = |(blk, dst): (usize, &mut [f32])| match cb {
            MAX_CB => self.pack_flipped_block_of::<MAX_CB>(w, blk, dst),
            4 => self.pack_flipped_block_of::<4>(w, blk, dst),
            cb => unreachable!("direct conv: no {cb}-channel tile"),
        };
        let block = self.c * nt * cb;
        if out.len() >= crate::sgemm::PARALLEL_PACK && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(block).enumerate().for_each(pack);
        } else {
            out.chunks_mut(block).enumerate().for_each(pack);
        }
        out
    }

    /// Output-channel block `blk` of [`Plan::pack_flipped_weights`] into `dst`, for tiles of
    /// `CB` channels (rows past `cout` zero).
    fn pack_flipped_block_of<const CB: usize>(&self, w: &[f32], blk: usize, dst: &mut [f32]) {
        let nt = self.kh * self.kw;
        let rows = CB.min(self.cout - blk * CB);
        let zeros = vec![0f32; if rows < CB { nt } else { 0 }];
        for (ci, d) in dst.chunks_exact_mut(nt * CB).enumerate() {
            let src = &w[(ci * self.cout + blk * CB) * nt..][..rows * nt];
            let taps: [&[f32]; CB] = std::array::from_fn(|j| {
                if j < rows {
                    &src[j * nt..(j + 1) * nt]
                } else {
                    &zeros[..]
                }
            });
            crate::interleave::interleave_rows(taps, d);
            // Tap `t` of the flipped kernel is tap `nt - 1 - t` of the forward's.
            for t in 0..nt / 2 {
                let (head, rest) = d.split_at_mut((nt - 1 - t) * CB);
                head[t * CB..(t + 1) * CB].swap_with_slice(&mut rest[..CB]);
            }
        }
    }

    /// Output-channel block `blk` of [`Plan::pack_weights`] into `dst` (`cb * c * kh * kw`
    /// long): for each (ci, tap) the `cb` output channels side by side, so the writes run in
    /// order and each channel's row is read in order; zero past `cout`.
    fn pack_block(&self, w: &[f32], blk: usize, dst: &mut [f32]) {
        match self.cb() {
            MAX_CB => self.pack_block_of::<MAX_CB>(w, blk, dst),
            4 => self.pack_block_of::<4>(w, blk, dst),
            cb => unreachable!("direct conv: no {cb}-channel tile"),
        }
    }

    /// [`Plan::pack_block`] for tiles of `CB` channels: the block's `CB` weight rows
    /// interleaved (rows past `cout` read as zeros).
    fn pack_block_of<const CB: usize>(&self, w: &[f32], blk: usize, dst: &mut [f32]) {
        let row = self.c * self.kh * self.kw;
        let rows = CB.min(self.cout - blk * CB);
        let zeros = vec![0f32; if rows < CB { row } else { 0 }];
        let src: [&[f32]; CB] = std::array::from_fn(|j| {
            if j < rows {
                &w[(blk * CB + j) * row..(blk * CB + j + 1) * row]
            } else {
                &zeros[..]
            }
        });
        crate::interleave::interleave_rows(src, dst);
    }

    /// The flattened output `(cout_r, qlen)` of one padded image `xp` (from [`Plan::pad`])
    /// with packed weights `wk`. With `parallel`, the output-channel blocks run in parallel
    /// (for a batch smaller than the thread count).
    pub(crate) fn forward(&self, xp: &[f32], wk: &[f32], out: &mut Vec<f32>, parallel: bool) {
        self.check_forward(xp, out);
        self.forward_into(xp, wk, out, parallel);
    }

    /// Whether the flattened output is the plain one `(cout, oh, ow)`: no junk columns (the
    /// masked layout), no tail, and whole channel tiles. Then [`Plan::forward_plain`] writes
    /// the output without [`Plan::unflatten`]'s copy (at 28x28, 16 channels: a 3x3 "same"
    /// layer's output, 2% of a ResNet-20 step).
    pub(crate) fn writes_plain(&self) -> bool {
        self.pitch == self.ow && self.qlen == self.oh * self.ow && self.cout_r == self.cout
    }

    /// [`Plan::forward`] straight into the plain output `out` `(cout, oh, ow)` of one
    /// image, which may be memory not yet written: every element is written. Only where
    /// [`Plan::writes_plain`].
    pub(crate) fn forward_plain<S: Slot>(
        &self,
        xp: &[f32],
        wk: &[f32],
        out: &mut [S],
        parallel: bool,
    ) {
        self.check_plain(xp, out.len());
        self.forward_into(xp, wk, out, parallel);
    }

    /// [`Plan::forward`] into `out`, `flat_len` values (every tile written).
    fn forward_into<S: Slot>(&self, xp: &[f32], wk: &[f32], out: &mut [S], parallel: bool) {
        assert_eq!(
            wk.len(),
            self.cout_r * self.c * self.taps.len(),
            "direct conv: packed weight size"
        );
        let wblk = self.c * self.taps.len() * self.cb();
        if parallel {
            out.par_chunks_mut(self.cb() * self.qlen)
                .zip(wk.par_chunks(wblk))
                .for_each(|(o, wb)| self.block_tiles(xp, wb, o));
        } else {
            // Cache blocking: the loop over output-channel blocks runs inside a block of
            // pixels, so the input rows those read stay in cache.
            let per_block = (BLOCK_PIXELS / self.isa.tq()).max(1);
            let tiles = self.tiles();
            for t0 in (0..tiles).step_by(per_block) {
                let blocks = out.chunks_mut(self.cb() * self.qlen).zip(wk.chunks(wblk));
                for (o, wb) in blocks {
                    for t in t0..(t0 + per_block).min(tiles) {
                        self.fwd_tile(xp, wb, self.tile(t), o);
                    }
                }
            }
        }
    }

    /// [`Plan::forward`] of one image with the output-channel blocks in parallel, from the
    /// raw weights `w` `(cout, c, kh, kw)`: each block's weights are packed by the thread
    /// that runs it, into its cache, just before use. For one image (batch-1 inference)
    /// packing them all first wrote and re-read as many bytes as the layer's weights.
    pub(crate) fn forward_raw_weights(&self, xp: &[f32], w: &[f32], out: &mut Vec<f32>) {
        self.check_forward(xp, out);
        self.raw_weight_blocks(xp, w, out, Epilogue::NONE);
    }

    /// [`Plan::forward_raw_weights`] straight into the plain output `out` `(cout, oh, ow)`
    /// of one image (memory not yet written is fine: every element is written), with the
    /// epilogue `ep` (already narrowed to this image) applied to each block of channels by
    /// the thread that computed it, while the block is in its cache. Only where
    /// [`Plan::writes_plain`]: at batch 1 this drops [`Plan::unflatten`]'s copy of every
    /// output.
    pub(crate) fn forward_raw_weights_plain<S: Slot>(
        &self,
        xp: &[f32],
        w: &[f32],
        out: &mut [S],
        ep: Epilogue<'_, f32>,
    ) {
        self.check_plain(xp, out.len());
        self.raw_weight_blocks(xp, w, out, ep);
    }

    /// The output-channel blocks of one image in parallel, each packing its own weights
    /// from the raw `w` and then applying `ep` to its rows (`flat_len` values of `out`; `ep`
    /// only where the rows are the plain output's planes).
    fn raw_weight_blocks<S: Slot>(
        &self,
        xp: &[f32],
        w: &[f32],
        out: &mut [S],
        ep: Epilogue<'_, f32>,
    ) {
        let (cb, qlen) = (self.cb(), self.qlen);
        let wblk = self.c * self.taps.len() * cb;
        assert_eq!(
            w.len(),
            self.cout * self.c * self.taps.len(),
            "direct conv: weight size"
        );
        assert!(ep.is_identity() || self.writes_plain());
        out.par_chunks_mut(cb * qlen)
            .enumerate()
            .for_each_init(Vec::new, |wb, (blk, o)| {
                wb.resize(wblk, 0.0);
                self.pack_block(w, blk, wb);
                self.block_tiles(xp, wb, o);
                // SAFETY: `block_tiles` wrote every element of the block (whole tiles of
                // every row), and `S` is `f32` or `MaybeUninit<f32>` (one layout).
                let o = unsafe {
                    std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<f32>(), o.len())
                };
                ep.apply_planes(blk * cb, o, qlen);
            });
    }

    /// Checks that this plan writes a plain output, that it is `out_len` values, and the
    /// padded input's size (the plain forwards).
    fn check_plain(&self, xp: &[f32], out_len: usize) {
        assert!(
            self.writes_plain() && out_len == self.flat_len(),
            "direct conv: a plain output of a plan that writes one"
        );
        assert!(
            xp.len() >= self.padded_len(),
            "direct conv: padded input size"
        );
    }

    /// Checks the padded input's size and sizes `out` for a forward.
    fn check_forward(&self, xp: &[f32], out: &mut Vec<f32>) {
        assert!(
            xp.len() >= self.padded_len(),
            "direct conv: padded input size"
        );
        out.resize(self.flat_len(), 0.0);
    }

    /// Micro-tiles per output row: whole tiles, then at most one one-vector tile and (AVX-512)
    /// at most one half-vector tile.
    fn tiles(&self) -> usize {
        let (tq, lanes) = (self.isa.tq(), self.isa.lanes());
        let rest = self.qlen % tq;
        self.qlen / tq + usize::from(rest >= lanes) + usize::from(!rest.is_multiple_of(lanes))
    }

    /// Micro-tile `t`: (start, pixels), the pixels [`Isa::tq`], one vector or [`QUANTUM`].
    fn tile(&self, t: usize) -> (usize, usize) {
        let (tq, lanes) = (self.isa.tq(), self.isa.lanes());
        let full = self.qlen / tq;
        let rest = self.qlen % tq;
        if t < full {
            (t * tq, tq)
        } else if t == full && rest >= lanes {
            (full * tq, lanes)
        } else {
            (self.qlen - rest % lanes, rest % lanes)
        }
    }

    /// All micro-tiles of one output-channel block: its output rows `o`, its packed weights
    /// `wb`.
    fn block_tiles<S: Slot>(&self, xp: &[f32], wb: &[f32], o: &mut [S]) {
        for t in 0..self.tiles() {
            self.fwd_tile(xp, wb, self.tile(t), o);
        }
    }

    /// One micro-tile: `cb` output rows of `o` (stride `qlen`) at `q0..q0 + len`, for `len`
    /// [`QV`] vectors or (the tail) one vector or [`QUANTUM`] pixels.
    fn fwd_tile<S: Slot>(&self, xp: &[f32], wb: &[f32], (q0, len): (usize, usize), o: &mut [S]) {
        let (cb, max_tap, lanes) = (self.cb(), self.max_tap, self.isa.lanes());
        // The bounds the kernels rely on.
        assert!(
            [self.isa.tq(), lanes, QUANTUM].contains(&len)
                && q0 + len <= self.qlen
                && self.qlen + max_tap <= self.ps
        );
        assert!(xp.len() >= self.c * self.ps && wb.len() >= self.c * self.taps.len() * cb);
        assert!(o.len() >= (cb - 1) * self.qlen + q0 + len);
        // A `Slot` is an `f32` or a `MaybeUninit<f32>`: the same layout (the kernel only
        // writes the output).
        const { assert!(std::mem::size_of::<S>() == 4 && std::mem::align_of::<S>() == 4) };
        let (x, w, out) = (
            xp[q0..].as_ptr(),
            wb.as_ptr(),
            o[q0..].as_mut_ptr().cast::<f32>(),
        );
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the plan's instruction set (`Isa::supported` in `Plan::strided`), and
        // every pointer the kernel forms is in bounds: input reads reach
        // `(c - 1) * ps + q0 + max_tap + len <= c * ps`, weight reads `c * taps * cb`, output
        // writes `(cb - 1) * qlen + q0 + len` (asserted above); on AVX-512, mask reads
        // `(kw - 1) * nq + q0 / 8 + 2 * (len / 16 - 1) < kw * nq` (`q0 + len <= qlen`; the
        // table's size is asserted in `mask_reads`).
        unsafe {
            let (ps, taps, c, qlen) = (self.ps, &self.taps[..], self.c, self.qlen);
            match self.isa {
                Isa::Avx2 if len == lanes => avx2::fwd_tile::<1>(x, ps, taps, c, w, out, qlen),
                Isa::Avx2 => avx2::fwd_tile::<QV>(x, ps, taps, c, w, out, qlen),
                Isa::Avx512 => {
                    let r = self.mask_reads(x, q0);
                    match len {
                        QUANTUM => avx512::fwd_tile_half(r, c, w, out, qlen),
                        16 if self.kw == 3 && self.prefetches() => {
                            avx512::fwd_tile_k3::<1, true>(r, c, w, out, qlen)
                        }
                        16 if self.kw == 3 => avx512::fwd_tile_k3::<1, false>(r, c, w, out, qlen),
                        16 => avx512::fwd_tile::<1>(r, c, w, out, qlen),
                        _ if self.kw == 3 && self.prefetches() => {
                            avx512::fwd_tile_k3::<QV, true>(r, c, w, out, qlen)
                        }
                        _ if self.kw == 3 => avx512::fwd_tile_k3::<QV, false>(r, c, w, out, qlen),
                        _ => avx512::fwd_tile::<QV>(r, c, w, out, qlen),
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, w, out);
    }

    /// Whether the AVX-512 3-wide forward tiles prefetch each next input channel's rows:
    /// where the rows one full tile reads over all input channels take at least
    /// [`PREFETCH_MIN_BYTES`]. Interleaved on the Intel Xeon host (ARCHITECTURE.md,
    /// nineteenth session) that made the 64-channel 56x56, 256-channel 14x14 and stride-2
    /// bench layers' forwards 3-6% faster, and the 16-channel 32x32 one (6.5 KiB of rows) 3%
    /// slower.
    #[cfg(target_arch = "x86_64")]
    pub(super) fn prefetches(&self) -> bool {
        self.c * self.kh * (self.isa.tq() + self.kw - 1) * 4 >= PREFETCH_MIN_BYTES
    }

    /// The AVX-512 kernels' reads of a tile at `q0` whose input starts at `x`.
    #[cfg(target_arch = "x86_64")]
    fn mask_reads(&self, x: *const f32, q0: usize) -> avx512::Reads<'_> {
        let nq = self.qlen / QUANTUM;
        assert!(self.masks.len() == self.kw * nq && q0 < self.qlen && q0.is_multiple_of(QUANTUM));
        avx512::Reads {
            x,
            ps: self.ps,
            taps: &self.taps,
            kw: self.kw,
            masks: self.masks[q0 / QUANTUM..].as_ptr(),
            nq,
        }
    }

    /// Copies the valid columns of a flattened output into `dst` `(cout, oh, ow)`, applying
    /// the epilogue `ep` on the way.
    ///
    /// Every element of `dst` is written (it may be a buffer filled for the first time).
    pub(crate) fn unflatten<S: Slot>(&self, flat: &[f32], dst: &mut [S], ep: Epilogue<'_, f32>) {
        let plane = self.oh * self.ow;
        assert_eq!(dst.len(), self.cout * plane, "direct conv: output size");
        if self.pitch == self.ow {
            // No junk columns (the masked layout): each plane is contiguous.
            for (co, out) in dst.chunks_exact_mut(plane).enumerate() {
                let src = &flat[co * self.qlen..][..plane];
                if ep.is_identity() {
                    out.iter_mut().zip(src).for_each(|(d, s)| d.put(*s));
                } else {
                    ep.apply_to((co, co * plane), src, out);
                }
            }
            return;
        }
        if ep.is_identity() {
            // Row by row in order: a row's last piece may run into the next row, which is
            // written after it.
            for co in 0..self.cout {
                for oy in 0..self.oh {
                    let at = co * plane + oy * self.ow;
                    copy_row(
                        &mut dst[at..],
                        &flat[co * self.qlen + oy * self.pitch..],
                        self.ow,
                        self.ow,
                    );
                }
            }
            return;
        }
        for (co, out) in dst.chunks_exact_mut(plane).enumerate() {
            let src = &flat[co * self.qlen..];
            for (oy, row) in out.chunks_exact_mut(self.ow).enumerate() {
                let at = co * plane + oy * self.ow;
                ep.apply_to(
                    (co, at),
                    &src[oy * self.pitch..oy * self.pitch + self.ow],
                    row,
                );
            }
        }
    }

    /// The output gradient `(cout, oh, ow)` of one image in the flattened layout
    /// `(cout_r, qlen)`, zero in the junk columns, the tail and the padding rows. As with
    /// [`Plan::pad`], `dst` must be empty or filled by this plan before.
    pub(crate) fn flatten(&self, dy: &[f32], dst: &mut Vec<f32>) {
        let plane = self.oh * self.ow;
        assert_eq!(dy.len(), self.cout * plane, "direct conv: gradient size");
        if dst.len() != self.flat_len() {
            dst.clear();
            dst.resize(self.flat_len(), 0.0);
        }
        for (row, src) in dst.chunks_exact_mut(self.qlen).zip(dy.chunks_exact(plane)) {
            for (oy, s) in src.chunks_exact(self.ow).enumerate() {
                row[oy * self.pitch..oy * self.pitch + self.ow].copy_from_slice(s);
            }
        }
    }

    /// One image's weight gradient `(cout, c, kh, kw)` into `dw`, from its padded input `xp`
    /// and flattened output gradient `dyf` (from [`Plan::flatten`]).
    pub(crate) fn weight_grad(&self, xp: &[f32], dyf: &[f32], dw: &mut [f32]) {
        assert_eq!(
            dyf.len(),
            self.flat_len(),
            "direct conv: flattened gradient size"
        );
        self.weight_grad_rows(&[xp], &[dyf], self.qlen, dw);
    }

    /// [`Plan::weight_grad`] from the output gradient `dy` in its plain layout `(cout, oh,
    /// ow)`, flattened into `dyf` first where the kernels need that. The masked layout's
    /// transposed kernels read `oh * ow` values per output channel, which is the plain
    /// plane itself: there `dy` is read as it is (the copy into `dyf` was 2.4% of a
    /// 64-channel 56x56 backward).
    pub(crate) fn weight_grad_plain(
        &self,
        xp: &[f32],
        dy: &[f32],
        dyf: &mut Vec<f32>,
        dw: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.masked && self.takes_transposed_weight_grad() {
            let plane = self.oh * self.ow;
            assert_eq!(dy.len(), self.cout * plane, "direct conv: gradient size");
            assert_eq!(
                xp.len(),
                self.padded_len(),
                "direct conv: padded input size"
            );
            assert_eq!(
                dw.len(),
                self.cout * self.c * self.taps.len(),
                "direct conv: weight gradient size"
            );
            // The masked layout's rows are the output's (`w == ow`, no junk columns).
            assert_eq!(
                self.w, self.ow,
                "direct conv: masked rows as wide as the output's"
            );
            self.weight_grad_transposed(&[xp], &[dy], plane, dw);
            return;
        }
        self.flatten(dy, dyf);
        self.weight_grad(xp, dyf, dw);
    }

    /// The weight gradient summed over images `i` from their padded inputs `xps[i]` (from
    /// [`Plan::pad`]) and flattened output gradients `dyfs[i]` (from [`Plan::flatten`]), at
    /// most [`MAX_GROUP`] images (see [`Plan::weight_grad_group`]).
    pub(crate) fn weight_grad_images(&self, xps: &[&[f32]], dyfs: &[&[f32]], dw: &mut [f32]) {
        for dyf in dyfs {
            assert_eq!(
                dyf.len(),
                self.flat_len(),
                "direct conv: flattened gradient size"
            );
        }
        self.weight_grad_rows(xps, dyfs, self.qlen, dw);
    }

    /// A zeroed buffer for [`Plan::write_padded_plane`] with `planes` planes (at least `c`),
    /// its border and tail kept zero by writing only the planes' values.
    pub(crate) fn padded_buffer(&self, planes: usize) -> Vec<f32> {
        vec![0f32; planes.max(self.c) * self.ps]
    }

    /// The weight gradient of this (forward) plan from `dY` held in the padded buffer `dyp`
    /// of `back`, the input-gradient plan of a "same" convolution (`2 * padding = k - 1`):
    /// there both paddings are equal, so the padded `dY` shifted by `back`'s border offset
    /// *is* the flattened `dY` this plan's kernel reads (zero in the junk columns, which
    /// fall on the border), with planes `back.ps` apart instead of `qlen`. `dyp` must hold
    /// `cout_r` planes (see [`Plan::padded_buffer`]). `None` when the layouts differ.
    ///
    /// Several images (`xps[i]` with `dyps[i]`) give their summed gradient: at small planes
    /// one image's pass over `q` is short, and the kernel's set-up and final reductions
    /// would cost as much as the pass.
    pub(crate) fn weight_grad_padded(
        &self,
        xps: &[&[f32]],
        back: &Plan,
        dyps: &[&[f32]],
        dw: &mut [f32],
    ) -> Option<()> {
        let off = back.pad_y * back.wp + back.pad_x;
        let same = self.stride == 1
            && back.stride == 1
            && self.copy_len == 0
            && back.copy_len == 0
            && self.masked == back.masked
            && back.wp == self.wp
            && back.c == self.cout
            && back.h == self.oh
            && back.w == self.ow
            && off + self.qlen <= back.ps;
        if !same || dyps.iter().any(|d| d.len() < self.cout_r * back.ps) {
            return None;
        }
        let dys: Vec<&[f32]> = dyps.iter().map(|d| &d[off..]).collect();
        self.weight_grad_rows(xps, &dys, back.ps, dw);
        Some(())
    }

    /// How many images [`Plan::weight_grad_padded`] should sum per call: as many as keep the
    /// `dY` rows one call streams ([`Isa::cb`] rows of `qlen` values per image) within
    /// [`WGRAD_PASS_BYTES`], at least one and at most [`MAX_GROUP`] (one image for planes
    /// of 28x28 and more, whose f32 sums then match the single-image kernel's).
    ///
    /// Each call ends in a reduction of its accumulators (24 on AVX-512), so small planes
    /// want several images per call; but each tap block of a call re-reads all its `dY`
    /// rows, which must stay in L1. At 28x28 two images (50 KiB of `dY` on AVX-512) were
    /// 1% faster than one on Zen 4 (fifteenth session) but 4-5% slower on the Intel Xeon of
    /// the seventeenth, whose two FMA units consume operands twice as fast: ResNet-20 bs128
    /// 28x28 backward 119-121 ms against 125-128 ms, four interleaved `step-profile` pairs
    /// (eighteenth session). Splitting one image's pixels instead cost 5% on Zen 4 (twice
    /// the reductions) and was no faster on the Xeon at 56x56 or 32x32.
    pub(crate) fn weight_grad_group(&self) -> usize {
        (WGRAD_PASS_BYTES / (self.cb() * self.qlen * size_of::<f32>())).clamp(1, MAX_GROUP)
    }

    /// Images per weight-gradient call for a batch of `n`: [`Plan::weight_grad_group`],
    /// but at least one group per rayon thread.
    pub(crate) fn images_per_group(&self, n: usize) -> usize {
        let threads = rayon::current_num_threads().max(1);
        self.weight_grad_group().min(n.div_ceil(threads)).max(1)
    }

    /// The weight gradient summed over images `i`: `dY` row `co` (flattened, `qlen` long) at
    /// `co * row_stride` in `dys[i]`, input `xps[i]`, for all `cout_r` rows.
    fn weight_grad_rows(&self, xps: &[&[f32]], dys: &[&[f32]], row_stride: usize, dw: &mut [f32]) {
        let nt = self.taps.len();
        assert!(
            !xps.is_empty() && xps.len() == dys.len() && xps.len() <= MAX_GROUP,
            "direct conv: image group"
        );
        for (xp, dy) in xps.iter().zip(dys) {
            assert_eq!(
                xp.len(),
                self.padded_len(),
                "direct conv: padded input size"
            );
            assert!(
                row_stride >= self.qlen && dy.len() >= (self.cout_r - 1) * row_stride + self.qlen,
                "direct conv: output gradient size"
            );
        }
        assert_eq!(
            dw.len(),
            self.cout * self.c * nt,
            "direct conv: weight gradient size"
        );
        let max_tap = self.max_tap;
        assert!(self.qlen.is_multiple_of(QUANTUM) && self.qlen + max_tap <= self.ps);
        #[cfg(target_arch = "x86_64")]
        if self.takes_transposed_weight_grad() {
            self.weight_grad_transposed(xps, dys, row_stride, dw);
            return;
        }
        let cb = self.cb();
        let mut xs = [std::ptr::null::<f32>(); MAX_GROUP];
        let mut ds = [std::ptr::null::<f32>(); MAX_GROUP];
        let m = xps.len();
        for blk in 0..self.cout_r / cb {
            for (d, dy) in ds.iter_mut().zip(dys) {
                *d = dy[blk * cb * row_stride..].as_ptr();
            }
            for ci in 0..self.c {
                for (x, xp) in xs.iter_mut().zip(xps) {
                    *x = xp[ci * self.ps..(ci + 1) * self.ps].as_ptr();
                }
                for t0 in (0..nt).step_by(TB) {
                    let n = TB.min(nt - t0);
                    // Missing taps of the last block repeat the first; their sums are dropped.
                    let offs: [usize; TB] = std::array::from_fn(|i| self.taps[t0 + i.min(n - 1)]);
                    let mut sums = [[0f32; TB]; MAX_CB];
                    let rows = (&xs[..m], &ds[..m]);
                    // Each tap's mask row (AVX-512): `qlen / 8` values from `kx * nq`.
                    let nq = self.qlen / QUANTUM;
                    let masks: [*const u16; TB] = std::array::from_fn(|i| {
                        let kx = (t0 + i.min(n - 1)) % self.kw;
                        self.masks
                            .get(kx * nq..(kx + 1) * nq)
                            .map_or(std::ptr::null(), <[u16]>::as_ptr)
                    });
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has the plan's instruction set (`Plan::strided`); for each
                    // of the `m` images, reads from its plane pointer reach
                    // `max_tap + qlen <= ps` and from its `dY` pointer
                    // `(cb - 1) * row_stride + qlen` (asserted above); `qlen` is a multiple
                    // of [`QUANTUM`], half an AVX-512 vector (whose kernel masks the rest).
                    unsafe {
                        match self.isa {
                            Isa::Avx2 => {
                                avx2::wgrad_tile(rows, offs, row_stride, self.qlen, &mut sums)
                            }
                            Isa::Avx512 => {
                                assert!(masks.iter().all(|m| !m.is_null()));
                                avx512::wgrad_tile(
                                    rows, offs, masks, row_stride, self.qlen, &mut sums,
                                )
                            }
                        }
                    };
                    // Off x86-64 no direct plan is made (`Isa::detect` finds no instruction set).
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (rows, offs, masks, &mut sums);
                    for (j, s) in sums.iter().take(cb).enumerate() {
                        let co = blk * cb + j;
                        if co < self.cout {
                            let at = (co * self.c + ci) * nt + t0;
                            // At most `TB` values. A copy of a constant length compiles to
                            // moves; one of `n` values (even written as a loop) to a
                            // `memcpy` call, which cost 1% of a training step here.
                            if n == TB {
                                dw[at..at + TB].copy_from_slice(&s[..TB]);
                            } else {
                                for (d, v) in dw[at..at + n].iter_mut().zip(s) {
                                    *d = *v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The most images one weight-gradient call sums.
pub(crate) const MAX_GROUP: usize = 8;

/// The `dY` bytes one weight-gradient call should stream (see [`Plan::weight_grad_group`]):
/// half of a 48 KiB L1 data cache, three quarters of a 32 KiB one, leaving room for the
/// input rows.
const WGRAD_PASS_BYTES: usize = 24 << 10;

/// Values per piece of [`copy_row`].
const ROW_PIECE: usize = 8;
/// How far a source plane should run past its values for [`Plan::write_padded_plane`] to
/// copy its last row in whole pieces.
pub(crate) const ROW_SLACK: usize = ROW_PIECE;

/// Copies `len` values from the front of `src` to the front of `dst`, in whole pieces of
/// [`ROW_PIECE`] where both slices are long enough for the last piece to run past `len` and
/// it runs at most `max_over` values past it, exactly otherwise; returns how many values
/// past `len` it wrote (less than a piece, at most `max_over`).
///
/// The rows of a convolution are short (7 to 56 values at CIFAR and ImageNet sizes), and a
/// `memcpy` call per row cost more than the copy: 6-8% of a CIFAR training step went to
/// them. The caller must overwrite or restore what the piece wrote past `len`.
fn copy_row<S: Slot>(dst: &mut [S], src: &[f32], len: usize, max_over: usize) -> usize {
    let whole = len.div_ceil(ROW_PIECE) * ROW_PIECE;
    if dst.len() >= whole && src.len() >= whole && whole - len <= max_over {
        for (d, s) in dst[..whole]
            .chunks_exact_mut(ROW_PIECE)
            .zip(src[..whole].chunks_exact(ROW_PIECE))
        {
            let piece: [f32; ROW_PIECE] = std::array::from_fn(|i| s[i]);
            for (d, v) in d.iter_mut().zip(piece) {
                d.put(v);
            }
        }
        whole - len
    } else {
        for (d, s) in dst[..len].iter_mut().zip(&src[..len]) {
            d.put(*s);
        }
        0
    }
}

#[cfg(test)]
mod tests;

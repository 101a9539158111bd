//! What every tile of [`super::forward`] takes, whichever instruction set runs it: where it
//! reads ([`Src`]), the partial sums it starts from and ends in ([`Part`]), where it
//! writes ([`Dst`]), and the [`Kernel`] each instruction set's tile implements
//! (`avx512.rs`: 32 output channels by up to 14 pixels, or 16 by up to 16; `avx2.rs`: 16
//! by up to 6).

/// Where a tile reads: `x` is the input value at channel 0, the first valid kernel row's
/// input row and the column left of the tile's first tap (`S ox0 - 1`: one before the
/// row for the row's first tile, formed with wrapping arithmetic and never read, see
/// `LEFT`). Channels are `plane` values apart, rows `w`; `rows` kernel rows are valid.
#[derive(Clone, Copy)]
pub(crate) struct Src {
    pub(crate) x: *const f32,
    pub(crate) plane: usize,
    pub(crate) w: usize,
    pub(crate) rows: usize,
}

/// The sums a tile starts from and ends in, pixel by pixel (`[P][CO]`), where the input
/// channels are taken in parts: `from` null: zero; `to` null: the output ([`Dst`]).
#[derive(Clone, Copy)]
pub(crate) struct Part {
    pub(crate) from: *const f32,
    pub(crate) to: *mut f32,
}

/// Where a tile writes: `out` is output channel 0 of the block at the tile's first pixel,
/// channels `plane` values apart. With `finish`, each value becomes
/// `relu?(residual? + (v * scale? + bias-or-0))` as `conv::epilogue` computes it
/// (multiply, then add: the same bits); the scale and bias per channel (null: not applied),
/// the residual laid out as the output from `residual` (null: none).
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    pub(crate) out: *mut f32,
    pub(crate) plane: usize,
    pub(crate) finish: bool,
    pub(crate) scale: *const f32,
    pub(crate) bias: *const f32,
    pub(crate) residual: *const f32,
    pub(crate) relu: bool,
}

/// One instruction set's tile: `P <= MAX_P` consecutive output pixels of one row by `CO`
/// output channels (the packed weights' innermost dimension, `[ci][tap][CO]`).
pub(crate) trait Kernel {
    /// Output channels of one block.
    const CO: usize;
    /// The most pixels of one tile.
    const MAX_P: usize;
    /// The most pixels of a tile that is a whole row (`LEFT` and `RIGHT`): a wider row of
    /// at most [`Kernel::MAX_P`] pixels is cut in two ([`super::work::tiles`]).
    const MAX_P_ROW: usize;

    /// The instruction set the tile runs on.
    const ISA: crate::conv::direct::Isa;

    /// `out[j * plane + i] = from[i * CO + j] + sum_ci sum_(ky, kx) wk[t * CO + j] * x[ci *
    /// plane + ky * w + s i + kx]`, with `t = ci * 9 + ky * 3 + kx`, for the `rows` valid
    /// kernel rows, pixels `i < pw` and channels `j < CO` (then finished, see [`Dst`]), or
    /// the same sums into `to[i * CO + j]` ([`Part`]: the sums over one part of the input
    /// channels). `edges.0` (`LEFT`): the tile starts a row, and its first pixel's column-0
    /// taps, reading the left padding (zero), are skipped; `edges.1` (`RIGHT`, stride 1
    /// only): it ends the row, and its last pixel's column-2 taps, reading the right
    /// padding, are skipped.
    ///
    /// # Safety
    /// The kernel's instruction set must be available; `1 <= pw <= MAX_P` (`MAX_P_ROW` for a
    /// whole row at stride 1), `s` 1 or 2;
    /// `x` readable at every offset above but the skipped ones, `wk` for `(c - 1) * 9 * CO
    /// + rows * 3 * CO` floats, `part`'s pointers (where not null) for `pw * CO` floats;
    /// without `part.to`, `out` writable (and `residual` readable) at `j * plane + i`, and
    /// `scale` and `bias` readable for `CO` floats where not null.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        pw_s: (usize, usize),
        edges: (bool, bool),
        src: Src,
        c: usize,
        wk: *const f32,
        part: Part,
        d: Dst,
    );
}

/// A [`Kernel::tile`]'s body: `$tile::<P, S, LEFT, RIGHT>` for `pw_s = (P, S)` and `edges =
/// (LEFT, RIGHT)`, for the pixel counts listed (`RIGHT` only at stride 1), and for a whole
/// row at stride 1 (`LEFT` and `RIGHT`) the counts of the second list.
macro_rules! tile_widths {
    ($tile:ident, $pw_s:expr, $edges:expr, $args:tt; $($p:literal)*; $($r:literal)*) => {
        match ($pw_s.0, $pw_s.1, $edges) {
            $(
                // SAFETY (each arm): the caller's contract.
                ($p, 2, (true, false)) => unsafe { $tile::<$p, 2, true, false>$args },
                ($p, 2, (false, false)) => unsafe { $tile::<$p, 2, false, false>$args },
                ($p, 1, (true, false)) => unsafe { $tile::<$p, 1, true, false>$args },
                ($p, 1, (false, true)) => unsafe { $tile::<$p, 1, false, true>$args },
                ($p, 1, (false, false)) => unsafe { $tile::<$p, 1, false, false>$args },
            )*
            $(
                // SAFETY (each arm): the caller's contract.
                ($r, 1, (true, true)) => unsafe { $tile::<$r, 1, true, true>$args },
            )*
            (pw, s, edges) => unreachable!("lanes: a tile of {pw} pixels at stride {s}, edges {edges:?}"),
        }
    };
}
pub(crate) use tile_widths;

/// `v`, through an empty `asm!` the compiler cannot see into (the tile's column offset).
/// Pixel `i`'s column-2 tap reads the value of pixel `i + 1`'s column-0 tap (at stride 2;
/// at stride 1, of pixel `i + 1`'s column-1 and pixel `i + 2`'s column-0 taps): with the
/// addresses in sight LLVM loaded it once and kept it in a register between the two, which
/// with 28 accumulators live pushed them onto the stack (the AVX-512 14-pixel tile ran at
/// about 60% of its speed).
#[inline(always)]
pub(crate) fn opaque(v: usize) -> usize {
    let out: usize;
    // SAFETY: moves a register; reads and writes nothing else.
    unsafe {
        std::arch::asm!(
            "mov {0}, {1}",
            out(reg) out,
            in(reg) v,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

//! Our f32 GEMM for x86-64 CPUs with AVX-512 or AVX2 + FMA: `dst (m x n, row-major) =
//! [dst +] a . b`.
//!
//! The `gemm` crate (Candle's matmul, and our convolutions' GEMM path before this) uses
//! 8-lane AVX2 kernels on stable Rust, which reach under half the FMA rate of a CPU that
//! retires two 16-lane FMAs per cycle, and about 64% of it on an AVX2-only CPU (its tile
//! leaves the FMAs waiting on loads). This is the classic packed design (Goto / BLIS), with
//! one micro-kernel per instruction set, each with its own tile ([`Micro`]): 8 x 32 on
//! AVX-512 ([`avx512`]), 6 x 16 on AVX2 ([`avx2`]):
//!
//! - `B` is cut into `KC x NC` blocks and packed into panels of `NR` columns (`NR` values
//!   per `k`, zero-padded), `A` into `MC x KC` blocks packed into panels of `MR` rows;
//! - the micro-kernel ([`avx512::kernel`]) computes an `MR x NR` tile of `dst` from one `A`
//!   panel and one `B` panel; the `B` panel (`KC * NR` floats, 32 KiB on AVX-512, 16 on
//!   AVX2) stays in L1 while the `A` block (`MC * KC`, 128 KiB) streams from L2 (an `A`
//!   read in place by a
//!   column part is walked the other way round: see `serial`);
//! - the first `KC` block writes (or adds to) `dst`, the others add; the last can finish
//!   each value as it stores it ([`Finish`]: a convolution's per-channel epilogue).
//!
//! Packing reads `a` and `b` through any row and column strides, so transposed operands
//! cost nothing extra. With several threads the larger of `n` and `m` is split into one
//! part per thread (whole panels each; the columns where that spares packing the whole of
//! `b` on every thread, `columns_pay`, each column part then reading a row-major `a` in
//! place, in `PARTS_PER_THREAD` parts a thread), and each part packs what it reads.
//!
//! [`available`] says whether it may run ([`isa`]: AVX-512, or AVX2 + FMA, present and
//! allowed by [`crate::dispatch`]); elsewhere the callers keep the `gemm` crate, which
//! covers ARM NEON and the portable fallback (and f64 everywhere).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::aligned::aligned_mut;

/// A micro-kernel: the `MR x NR` tile of `dst` it computes from an `A` panel of `MR` rows
/// and a `B` panel of `NR` columns (both packed, `A` also read in place), on `VR` vectors
/// per row (`VR = 2`: the whole `NR`; `VR = 1`: a last panel of at most `NR / 2` columns).
/// The packers and the macro-kernel ([`serial`]) take the tile as const parameters beside
/// the kernel (`<K, MR, NR>`, checked equal to `K`'s at compile time): array lengths cannot
/// come from a trait's constants on stable Rust.
pub(crate) trait Micro {
    /// Rows of a micro-tile.
    const MR: usize;
    /// Columns of a micro-tile.
    const NR: usize;
    /// Rows of one packed `A` block: a multiple of `MR` (the packed layout relies on it).
    const MC: usize = 128 / Self::MR * Self::MR;

    /// `c[i * ldc + j] (=|+=) sum_p A[i, p] * b[p * NR + j]` for `i < mr`, `j < nr` (the
    /// fields of `dst`), finished by `dst.fin` as it is stored; `A` packed (`lda` `None`,
    /// `A[i, p] = a[p * MR + i]`) or read in place from a row-major matrix (`Some(lda)`,
    /// `A[i, p] = a[i * lda + p]`; rows past `mr` read row 0 again, their sums not stored).
    ///
    /// # Safety
    /// The kernel's instruction set must be available ([`Isa::runs_here`]); `a` readable
    /// for `kc * MR` floats (packed) or at `i * lda + p` for `i < mr`, `p < kc` (in place),
    /// `b` for `kc * NR`, and `dst` as [`TileDst`] says, with `nr <= VR * NR / 2`.
    unsafe fn tile<const VR: usize>(
        kc: usize,
        a: (*const f32, Option<usize>),
        b: *const f32,
        dst: TileDst,
    );
}

/// The AVX-512 micro-kernel ([`avx512::kernel`]): 8 x 32, 16 of the 32 registers summing.
pub(crate) struct Avx512Kernel;
/// The AVX2 + FMA micro-kernel ([`avx2::kernel`]): 6 x 16, 12 of the 16 registers summing.
pub(crate) struct Avx2Kernel;

/// Implements [`Micro`] for a kernel type: its tile (`MR` x `NR`) and the module whose
/// `kernel::<VR>` it runs. The entry point exists only on x86-64; elsewhere [`isa`] never
/// names a kernel, so `tile` is unreachable there.
macro_rules! micro_kernel {
    ($kernel:ty, $mr:literal x $nr:literal, $module:ident, $name:literal) => {
        impl Micro for $kernel {
            const MR: usize = $mr;
            const NR: usize = $nr;

            unsafe fn tile<const VR: usize>(
                kc: usize,
                a: (*const f32, Option<usize>),
                b: *const f32,
                dst: TileDst,
            ) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller's contract is the kernel's.
                unsafe {
                    $module::kernel::<VR>(kc, a, b, dst)
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (kc, a, b, dst);
                    unreachable!(concat!("sgemm: ", $name, " kernel on another architecture"))
                }
            }
        }
    };
}

micro_kernel!(Avx512Kernel, 8 x 32, avx512, "AVX-512");
micro_kernel!(Avx2Kernel, 6 x 16, avx2, "AVX2");

/// Which micro-kernel a product runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    /// [`Avx512Kernel`].
    Avx512,
    /// [`Avx2Kernel`].
    Avx2,
}

impl Isa {
    /// Every kernel, widest first.
    #[cfg(test)]
    pub(crate) const ALL: [Isa; 2] = [Isa::Avx512, Isa::Avx2];

    /// Whether this CPU has the kernel's instructions (whatever the dispatch allows).
    pub(crate) fn runs_here(self) -> bool {
        let cpu = crate::dispatch::cpu();
        cfg!(target_arch = "x86_64")
            && match self {
                Isa::Avx512 => cpu.has(crate::dispatch::Simd::Avx512),
                Isa::Avx2 => cpu.has(crate::dispatch::Simd::Avx2),
            }
    }

    /// Columns of the kernel's tile.
    pub(crate) fn nr(self) -> usize {
        match self {
            Isa::Avx512 => Avx512Kernel::NR,
            Isa::Avx2 => Avx2Kernel::NR,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// The kernel this thread's products run on, whatever the dispatch says ([`force`]).
    static FORCED: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's products (and packed operands) on `isa`: the tests check
/// every kernel the CPU has, on any CPU, without changing the process's dispatch.
#[cfg(test)]
pub(crate) fn force<T>(isa: Isa, f: impl FnOnce() -> T) -> T {
    assert!(isa.runs_here(), "sgemm: {isa:?} forced on a CPU without it");
    let before = FORCED.with(|c| c.replace(Some(isa)));
    let out = f();
    FORCED.with(|c| c.set(before));
    out
}

/// The kernel our GEMM runs on here: the widest the CPU has and [`crate::dispatch`]
/// allows (`RESBLOCK_SIMD`), unless [`crate::dispatch::Dispatch::own_gemm`] is off
/// (`RESBLOCK_SGEMM=0`); `None` where none runs (the callers then use the `gemm` crate).
pub(crate) fn isa() -> Option<Isa> {
    #[cfg(test)]
    if let Some(isa) = FORCED.with(std::cell::Cell::get) {
        return Some(isa);
    }
    if !cfg!(target_arch = "x86_64") || !crate::dispatch::current().own_gemm {
        None
    } else if crate::dispatch::avx512() {
        Some(Isa::Avx512)
    } else if crate::dispatch::avx2_fma() {
        Some(Isa::Avx2)
    } else {
        None
    }
}

/// The columns the micro-kernel computes for an `n`-column product: whole panels of
/// `NR` ([`Isa::nr`] of the kernel that runs), and a last one of `NR / 2` where the rest
/// fits in it (the kernel choice in the macro-kernel's loop). A 7x7 output (49 columns)
/// costs 64 at `NR = 32`, 56 at 16. Where no kernel runs, `n`.
pub(crate) fn computed_columns(n: usize) -> usize {
    isa().map_or(n, |isa| columns_on(isa.nr(), n))
}

/// [`computed_columns`] for panels of `nr` columns.
fn columns_on(nr: usize, n: usize) -> usize {
    let rest = n % nr;
    n - rest
        + match rest {
            0 => 0,
            r if r <= nr / 2 => nr / 2,
            _ => nr,
        }
}
/// Depth of one packed block.
const KC: usize = 256;
/// Depth of one block where a column part reads `A` in place ([`columns_pay`]): no `A`
/// block is packed, so the depth is not bound by one, and half as many passes store and
/// reload the `C` tiles. The `B` panels (64 KiB on AVX-512) then stream from L2 while the
/// `A` panel (8 rows of 2 KiB) stays in L1 (the tiles are walked along the rows, see
/// [`serial`]). (Chosen on AVX-512, kept for AVX2's 6 x 16 tile unmeasured.)
/// 1024^3 on two threads: 4.86-4.90 against 4.96-5.02 ms at [`KC`].
const KC_IN_PLACE: usize = 512;
/// Rows ahead that [`pack_b`] asks for while it copies a row-major `b`'s panel row by row:
/// each row's `NR` values are one cache line, `rs` floats after the last (a 1x1
/// convolution's input planes, 3136 floats apart at 56x56), a stride the hardware's
/// prefetchers followed too late. On the Zen 3 host, ResNet-50 batch-8 inference
/// (`infer-profile`, processes alternated): `pack_b` 7.4% of the samples before, 5.8%
/// after; minima 423-605 against 417-630 ms, lower in 7 of 9 pairs (the host's spread
/// is larger than the gain). Measured on AVX2 only.
#[cfg(target_arch = "x86_64")]
const PACK_B_AHEAD: usize = 8;
/// Columns of one packed `B` block (a multiple of every kernel's `NR`).
const NC: usize = 1024;
/// The most `NR` panels of one `B` block for which a row-major `A` is read in place by the
/// micro-kernel instead of packed: packing costs a read and a write of the block for
/// reuse by every panel, which a few panels (a batch-1 convolution's 7x7 to 14x14 output:
/// 2 to 7 panels) do not pay back. At batch 1 the packing of `A` was a tenth of a
/// ResNet-50 inference. (A column part of [`columns_pay`] reads it in place whatever the
/// count: there every part would pack all of `A`.) Counted on AVX-512's 32-column panels;
/// on AVX2's 16-column ones the same count is half as many columns (kept unmeasured).
const STRIDED_A_PANELS: usize = 8;
/// Column parts per thread where each part reads a row-major `a` in place
/// ([`columns_pay`]): rayon hands the parts to whichever thread is free, so a core slowed
/// by a neighbour (these hosts are shared) does fewer of them, where one part per thread
/// left the other waiting. More parts cost nothing but more reads of `a` (in place, from
/// L2/L3): each part packs only its own columns of `b`. Not for the other splits, whose
/// parts each pack all of `a` or of `b`. On the 2-core Zen 3 host, process against process
/// alternated (minima of 8 calls): 1024^3 11.40-11.99 against 11.62-12.79 ms (8 of 8
/// pairs) and 14.57-16.08 against 14.84-16.90 (4 of 4) in a busier spell; the residual MLP
/// block's 128 x 256 . 256 x 256 the same (0.121-0.144 against 0.122-0.145 ms). Measured
/// on AVX2 only.
const PARTS_PER_THREAD: usize = 4;
/// Weights of at least this many floats are packed on all threads ([`PackedA::new`], the
/// direct convolution's `pack_weights`): below it the rayon hand-off costs more than the
/// copy.
pub(crate) const PARALLEL_PACK: usize = 1 << 16;

/// Whether the callers use [`sgemm`]: a micro-kernel runs here ([`isa`]).
pub(crate) fn available() -> bool {
    isa().is_some()
}

/// A matrix operand: its slice and (row, column) strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Operand<'_> {
    /// Panics unless every element of a `rows x cols` matrix read through the strides lies
    /// in the slice.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(self.data.len() > last, "sgemm: {what} out of bounds");
        }
    }
}

/// `dst (m x n, row-major) = [dst +] a (m x k) . b (k x n)` on `threads` threads.
///
/// # Panics
/// If [`available`] is false, or an operand's strides reach past its slice.
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
    threads: usize,
) {
    a.check(m, k, "lhs");
    run(
        (m, n, k),
        Dst::of(dst),
        accumulate,
        Lhs::Raw(a),
        b,
        None,
        threads,
    );
}

/// [`sgemm`] into uninitialised memory (`dst = a . b`): the product writes each of its
/// `m * n` values without reading any, so a fresh output needs no zero-filling first.
///
/// # Panics
/// As [`sgemm`].
pub(crate) fn sgemm_uninit(
    (m, n, k): (usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    a: Operand<'_>,
    b: Operand<'_>,
    finish: Option<Finish<'_>>,
    threads: usize,
) {
    a.check(m, k, "lhs");
    run(
        (m, n, k),
        Dst::uninit(dst),
        false,
        Lhs::Raw(a),
        b,
        finish,
        threads,
    );
}

/// [`sgemm`] with `a` packed beforehand ([`PackedA`]): for a left operand shared by many
/// products, such as a convolution's weights over the images of a batch.
pub(crate) fn sgemm_packed(
    a: &PackedA,
    n: usize,
    dst: &mut [f32],
    accumulate: bool,
    b: Operand<'_>,
    threads: usize,
) {
    run(
        (a.m, n, a.k),
        Dst::of(dst),
        accumulate,
        Lhs::Packed(a),
        b,
        None,
        threads,
    );
}

/// [`sgemm_packed`] into uninitialised memory, as [`sgemm_uninit`].
pub(crate) fn sgemm_packed_uninit(
    a: &PackedA,
    n: usize,
    dst: &mut [MaybeUninit<f32>],
    b: Operand<'_>,
    finish: Option<Finish<'_>>,
    threads: usize,
) {
    run(
        (a.m, n, a.k),
        Dst::uninit(dst),
        false,
        Lhs::Packed(a),
        b,
        finish,
        threads,
    );
}

/// What the product applies to each value of `dst` as it stores it the last time:
/// `relu?(residual? + (v * scale[i]? + bias[i]?))` for row `i` (a convolution's epilogue,
/// its rows being output channels), computed as `conv::epilogue`'s separate pass does, bit
/// for bit. Finished in the micro-kernel's last store, the values are not read and written
/// again (that pass was 3.5% of a ResNet-50 batch-1 inference).
#[derive(Clone, Copy)]
pub(crate) struct Finish<'a> {
    /// One value per row.
    pub scale: Option<&'a [f32]>,
    /// One value per row.
    pub bias: Option<&'a [f32]>,
    /// Laid out as `dst` (`m x n`, row-major).
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl<'a> Finish<'a> {
    /// Panics unless the parts cover an `m x n` product.
    fn check(&self, m: usize, n: usize) {
        let rows = |v: Option<&[f32]>| v.is_none_or(|v| v.len() >= m);
        assert!(
            rows(self.scale) && rows(self.bias),
            "sgemm: finish scale or bias shorter than the rows"
        );
        assert!(
            self.residual.is_none_or(|r| r.len() >= m * n),
            "sgemm: finish residual shorter than the product"
        );
    }

    /// The finish of the part of the product from row `i` and column `j` on, whose rows
    /// are `ldc` apart.
    fn from(self, i: usize, j: usize, ldc: usize) -> Finish<'a> {
        Finish {
            scale: self.scale.map(|s| &s[i..]),
            bias: self.bias.map(|b| &b[i..]),
            residual: self.residual.map(|r| &r[i * ldc + j..]),
            relu: self.relu,
        }
    }

    /// The micro-kernel's view of the tile at row `i`, column `j` (rows `ldc` apart).
    fn tile(&self, i: usize, j: usize, ldc: usize) -> TileFinish {
        let at = |v: Option<&[f32]>, off: usize| v.map_or(std::ptr::null(), |v| v[off..].as_ptr());
        TileFinish {
            scale: at(self.scale, i),
            bias: at(self.bias, i),
            residual: at(self.residual, i * ldc + j),
            relu: self.relu,
        }
    }
}

/// Where a micro-tile's sums go: the `mr x nr` values of `dst` from `c`, rows `ldc` apart,
/// written, or added to with `add`, and finished by `fin` (the last depth block's).
///
/// Valid for a kernel's [`Micro::tile`] when `c` is writable (and readable when `add`) at
/// `i * ldc + j` for `i < mr`, `j < nr`, with `1 <= mr <= MR`, and `fin`'s pointers are
/// as [`TileFinish`] says.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct TileDst {
    pub c: *mut f32,
    pub ldc: usize,
    pub mr: usize,
    pub nr: usize,
    pub add: bool,
    pub fin: Option<TileFinish>,
}

#[cfg(target_arch = "x86_64")]
impl TileDst {
    /// Asks for the lines of the tile that its store will write (and read, with `add`) and
    /// of the residual it will add, before the kernel's loop over `k` fills the sums: the
    /// store then finds them in cache where it waited for memory. In ResNet-50's unfolded
    /// inference at batch 8 (AVX-512) the epilogue's residual loads, which miss every cache
    /// (the shortcut was written a whole block earlier), held most of the 10% of samples in
    /// the kernel's store; asking first took 4-7% off the forward.
    ///
    /// A row's `nr <= 32` values from `s` meet at most three 64-byte lines, each holding
    /// one of `s`, `s + 16` and `s + nr - 1`. Hints only: they read nothing and cannot
    /// fault, so the tile's contract is all they need.
    #[inline]
    pub(super) fn prefetch(&self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let residual = self.fin.map_or(std::ptr::null(), |f| f.residual);
        let last = self.nr.saturating_sub(1);
        for i in 0..self.mr {
            for j in [0, last.min(16), last] {
                let at = i * self.ldc + j;
                // SAFETY: a prefetch is a hint (SSE, in every x86-64 CPU).
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(self.c.wrapping_add(at).cast::<i8>());
                    if !residual.is_null() {
                        _mm_prefetch::<_MM_HINT_T0>(residual.wrapping_add(at).cast::<i8>());
                    }
                }
            }
        }
    }
}

/// What a micro-tile applies to its values as it stores them the last time:
/// `relu?(residual? + (v * scale? + bias?))`, the scale and bias per row, the residual laid
/// out as the tile (row stride `ldc`), as the separate pass of a convolution's epilogue
/// computes it (multiply, then add the bias or zero: no fused multiply-add, so both give
/// the same bits). Null pointers are the parts not applied. Each kernel applies it with
/// its own vectors (`avx512::finish`, `avx2::finish`); off x86-64 no kernel reads it.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct TileFinish {
    /// The tile's first row's scale (`mr` values readable), or null.
    pub scale: *const f32,
    /// The tile's first row's bias (`mr` values readable), or null.
    pub bias: *const f32,
    /// The residual's value at the tile's first element, readable where the tile is
    /// written, or null.
    pub residual: *const f32,
    pub relu: bool,
}

/// The destination of [`run`]: `len` values from `ptr`, borrowed mutably for `'a`, either
/// initialised or not. The kernels never read a value they have not written unless asked to
/// accumulate, which only an initialised destination allows ([`run`] checks).
struct Dst<'a> {
    ptr: DstPtr,
    len: usize,
    init: bool,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> Dst<'a> {
    fn of(dst: &'a mut [f32]) -> Dst<'a> {
        Dst {
            ptr: DstPtr(dst.as_mut_ptr()),
            len: dst.len(),
            init: true,
            _borrow: PhantomData,
        }
    }

    fn uninit(dst: &'a mut [MaybeUninit<f32>]) -> Dst<'a> {
        Dst {
            ptr: DstPtr(dst.as_mut_ptr().cast()),
            len: dst.len(),
            init: false,
            _borrow: PhantomData,
        }
    }
}

/// The left operand: read through strides and packed per block, or packed already.
#[derive(Clone, Copy)]
enum Lhs<'a> {
    Raw(Operand<'a>),
    Packed(&'a PackedA),
}

/// `a` packed whole for one kernel ([`Isa`], the one [`isa`] named when it was packed),
/// block by block in the order [`serial`] reads them: for each `KC` step of depth `pc`,
/// the `MC` blocks of rows, each as [`pack_a`] lays it out; block `(pc, ic)` starts at
/// `pc * m_pad + ic * kc` (`m_pad`: `m` rounded up to `MR`).
pub(crate) struct PackedA {
    isa: Isa,
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedA {
    /// Packs `a` (`m x k`) for the kernel that runs here.
    ///
    /// # Panics
    /// If `a`'s strides reach past its slice, or no kernel runs ([`available`]).
    pub(crate) fn new(a: Operand<'_>, m: usize, k: usize) -> PackedA {
        a.check(m, k, "packed lhs");
        let isa = isa().expect("sgemm: packing for a GEMM that does not run here");
        let data = match isa {
            Isa::Avx512 => pack_whole::<Avx512Kernel, { Avx512Kernel::MR }>(a, m, k),
            Isa::Avx2 => pack_whole::<Avx2Kernel, { Avx2Kernel::MR }>(a, m, k),
        };
        PackedA { isa, m, k, data }
    }

    /// The packed block at depth `pc`, rows from `ic`, of depth `kc`, for kernel `K`.
    fn block<K: Micro>(&self, pc: usize, ic: usize, kc: usize) -> &[f32] {
        let m_pad = self.m.div_ceil(K::MR) * K::MR;
        let start = pc * m_pad + ic * kc;
        let rows = K::MC.min(self.m - ic).div_ceil(K::MR) * K::MR;
        &self.data[start..start + rows * kc]
    }
}

/// [`PackedA::new`]'s data for kernel `K` (`MR` its rows).
fn pack_whole<K: Micro, const MR: usize>(a: Operand<'_>, m: usize, k: usize) -> Vec<f32> {
    const { assert!(K::MR == MR) };
    let m_pad = m.div_ceil(MR) * MR;
    let mut data = vec![0f32; m_pad * k];
    // The blocks in order, each `(pc, kc, ic, mc)` and its slice of `data`.
    let mut blocks = Vec::new();
    let mut rest = &mut data[..];
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        for ic in (0..m).step_by(K::MC) {
            let mc = K::MC.min(m - ic);
            let (block, tail) = rest.split_at_mut(mc.div_ceil(MR) * MR * kc);
            blocks.push(((pc, kc, ic, mc), block));
            rest = tail;
        }
    }
    let pack = |((pc, kc, ic, mc), block): ((usize, usize, usize, usize), &mut [f32])| {
        pack_a_into::<MR>(block, a, ic, mc, pc, kc);
    };
    if m_pad * k >= PARALLEL_PACK && rayon::current_num_threads() > 1 {
        blocks.into_par_iter().for_each(pack);
    } else {
        blocks.into_iter().for_each(pack);
    }
    data
}

/// The product on the kernel of a packed `a`, else on [`isa`]'s.
fn run(
    dims: (usize, usize, usize),
    dst: Dst<'_>,
    accumulate: bool,
    a: Lhs<'_>,
    b: Operand<'_>,
    finish: Option<Finish<'_>>,
    threads: usize,
) {
    if threads > 1 {
        // The block's small loops between GEMMs find the other threads awake.
        crate::warm::keep_warm();
    }
    let isa = match a {
        Lhs::Packed(p) => p.isa,
        Lhs::Raw(_) => isa().expect("sgemm: called where no kernel runs (see `available`)"),
    };
    assert!(isa.runs_here(), "sgemm: {isa:?} kernel on a CPU without it");
    match isa {
        Isa::Avx512 => run_on::<Avx512Kernel, { Avx512Kernel::MR }, { Avx512Kernel::NR }>(
            dims, dst, accumulate, a, b, finish, threads,
        ),
        Isa::Avx2 => run_on::<Avx2Kernel, { Avx2Kernel::MR }, { Avx2Kernel::NR }>(
            dims, dst, accumulate, a, b, finish, threads,
        ),
    }
}

/// [`run`] on kernel `K` (`MR x NR` its tile).
fn run_on<K: Micro, const MR: usize, const NR: usize>(
    (m, n, k): (usize, usize, usize),
    dst: Dst<'_>,
    accumulate: bool,
    a: Lhs<'_>,
    b: Operand<'_>,
    finish: Option<Finish<'_>>,
    threads: usize,
) {
    assert!(
        finish.is_none() || !accumulate,
        "sgemm: a finish applies to a product, not to a sum into dst"
    );
    assert!(
        dst.init || !accumulate,
        "sgemm: accumulating into an uninitialised destination"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len >= m * n, "sgemm: destination too small");
    let c = dst.ptr;
    if k == 0 {
        assert!(
            finish.is_none(),
            "sgemm: a finish needs a depth of at least 1"
        );
        if !accumulate {
            // SAFETY: `dst` holds at least `m * n` values, borrowed mutably.
            unsafe { std::ptr::write_bytes(c.0, 0, m * n) };
        }
        return;
    }
    b.check(k, n, "rhs");
    if let Some(f) = &finish {
        f.check(m, n);
    }
    let split = parts(a, (m, n), (MR, NR), threads);
    if split == Parts::One {
        serial::<K, MR, NR>(m, n, k, c, n, accumulate, a, b, finish, false);
    } else if let Parts::Columns { a_in_place } = split {
        // Column parts of whole NR panels: one per thread, or where each reads `a` in
        // place (and so packs only its own columns of `b`) `PARTS_PER_THREAD` per thread.
        let parts = threads * if a_in_place { PARTS_PER_THREAD } else { 1 };
        let per = n.div_ceil(NR).div_ceil(parts) * NR;
        (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
            let j0 = t * per;
            let nn = per.min(n - j0);
            let bt = Operand {
                data: &b.data[j0 * b.cs..],
                ..b
            };
            // Each part writes only its own columns j0..j0 + nn of `dst`.
            let ft = finish.map(|f| f.from(0, j0, n));
            serial::<K, MR, NR>(m, nn, k, c.offset(j0), n, accumulate, a, bt, ft, a_in_place);
        });
    } else if let Lhs::Raw(a) = a {
        // Row parts: whole MR panels per thread.
        let per = m.div_ceil(MR).div_ceil(threads) * MR;
        (0..m.div_ceil(per)).into_par_iter().for_each(|t| {
            let i0 = t * per;
            let mm = per.min(m - i0);
            let at = Operand {
                data: &a.data[i0 * a.rs..],
                ..a
            };
            // Each part writes only its own rows i0..i0 + mm of `dst`.
            let ft = finish.map(|f| f.from(i0, 0, n));
            serial::<K, MR, NR>(
                mm,
                n,
                k,
                c.offset(i0 * n),
                n,
                accumulate,
                Lhs::Raw(at),
                b,
                ft,
                false,
            );
        });
    }
}

/// How [`run`] splits a product between threads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Parts {
    /// One thread does it all.
    One,
    /// One part of whole `MR` panels of rows per thread, each packing all of `b`.
    Rows,
    /// One part of whole `NR` panels of columns per thread; with `a_in_place` (a raw,
    /// row-major `a` where [`columns_pay`]) [`PARTS_PER_THREAD`] parts a thread, each
    /// reading `a` in place as [`serial`] says.
    Columns { a_in_place: bool },
}

/// The split of an `m x n` product with left operand `a` on `threads` threads, on a kernel
/// of `mr x nr` tiles: rows where their panels outnumber the columns' (a raw `a`), unless
/// column parts reading a row-major `a` in place pay ([`columns_pay`]); else columns.
fn parts(a: Lhs<'_>, (m, n): (usize, usize), (mr, nr): (usize, usize), threads: usize) -> Parts {
    let (m_panels, n_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    if threads <= 1 || (n_panels < 2 && m_panels < 2) {
        return Parts::One;
    }
    match a {
        Lhs::Raw(a) if m_panels > n_panels && m_panels >= threads => {
            if columns_pay(a, (m, n), nr, threads) {
                Parts::Columns { a_in_place: true }
            } else {
                Parts::Rows
            }
        }
        _ => Parts::Columns { a_in_place: false },
    }
}

/// Whether column parts beat row parts for a raw `a` (`m x k`) and an `n`-column product
/// where the rows outnumber the columns: with whole `NR` panels per thread, each column
/// part reads a row-major `a` in place (neither part packs it), so each thread packs only
/// its own `1 / threads` of `b` and reads all of `a`, where a row part packs the whole of
/// `b` and its rows of `a`. Per thread that trades `2 k n (1 - 1 / threads)` floats packed
/// (read and written) for `m k (1 - 1 / threads)` read: worth it where `2 n > m`, such as
/// a linear layer's product at batch 128 with 256 outputs (the residual MLP block: its
/// second layer's forward and its first layer's input gradient, each thread packing a
/// whole 1 MiB weight for 64 rows), or a square one (1024^3 on two threads: 4.86-4.90 ms
/// against 5.26-5.36 split by rows; PyTorch's MKL 4.91-4.94 in the same minutes).
/// (Split into [`PARTS_PER_THREAD`] parts a thread, each part reads all of `a`: more reads,
/// still no packing.) Only where the columns split evenly (whole panels of `nr`, as many
/// per thread): a 14x14 output's 196 columns would split 128 / 68, where the rows split
/// evenly.
fn columns_pay(a: Operand<'_>, (m, n): (usize, usize), nr: usize, threads: usize) -> bool {
    a.cs == 1 && n.is_multiple_of(nr * threads) && 2 * n > m
}

/// `dst`'s base pointer, shared by the column parts (each writes its own columns).
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);
// SAFETY: the parts that share it write disjoint elements.
unsafe impl Send for DstPtr {}
// SAFETY: as above.
unsafe impl Sync for DstPtr {}

impl DstPtr {
    fn offset(self, i: usize) -> DstPtr {
        DstPtr(self.0.wrapping_add(i))
    }
}

thread_local! {
    /// Each thread's packing buffers (`A` block, `B` block), kept between calls.
    static PACKS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// One thread's GEMM into `c` (row stride `ldc`, `m x n` of it ours to write), finished
/// (`finish`, its residual with the same row stride) in the last depth block's stores.
/// With `a_in_place` (a column part of [`columns_pay`]; `a` raw and row-major) `a` is read
/// in place in blocks [`KC_IN_PLACE`] deep, and the tiles are walked along each row of
/// panels (every `B` panel past one `A` panel, which stays in L1), not down each column
/// (one `B` panel past every `A` panel of the block): in place an `A` panel is `MR` rows,
/// each a stream of its own, where a packed one is one stream.
#[allow(clippy::too_many_arguments)]
fn serial<K: Micro, const MR: usize, const NR: usize>(
    m: usize,
    n: usize,
    k: usize,
    c: DstPtr,
    ldc: usize,
    accumulate: bool,
    a: Lhs<'_>,
    b: Operand<'_>,
    finish: Option<Finish<'_>>,
    a_in_place: bool,
) {
    // A packed `a` is laid out in `KC` blocks, and only a row-major one is read in place.
    assert!(
        !a_in_place || matches!(a, Lhs::Raw(a) if a.cs == 1),
        "sgemm: only a raw row-major lhs is read in place"
    );
    const { assert!(K::MR == MR && K::NR == NR) };
    let depth = if a_in_place { KC_IN_PLACE } else { KC };
    PACKS.with(|p| {
        let (pa, pb) = &mut *p.borrow_mut();
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(depth) {
                let kc = depth.min(k - pc);
                let add = accumulate || pc > 0;
                let last = pc + kc == k;
                let pb = pack_b::<NR>(pb, b, pc, kc, jc, nc);
                let in_place = a_in_place || nc.div_ceil(NR) <= STRIDED_A_PANELS;
                for ic in (0..m).step_by(K::MC) {
                    let mc = K::MC.min(m - ic);
                    // The block, its row stride in place (`None`: packed) and the distance
                    // between its `MR`-row panels.
                    let (ablock, lda, panel_step): (&[f32], _, _) = match a {
                        Lhs::Raw(a) if in_place && a.cs == 1 => {
                            (&a.data[ic * a.rs + pc..], Some(a.rs), MR * a.rs)
                        }
                        Lhs::Raw(a) => {
                            pack_a::<MR>(pa, a, ic, mc, pc, kc);
                            (pa, None, kc * MR)
                        }
                        Lhs::Packed(p) => (p.block::<K>(pc, ic, kc), None, kc * MR),
                    };
                    let (jrs, irs) = (nc.div_ceil(NR), mc.div_ceil(MR));
                    for t in 0..jrs * irs {
                        let (jr, ir) = if a_in_place {
                            (t % jrs, t / jrs)
                        } else {
                            (t / irs, t % irs)
                        };
                        let nr = NR.min(nc - jr * NR);
                        let mr = MR.min(mc - ir * MR);
                        let (ti, tj) = (ic + ir * MR, jc + jr * NR);
                        let tile = c.offset(ti * ldc + tj);
                        // SAFETY: `run` checked that `K`'s instructions run here; the packed
                        // panels hold `kc * MR` and `kc * NR` floats, and in place the `mr`
                        // rows of the panel hold `kc` values each (`a.check` in `sgemm`:
                        // rows `ic + ir * MR + i < m`, columns `pc + p < k`); the tile's
                        // `mr x nr` elements lie inside this call's `m x n` part of `dst`,
                        // and so inside the finish's parts (`Finish::check` in `run_on`,
                        // shifted with `dst` by `Finish::from`).
                        unsafe {
                            #[cfg(target_arch = "x86_64")]
                            prefetch_tile(tile.0, ldc, mr, nr);
                            let fin = finish.filter(|_| last).map(|f| f.tile(ti, tj, ldc));
                            let (ap, bp) = (
                                (ablock.as_ptr().add(ir * panel_step), lda),
                                pb.as_ptr().add(jr * kc * NR),
                            );
                            // A last panel of at most `NR / 2` columns (e.g. 196 = 6 x 32 +
                            // 4 at 14x14 on AVX-512) runs on one vector per row: half the
                            // FMAs (see `computed_columns`).
                            let dst = TileDst {
                                c: tile.0,
                                ldc,
                                mr,
                                nr,
                                add,
                                fin,
                            };
                            if nr <= NR / 2 {
                                K::tile::<1>(kc, ap, bp, dst);
                            } else {
                                K::tile::<2>(kc, ap, bp, dst);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Asks for the `mr x nr` tile of `dst` at `c` (rows `ldc` apart) to be brought into L1
/// while its sums run: with a short depth (a weight gradient's `k` is one image's output
/// plane, 196 at 14x14) the micro-kernel stalled on the stores of tiles not in cache
/// (interleaved: ResNet-50 batch-32 training step 6.75-6.80 against 7.07-7.14 s). Done
/// here, not in the micro-kernel: there the change made the compiler keep the sums in
/// memory as well as in registers, storing them on every step of `k` (half the speed).
#[cfg(target_arch = "x86_64")]
fn prefetch_tile(c: *mut f32, ldc: usize, mr: usize, nr: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for i in 0..mr {
        let row = c.wrapping_add(i * ldc).cast::<i8>().cast_const();
        // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(row) };
        // A second cache line where the row's values may reach it.
        if nr > 16 {
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(64)) };
        }
    }
}

/// Packs rows `i0..i0 + mc`, depth `p0..p0 + kc` of `a` into panels of `MR` rows: panel
/// `r` holds, for each `p`, the `MR` values `a[i0 + r * MR + i, p0 + p]` (zero past `mc`).
/// Reads run along whichever of `a`'s dimensions is contiguous.
fn pack_a<const MR: usize>(
    dst: &mut Vec<f32>,
    a: Operand<'_>,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
) {
    dst.resize(mc.div_ceil(MR) * kc * MR, 0.);
    pack_a_into::<MR>(dst, a, i0, mc, p0, kc);
}

/// [`pack_a`] into a slice of exactly its size; every value is written (zero past `mc`).
fn pack_a_into<const MR: usize>(
    dst: &mut [f32],
    a: Operand<'_>,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
) {
    debug_assert_eq!(dst.len(), mc.div_ceil(MR) * kc * MR);
    for (r, panel) in dst.chunks_exact_mut(kc * MR).enumerate() {
        let rows = MR.min(mc - r * MR);
        let top = i0 + r * MR;
        if a.rs == 1 && a.cs != 1 {
            // Column-major (a transposed operand): a panel's rows are contiguous per `p`.
            for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
                let base = top + (p0 + p) * a.cs;
                if rows == MR {
                    // A fixed-size copy: with a length known only at run time every 32
                    // bytes were a `memcpy` call (a weight gradient's transposed output
                    // gradient: 1.7% of the residual MLP block's samples, in `memmove`).
                    let src: &[f32; MR] = a.data[base..base + MR].try_into().expect("MR");
                    let out: &mut [f32; MR] = out.try_into().expect("MR");
                    *out = *src;
                } else {
                    out[..rows].copy_from_slice(&a.data[base..base + rows]);
                    out[rows..].fill(0.);
                }
            }
        } else if a.cs == 1 {
            // Row-major: the `MR` rows as slices of exactly `kc` values (a zero row past
            // `mc`), so the transpose below runs without bounds checks.
            let zeros = [0f32; KC];
            let src: [&[f32]; MR] = std::array::from_fn(|i| {
                if i < rows {
                    let start = (top + i) * a.rs + p0;
                    &a.data[start..start + kc]
                } else {
                    &zeros[..kc]
                }
            });
            crate::interleave::interleave_rows(src, panel);
        } else {
            // General strides: walk the `MR` rows side by side, so every write is
            // sequential and each row is read in order.
            let mut starts = [0usize; MR];
            for (i, s) in starts.iter_mut().enumerate().take(rows) {
                *s = (top + i) * a.rs + p0 * a.cs;
            }
            for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
                let off = p * a.cs;
                for (o, s) in out.iter_mut().zip(&starts[..rows]) {
                    *o = a.data[s + off];
                }
                out[rows..].fill(0.);
            }
        }
    }
}

/// Packs depth `p0..p0 + kc`, columns `j0..j0 + nc` of `b` into panels of `NR` columns:
/// panel `q` holds, for each `p`, the `NR` values `b[p0 + p, j0 + q * NR + j]` (zero past
/// `nc`). Reads run along whichever of `b`'s dimensions is contiguous. The panels are
/// written into `dst` from a cache line on ([`aligned_mut`]: the micro-kernel reads them
/// with whole-vector loads) and returned.
fn pack_b<'d, const NR: usize>(
    dst: &'d mut Vec<f32>,
    b: Operand<'_>,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
) -> &'d [f32] {
    let panels = nc.div_ceil(NR);
    let dst = aligned_mut(dst, panels * kc * NR);
    for (q, panel) in dst.chunks_exact_mut(kc * NR).enumerate() {
        let cols = NR.min(nc - q * NR);
        let left = j0 + q * NR;
        if b.cs == 1 || b.rs != 1 {
            for (p, out) in panel.chunks_exact_mut(NR).enumerate() {
                let base = (p0 + p) * b.rs + left * b.cs;
                #[cfg(target_arch = "x86_64")]
                if b.cs == 1 {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                    let ahead = b.data.as_ptr().wrapping_add(base + PACK_B_AHEAD * b.rs);
                    // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.cast::<i8>()) };
                }
                if b.cs == 1 && cols == NR {
                    // A fixed-size copy: with a length known only at run time every row
                    // was a `memcpy` call.
                    let row: &[f32; NR] = b.data[base..base + NR].try_into().expect("NR");
                    let out: &mut [f32; NR] = out.try_into().expect("NR");
                    *out = *row;
                } else {
                    if b.cs == 1 {
                        out[..cols].copy_from_slice(&b.data[base..base + cols]);
                    } else {
                        for (j, o) in out[..cols].iter_mut().enumerate() {
                            *o = b.data[base + j * b.cs];
                        }
                    }
                    out[cols..].fill(0.);
                }
            }
        } else {
            // Column-major (a transposed operand, such as the unfolded input of a weight
            // gradient): the `NR` columns as slices of exactly `kc` values (a zero column
            // past `nc`), interleaved in pieces. One value at a time this scatter was 5% of
            // a 256-channel 3x3 backward.
            let zeros = [0f32; if KC > KC_IN_PLACE { KC } else { KC_IN_PLACE }];
            let src: [&[f32]; NR] = std::array::from_fn(|j| {
                if j < cols {
                    let base = p0 + (left + j) * b.cs;
                    &b.data[base..base + kc]
                } else {
                    &zeros[..kc]
                }
            });
            crate::interleave::interleave_rows(src, panel);
        }
    }
    dst
}

#[cfg(test)]
mod tests;

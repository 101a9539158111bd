//! The boilerplate every CPU custom op shares: reading a tensor's contiguous CPU data,
//! output buffers written without zero-filling, and the gradient through a fused ReLU.

/// An output element a kernel writes: an initialised `f32`, or a `MaybeUninit<f32>` of a
/// buffer filled for the first time (see [`vec_written_by`]).
pub(crate) trait Slot: Send + Sized {
    fn put(&mut self, v: f32);

    /// The slots as the values written into them.
    ///
    /// # Safety
    /// Every slot must have been written ([`Slot::put`]) or initialised before.
    unsafe fn written(slots: &mut [Self]) -> &mut [f32];
}

impl Slot for f32 {
    #[inline(always)]
    fn put(&mut self, v: f32) {
        *self = v;
    }

    unsafe fn written(slots: &mut [f32]) -> &mut [f32] {
        slots
    }
}

impl Slot for std::mem::MaybeUninit<f32> {
    #[inline(always)]
    fn put(&mut self, v: f32) {
        self.write(v);
    }

    unsafe fn written(slots: &mut [Self]) -> &mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { assume_written(slots) }
    }
}

/// NaNs with a payload that arithmetic never produces (signalling: any operation on them
/// gives a quiet NaN): what debug builds put in a [`vec_written_by`] buffer first, to check
/// that `fill` overwrote every element.
const UNWRITTEN: u32 = 0x7fa5_5a5a;
const UNWRITTEN_F64: u64 = 0x7ff5_5a5a_5a5a_5a5a;

/// The marker of [`UNWRITTEN`] as a `T`, for f32 and f64 (other types are not checked).
fn unwritten<T: candle_core::WithDType>() -> Option<T> {
    // SAFETY: each arm copies a value of exactly `T`'s type (checked by its dtype).
    match T::DTYPE {
        candle_core::DType::F32 => {
            Some(unsafe { std::mem::transmute_copy(&f32::from_bits(UNWRITTEN)) })
        }
        candle_core::DType::F64 => {
            Some(unsafe { std::mem::transmute_copy(&f64::from_bits(UNWRITTEN_F64)) })
        }
        _ => None,
    }
}

/// Whether `v` is bit for bit the marker `m`.
fn same_bits<T>(v: &T, m: &T) -> bool {
    let bytes = |t: &T| {
        // SAFETY: any initialised value can be read as its bytes (f32 and f64 have no
        // padding).
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(t).cast::<u8>(), size_of::<T>()) }
    };
    bytes(v) == bytes(m)
}

/// A vector of `len` values filled by `fill` without zero-filling it first: for the large
/// outputs of our kernels, `vec![0.0; len]` is one more pass over the buffer (glibc's
/// `calloc` clears reused heap memory), measured at about 5% of a training step. Debug
/// builds (the tests) pre-fill a marker (f32 and f64) and assert that `fill` overwrote all
/// of it.
///
/// # Safety
/// `fill` must write every element of the slice it gets (`MaybeUninit::write`, or
/// [`Slot::put`]); the vector's elements are read as initialised afterwards.
pub(crate) unsafe fn vec_written_by<T: candle_core::WithDType>(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Vec<T> {
    // SAFETY: the caller's contract.
    unsafe { vec_written_with(len, fill) }.0
}

/// [`vec_written_by`] with what `fill` returns besides (a backward's weight gradient,
/// computed while it writes the input gradient).
///
/// # Safety
/// As [`vec_written_by`].
pub(crate) unsafe fn vec_written_with<T: candle_core::WithDType, R>(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]) -> R,
) -> (Vec<T>, R) {
    // An op starts: the pool's other threads spin for its loops (see `warm`).
    crate::warm::keep_warm();
    let mut v = Vec::with_capacity(len);
    let spare = &mut v.spare_capacity_mut()[..len];
    let marker = unwritten::<T>().filter(|_| cfg!(debug_assertions));
    if let Some(m) = marker {
        spare.fill(std::mem::MaybeUninit::new(m));
    }
    let r = fill(spare);
    // SAFETY: the capacity is at least `len`, and the caller guarantees `fill` initialised
    // all `len` elements.
    unsafe { v.set_len(len) };
    if let Some(m) = marker {
        assert!(
            !v.iter().any(|x| same_bits(x, &m)),
            "vec_written_by: an element was not written"
        );
    }
    (v, r)
}

/// `slice` filled with zeros, as the initialised values it now holds: for a thread's part
/// of a [`Vec::spare_capacity_mut`] that is scatter-added into, zeroed by the thread that
/// writes it rather than all at once on the calling thread.
pub(crate) fn zeroed<T: candle_core::WithDType>(
    slice: &mut [std::mem::MaybeUninit<T>],
) -> &mut [T] {
    slice.fill(std::mem::MaybeUninit::new(T::zero()));
    // SAFETY: every element was just written.
    unsafe { assume_written(slice) }
}

/// `slice` as the initialised values a kernel has just written into it.
///
/// # Safety
/// Every element of `slice` must have been written.
pub(crate) unsafe fn assume_written<T>(slice: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and the caller guarantees every element is
    // initialised.
    unsafe { &mut *(std::ptr::from_mut(slice) as *mut [T]) }
}

/// The contiguous slice of a CPU buffer that a layout covers (custom ops' inputs are made
/// contiguous before the op).
pub(crate) fn contiguous_slice<'a, T>(
    s: &'a [T],
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// The contiguous f32 slice of a custom op's CPU input, or an error naming `op` for any
/// other dtype (the ops whose kernels take only f32).
pub(crate) fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match s {
        candle_core::CpuStorage::F32(v) => contiguous_slice(v, l, op),
        _ => candle_core::bail!("{op}: the kernel takes f32"),
    }
}

/// Runs `f` on the contiguous CPU data of `t` (copied first only if `t` is not contiguous),
/// without copying it out: custom ops' backward passes read their saved inputs this way.
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &candle_core::Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<T>()?;
            Ok(f(contiguous_slice(all, layout, op)?))
        }
        _ => candle_core::bail!("{op}: the native kernel runs on the CPU only"),
    }
}

/// `dy` where a ReLU's output `y` is positive, zero elsewhere: the gradient through a fused
/// ReLU (CPU, f32/f64).
pub(crate) fn relu_mask<T: candle_core::WithDType>(
    y: &candle_core::Tensor,
    dy: &candle_core::Tensor,
    op: &str,
) -> candle_core::Result<candle_core::Tensor> {
    let g = with_cpu_slice(y, op, |y: &[T]| {
        with_cpu_slice(dy, op, |dy: &[T]| relu_mask_slice(y, dy))
    })??;
    candle_core::Tensor::from_vec(g, y.shape(), y.device())
}

/// [`relu_mask`] on slices.
pub(crate) fn relu_mask_slice<T: candle_core::WithDType>(y: &[T], dy: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let zero = T::zero();
    y.par_iter()
        .zip(dy.par_iter())
        .map(|(y, g)| if *y > zero { *g } else { zero })
        .collect()
}

/// A CPU kernel over one tensor, generic over the float types our ops take (f32 and f64):
/// the dtype match, the contiguity check and the wrapping back into a `CpuStorage` are
/// [`Map1::map`]'s, so a `CustomOp1::cpu_fwd` is one call (Candle's `Map1` idea).
pub(crate) trait Map1 {
    /// The op's name, for errors.
    const OP: &'static str;
    /// The kernel on `x`'s contiguous data; `l` is its layout (for the dims).
    fn f<T: candle_core::WithDType>(
        &self,
        x: &[T],
        l: &candle_core::Layout,
    ) -> candle_core::Result<Vec<T>>;
    /// Runs [`Map1::f`] on `s` in its dtype.
    fn map(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<candle_core::CpuStorage> {
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage as S;
        Ok(match s {
            S::F32(v) => S::F32(self.f(contiguous_slice(v, l, Self::OP)?, l)?),
            S::F64(v) => S::F64(self.f(contiguous_slice(v, l, Self::OP)?, l)?),
            other => candle_core::bail!("{}: f32 or f64 only, got {:?}", Self::OP, other.dtype()),
        })
    }
}

/// [`Map1`] for two tensors of one dtype.
pub(crate) trait Map2 {
    /// The op's name, for errors.
    const OP: &'static str;
    /// The kernel on the two inputs' contiguous data and layouts.
    fn f<T: candle_core::WithDType>(
        &self,
        a: &[T],
        la: &candle_core::Layout,
        b: &[T],
        lb: &candle_core::Layout,
    ) -> candle_core::Result<Vec<T>>;
    /// Runs [`Map2::f`] on `(a, b)` in their dtype.
    fn map(
        &self,
        a: &candle_core::CpuStorage,
        la: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
    ) -> candle_core::Result<candle_core::CpuStorage> {
        use candle_core::backend::BackendStorage as _;
        use candle_core::CpuStorage as S;
        let op = Self::OP;
        Ok(match (a, b) {
            (S::F32(x), S::F32(y)) => S::F32(self.f(
                contiguous_slice(x, la, op)?,
                la,
                contiguous_slice(y, lb, op)?,
                lb,
            )?),
            (S::F64(x), S::F64(y)) => S::F64(self.f(
                contiguous_slice(x, la, op)?,
                la,
                contiguous_slice(y, lb, op)?,
                lb,
            )?),
            (x, y) => candle_core::bail!(
                "{op}: f32 or f64 of one dtype only, got {:?} and {:?}",
                x.dtype(),
                y.dtype()
            ),
        })
    }
}

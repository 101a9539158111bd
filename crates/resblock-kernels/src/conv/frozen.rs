//! Kernels frozen for inference: what our forward derives from a kernel on every call (the
//! Winograd-transformed weights) made once per kernel and kept while the kernel lives.
//!
//! A [`FrozenKernel`] holds its own copy of a kernel, so nothing else can change the values
//! its forms were made from, and registers that copy's [`TensorId`] with a weak handle on
//! the forms. The convolution ops look the kernel they are given up in that registry
//! ([`forms_of`]); a kernel that is not there (every variable, every tensor of a model that
//! was not frozen) runs as before. A folded network (`fold_batch_norm` in resblock-core)
//! freezes its kernels.
//!
//! With the transform paid once, Winograd pays for smaller layers than it does per call: a
//! frozen kernel runs it from one tile up and F(4x4, 3x3) from [`super::winograd`]'s
//! smaller pixel count (interleaved against the build before: ResNet-18 at batch 1, folded,
//! 19.7 -> 15.5 ms; ResNet-50 48.0 -> 44.4 ms; at batch 8, 4-5% faster).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use candle_core::{DType, Tensor, TensorId};

use super::winograd::{transform_weights, Algo};
use crate::error::Result;

/// A convolution kernel `(C_out, C_in / groups, kh, kw)` frozen for inference: a private
/// copy of the values, and the forms our forward derives from them, made on first use.
/// Clones share both. The forms cost memory beside the kernel: 16/9 of a 3x3 kernel's size
/// for F(2x2, 3x3), 4 times for F(4x4, 3x3), each only once a call has used it (by its
/// layer shapes, a folded ResNet-50 holds about 63 MB of them after a batch-1 call, beside
/// 102 MB of weights).
#[derive(Clone)]
pub struct FrozenKernel {
    kernel: Tensor,
    /// Kept alive here; the registry holds a weak handle.
    _forms: Arc<Forms>,
}

impl std::fmt::Debug for FrozenKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenKernel")
            .field("shape", &self.kernel.dims())
            .finish_non_exhaustive()
    }
}

impl FrozenKernel {
    /// Freezes a copy of `kernel` (detached from any graph; the caller's tensor stays free
    /// to change).
    ///
    /// # Errors
    /// If the copy fails.
    pub fn new(kernel: &Tensor) -> Result<FrozenKernel> {
        let kernel = kernel.detach().copy()?;
        let forms = Arc::new(Forms::default());
        let mut registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        let registry = registry.get_or_insert_with(HashMap::new);
        // Kernels of dropped models leave dead entries; clear them as new ones come.
        registry.retain(|_, forms| forms.strong_count() > 0);
        registry.insert(kernel.id(), Arc::downgrade(&forms));
        Ok(FrozenKernel {
            kernel,
            _forms: forms,
        })
    }

    /// The frozen kernel: pass it to the convolution ops as any kernel.
    pub fn kernel(&self) -> &Tensor {
        &self.kernel
    }
}

/// The frozen kernels by id (`None` until the first).
type Registry = Option<HashMap<TensorId, Weak<Forms>>>;

static REGISTRY: Mutex<Registry> = Mutex::new(None);

/// The forms of `kernel` if it is a live [`FrozenKernel`]'s f32 kernel.
pub(crate) fn forms_of(kernel: &Tensor) -> Option<Arc<Forms>> {
    if kernel.dtype() != DType::F32 {
        return None;
    }
    let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    registry.as_ref()?.get(&kernel.id())?.upgrade()
}

/// What the forward derives from one frozen kernel, each made on first use.
#[derive(Default)]
pub(crate) struct Forms {
    /// The Winograd weights `u[co][ξ][ci]` of F(2x2, 3x3) and of F(4x4, 3x3).
    winograd: [OnceLock<Vec<f32>>; 2],
    /// The weights packed for `conv/lanes` (x86-64 only).
    #[cfg(target_arch = "x86_64")]
    lanes: OnceLock<super::lanes::Packed>,
}

impl Forms {
    /// The kernel `w` `(cout, c, 3, 3)` transformed for algorithm `A`, made on the first
    /// call. `w` must be the frozen kernel's values (the ops pass the storage of the tensor
    /// they looked up).
    pub(crate) fn winograd<A: Algo>(&self, w: &[f32], cout: usize, c: usize) -> &[f32] {
        let slot = &self.winograd[usize::from(A::M == 4)];
        let u = slot.get_or_init(|| transform_weights::<A>(w, cout, c));
        assert_eq!(u.len(), cout * A::POS * c, "frozen kernel: weight size");
        u
    }

    /// The kernel `w` `(cout, c, 3, 3)` packed for `conv/lanes`, made on the first call (as
    /// [`Forms::winograd`]).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn lanes(&self, w: &[f32], cout: usize, c: usize) -> &super::lanes::Packed {
        let p = self
            .lanes
            .get_or_init(|| super::lanes::Packed::new(w, cout, c));
        assert_eq!(p.values().len(), cout * c * 9, "frozen kernel: weight size");
        p
    }

    /// Which Winograd forms have been made (F(2x2), F(4x4)), for tests.
    #[cfg(test)]
    pub(crate) fn made(&self) -> [bool; 2] {
        [0, 1].map(|i| self.winograd[i].get().is_some())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;
    use crate::conv::{conv2d_add_relu, conv2d_candle, conv2d_fused, ChannelAffine};

    type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    fn randn(shape: &[usize], seed: u64) -> R<Tensor> {
        Ok(crate::test_support::uniform_tensor(shape, seed, 1.))
    }

    /// `max |a - b| / max |b|`.
    fn rel(a: &Tensor, b: &Tensor) -> R<f32> {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(d / b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// A frozen kernel gives Candle's convolution's values on every path, the Winograd ones
    /// from forms made once: a 14x14 output at batch 1 (F(2x2) only when frozen: 49 tiles), a
    /// 28x28 one (F(4x4) only when frozen: 784 pixels), and paths Winograd does not take
    /// (`conv/lanes` from its packed form at stride 2 and 32 output channels, on AVX-512 or
    /// AVX2).
    #[test]
    fn frozen_kernels_match_candle_and_keep_their_transforms() -> R<()> {
        crate::conv::winograd::force_for_tests();
        // (n, c, size, cout, k, padding, stride, the Winograd forms it makes)
        let cases = [
            (1, 64, 14, 64, 3, 1, 1, [true, false]),
            (1, 64, 28, 64, 3, 1, 1, [false, true]),
            (2, 16, 9, 24, 3, 1, 2, [false, false]),
            // `conv/lanes` where AVX-512 or AVX2 runs, from the packed form.
            (2, 16, 10, 32, 3, 1, 2, [false, false]),
            (1, 64, 7, 32, 1, 0, 1, [false, false]),
        ];
        for (i, (n, c, hw, cout, k, p, s, made)) in cases.into_iter().enumerate() {
            let x = randn(&[n, c, hw, hw], 2 * i as u64 + 1)?;
            let frozen = FrozenKernel::new(&randn(&[cout, c, k, k], 2 * i as u64 + 2)?)?;
            let w = frozen.kernel();
            let bias = randn(&[cout], 99)?;
            let want =
                conv2d_candle(&x, w, p, s, 1, 1)?.broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            for call in 0..2 {
                let got = conv2d_fused(&x, w, Some(&bias), false, p, s, 1, 1)?;
                let r = rel(&got, &want)?;
                assert!(r < 1e-4, "case {i} call {call}: relative difference {r}");
            }
            let forms = forms_of(w).ok_or("a frozen kernel is registered")?;
            assert_eq!(forms.made(), made, "case {i}");
            // The residual op (a folded block's last convolution) takes the same forms.
            let residual = randn(want.dims(), 7)?;
            let got = conv2d_add_relu(&x, w, ChannelAffine::Bias(&bias), &residual, p, s, 1, 1)?;
            let r = rel(&got, &(&want + &residual)?.relu()?)?;
            assert!(r < 1e-4, "case {i} residual: relative difference {r}");
        }
        Ok(())
    }

    /// Only a live frozen kernel's own tensor is in the registry: not the tensor it was
    /// copied from, not a variable, not after the last clone is dropped.
    #[test]
    fn the_registry_holds_live_frozen_kernels_only() -> R<()> {
        let source = randn(&[8, 8, 3, 3], 5)?;
        let frozen = FrozenKernel::new(&source)?;
        let kernel = frozen.kernel().clone();
        let clone = frozen.clone();
        assert!(forms_of(&kernel).is_some());
        assert!(forms_of(&source).is_none());
        let var = Var::from_tensor(&source)?;
        assert!(forms_of(var.as_tensor()).is_none());
        assert!(forms_of(&kernel.to_dtype(DType::F64)?).is_none());
        drop(frozen);
        assert!(forms_of(&kernel).is_some(), "a clone keeps the forms");
        drop(clone);
        assert!(forms_of(&kernel).is_none());
        Ok(())
    }
}

//! `relu(a + b)` as one multithreaded op: the end of every post-activation residual block.
//!
//! As two Candle ops it is two passes over the activation forward, and backward two more
//! plus a gradient accumulation per input; here it is one pass each way, the backward
//! handing the same masked gradient to both inputs.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::buffer::Map2;
use crate::error::Result;

/// `relu(a + b)` for tensors of one shape, with its backward. Our kernel on the CPU in
/// f32/f64 (unless [`crate::dispatch`] chose Candle's), Candle ops elsewhere.
///
/// # Errors
/// Different shapes or dtypes.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let native = crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && a.device().is_cpu()
        && b.device().is_cpu()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.dtype() == b.dtype()
        && a.dims() == b.dims();
    if native {
        return Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?);
    }
    Ok((a + b)?.relu()?)
}

struct AddRelu;

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

fn fwd<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
    let zero = T::zero();
    let mut y = vec![zero; a.len()];
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| {
            for ((o, a), b) in y.iter_mut().zip(a).zip(b) {
                let s = *a + *b;
                // As PyTorch's relu: NaN propagates.
                *o = if s < zero { zero } else { s };
            }
        });
    y
}

impl Map2 for AddRelu {
    const OP: &'static str = "add_relu";
    fn f<T: WithDType>(
        &self,
        a: &[T],
        _: &Layout,
        b: &[T],
        _: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        Ok(fwd(a, b))
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "resblock-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.map(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = match y.dtype() {
            DType::F32 => crate::buffer::relu_mask::<f32>(y, dy, "add_relu")?,
            DType::F64 => crate::buffer::relu_mask::<f64>(y, dy, "add_relu")?,
            dt => candle_core::bail!("add_relu: the native kernel has no {dt:?} backward"),
        };
        Ok((Some(g.clone()), Some(g)))
    }
}

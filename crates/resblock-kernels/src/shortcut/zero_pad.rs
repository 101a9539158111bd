//! The option-A shortcut, `pad(x[:, :, ::s, ::s], channels front/back)`, as one op.
//!
//! From Candle ops it is two `index_select` gathers and a concatenation with zero tensors,
//! and its backward a scatter-add per gather plus the concatenation's slices, each a pass
//! with its own zero-filled buffer. Here it is one pass each way: the forward copies every
//! `s`-th pixel into the middle channels of a zeroed output, the backward the same pixels
//! of the middle channels of `dy` back into a zeroed `dx`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::buffer::Map1;
use crate::error::{Error, Result};

/// `x[:, :, ::stride, ::stride]` with `front` zero channels before and `back` after: the
/// option-A ("zero-pad") shortcut of He et al.'s CIFAR ResNets, with its backward. Our
/// kernel on the CPU in f32/f64 unless [`crate::dispatch`] chose Candle's; Candle ops
/// ([`super::subsample2d`] and `pad_with_zeros`) elsewhere.
///
/// # Shapes
/// - input: (N, C, H, W)
/// - output: (N, front + C + back, ceil(H / stride), ceil(W / stride))
///
/// # Errors
/// A non-4-D input or a zero stride.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
/// let y = resblock_kernels::zero_pad_shortcut(&x, 2, 1, 1)?;
/// assert_eq!(y.dims(), [1, 3, 2, 2]);
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [0., 0., 0., 0., 0., 2., 8., 10., 0., 0., 0., 0.]);
/// # Ok::<(), resblock_kernels::Error>(())
/// ```
pub fn zero_pad_shortcut(x: &Tensor, stride: usize, front: usize, back: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4().map_err(|_| Error::Shape {
        op: "zero_pad_shortcut",
        expected: "a 4-D (N, C, H, W) input".into(),
        got: x.dims().to_vec(),
    })?;
    if stride == 0 {
        return Err(Error::config(
            "zero_pad_shortcut: the stride must be positive",
        ));
    }
    let native = crate::dispatch::kernels() == crate::dispatch::Kernels::Native
        && x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if !native || h == 0 || w == 0 {
        return Ok(super::subsample2d(x, stride, stride)?.pad_with_zeros(1, front, back)?);
    }
    let op = ZeroPad {
        stride,
        front,
        back,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// The option-A shortcut's geometry (see [`zero_pad_shortcut`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ZeroPad {
    pub(crate) stride: usize,
    pub(crate) front: usize,
    pub(crate) back: usize,
}

impl ZeroPad {
    pub(crate) fn out_dims(
        &self,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> (usize, usize, usize, usize) {
        (
            n,
            self.front + c + self.back,
            h.div_ceil(self.stride),
            w.div_ceil(self.stride),
        )
    }
}

/// The output (N, front + C + back, ceil(H/s), ceil(W/s)) of `x` (N, C, H, W).
pub(crate) fn forward<T: WithDType>(
    x: &[T],
    dims: (usize, usize, usize, usize),
    op: &ZeroPad,
) -> Vec<T> {
    let (n, c, h, w) = dims;
    let (_, co, oh, ow) = op.out_dims(dims);
    let len = n * co * oh * ow;
    // Each image written whole on its thread (zeros and values), not zero-filled first on
    // the calling thread.
    let mut y = Vec::with_capacity(len);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(co * oh * ow)
        .zip(x.par_chunks(c * h * w))
        .for_each(|(y_n, x_n)| {
            let (before, rest) = y_n.split_at_mut(op.front * oh * ow);
            let (mid, after) = rest.split_at_mut(c * oh * ow);
            for z in before.iter_mut().chain(after) {
                z.write(T::zero());
            }
            for (out, plane) in mid.chunks_exact_mut(oh * ow).zip(x_n.chunks_exact(h * w)) {
                for (orow, row) in out
                    .chunks_exact_mut(ow)
                    .zip(plane.chunks_exact(w).step_by(op.stride))
                {
                    for (o, v) in orow.iter_mut().zip(row.iter().step_by(op.stride)) {
                        o.write(*v);
                    }
                }
            }
        });
    // SAFETY: each image's chunk is its `front` and `back` zero planes and its `c`
    // subsampled planes, whose `oh` rows of `ow` values are each written (`oh` and `ow` are
    // the subsampled sizes, so the row and column iterators are that long); the images'
    // chunks cover `len`.
    unsafe { y.set_len(len) };
    y
}

/// `dx` (N, C, H, W) from `dy` of the output's shape.
fn backward<T: WithDType>(dy: &[T], dims: (usize, usize, usize, usize), op: &ZeroPad) -> Vec<T> {
    let (n, c, h, w) = dims;
    let mut dx = vec![T::zero(); n * c * h * w];
    add_backward(&mut dx, dy, dims, op);
    dx
}

/// Adds the shortcut's gradient for `dy` (of the output's shape) into `dx` (N, C, H, W):
/// [`backward`] into a buffer that holds something already, for a block whose input also
/// gets the first convolution's gradient (`fused/basic_block.rs`).
pub(crate) fn add_backward<T: WithDType>(
    dx: &mut [T],
    dy: &[T],
    dims: (usize, usize, usize, usize),
    op: &ZeroPad,
) {
    let (n, c, h, w) = dims;
    let (_, co, oh, ow) = op.out_dims(dims);
    assert!(
        dx.len() == n * c * h * w && dy.len() == n * co * oh * ow,
        "zero_pad_shortcut: gradient sizes"
    );
    dx.par_chunks_mut(c * h * w)
        .zip(dy.par_chunks(co * oh * ow))
        .for_each(|(dx_n, dy_n)| {
            let mid = &dy_n[op.front * oh * ow..(op.front + c) * oh * ow];
            for (plane, g) in dx_n.chunks_exact_mut(h * w).zip(mid.chunks_exact(oh * ow)) {
                for (row, grow) in plane
                    .chunks_exact_mut(w)
                    .step_by(op.stride)
                    .zip(g.chunks_exact(ow))
                {
                    for (d, v) in row.iter_mut().step_by(op.stride).zip(grow) {
                        *d += *v;
                    }
                }
            }
        });
}

impl Map1 for ZeroPad {
    const OP: &'static str = "zero_pad_shortcut";
    fn f<T: WithDType>(&self, x: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
        Ok(forward(x, l.shape().dims4()?, self))
    }
}

impl CustomOp1 for ZeroPad {
    fn name(&self) -> &'static str {
        "resblock-zero-pad-shortcut"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        Ok((self.map(s, l)?, Shape::from(self.out_dims(dims))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        use crate::buffer::with_cpu_slice as with;
        let dims = arg.dims4()?;
        let op = "zero_pad_shortcut";
        let dx = match grad.dtype() {
            candle_core::DType::F32 => {
                let g = with(grad, op, |g: &[f32]| backward(g, dims, self))?;
                Tensor::from_vec(g, arg.shape(), arg.device())?
            }
            candle_core::DType::F64 => {
                let g = with(grad, op, |g: &[f64]| backward(g, dims, self))?;
                Tensor::from_vec(g, arg.shape(), arg.device())?
            }
            dt => candle_core::bail!("zero_pad_shortcut: no {dt:?} backward"),
        };
        Ok(Some(dx))
    }
}

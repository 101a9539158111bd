//! Strided subsampling, `x[:, :, ::sh, ::sw]` in PyTorch (Candle has no strided slice).

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Keeps every `sh`-th row and `sw`-th column of an (N, C, H, W) tensor, starting at 0:
/// PyTorch's `x[:, :, ::sh, ::sw]`. Differentiable (via `index_select`).
///
/// # Shapes
/// - input: (N, C, H, W)
/// - output: (N, C, ceil(H / sh), ceil(W / sw))
///
/// # Errors
/// A non-4-D input or a zero stride.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::arange(0f32, 15., &Device::Cpu)?.reshape((1, 1, 3, 5))?;
/// let y = resblock_kernels::subsample2d(&x, 2, 2)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [0., 2., 4., 10., 12., 14.]);
/// # Ok::<(), resblock_kernels::Error>(())
/// ```
pub fn subsample2d(x: &Tensor, sh: usize, sw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4().map_err(|_| Error::Shape {
        op: "subsample2d",
        expected: "a 4-D (N, C, H, W) input".into(),
        got: x.dims().to_vec(),
    })?;
    if sh == 0 || sw == 0 {
        return Err(Error::config("subsample2d: strides must be positive"));
    }
    let pick = |x: Tensor, dim: usize, size: usize, s: usize| -> Result<Tensor> {
        if s == 1 {
            return Ok(x);
        }
        let idx: Vec<u32> = (0..size).step_by(s).map(|i| i as u32).collect();
        let n = idx.len();
        let idx = Tensor::from_vec(idx, n, x.device())?;
        Ok(x.contiguous()?.index_select(&idx, dim)?)
    };
    let y = pick(x.clone(), 2, h, sh)?;
    pick(y, 3, w, sw)
}

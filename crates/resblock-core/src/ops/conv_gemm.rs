//! A CPU convolution whose backward runs as GEMMs.
//!
//! Candle's CPU conv backward computes the input gradient with a direct transposed
//! convolution loop (4-13x slower than the forward) and the weight gradient as a convolution
//! of transposed tensors. Here both are matrix products over the unfolded input
//! ("im2col"), per group, with `cols` the (N*P) x K matrix of input patches (P = Hout*Wout,
//! K = Cin/groups * kh * kw):
//!
//! - weight gradient: dW_g = dY_g^T . cols_g            ((Cout_g x N*P) . (N*P x K))
//! - input gradient:  dcols_g = dY_g . W_g, then col2im  ((N*P x Cout_g) . (Cout_g x K))
//!
//! The forward stays Candle's (im2col + GEMM). See `../shared/notes/cpu-training-kernels.md`.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Geometry of one convolution (same padding/stride/dilation in both dims).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeom {
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
}

struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl ConvGeom {
    fn dims(&self, x: &[usize], k: &[usize]) -> candle_core::Result<Dims> {
        let (n, c, h, w) = (x[0], x[1], x[2], x[3]);
        let (kh, kw) = (k[2], k[3]);
        let out = |size: usize, k: usize| -> candle_core::Result<usize> {
            let eff = self.dilation * (k - 1) + 1;
            match (size + 2 * self.padding).checked_sub(eff) {
                Some(v) => Ok(v / self.stride + 1),
                None => candle_core::bail!("conv2d: kernel larger than the padded input"),
            }
        };
        Ok(Dims {
            n,
            c,
            h,
            w,
            kh,
            kw,
            oh: out(h, kh)?,
            ow: out(w, kw)?,
        })
    }
}

/// Unfolds x (N, C, H, W) into rows [n, oy, ox] x columns [c, ky, kx].
fn im2col<T: WithDType>(x: &[T], d: &Dims, g: &ConvGeom) -> Vec<T> {
    let k = d.c * d.kh * d.kw;
    let p = d.oh * d.ow;
    let mut cols = vec![T::zero(); d.n * p * k];
    cols.par_chunks_mut(p * k)
        .enumerate()
        .for_each(|(ni, out)| {
            let img = &x[ni * d.c * d.h * d.w..(ni + 1) * d.c * d.h * d.w];
            for oy in 0..d.oh {
                for ox in 0..d.ow {
                    let row = &mut out[(oy * d.ow + ox) * k..(oy * d.ow + ox + 1) * k];
                    let mut j = 0;
                    for ci in 0..d.c {
                        for ky in 0..d.kh {
                            let iy =
                                (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                            for kx in 0..d.kw {
                                let ix =
                                    (ox * g.stride + kx * g.dilation) as isize - g.padding as isize;
                                if iy >= 0 && iy < d.h as isize && ix >= 0 && ix < d.w as isize {
                                    row[j] = img[ci * d.h * d.w + iy as usize * d.w + ix as usize];
                                }
                                j += 1;
                            }
                        }
                    }
                }
            }
        });
    cols
}

/// Scatter-adds patch gradients (rows [n, oy, ox] x columns [c, ky, kx]) back into dx.
fn col2im<T: WithDType>(dcols: &[T], d: &Dims, g: &ConvGeom) -> Vec<T> {
    let k = d.c * d.kh * d.kw;
    let p = d.oh * d.ow;
    let mut dx = vec![T::zero(); d.n * d.c * d.h * d.w];
    dx.par_chunks_mut(d.c * d.h * d.w)
        .enumerate()
        .for_each(|(ni, img)| {
            let rows = &dcols[ni * p * k..(ni + 1) * p * k];
            for oy in 0..d.oh {
                for ox in 0..d.ow {
                    let row = &rows[(oy * d.ow + ox) * k..(oy * d.ow + ox + 1) * k];
                    let mut j = 0;
                    for ci in 0..d.c {
                        for ky in 0..d.kh {
                            let iy =
                                (oy * g.stride + ky * g.dilation) as isize - g.padding as isize;
                            for kx in 0..d.kw {
                                let ix =
                                    (ox * g.stride + kx * g.dilation) as isize - g.padding as isize;
                                if iy >= 0 && iy < d.h as isize && ix >= 0 && ix < d.w as isize {
                                    img[ci * d.h * d.w + iy as usize * d.w + ix as usize] += row[j];
                                }
                                j += 1;
                            }
                        }
                    }
                }
            }
        });
    dx
}

fn to_vec<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// (dx, dw) of a convolution for the upstream gradient dy.
fn backward<T: WithDType>(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    g: &ConvGeom,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = g.dims(x.dims(), w.dims())?;
    let cout = w.dim(0)?;
    let (cg, og) = (d.c / g.groups, cout / g.groups);
    let kg = cg * d.kh * d.kw;
    let np = d.n * d.oh * d.ow;
    let dev = x.device();
    let cols = Tensor::from_vec(
        im2col(&to_vec::<T>(x)?, &d, g),
        (np, d.c * d.kh * d.kw),
        dev,
    )?;
    // dY as (N*P, Cout): rows [n, oy, ox].
    let dy_rows = dy.permute((0, 2, 3, 1))?.reshape((np, cout))?;
    let w_mat = w.reshape((cout, kg))?;
    let mut dws = Vec::with_capacity(g.groups);
    let mut dcols = Vec::with_capacity(g.groups);
    for gi in 0..g.groups {
        let dy_g = dy_rows.narrow(1, gi * og, og)?.contiguous()?; // (NP, og)
        let cols_g = cols.narrow(1, gi * kg, kg)?.contiguous()?; // (NP, kg)
        dws.push(dy_g.t()?.matmul(&cols_g)?); // (og, kg)
        dcols.push(dy_g.matmul(&w_mat.narrow(0, gi * og, og)?.contiguous()?)?); // (NP, kg)
    }
    let dw = Tensor::cat(&dws, 0)?.reshape(w.shape())?;
    let dcols = if g.groups == 1 {
        dcols.remove(0)
    } else {
        Tensor::cat(&dcols, 1)?
    };
    let dx = Tensor::from_vec(col2im(&to_vec::<T>(&dcols)?, &d, g), x.shape(), dev)?;
    Ok((dx, dw))
}

/// The convolution as a custom op: Candle's forward, GEMM backward.
pub(crate) struct GemmConv2d(pub ConvGeom);

fn slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    super::contiguous_slice(s, l, "conv2d")
}

impl CustomOp2 for GemmConv2d {
    fn name(&self) -> &'static str {
        "resblock-conv2d-gemm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let dev = candle_core::Device::Cpu;
        let (x, w) = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => (
                Tensor::from_slice(slice(a, l1)?, l1.shape(), &dev)?,
                Tensor::from_slice(slice(b, l2)?, l2.shape(), &dev)?,
            ),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => (
                Tensor::from_slice(slice(a, l1)?, l1.shape(), &dev)?,
                Tensor::from_slice(slice(b, l2)?, l2.shape(), &dev)?,
            ),
            _ => candle_core::bail!("conv2d: unsupported dtypes"),
        };
        let y = super::conv::conv2d(&x, &w, g.padding, g.stride, g.dilation, g.groups)
            .map_err(candle_core::Error::from)?;
        let shape = y.shape().clone();
        let storage = match y.dtype() {
            candle_core::DType::F32 => CpuStorage::F32(to_vec::<f32>(&y)?),
            _ => CpuStorage::F64(to_vec::<f64>(&y)?),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, dy) = (x.detach(), w.detach(), dy.detach());
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => backward::<f32>(&x, &w, &dy, &self.0)?,
            _ => backward::<f64>(&x, &w, &dy, &self.0)?,
        };
        Ok((Some(dx), Some(dw)))
    }
}

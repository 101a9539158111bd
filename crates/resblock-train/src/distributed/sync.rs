//! The trainer's collective steps: broadcasting variables from rank 0, and averaging
//! gradients over the ranks in buckets.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use super::Communicator;
use crate::error::Result;

/// Gradient bytes per bucket: PyTorch DDP's default `bucket_cap_mb` (25 MiB). Fewer, larger
/// messages cost less latency; several buckets can be in flight at once.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Replaces, on every rank, the variables of `varmap` whose names satisfy `keep` by rank
/// 0's (in one message, in name order; values travel as f64, exact for every dtype a model
/// holds).
///
/// # Errors
/// A failed transfer or a variable that cannot be set.
pub fn broadcast_vars(
    comm: &dyn Communicator,
    varmap: &VarMap,
    keep: impl Fn(&str) -> bool,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(&String, &Var)> = data.iter().filter(|(k, _)| keep(k)).collect();
    vars.sort_by(|a, b| a.0.cmp(b.0));
    let tensors: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let mut flat = flatten_f64(&tensors)?;
    comm.broadcast_f64(&mut flat, 0)?;
    let mut offset = 0;
    for (_, v) in vars {
        let n = v.elem_count();
        let t = Tensor::from_slice(&flat[offset..offset + n], v.dims(), v.device())?
            .to_dtype(v.dtype())?;
        v.set(&t)?;
        offset += n;
    }
    Ok(())
}

/// Broadcasts rank 0's value of each tensor (in place of the given ones): the moving
/// average's tensors, say.
///
/// # Errors
/// A failed transfer.
pub fn broadcast_tensors(comm: &dyn Communicator, tensors: &mut [Tensor]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut flat = flatten_f64(tensors)?;
    comm.broadcast_f64(&mut flat, 0)?;
    let mut offset = 0;
    for t in tensors.iter_mut() {
        let n = t.elem_count();
        *t = Tensor::from_slice(&flat[offset..offset + n], t.dims(), t.device())?
            .to_dtype(t.dtype())?;
        offset += n;
    }
    Ok(())
}

fn flatten_f64(tensors: &[Tensor]) -> Result<Vec<f64>> {
    let mut flat = Vec::with_capacity(tensors.iter().map(Tensor::elem_count).sum());
    for t in tensors {
        flat.extend(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    }
    Ok(flat)
}

/// Averages the gradients of `params` over the ranks, in place in `grads`, as DDP does
/// after backward: f32 gradients are packed, in reverse parameter order (the order in
/// which backward finishes them), into flat buckets of at most [`BUCKET_BYTES`] that are
/// summed by [`Communicator::all_reduce_sum_f32_buckets`] and divided by the rank count;
/// gradients of other dtypes go in one f64 buffer. A parameter without a gradient (not
/// used in the forward) is skipped, the same on every rank since every rank runs the same
/// model.
///
/// # Errors
/// A failed transfer or a tensor error.
pub fn all_reduce_gradients(
    comm: &dyn Communicator,
    params: &[Var],
    grads: &mut GradStore,
) -> Result<()> {
    let world = comm.size();
    if world == 1 {
        return Ok(());
    }
    let with_grad: Vec<(&Var, Tensor)> = params
        .iter()
        .rev()
        .filter_map(|p| grads.get(p.as_tensor()).map(|g| (p, g.clone())))
        .collect();
    let (f32s, others): (Vec<_>, Vec<_>) = with_grad
        .into_iter()
        .partition(|(_, g)| g.dtype() == DType::F32);

    // Buckets of whole tensors, each at most BUCKET_BYTES unless one tensor is larger.
    let cap = BUCKET_BYTES / 4;
    let mut bounds: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut start, mut len) = (0, 0);
    for (i, (_, g)) in f32s.iter().enumerate() {
        let n = g.elem_count();
        if len > 0 && len + n > cap {
            bounds.push(start..i);
            (start, len) = (i, 0);
        }
        len += n;
    }
    if start < f32s.len() {
        bounds.push(start..f32s.len());
    }
    let mut buckets: Vec<Vec<f32>> = bounds
        .iter()
        .map(|r| {
            let mut b = Vec::new();
            for (_, g) in &f32s[r.clone()] {
                b.extend(g.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(b)
        })
        .collect::<Result<_>>()?;
    comm.all_reduce_sum_f32_buckets(&mut buckets)?;
    let scale = 1. / world as f32;
    for (r, bucket) in bounds.iter().zip(buckets.iter_mut()) {
        bucket.iter_mut().for_each(|x| *x *= scale);
        let mut offset = 0;
        for (p, g) in &f32s[r.clone()] {
            let n = g.elem_count();
            let avg = Tensor::from_slice(&bucket[offset..offset + n], g.dims(), g.device())?;
            grads.insert(p.as_tensor(), avg);
            offset += n;
        }
    }

    if !others.is_empty() {
        let tensors: Vec<Tensor> = others.iter().map(|(_, g)| g.clone()).collect();
        let mut flat = flatten_f64(&tensors)?;
        comm.all_reduce_sum_f64(&mut flat)?;
        let scale = 1. / world as f64;
        let mut offset = 0;
        for (p, g) in &others {
            let n = g.elem_count();
            let avg: Vec<f64> = flat[offset..offset + n].iter().map(|x| x * scale).collect();
            let avg = Tensor::from_vec(avg, g.dims(), g.device())?.to_dtype(g.dtype())?;
            grads.insert(p.as_tensor(), avg);
            offset += n;
        }
    }
    Ok(())
}

//! Running a ResNet's blocks in order, each run of consecutive plain basic blocks as one op
//! in training ([`resblock_core::conv_bn::basic_block_chain_t`]).
//!
//! One op per block leaves Candle's backward a zero fill and an add of activation size for
//! every block output, on one thread while the kernels' threads wait; one op per run leaves
//! it one, for the run's output. A CIFAR ResNet's blocks (identity and option-A shortcuts)
//! all chain, so its whole body is one op in [`crate::ResNet::embed`], and one per stage in
//! [`crate::ResNet::features`], which returns each stage's output. A conv + norm + ReLU stem
//! (the CIFAR one) joins the first run as its lead layer
//! ([`resblock_core::conv_bn::conv_bn_relu_chain_t`]), which saves that bookkeeping for the
//! stem's output too.

use candle_core::{ModuleT, Tensor};
use resblock_core::conv_bn::{basic_block_chain_t, conv_bn_relu_chain_t, ChainedBlock, ConvBn};
use resblock_core::Shortcut;

use crate::resnet::Block;

impl Block {
    /// This block as a link of a chain in training: a post-activation basic block with no
    /// pre-activation that computes exactly `relu(shortcut(x) + g(x))`
    /// ([`resblock_core::Residual::is_plain_post_relu`]) with an identity or option-A
    /// shortcut; `None` otherwise and at inference.
    fn chain_link(&self, train: bool) -> Option<ChainedBlock<'_>> {
        let Self::Basic(b) = self else { return None };
        if !train || b.pre().is_some() || !b.is_plain_post_relu(train) {
            return None;
        }
        let zero_pad = match b.shortcut() {
            Shortcut::Identity => None,
            Shortcut::ZeroPad {
                stride,
                front,
                back,
            } => Some((*stride, *front, *back)),
            _ => return None,
        };
        let [first, second] = b.branch().layers();
        Some((first, second, zero_pad))
    }
}

/// `blocks` applied to `x` in order, after `lead` (a conv + norm + ReLU stem) if given, each
/// run of consecutive blocks with a [`Block::chain_link`] as one op where the layers allow
/// (else block by block), the lead layer in the first run's op.
pub(crate) fn run_blocks<'a>(
    x: Tensor,
    lead: Option<&ConvBn>,
    blocks: impl IntoIterator<Item = &'a Block>,
    train: bool,
) -> candle_core::Result<Tensor> {
    let mut h = x;
    let mut lead = lead;
    let mut run: Vec<(&Block, ChainedBlock<'_>)> = Vec::new();
    for b in blocks {
        match b.chain_link(train) {
            Some(link) => run.push((b, link)),
            None => {
                h = run_chain(h, lead.take(), &run, train)?;
                run.clear();
                h = b.forward_t(&h, train)?;
            }
        }
    }
    run_chain(h, lead, &run, train)
}

/// The blocks of `run` on `x` after `lead` if given: one op where [`basic_block_chain_t`]
/// or [`conv_bn_relu_chain_t`] takes them.
fn run_chain(
    x: Tensor,
    lead: Option<&ConvBn>,
    run: &[(&Block, ChainedBlock<'_>)],
    train: bool,
) -> candle_core::Result<Tensor> {
    let links: Vec<ChainedBlock<'_>> = run.iter().map(|(_, l)| *l).collect();
    let fused = match (lead, run.is_empty()) {
        (_, true) => None,
        (None, false) => basic_block_chain_t(&x, &links)?,
        (Some(l), false) => conv_bn_relu_chain_t(&x, l, &links)?,
    };
    if let Some(y) = fused {
        return Ok(y);
    }
    let h = match lead {
        Some(l) => l.forward_relu_t(&x, train)?,
        None => x,
    };
    run.iter().try_fold(h, |h, (b, _)| b.forward_t(&h, train))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device, ModuleT, Tensor};
    use candle_nn::VarMap;
    use resblock_core::{seeded_var_builder, RngHandle};

    use crate::{resnet, ResNet, ResNetConfig, Result};

    /// A seeded ResNet-20 and its variables.
    fn resnet20() -> Result<(VarMap, ResNet)> {
        let rng = RngHandle::seed_from_u64(3);
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
        let net = resnet(&ResNetConfig::preset("resnet20")?, &rng, vb)?;
        Ok((varmap, net))
    }

    fn values(shape: &[usize], seed: usize) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// Every variable's value and gradient (if any), by name.
    type State = BTreeMap<String, (Vec<f32>, Option<Vec<f32>>)>;

    /// Every variable's value (parameters and running statistics) and gradient, by name.
    fn state(varmap: &VarMap, grads: &candle_core::backprop::GradStore) -> Result<State> {
        let data = varmap.data().lock().expect("varmap");
        data.iter()
            .map(|(name, var)| {
                let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
                let grad = grads.get(var.as_tensor()).map(flat).transpose()?;
                Ok((name.clone(), (flat(var.as_tensor())?, grad)))
            })
            .collect()
    }

    /// ResNet-20 in training with its whole body as one op ([`ResNet::embed`]) and one op
    /// per stage ([`ResNet::features`]) against one op per block: the embedding, every
    /// parameter's gradient and every norm's running statistics.
    #[test]
    fn chained_blocks_match_one_op_per_block() -> Result<()> {
        let x = values(&[2, 3, 12, 12], 1)?;
        let w = values(&[2, 64], 2)?;
        let run = |how: usize| -> Result<(Tensor, State)> {
            let (varmap, net) = resnet20()?;
            let e = match how {
                0 => net.embed(&x, true)?,
                1 => net
                    .features(&x, true)?
                    .pop()
                    .expect("stages")
                    .mean((2, 3))?,
                _ => {
                    let mut h = net.run_stem(&x, true)?;
                    for b in net.stages().iter().flatten() {
                        h = b.forward_t(&h, true)?;
                    }
                    h.mean((2, 3))?
                }
            };
            let grads = (&e * &w)?.sum_all()?.backward()?;
            Ok((e, state(&varmap, &grads)?))
        };
        let (want, want_state) = run(2)?;
        for how in [0, 1] {
            let (got, got_state) = run(how)?;
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "path {how}: embedding differs by {d}");
            assert_eq!(got_state.len(), want_state.len());
            for (name, (value, grad)) in &got_state {
                let (want_value, want_grad) = &want_state[name];
                let close = |a: &[f32], b: &[f32]| {
                    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                    a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-4 * scale)
                };
                assert!(close(value, want_value), "path {how}: {name} differs");
                assert_eq!(grad.is_some(), want_grad.is_some(), "path {how}: {name}");
                if let (Some(g), Some(wg)) = (grad, want_grad) {
                    assert!(close(g, wg), "path {how}: gradient of {name} differs");
                }
            }
        }
        Ok(())
    }
}

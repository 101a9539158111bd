//! Finite-difference gradient checks (f64) of the new ops and the residual combinator.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use common::{assert_close, autograd, numeric_grad};
use resblock_core::ops::{conv2d, conv2d_gemm, max_pool2d, max_pool2d_generic, Pool2dConfig};
use resblock_core::{
    mlp_block, seeded_var_builder, Activation, BatchNormConfig, ConvInit, MlpBlockConfig,
    ProjectionConfig, Residual, ResidualScale, RngHandle, Shortcut,
};

fn randn(rng: &RngHandle, shape: &[usize]) -> Result<Tensor> {
    Ok(rng.normal_tensor(shape, 0., 1., DType::F64, &Device::Cpu)?)
}

#[test]
fn max_pool_backward_matches_finite_differences() -> Result<()> {
    let rng = RngHandle::seed_from_u64(3);
    let x = randn(&rng, &[2, 2, 7, 6])?;
    let r = randn(&rng, &[2, 2, 4, 3])?;
    let cfg = Pool2dConfig::new(3, 2, 1);
    let f = |t: &Tensor| -> Result<Tensor> { Ok((max_pool2d(t, cfg)? * &r)?.sum_all()?) };
    let analytic = autograd(&f, &x)?;
    let numeric = numeric_grad(&|t| Ok(f(t)?.to_scalar::<f64>()?), &x, 1e-6)?;
    assert_close("max_pool dx", &analytic, &numeric, 1e-6)
}

#[test]
fn generic_max_pool_agrees_with_cpu_kernel() -> Result<()> {
    // The device-generic fallback (used off the CPU) gives the same forward and, without
    // ties (random data), the same gradient.
    let rng = RngHandle::seed_from_u64(4);
    let x = randn(&rng, &[2, 3, 9, 8])?;
    for cfg in [Pool2dConfig::new(3, 2, 1), Pool2dConfig::new(2, 1, 0)] {
        let a = max_pool2d(&x, cfg)?;
        let b = max_pool2d_generic(&x, cfg)?;
        assert_close("forward", &a, &b, 0.)?;
        let (_, _, oh, ow) = a.dims4()?;
        let r = randn(&rng, &[2, 3, oh, ow])?;
        let da = autograd(&|t| Ok((max_pool2d(t, cfg)? * &r)?.sum_all()?), &x)?;
        let db = autograd(&|t| Ok((max_pool2d_generic(t, cfg)? * &r)?.sum_all()?), &x)?;
        assert_close("backward", &da, &db, 1e-12)?;
    }
    Ok(())
}

#[test]
fn conv_backward_matches_finite_differences_on_8x7_stride_2() -> Result<()> {
    let rng = RngHandle::seed_from_u64(5);
    let x = randn(&rng, &[1, 2, 8, 7])?;
    let w = randn(&rng, &[3, 2, 3, 3])?;
    let r = randn(&rng, &[1, 3, 4, 4])?;
    let f = |t: &Tensor| -> Result<Tensor> { Ok((conv2d(t, &w, 1, 2, 1, 1)? * &r)?.sum_all()?) };
    let analytic = autograd(&f, &x)?;
    let numeric = numeric_grad(&|t| Ok(f(t)?.to_scalar::<f64>()?), &x, 1e-6)?;
    assert_close("conv dx", &analytic, &numeric, 1e-6)?;
    // The GEMM-backward convolution, also with dilation and groups.
    let w2 = randn(&rng, &[4, 1, 3, 3])?;
    let r2 = randn(&rng, &[1, 4, 3, 3])?;
    let g =
        |t: &Tensor| -> Result<Tensor> { Ok((conv2d_gemm(t, &w2, 1, 2, 2, 2)? * &r2)?.sum_all()?) };
    let analytic = autograd(&g, &x)?;
    let numeric = numeric_grad(&|t| Ok(g(t)?.to_scalar::<f64>()?), &x, 1e-6)?;
    assert_close("gemm conv dx", &analytic, &numeric, 1e-6)?;
    let gw =
        |t: &Tensor| -> Result<Tensor> { Ok((conv2d_gemm(&x, t, 1, 2, 2, 2)? * &r2)?.sum_all()?) };
    let analytic = autograd(&gw, &w2)?;
    let numeric = numeric_grad(&|t| Ok(gw(t)?.to_scalar::<f64>()?), &w2, 1e-6)?;
    assert_close("gemm conv dw", &analytic, &numeric, 1e-6)
}

/// The gradient of a residual block's output w.r.t. its input and a parameter, against
/// finite differences, for a conv block with a projection shortcut, BN and ReLU post.
#[test]
fn conv_residual_block_gradients_match_finite_differences() -> Result<()> {
    struct Branch {
        conv: resblock_core::Conv2d,
        bn: resblock_core::BatchNorm,
    }
    impl ModuleT for Branch {
        fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
            use candle_core::Module;
            self.bn.forward_t(&self.conv.forward(x)?, train)
        }
    }
    let rng = RngHandle::seed_from_u64(6);
    let mut varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F64, &Device::Cpu);
    let conv_cfg = resblock_core::Conv2dConfig {
        padding: 1,
        stride: 2,
        bias: false,
        ..Default::default()
    };
    let branch = Branch {
        conv: resblock_core::conv2d(2, 4, 3, conv_cfg, vb.pp("conv1"))?,
        bn: resblock_core::batch_norm(4, BatchNormConfig::default(), vb.pp("bn1"))?,
    };
    let proj = ProjectionConfig {
        init: ConvInit::TorchDefault,
        ..Default::default()
    };
    let shortcut = Shortcut::projection(2, 4, 2, proj, vb.pp("downsample"))?;
    let block = Residual::new(branch, shortcut)
        .with_post(Activation::Tanh) // smooth, so finite differences are exact enough
        .with_scale(ResidualScale::ReZero, vb.clone())?;
    // alpha = 0 would hide the branch's gradient: move it.
    varmap.set_one("alpha", Tensor::new(&[0.7f64], &Device::Cpu)?)?;
    let x = randn(&rng, &[3, 2, 6, 5])?;
    let r = randn(&rng, &[3, 4, 3, 3])?;
    let f = |t: &Tensor| -> Result<Tensor> { Ok((block.forward_t(t, true)? * &r)?.sum_all()?) };
    let analytic = autograd(&f, &x)?;
    let numeric = numeric_grad(&|t| Ok(f(t)?.to_scalar::<f64>()?), &x, 1e-6)?;
    assert_close("block dx", &analytic, &numeric, 1e-5)?;

    // And w.r.t. the branch conv's weight (through the VarMap's variable).
    let w: Var = varmap.data().lock().expect("lock")["conv1.weight"].clone();
    let w0 = w.as_tensor().copy()?;
    let grads = f(&x)?.backward()?;
    let analytic_w = grads
        .get(w.as_tensor())
        .expect("grad of conv1.weight")
        .clone();
    let numeric_w = numeric_grad(
        &|t| {
            w.set(t)?;
            let v = f(&x)?.to_scalar::<f64>()?;
            w.set(&w0)?;
            Ok(v)
        },
        &w0,
        1e-6,
    )?;
    assert_close("block dW", &analytic_w, &numeric_w, 1e-5)
}

#[test]
fn mlp_block_gradients_match_finite_differences() -> Result<()> {
    let rng = RngHandle::seed_from_u64(7);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F64, &Device::Cpu);
    let cfg = MlpBlockConfig {
        hidden: Some(8),
        activation: Activation::Gelu,
        layer_norm: true,
        scale: ResidualScale::Fixed(0.5),
        ..Default::default()
    };
    // Width change: a linear shortcut.
    let block = mlp_block(5, 6, cfg, &rng, vb)?;
    let x = randn(&rng, &[4, 5])?;
    let r = randn(&rng, &[4, 6])?;
    let f = |t: &Tensor| -> Result<Tensor> { Ok((block.forward_t(t, true)? * &r)?.sum_all()?) };
    let analytic = autograd(&f, &x)?;
    let numeric = numeric_grad(&|t| Ok(f(t)?.to_scalar::<f64>()?), &x, 1e-6)?;
    assert_close("mlp dx", &analytic, &numeric, 1e-6)
}

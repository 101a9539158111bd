//! Finite-difference gradient checks (f64) of the new ops and the residual combinator.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use common::{assert_close, autograd, numeric_grad};
use resblock_core::ops::{
    conv2d_candle, conv2d_native, max_pool2d, max_pool2d_generic, Pool2dConfig,
};
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
    let f =
        |t: &Tensor| -> Result<Tensor> { Ok((conv2d_candle(t, &w, 1, 2, 1, 1)? * &r)?.sum_all()?) };
    let analytic = autograd(&f, &x)?;
    let numeric = numeric_grad(&|t| Ok(f(t)?.to_scalar::<f64>()?), &x, 1e-6)?;
    assert_close("conv dx", &analytic, &numeric, 1e-6)?;
    // Our native convolution, also with dilation and groups.
    let w2 = randn(&rng, &[4, 1, 3, 3])?;
    let r2 = randn(&rng, &[1, 4, 3, 3])?;
    let g = |t: &Tensor| -> Result<Tensor> {
        Ok((conv2d_native(t, &w2, 1, 2, 2, 2)? * &r2)?.sum_all()?)
    };
    let analytic = autograd(&g, &x)?;
    let numeric = numeric_grad(&|t| Ok(g(t)?.to_scalar::<f64>()?), &x, 1e-6)?;
    assert_close("native conv dx", &analytic, &numeric, 1e-6)?;
    let gw = |t: &Tensor| -> Result<Tensor> {
        Ok((conv2d_native(&x, t, 1, 2, 2, 2)? * &r2)?.sum_all()?)
    };
    let analytic = autograd(&gw, &w2)?;
    let numeric = numeric_grad(&|t| Ok(gw(t)?.to_scalar::<f64>()?), &w2, 1e-6)?;
    assert_close("native conv dw", &analytic, &numeric, 1e-6)
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
    // Any module is a residual branch with an empty impl (the default block end).
    impl resblock_core::Branch for Branch {}
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

/// Our convolution against Candle's (f64, forward and both gradients) over every path of its
/// input gradient: 1x1 direct, stride-1 flipped kernel (with dilation, groups, padding 0
/// and 2), strided scatter, a non-square kernel, and batch 1 (GEMM-parallel rather than
/// image-parallel).
#[test]
fn native_conv_agrees_with_candle_on_every_path() -> Result<()> {
    let rng = RngHandle::seed_from_u64(11);
    // (n, c_in, c_out, h, w, kh, kw, padding, stride, dilation, groups)
    let cases = [
        (2, 4, 6, 5, 7, 1, 1, 0, 1, 1, 1),
        (2, 4, 6, 5, 7, 1, 1, 0, 2, 1, 2),
        (3, 4, 6, 6, 5, 3, 3, 1, 1, 1, 1),
        (2, 4, 6, 6, 5, 3, 3, 0, 1, 1, 2),
        (2, 4, 4, 9, 8, 3, 3, 2, 1, 2, 4),
        (2, 4, 6, 8, 7, 3, 3, 1, 2, 1, 1),
        (2, 2, 3, 7, 9, 3, 2, 1, 1, 1, 1),
        (1, 3, 5, 11, 10, 5, 5, 2, 1, 1, 1),
        (1, 3, 5, 11, 10, 7, 7, 3, 2, 1, 1),
    ];
    for (n, ci, co, h, w, kh, kw, p, s, d, g) in cases {
        let name = format!("n{n} {ci}->{co} {h}x{w} k{kh}x{kw} p{p} s{s} d{d} g{g}");
        let x = randn(&rng, &[n, ci, h, w])?;
        let k = randn(&rng, &[co, ci / g, kh, kw])?;
        let ya = conv2d_native(&x, &k, p, s, d, g)?;
        let yb = conv2d_candle(&x, &k, p, s, d, g)?;
        assert_close(&format!("{name} y"), &ya, &yb, 1e-12)?;
        let r = randn(&rng, ya.dims())?;
        type Conv =
            fn(&Tensor, &Tensor, usize, usize, usize, usize) -> resblock_core::ops::Result<Tensor>;
        let grads = |conv: Conv| -> Result<(Tensor, Tensor)> {
            let (xv, kv) = (Var::from_tensor(&x)?, Var::from_tensor(&k)?);
            let gs = (conv(xv.as_tensor(), kv.as_tensor(), p, s, d, g)? * &r)?
                .sum_all()?
                .backward()?;
            let get = |v: &Var| gs.get(v).cloned().ok_or_else(|| anyhow::anyhow!("no grad"));
            Ok((get(&xv)?, get(&kv)?))
        };
        let (dxa, dka) = grads(conv2d_native)?;
        let (dxb, dkb) = grads(conv2d_candle)?;
        assert_close(&format!("{name} dx"), &dxa, &dxb, 1e-12)?;
        assert_close(&format!("{name} dw"), &dka, &dkb, 1e-12)?;
    }
    Ok(())
}

/// The BatchNorm kernel (with and without the fused ReLU) against the same maths from
/// Candle ops: output, statistics and all three gradients, in f64.
#[test]
fn native_batch_norm_agrees_with_candle_ops() -> Result<()> {
    use resblock_core::ops::{batch_norm_train, batch_norm_train_candle};
    let rng = RngHandle::seed_from_u64(12);
    for (shape, relu) in [
        (vec![4, 3, 5, 6], false),
        (vec![4, 3, 5, 6], true),
        (vec![6, 5], true),
    ] {
        let x = (randn(&rng, &shape)? * 3.)?.affine(1., 2.)?;
        let c = shape[1];
        let gamma = randn(&rng, &[c])?;
        let beta = randn(&rng, &[c])?;
        let r = randn(&rng, &shape)?;
        type Bn = fn(
            &Tensor,
            &Tensor,
            &Tensor,
            f64,
            bool,
        )
            -> resblock_core::ops::Result<(Tensor, resblock_core::ops::BatchStats)>;
        let run = |bn: Bn| -> Result<(Tensor, Vec<f64>, Vec<Tensor>)> {
            let vars = [&x, &gamma, &beta].map(|t| Var::from_tensor(t).expect("var"));
            let (y, stats) = bn(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                1e-5,
                relu,
            )?;
            let gs = (&y * &r)?.sum_all()?.backward()?;
            let grads = vars
                .iter()
                .map(|v| gs.get(v).cloned().ok_or_else(|| anyhow::anyhow!("no grad")))
                .collect::<Result<Vec<_>>>()?;
            Ok((y, [stats.mean, stats.var].concat(), grads))
        };
        let (ya, sa, ga) = run(batch_norm_train)?;
        let (yb, sb, gb) = run(batch_norm_train_candle)?;
        let name = format!("bn {shape:?} relu {relu}");
        assert_close(&format!("{name} y"), &ya, &yb, 1e-12)?;
        let (sa, sb) = (
            Tensor::new(sa, &Device::Cpu)?,
            Tensor::new(sb, &Device::Cpu)?,
        );
        assert_close(&format!("{name} stats"), &sa, &sb, 1e-12)?;
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            assert_close(&format!("{name} grad {i}"), a, b, 1e-10)?;
        }
    }
    Ok(())
}

/// The fused conv (+ bias, + ReLU) against the same maths from separate Candle ops, with
/// gradients for input, kernel and bias (f64).
#[test]
fn fused_conv_bias_relu_agrees_with_separate_ops() -> Result<()> {
    use resblock_core::ops::{conv2d_fused, set_kernels, Kernels};
    let rng = RngHandle::seed_from_u64(13);
    let x = randn(&rng, &[2, 4, 7, 6])?;
    let k = randn(&rng, &[6, 2, 3, 3])?;
    let b = randn(&rng, &[6])?;
    let r = randn(&rng, &[2, 6, 4, 3])?;
    for (bias, relu) in [(true, true), (true, false), (false, true)] {
        let run = |native: bool| -> Result<Vec<Tensor>> {
            let vars = [&x, &k, &b].map(|t| Var::from_tensor(t).expect("var"));
            let bt = bias.then(|| vars[2].as_tensor());
            let y = if native {
                conv2d_fused(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    bt,
                    relu,
                    1,
                    2,
                    1,
                    2,
                )?
            } else {
                let y = conv2d_candle(vars[0].as_tensor(), vars[1].as_tensor(), 1, 2, 1, 2)?;
                let y = match bt {
                    Some(b) => y.broadcast_add(&b.reshape((1, 6, 1, 1))?)?,
                    None => y,
                };
                if relu {
                    y.relu()?
                } else {
                    y
                }
            };
            let gs = (&y * &r)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for v in &vars[..if bias { 3 } else { 2 }] {
                out.push(
                    gs.get(v)
                        .cloned()
                        .ok_or_else(|| anyhow::anyhow!("no grad"))?,
                );
            }
            Ok(out)
        };
        set_kernels(Kernels::Native);
        let a = run(true)?;
        let c = run(false)?;
        for (i, (p, q)) in a.iter().zip(&c).enumerate() {
            assert_close(
                &format!("bias {bias} relu {relu} output/grad {i}"),
                p,
                q,
                1e-12,
            )?;
        }
    }
    Ok(())
}

/// `add_relu` against `(a + b).relu()` from Candle ops: output and both gradients (f64).
#[test]
fn add_relu_agrees_with_separate_ops() -> Result<()> {
    use resblock_core::ops::add_relu;
    let rng = RngHandle::seed_from_u64(14);
    let (a, b, r) = (
        randn(&rng, &[3, 4, 5, 6])?,
        randn(&rng, &[3, 4, 5, 6])?,
        randn(&rng, &[3, 4, 5, 6])?,
    );
    let run = |fused: bool| -> Result<Vec<Tensor>> {
        let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        let y = if fused {
            add_relu(va.as_tensor(), vb.as_tensor())?
        } else {
            (va.as_tensor() + vb.as_tensor())?.relu()?
        };
        let gs = (&y * &r)?.sum_all()?.backward()?;
        let get = |v: &Var| gs.get(v).cloned().ok_or_else(|| anyhow::anyhow!("no grad"));
        Ok(vec![y.clone(), get(&va)?, get(&vb)?])
    };
    for (i, (p, q)) in run(true)?.iter().zip(&run(false)?).enumerate() {
        assert_close(&format!("add_relu output/grad {i}"), p, q, 0.)?;
    }
    Ok(())
}

/// The fused conv + training BatchNorm (+ ReLU) op in f32 against the two separate ops in f64:
/// output, batch statistics and the gradients of input, kernel, gamma and beta. Covers
/// output channels that are not a multiple of the kernels' block (4 with AVX2, 8 with AVX-512), batch 1 (channel
/// blocks in parallel) and larger batches (images in parallel), and an input that needs no
/// gradient (the network's input: the op skips the input-gradient convolution); stride 2
/// (a downsampling block's first convolution) at odd and even sizes.
#[test]
fn fused_conv_batch_norm_agrees_with_separate_ops() -> Result<()> {
    use resblock_core::ops::{batch_norm_train, conv2d, conv_batch_norm_train};
    let rng = RngHandle::seed_from_u64(15);
    for (n, c, h, w, cout, relu, x_grad, stride) in [
        (3, 5, 7, 9, 6, true, true, 1),
        (1, 4, 8, 8, 8, false, true, 1),
        (4, 16, 6, 5, 16, true, true, 1),
        (2, 3, 9, 9, 4, true, false, 1),
        (3, 5, 9, 7, 6, true, true, 2),
        (1, 4, 8, 8, 8, false, true, 2),
        (5, 16, 8, 8, 32, true, true, 2),
        (2, 3, 9, 9, 4, true, false, 2),
    ] {
        let x = randn(&rng, &[n, c, h, w])?.affine(1.5, 0.3)?;
        let k = randn(&rng, &[cout, c, 3, 3])?.affine(0.3, 0.)?;
        let gamma = randn(&rng, &[cout])?.affine(0.5, 1.)?;
        let beta = randn(&rng, &[cout])?.affine(0.5, 0.)?;
        let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let r = randn(&rng, &[n, cout, oh, ow])?;
        let run = |dtype: DType, fused: bool| -> Result<(Tensor, Vec<f64>, Vec<Option<Tensor>>)> {
            let vars = [&x, &k, &gamma, &beta]
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).expect("cast")).expect("var"));
            let xin = if x_grad {
                vars[0].as_tensor().clone()
            } else {
                vars[0].as_tensor().detach()
            };
            let (y, stats) = if fused {
                conv_batch_norm_train(
                    &xin,
                    vars[1].as_tensor(),
                    (1, stride, 1, 1),
                    vars[2].as_tensor(),
                    vars[3].as_tensor(),
                    1e-5,
                    relu,
                )?
            } else {
                let y = conv2d(&xin, vars[1].as_tensor(), 1, stride, 1, 1)?;
                batch_norm_train(&y, vars[2].as_tensor(), vars[3].as_tensor(), 1e-5, relu)?
            };
            let gs = (&y * r.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let grads = vars.iter().map(|v| gs.get(v).cloned()).collect();
            Ok((y, [stats.mean, stats.var].concat(), grads))
        };
        let (ya, sa, ga) = run(DType::F32, true)?;
        let (yb, sb, gb) = run(DType::F64, false)?;
        let name = format!("conv-bn {n}x{c}x{h}x{w} -> {cout} stride {stride} relu {relu}");
        assert_close(&format!("{name} y"), &ya, &yb, 1e-5)?;
        let (sa, sb) = (
            Tensor::new(sa, &Device::Cpu)?,
            Tensor::new(sb, &Device::Cpu)?,
        );
        assert_close(&format!("{name} stats"), &sa, &sb, 1e-6)?;
        anyhow::ensure!(
            ga[0].is_some() == x_grad && gb[0].is_some() == x_grad,
            "{name}: an input gradient only where the input needs one"
        );
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            if let (Some(a), Some(b)) = (a, b) {
                assert_close(&format!("{name} grad {i}"), a, b, 1e-4)?;
            } else {
                anyhow::ensure!(i == 0, "{name}: no gradient {i}");
            }
        }
    }
    Ok(())
}

/// NaN propagates through max pooling as in PyTorch: exactly the windows that hold it
/// output NaN, the others are unchanged.
#[test]
fn max_pool_propagates_nan_to_its_windows_only() -> Result<()> {
    let cfg = Pool2dConfig::new(3, 2, 1);
    let base: Vec<f32> = (0..36).map(|i| ((i * 7) % 11) as f32).collect();
    let mut with_nan = base.clone();
    with_nan[0] = f32::NAN; // row 0, col 0: only in the window of output (0, 0)
    let pool = |v: Vec<f32>| -> Result<Vec<f32>> {
        let x = Tensor::from_vec(v, (1, 1, 6, 6), &Device::Cpu)?;
        Ok(max_pool2d(&x, cfg)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (a, b) = (pool(base)?, pool(with_nan)?);
    anyhow::ensure!(b[0].is_nan(), "window (0, 0) holds the NaN: {b:?}");
    anyhow::ensure!(a[1..] == b[1..], "other windows changed: {a:?} vs {b:?}");
    Ok(())
}

/// The fused conv + BatchNorm + residual sum + ReLU op (a residual block's end) in f32
/// against separate ops in f64: output, statistics, and the gradients of input, kernel,
/// gamma, beta and the residual; at stride 1 and 2.
#[test]
fn fused_conv_batch_norm_add_relu_agrees_with_separate_ops() -> Result<()> {
    use resblock_core::ops::{add_relu, batch_norm_train, conv2d, conv_batch_norm_add_relu_train};
    let rng = RngHandle::seed_from_u64(16);
    for (n, c, h, w, cout, stride) in [
        (3, 5, 7, 9, 6, 1),
        (1, 4, 8, 8, 8, 1),
        (5, 8, 4, 4, 8, 1),
        (3, 5, 9, 7, 6, 2),
    ] {
        let x = randn(&rng, &[n, c, h, w])?.affine(1.5, 0.3)?;
        let k = randn(&rng, &[cout, c, 3, 3])?.affine(0.3, 0.)?;
        let gamma = randn(&rng, &[cout])?.affine(0.5, 1.)?;
        let beta = randn(&rng, &[cout])?.affine(0.5, 0.)?;
        let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let res = randn(&rng, &[n, cout, oh, ow])?;
        let r = randn(&rng, &[n, cout, oh, ow])?;
        let run = |dtype: DType, fused: bool| -> Result<(Tensor, Vec<f64>, Vec<Option<Tensor>>)> {
            let vars = [&x, &k, &gamma, &beta, &res]
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).expect("cast")).expect("var"));
            let t = |i: usize| vars[i].as_tensor();
            let (y, stats) = if fused {
                conv_batch_norm_add_relu_train(
                    t(0),
                    t(1),
                    (1, stride, 1, 1),
                    t(2),
                    t(3),
                    1e-5,
                    t(4),
                )?
            } else {
                let y = conv2d(t(0), t(1), 1, stride, 1, 1)?;
                let (y, stats) = batch_norm_train(&y, t(2), t(3), 1e-5, false)?;
                (add_relu(t(4), &y)?, stats)
            };
            let gs = (&y * r.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let grads = vars.iter().map(|v| gs.get(v).cloned()).collect();
            Ok((y, [stats.mean, stats.var].concat(), grads))
        };
        let (ya, sa, ga) = run(DType::F32, true)?;
        let (yb, sb, gb) = run(DType::F64, false)?;
        let name = format!("conv-bn-add-relu {n}x{c}x{h}x{w} -> {cout} stride {stride}");
        assert_close(&format!("{name} y"), &ya, &yb, 1e-5)?;
        let (sa, sb) = (
            Tensor::new(sa, &Device::Cpu)?,
            Tensor::new(sb, &Device::Cpu)?,
        );
        assert_close(&format!("{name} stats"), &sa, &sb, 1e-6)?;
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            let (Some(a), Some(b)) = (a, b) else {
                anyhow::bail!("{name}: no gradient {i}");
            };
            assert_close(&format!("{name} grad {i}"), a, b, 1e-4)?;
        }
    }
    Ok(())
}

/// The f32 training BatchNorm (vectorised kernels for planes of 16 and more values, the
/// generic loop below) against the f64 one: output, statistics and all three gradients.
#[test]
fn f32_batch_norm_agrees_with_f64() -> Result<()> {
    use resblock_core::ops::batch_norm_train;
    let rng = RngHandle::seed_from_u64(17);
    for (shape, relu) in [
        (vec![4, 3, 5, 6], true),
        (vec![4, 3, 5, 6], false),
        (vec![2, 4, 4, 4], true),
        (vec![3, 2, 9, 9], true),
        (vec![6, 5], true),
    ] {
        let c = shape[1];
        let x = (randn(&rng, &shape)? * 2.)?.affine(1., 0.5)?;
        let gamma = randn(&rng, &[c])?.affine(0.5, 1.)?;
        let beta = randn(&rng, &[c])?;
        let r = randn(&rng, &shape)?;
        let run = |dtype: DType| -> Result<(Tensor, Vec<f64>, Vec<Tensor>)> {
            let vars = [&x, &gamma, &beta]
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).expect("cast")).expect("var"));
            let (y, stats) = batch_norm_train(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                1e-5,
                relu,
            )?;
            let gs = (&y * r.to_dtype(dtype)?)?.sum_all()?.backward()?;
            let grads = vars
                .iter()
                .map(|v| gs.get(v).cloned().ok_or_else(|| anyhow::anyhow!("no grad")))
                .collect::<Result<Vec<_>>>()?;
            Ok((y, [stats.mean, stats.var].concat(), grads))
        };
        let (ya, sa, ga) = run(DType::F32)?;
        let (yb, sb, gb) = run(DType::F64)?;
        let name = format!("bn f32 {shape:?} relu {relu}");
        assert_close(&format!("{name} y"), &ya, &yb, 1e-5)?;
        let (sa, sb) = (
            Tensor::new(sa, &Device::Cpu)?,
            Tensor::new(sb, &Device::Cpu)?,
        );
        assert_close(&format!("{name} stats"), &sa, &sb, 1e-6)?;
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            assert_close(&format!("{name} grad {i}"), a, b, 1e-4)?;
        }
    }
    Ok(())
}

/// The option-A shortcut op against subsampling and zero-padding from Candle ops: output
/// and input gradient, odd and even sizes, strides 1 to 3, padding on one or both sides.
#[test]
fn zero_pad_shortcut_agrees_with_candle_ops() -> Result<()> {
    use resblock_core::ops::{subsample2d, zero_pad_shortcut};
    let rng = RngHandle::seed_from_u64(18);
    for (shape, stride, front, back) in [
        ([2, 3, 8, 8], 2, 1, 2),
        ([1, 4, 7, 5], 2, 2, 2),
        ([3, 2, 9, 6], 3, 0, 1),
        ([2, 2, 4, 4], 1, 1, 0),
    ] {
        let x = randn(&rng, &shape)?;
        let oc = shape[1] + front + back;
        let (oh, ow) = (shape[2].div_ceil(stride), shape[3].div_ceil(stride));
        let r = randn(&rng, &[shape[0], oc, oh, ow])?;
        let ours = zero_pad_shortcut(&x, stride, front, back)?;
        let theirs = subsample2d(&x, stride, stride)?.pad_with_zeros(1, front, back)?;
        let name = format!("zero-pad {shape:?} stride {stride} +{front}/{back}");
        assert_close(&format!("{name} y"), &ours, &theirs, 0.)?;
        let ga = autograd(
            &|t| Ok((zero_pad_shortcut(t, stride, front, back)? * &r)?.sum_all()?),
            &x,
        )?;
        let gb = autograd(
            &|t| {
                Ok(
                    (subsample2d(t, stride, stride)?.pad_with_zeros(1, front, back)? * &r)?
                        .sum_all()?,
                )
            },
            &x,
        )?;
        assert_close(&format!("{name} dx"), &ga, &gb, 0.)?;
    }
    Ok(())
}

/// `conv2d_backward` (both gradients for a given output gradient, no graph) against Candle's
/// autograd through its own convolution: f64 on the GEMM and flipped-kernel paths, f32 on
/// the direct kernels and on the GEMM path (1x1, strided grouped scatter, `C_in * 9` above
/// the direct kernels' limit: our own GEMM where it runs); a wrong output-gradient shape
/// is an error that names the shapes.
#[test]
fn conv_backward_without_a_graph_matches_autograd() -> Result<()> {
    use resblock_core::ops::conv2d_backward;
    let rng = RngHandle::seed_from_u64(21);
    // (n, c_in, c_out, h, w, k, padding, stride, groups, dtype)
    let cases = [
        (2, 4, 6, 7, 6, 3, 1, 1, 1, DType::F64),
        (2, 4, 6, 8, 7, 3, 1, 2, 2, DType::F64),
        (3, 8, 16, 9, 10, 3, 1, 1, 1, DType::F32),
        (2, 4, 6, 5, 5, 1, 0, 1, 1, DType::F32),
        (2, 4, 6, 8, 7, 3, 1, 2, 2, DType::F32),
        (1, 72, 20, 6, 5, 3, 1, 1, 1, DType::F32),
    ];
    for (n, ci, co, h, w, k, p, s, g, dt) in cases {
        let name = format!("n{n} {ci}->{co} {h}x{w} k{k} p{p} s{s} g{g} {dt:?}");
        let x = randn(&rng, &[n, ci, h, w])?.to_dtype(dt)?;
        let kern = randn(&rng, &[co, ci / g, k, k])?.to_dtype(dt)?;
        let (xv, kv) = (Var::from_tensor(&x)?, Var::from_tensor(&kern)?);
        let y = conv2d_candle(xv.as_tensor(), kv.as_tensor(), p, s, 1, g)?;
        let dy = randn(&rng, y.dims())?.to_dtype(dt)?;
        let gs = (&y * &dy)?.sum_all()?.backward()?;
        let (dx, dk) = conv2d_backward(&x, &kern, &dy, p, s, 1, g)?;
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
        let want = |v: &Var| gs.get(v).cloned().ok_or_else(|| anyhow::anyhow!("no grad"));
        assert_close(&format!("{name} dx"), &dx, &want(&xv)?, tol)?;
        assert_close(&format!("{name} dw"), &dk, &want(&kv)?, tol)?;
    }
    let x = randn(&rng, &[1, 2, 5, 5])?;
    let kern = randn(&rng, &[3, 2, 3, 3])?;
    let bad = randn(&rng, &[1, 3, 4, 5])?;
    let err = conv2d_backward(&x, &kern, &bad, 1, 1, 1, 1)
        .expect_err("a wrong output gradient shape is refused")
        .to_string();
    anyhow::ensure!(
        err.contains("[1, 3, 5, 5]") && err.contains("[1, 3, 4, 5]"),
        "error names both shapes: {err}"
    );
    Ok(())
}

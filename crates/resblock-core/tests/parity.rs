//! Parity with PyTorch: fixtures from tests/fixtures/make_fixtures.py.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, autograd, fixture, get};
use resblock_core::ops::{conv2d_candle, conv2d_native, max_pool2d, Pool2dConfig};
use resblock_core::{batch_norm, Shortcut};

#[test]
fn max_pool_forward_and_backward_match_pytorch() -> Result<()> {
    let f = fixture("core_ops.safetensors")?;
    let cases = [
        ("k3s2p1", Pool2dConfig::new(3, 2, 1)),
        ("k2s1p0", Pool2dConfig::new(2, 1, 0)),
        ("k3s1p1", Pool2dConfig::new(3, 1, 1)),
        ("k2s2p0", Pool2dConfig::new(2, 2, 0)),
        (
            "k3s2p1d2",
            Pool2dConfig {
                dilation: (2, 2),
                ..Pool2dConfig::new(3, 2, 1)
            },
        ),
    ];
    for (name, cfg) in cases {
        let x = get(&f, &format!("maxpool.{name}.x"))?;
        let r = get(&f, &format!("maxpool.{name}.r"))?;
        let y = max_pool2d(x, cfg)?;
        assert_close(
            &format!("maxpool {name} y"),
            &y,
            get(&f, &format!("maxpool.{name}.y"))?,
            0.,
        )?;
        let dx = autograd(&|t| Ok((max_pool2d(t, cfg)? * r)?.sum_all()?), x)?;
        assert_close(
            &format!("maxpool {name} dx"),
            &dx,
            get(&f, &format!("maxpool.{name}.dx"))?,
            1e-6,
        )?;
    }
    Ok(())
}

#[test]
fn conv_gradients_match_pytorch_on_non_square_strided_inputs() -> Result<()> {
    let f = fixture("core_ops.safetensors")?;
    // (name, padding, stride, groups)
    for (name, p, s, g) in [
        ("s2p1_8x7", 1, 2, 1),
        ("s2p1_7x8", 1, 2, 1),
        ("s2p0_9x6_1x1", 0, 2, 1),
        ("s2p1_8x7_g2", 1, 2, 2),
        ("s1p1_6x5", 1, 1, 1),
    ] {
        let k = |s: &str| get(&f, &format!("conv.{name}.{s}"));
        let (x, w, r) = (k("x")?, k("w")?, k("r")?);
        type Conv =
            fn(&Tensor, &Tensor, usize, usize, usize, usize) -> resblock_core::ops::Result<Tensor>;
        for (which, conv) in [
            ("candle", conv2d_candle as Conv),
            ("native", conv2d_native as Conv),
        ] {
            let y = conv(x, w, p, s, 1, g)?;
            assert_close(&format!("conv {which} {name} y"), &y, k("y")?, 1e-5)?;
            let dx = autograd(&|t| Ok((conv(t, w, p, s, 1, g)? * r)?.sum_all()?), x)?;
            assert_close(&format!("conv {which} {name} dx"), &dx, k("dx")?, 1e-5)?;
            let dw = autograd(&|t| Ok((conv(x, t, p, s, 1, g)? * r)?.sum_all()?), w)?;
            assert_close(&format!("conv {which} {name} dw"), &dw, k("dw")?, 1e-5)?;
        }
    }
    Ok(())
}

/// Documents the Candle bug that `ops::conv2d` works around: if this starts passing, the
/// workaround can go (see resblock-kernels/src/conv/mod.rs).
#[test]
fn plain_candle_conv_backward_missizes_non_square_stride2_inputs() -> Result<()> {
    let x = candle_core::Var::zeros((1, 2, 8, 7), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones((3, 2, 3, 3), DType::F32, &Device::Cpu)?;
    let y = x.as_tensor().conv2d(&w, 1, 2, 1, 1)?;
    let outcome = y.sum_all()?.backward();
    let wrong = match outcome {
        Err(_) => true,
        Ok(g) => g
            .get(x.as_tensor())
            .map(|t| t.dims() != [1, 2, 8, 7])
            .unwrap_or(true),
    };
    assert!(
        wrong,
        "Candle's conv2d backward now sizes 8x7 stride-2 inputs right"
    );
    Ok(())
}

#[test]
fn option_a_padding_matches_pytorch_idiom() -> Result<()> {
    let f = fixture("core_ops.safetensors")?;
    for name in ["even", "odd"] {
        let x = get(&f, &format!("optiona.{name}.x"))?;
        let sc = Shortcut::zero_pad(4, 8, 2)?;
        let y = sc.apply(x, true)?.expect("zero-pad shortcut has an output");
        assert_close(
            &format!("option A {name}"),
            &y,
            get(&f, &format!("optiona.{name}.y"))?,
            0.,
        )?;
    }
    Ok(())
}

#[test]
fn batch_norm_train_eval_and_grads_match_pytorch() -> Result<()> {
    let f = fixture("core_ops.safetensors")?;
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = batch_norm(3, Default::default(), vb.clone())?;
    varmap.set_one("weight", get(&f, "bn.weight")?)?;
    varmap.set_one("bias", get(&f, "bn.bias")?)?;
    let x1 = get(&f, "bn.x1")?;
    let r = get(&f, "bn.r")?;
    let xv = candle_core::Var::from_tensor(x1)?;
    let y1 = bn.forward_t(xv.as_tensor(), true)?;
    assert_close("bn train y", &y1, get(&f, "bn.y1")?, 1e-5)?;
    let grads = (&y1 * r)?.sum_all()?.backward()?;
    let dx = grads.get(xv.as_tensor()).expect("dx");
    assert_close("bn dx", dx, get(&f, "bn.dx")?, 1e-4)?;
    let w = varmap.data().lock().expect("lock")["weight"]
        .as_tensor()
        .clone();
    let b = varmap.data().lock().expect("lock")["bias"]
        .as_tensor()
        .clone();
    assert_close(
        "bn dweight",
        grads.get(&w).expect("dw"),
        get(&f, "bn.dweight")?,
        1e-5,
    )?;
    assert_close(
        "bn dbias",
        grads.get(&b).expect("db"),
        get(&f, "bn.dbias")?,
        1e-5,
    )?;
    bn.forward_t(get(&f, "bn.x2")?, true)?;
    assert_close(
        "running_mean",
        bn.running_mean(),
        get(&f, "bn.running_mean")?,
        1e-5,
    )?;
    assert_close(
        "running_var",
        bn.running_var(),
        get(&f, "bn.running_var")?,
        1e-5,
    )?;
    assert_eq!(bn.num_batches_tracked()?, 2);
    let ye = bn.forward_t(get(&f, "bn.x2")?, false)?;
    assert_close("bn eval y", &ye, get(&f, "bn.y_eval")?, 1e-5)?;
    Ok(())
}

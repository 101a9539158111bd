//! `ConvBn` decides itself how to run, and every way gives the same numbers: the fused op,
//! the two separate ops, the portable loops instead of SIMD, and Candle's ops. Its block end
//! (`forward_add_relu_t`) is `relu(conv_bn(x) + residual)`. Eval mode records no graph.
//!
//! One test function: the kernel choice is process-wide.

use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use resblock_core::ops::dispatch::{self, Dispatch, Kernels};
use resblock_core::{
    batch_norm, conv2d, seeded_var_builder, BatchNormConfig, Conv2dConfig, ConvBn, RngHandle,
};

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A fresh 3x3 conv (5 -> 6 channels, "same") + BN, the same weights every time.
fn layer() -> Result<ConvBn> {
    layer_of(5, 6, 1)
}

/// A fresh 3x3 conv (`cin` -> `cout` channels, padding 1, `stride`) + BN, the same weights
/// every time.
fn layer_of(cin: usize, cout: usize, stride: usize) -> Result<ConvBn> {
    let rng = RngHandle::seed_from_u64(3);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        bias: false,
        ..Default::default()
    };
    Ok(ConvBn::new(
        conv2d(cin, cout, 3, cfg, vb.pp("conv"))?,
        Some(batch_norm(cout, BatchNormConfig::default(), vb.pp("bn"))?),
    ))
}

/// (output, d/dx, d/dkernel) of a training step of a layer (`cin` from `x`'s shape).
fn run_layer(
    d: Dispatch,
    (cout, stride): (usize, usize),
    x: &Tensor,
    g: &Tensor,
) -> Result<[Tensor; 3]> {
    dispatch::set(d);
    let l = layer_of(x.dim(1)?, cout, stride)?;
    let xv = Var::from_tensor(x)?;
    let y = l.forward_relu_t(xv.as_tensor(), true)?;
    let grads: GradStore = (&y * g)?.sum_all()?.backward()?;
    let dx = grads.get(xv.as_tensor()).expect("dx").clone();
    let dw = grads.get(l.conv().weight()).expect("dw").clone();
    Ok([y, dx, dw])
}

/// (output, d/dx, d/dkernel, running mean) of a training step, and of the block end.
fn run(d: Dispatch, x: &Tensor, r: &Tensor, g: &Tensor) -> Result<[Tensor; 5]> {
    dispatch::set(d);
    let l = layer()?;
    let xv = Var::from_tensor(x)?;
    let y = l.forward_relu_t(xv.as_tensor(), true)?;
    let grads: GradStore = (&y * g)?.sum_all()?.backward()?;
    let dx = grads.get(xv.as_tensor()).expect("dx").clone();
    let dw = grads.get(l.conv().weight()).expect("dw").clone();
    let mean = l.norm().expect("bn").running_mean().clone();
    let end = layer()?.forward_add_relu_t(x, r, true)?;
    Ok([y, dx, dw, mean, end])
}

/// Panics unless each of `got` is within 2e-4 of Candle's `want` (named by `whats`).
fn assert_agree(label: &str, whats: &[&str], got: &[Tensor], want: &[Tensor]) -> Result<()> {
    for ((what, a), b) in whats.iter().zip(got).zip(want) {
        let e = max_diff(a, b)?;
        assert!(e < 2e-4, "{label}: {what} differs from Candle's by {e}");
    }
    Ok(())
}

#[test]
fn every_path_agrees_and_eval_records_no_graph() -> Result<()> {
    let rng = RngHandle::seed_from_u64(9);
    let x = rng.normal_tensor((3, 5, 9, 7), 0., 1., DType::F32, &Device::Cpu)?;
    let r = rng.normal_tensor((3, 6, 9, 7), 0., 1., DType::F32, &Device::Cpu)?;
    let g = rng.normal_tensor((3, 6, 9, 7), 0., 1., DType::F32, &Device::Cpu)?;
    let candle = Dispatch {
        kernels: Kernels::Candle,
        ..Dispatch::default()
    };
    let want = run(candle, &x, &r, &g)?;
    // The block end is relu(conv_bn(x) + r).
    let composed = (layer()?.forward_t(&x, true)? + &r)?.relu()?;
    assert!(max_diff(&want[4], &composed)? < 1e-5);
    let paths = [
        ("default", Dispatch::default()),
        (
            "unfused",
            Dispatch {
                fused_conv_bn: false,
                ..Dispatch::default()
            },
        ),
        (
            "gemm",
            Dispatch {
                direct_conv: false,
                fused_conv_bn: false,
                ..Dispatch::default()
            },
        ),
        (
            "gemm crate",
            Dispatch {
                direct_conv: false,
                fused_conv_bn: false,
                own_gemm: false,
                ..Dispatch::default()
            },
        ),
        (
            "avx2",
            Dispatch {
                simd: resblock_core::ops::Simd::Avx2,
                ..Dispatch::default()
            },
        ),
        (
            "portable",
            Dispatch {
                simd: resblock_core::ops::Simd::Portable,
                ..Dispatch::default()
            },
        ),
    ];
    for (name, d) in paths {
        let got = run(d, &x, &r, &g)?;
        let whats = ["y", "dx", "dw", "running mean", "block end"];
        assert_agree(name, &whats, &got, &want)?;
    }
    // Where AVX-512 runs, on `conv/lanes` (fused and not): a stride-2 layer with 32 output
    // channels on an even input (its forward); a stride-1 one from 32 input channels (its
    // input gradient), and one to 32 output channels (its forward); a 16-channel one (both,
    // on AVX-512's 16-channel tile and on AVX2's). Elsewhere, and with `channel_lanes` off,
    // on the direct plans.
    let layers = [
        ((5, 10, 8), (32, 2), (5, 4)),
        ((32, 6, 5), (8, 1), (6, 5)),
        ((5, 7, 9), (32, 1), (7, 9)),
        ((16, 6, 7), (16, 1), (6, 7)),
    ];
    let paths = [
        ("default", Dispatch::default()),
        (
            "unfused",
            Dispatch {
                fused_conv_bn: false,
                ..Dispatch::default()
            },
        ),
        (
            "no channel_lanes",
            Dispatch {
                channel_lanes: false,
                ..Dispatch::default()
            },
        ),
        (
            "unfused, no channel_lanes",
            Dispatch {
                channel_lanes: false,
                fused_conv_bn: false,
                ..Dispatch::default()
            },
        ),
    ];
    for ((cin, h, w), (cout, stride), (oh, ow)) in layers {
        let xs = rng.normal_tensor((3, cin, h, w), 0., 1., DType::F32, &Device::Cpu)?;
        let gs = rng.normal_tensor((3, cout, oh, ow), 0., 1., DType::F32, &Device::Cpu)?;
        let want = run_layer(candle, (cout, stride), &xs, &gs)?;
        for (name, d) in paths {
            let got = run_layer(d, (cout, stride), &xs, &gs)?;
            let label = format!("{cin}->{cout} stride {stride}, {name}");
            assert_agree(&label, &["y", "dx", "dw"], &got, &want)?;
        }
    }
    dispatch::set(Dispatch::default());

    // Eval mode: parameters are constants, so a VarMap-built layer records no graph, and
    // the fused epilogue gives the composed value.
    let l = layer()?;
    let y = l.forward_t(&x, false)?;
    assert!(!y.track_op(), "eval mode recorded a backprop graph");
    let bn = l.norm().expect("bn");
    let composed = bn.forward_t(&candle_core::Module::forward(l.conv(), &x)?, false)?;
    assert!(max_diff(&y, &composed)? < 1e-5);
    Ok(())
}

/// Folding freezes the kernel (its derived forms kept for inference) and leaves the trained
/// layer's kernel a variable; the folded layer gives the eval output.
#[test]
fn folding_freezes_the_kernel_and_keeps_the_eval_output() -> Result<()> {
    let layer = layer()?;
    let folded = layer.folded()?;
    assert!(folded.conv().is_frozen());
    assert!(!layer.conv().is_frozen());
    assert!(layer.conv().weight().is_variable());
    let x = RngHandle::seed_from_u64(4).normal_tensor(
        (2, 5, 7, 7),
        0.,
        1.,
        DType::F32,
        &Device::Cpu,
    )?;
    let d = max_diff(&folded.forward_t(&x, false)?, &layer.forward_t(&x, false)?)?;
    assert!(d < 1e-5, "folded vs eval: {d}");
    Ok(())
}

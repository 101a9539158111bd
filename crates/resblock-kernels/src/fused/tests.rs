//! The whole-block op (identity and zero-pad shortcuts) against the conv-BN ops (and the
//! zero-pad shortcut op) it replaces: output, statistics and every gradient, with and
//! without an input gradient; a run of blocks as one op against one op per block; and where
//! they do not apply.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::*;

fn values(shape: &[usize], seed: usize, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("test tensor")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

/// Asserts that each pair of batch statistics agrees: means and variances within f64
/// rounding, the same count.
fn assert_same_stats<'a>(
    what: &str,
    pairs: impl Iterator<Item = (&'a BatchStats, &'a BatchStats)>,
) {
    for (got, want) in pairs {
        let values = got.mean.iter().zip(&want.mean);
        for (a, b) in values.chain(got.var.iter().zip(&want.var)) {
            assert!((a - b).abs() < 1e-9, "{what}: statistics {a} against {b}");
        }
        assert_eq!(got.count, want.count, "{what}: count");
    }
}

/// Asserts that two backward passes give each of `tensors` a gradient, the same within
/// `tol` relative to the larger of 1 and the wanted gradient's largest magnitude.
fn assert_same_grads(
    what: &str,
    (got, want): (&GradStore, &GradStore),
    tensors: &[&Tensor],
    tol: f32,
) -> Result<()> {
    for (i, t) in tensors.iter().enumerate() {
        let (a, b) = (got.get(t), want.get(t));
        let (a, b) = (a.expect("gradient"), b.expect("gradient"));
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        let e = max_diff(a, b) / scale;
        assert!(e < tol, "{what}: gradient {i} differs by {e}");
    }
    Ok(())
}

/// Runs the fused block (with the option-A `shortcut` when given) and the separate ops it
/// replaces on `x`, and checks the output, the statistics and the gradients (of the
/// parameters `p`, and of `x` exactly when `input_grad`) agree within f32 rounding; returns
/// the fused block's output.
fn check_block(
    what: &str,
    (x, input_grad): (&Tensor, bool),
    (l1, l2): (Layer<'_>, Layer<'_>),
    shortcut: Option<crate::shortcut::zero_pad::ZeroPad>,
    p: &[Var],
) -> Result<Tensor> {
    let (y, stats) = fused_block(x, l1, l2, shortcut)?.expect("the block fuses");
    let dy = values(y.dims(), 7, 1.0);
    let grads = (&y * &dy)?.sum_all()?.backward()?;

    let (mid, s1) = conv_batch_norm_train(x, l1.0, l1.1, l1.2, l1.3, l1.4, true)?;
    let res = match shortcut {
        Some(z) => crate::zero_pad_shortcut(x, z.stride, z.front, z.back)?,
        None => x.clone(),
    };
    let (want, s2) = conv_batch_norm_add_relu_train(&mid, l2.0, l2.1, l2.2, l2.3, l2.4, &res)?;
    let want_grads = (&want * &dy)?.sum_all()?.backward()?;

    assert!(max_diff(&y, &want) < 1e-5, "{what}: output");
    assert_same_stats(what, stats.iter().zip(&[s1, s2]));
    assert_eq!(grads.get(x).is_some(), input_grad, "{what}: input gradient");
    let mut wanted: Vec<&Tensor> = p.iter().map(Var::as_tensor).collect();
    if input_grad {
        wanted.push(x);
    }
    assert_same_grads(what, (&grads, &want_grads), &wanted, 1e-4)?;
    Ok(y)
}

/// A block's parameters: `[k1, w1, b1, k2, w2, b2]` for `c` channels.
fn params(c: usize) -> Vec<Var> {
    let kernel = |seed| Var::from_tensor(&values(&[c, c, 3, 3], seed, 0.3)).expect("var");
    let vector = |seed, base: f32| {
        Var::from_tensor(&(values(&[c], seed, 0.2) + f64::from(base)).expect("add")).expect("var")
    };
    vec![
        kernel(1),
        vector(2, 1.0),
        vector(3, 0.0),
        kernel(4),
        vector(5, 1.0),
        vector(6, 0.0),
    ]
}

fn layers(p: &[Var]) -> (Layer<'_>, Layer<'_>) {
    let geom = (1, 1, 1, 1);
    (
        (
            p[0].as_tensor(),
            geom,
            p[1].as_tensor(),
            p[2].as_tensor(),
            1e-5,
        ),
        (
            p[3].as_tensor(),
            geom,
            p[4].as_tensor(),
            p[5].as_tensor(),
            1e-5,
        ),
    )
}

/// A downsampling block's parameters `[k1, w1, b1, k2, w2, b2]` from `c` to `cout`
/// channels, seeded from `seed + 1` on.
fn down_params(c: usize, cout: usize, seed: usize) -> Vec<Var> {
    let vector = |s, base: f32| {
        Var::from_tensor(&(values(&[cout], seed + s, 0.2) + f64::from(base)).expect("add"))
            .expect("var")
    };
    let kernel =
        |s, cin| Var::from_tensor(&values(&[cout, cin, 3, 3], seed + s, 0.3)).expect("var");
    vec![
        kernel(1, c),
        vector(2, 1.0),
        vector(3, 0.0),
        kernel(4, cout),
        vector(5, 1.0),
        vector(6, 0.0),
    ]
}

/// The layers of [`down_params`]: the first at stride 2.
fn down_layers(p: &[Var]) -> (Layer<'_>, Layer<'_>) {
    let (l1, l2) = layers(p);
    ((l1.0, (1, 2, 1, 1), l1.2, l1.3, l1.4), l2)
}

#[test]
fn one_op_block_matches_two_conv_bn_ops() -> Result<()> {
    if crate::conv::direct::Isa::detect().is_none() {
        // No direct kernels on this CPU: the fused ops do not apply.
        return Ok(());
    }
    // Direct kernels (the residual's gradient added as dx is written) and, at 64 channels
    // and 3 x 49 tiles, Winograd (added after).
    let cases = [(6, [3, 6, 7, 9], false), (64, [3, 64, 14, 14], true)];
    for ((c, shape, winograd), input_grad) in cases
        .into_iter()
        .flat_map(|case| [(case, true), (case, false)])
    {
        let p = params(c);
        let x = Var::from_tensor(&values(&shape, 8, 1.0))?;
        let x = if input_grad {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let (l1, l2) = layers(&p);
        let g = crate::conv::geom::ConvGeom {
            padding: 1,
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        let d = crate::conv::geom::Dims::new(&g, &shape, &[c, c, 3, 3]).expect("dims");
        crate::conv::winograd::force_for_tests();
        assert_eq!(
            crate::conv::winograd::applies(&d, &g),
            winograd,
            "{shape:?}"
        );
        let what = format!("identity block, {shape:?}, input_grad {input_grad}");
        check_block(&what, (&x, input_grad), (l1, l2), None, &p)?;
    }
    Ok(())
}

/// A 64-channel conv + BN layer with enough tiles runs on Winograd inside the fused op:
/// output, statistics and every gradient against the convolution and the norm as two ops.
#[test]
fn winograd_conv_bn_matches_two_ops() -> Result<()> {
    crate::conv::winograd::force_for_tests();
    let (c, shape) = (64, [2, 64, 14, 15]);
    let geom_t = (1, 1, 1, 1);
    let probe = conv_bn::ConvBnTrain::new(
        &shape,
        &[c, c, 3, 3],
        geom(geom_t),
        1e-5,
        true,
        Arc::new(OnceLock::new()),
    );
    let Some(probe) = probe else {
        // No direct kernels on this CPU: the fused ops do not apply.
        return Ok(());
    };
    assert!(probe.on_winograd());
    let kernel = Var::from_tensor(&values(&[c, c, 3, 3], 1, 0.1))?;
    let gamma = Var::from_tensor(&(values(&[c], 2, 0.2) + 1.0)?)?;
    let beta = Var::from_tensor(&values(&[c], 3, 0.2))?;
    let x = Var::from_tensor(&values(&shape, 4, 1.0))?;
    let dy = values(&shape, 5, 1.0);
    let (kt, gt, bt, xt) = (
        kernel.as_tensor(),
        gamma.as_tensor(),
        beta.as_tensor(),
        x.as_tensor(),
    );
    let (y, stats) = conv_batch_norm_train(xt, kt, geom_t, gt, bt, 1e-5, true)?;
    let grads = (&y * &dy)?.sum_all()?.backward()?;
    let conv = crate::conv::conv2d(xt, kt, 1, 1, 1, 1)?;
    let (want, want_stats) = crate::norm::batch_norm_train(&conv, gt, bt, 1e-5, true)?;
    let want_grads = (&want * &dy)?.sum_all()?.backward()?;
    assert!(max_diff(&y, &want) < 1e-4, "output");
    for (a, b) in stats.mean.iter().zip(&want_stats.mean) {
        assert!((a - b).abs() < 1e-6, "mean {a} against {b}");
    }
    for (i, t) in [kt, gt, bt, xt].into_iter().enumerate() {
        let (a, b) = (grads.get(t), want_grads.get(t));
        let (a, b) = (a.expect("gradient"), b.expect("gradient"));
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        let e = max_diff(a, b) / scale;
        assert!(e < 1e-4, "gradient {i} differs by {e}");
    }
    Ok(())
}

#[test]
fn blocks_that_change_the_shape_are_not_one_op() -> Result<()> {
    let p = params(6);
    let (l1, l2) = layers(&p);
    // A stride-2 first layer halves the size: no identity shortcut.
    let strided = (l1.0, (1, 2, 1, 1), l1.2, l1.3, l1.4);
    let x = values(&[2, 6, 8, 8], 9, 1.0);
    assert!(fused_block(&x, strided, l2, None)?.is_none());
    // f64 runs on the separate ops.
    let x64 = x.to_dtype(DType::F64)?;
    assert!(fused_block(&x64, l1, l2, None)?.is_none());
    // And the public entry point says what is wrong with such a block.
    assert!(basic_block_train(&x, strided, l2).is_err());
    Ok(())
}

/// A downsampling block with the option-A shortcut as one op, against the conv-BN ops and
/// the zero-pad shortcut it replaces: output, statistics and every gradient (the input's
/// too, whose two parts are the first convolution's and the shortcut's); odd and even
/// sides, with and without an input gradient.
#[test]
fn zero_pad_block_matches_the_separate_ops() -> Result<()> {
    if crate::conv::direct::Isa::detect().is_none() {
        return Ok(());
    }
    let front = 3;
    // 32 output channels on an even side: the first convolution's forward on
    // `conv/lanes` (where AVX-512 or AVX2 runs); the others on the polyphase plan.
    for (c, cout, side, input_grad) in [
        (6, 12, 8usize, true),
        (6, 12, 9, true),
        (6, 12, 8, false),
        (5, 32, 10, true),
    ] {
        let shape = [3, c, side, side];
        let out = side.div_ceil(2);
        let p = down_params(c, cout, 0);
        let (l1, l2) = down_layers(&p);
        let xv = Var::from_tensor(&values(&shape, 8, 1.0))?;
        let x = if input_grad {
            xv.as_tensor().clone()
        } else {
            xv.as_tensor().detach()
        };
        let zp = crate::shortcut::zero_pad::ZeroPad {
            stride: 2,
            front,
            back: cout - c - front,
        };
        let what = format!("zero-pad block {c}->{cout}, side {side}, input_grad {input_grad}");
        let y = check_block(&what, (&x, input_grad), (l1, l2), Some(zp), &p)?;
        assert_eq!(y.dims(), [3, cout, out, out]);
        // The public entry point takes the fused op too, with the same output.
        let (y2, _) = zero_pad_block_train(&x, l1, l2, (2, zp.front, zp.back))?;
        assert!(max_diff(&y2, &y) < 1e-6);
    }
    Ok(())
}

/// A run of blocks as one op (identity, option-A downsampling, identity) against the same
/// blocks as one op each: output, every block's statistics and every gradient, with and
/// without an input gradient; and an empty or mislinked run does not fuse.
#[test]
fn block_chain_matches_one_op_per_block() -> Result<()> {
    if crate::conv::direct::Isa::detect().is_none() {
        return Ok(());
    }
    let (c, cout) = (6, 12);
    let narrow = params(c);
    let wide = params(cout);
    let down = down_params(c, cout, 10);
    let (n1, n2) = layers(&narrow);
    let (w1, w2) = layers(&wide);
    let (d1, d2) = down_layers(&down);
    let zp = (2, 2, cout - c - 2);
    let blocks = [
        ChainBlock {
            first: n1,
            second: n2,
            zero_pad: None,
        },
        ChainBlock {
            first: d1,
            second: d2,
            zero_pad: Some(zp),
        },
        ChainBlock {
            first: w1,
            second: w2,
            zero_pad: None,
        },
    ];
    for input_grad in [true, false] {
        let what = format!("chain, input_grad {input_grad}");
        let xv = Var::from_tensor(&values(&[3, c, 9, 9], 8, 1.0))?;
        let x = if input_grad {
            xv.as_tensor().clone()
        } else {
            xv.as_tensor().detach()
        };
        let (y, _, stats) = fused_chain(&x, None, &blocks)?.expect("the chain fuses");
        assert_eq!(y.dims(), [3, cout, 5, 5]);
        let dy = values(y.dims(), 7, 1.0);
        let grads = (&y * &dy)?.sum_all()?.backward()?;

        let mut h = x.clone();
        let mut want_stats = Vec::new();
        for b in &blocks {
            let (out, s) = fused_block(
                &h,
                b.first,
                b.second,
                b.zero_pad
                    .map(|(stride, front, back)| crate::shortcut::zero_pad::ZeroPad {
                        stride,
                        front,
                        back,
                    }),
            )?
            .expect("the block fuses");
            h = out;
            want_stats.extend(s);
        }
        let want_grads = (&h * &dy)?.sum_all()?.backward()?;
        assert!(max_diff(&y, &h) < 1e-5, "{what}: output");
        assert_same_stats(&what, stats.iter().flatten().zip(&want_stats));
        assert_eq!(stats.len(), 3);
        assert_eq!(
            grads.get(&x).is_some(),
            input_grad,
            "{what}: input gradient"
        );
        let mut wanted: Vec<&Tensor> = narrow
            .iter()
            .chain(&down)
            .chain(&wide)
            .map(Var::as_tensor)
            .collect();
        if input_grad {
            wanted.push(&x);
        }
        assert_same_grads(&what, (&grads, &want_grads), &wanted, 1e-5)?;
        // The public entry point takes the fused op, with the same output.
        let (y2, _) = basic_block_chain_train(&x, &blocks)?;
        assert!(max_diff(&y2, &y) < 1e-6);
    }
    let x = values(&[3, c, 9, 9], 8, 1.0);
    assert!(fused_chain(&x, None, &[])?.is_none());
    // The wide block cannot take the narrow input first.
    assert!(fused_chain(&x, None, &[blocks[2], blocks[0]])?.is_none());
    assert!(basic_block_chain_train(&x, &[blocks[2]]).is_err());
    Ok(())
}

/// A chain with a lead conv + norm + ReLU layer (a CIFAR stem) against that layer's op
/// followed by the chain's op: output, every statistic and every gradient, with and without
/// an input gradient.
#[test]
fn lead_layer_joins_the_chain() -> Result<()> {
    if crate::conv::direct::Isa::detect().is_none() {
        return Ok(());
    }
    let (cin, c, cout) = (3, 6, 12);
    let stem = down_params(cin, c, 30);
    let lead: Layer<'_> = (
        stem[0].as_tensor(),
        (1, 1, 1, 1),
        stem[1].as_tensor(),
        stem[2].as_tensor(),
        1e-5,
    );
    let narrow = params(c);
    let down = down_params(c, cout, 10);
    let wide = params(cout);
    let ((n1, n2), (d1, d2), (w1, w2)) = (layers(&narrow), down_layers(&down), layers(&wide));
    let chain_block = |(first, second), zero_pad| ChainBlock {
        first,
        second,
        zero_pad,
    };
    // The down block's output feeds the wide block's padded first layer; the lead's output,
    // the narrow block's.
    let blocks = [
        chain_block((n1, n2), None),
        chain_block((d1, d2), Some((2, 2, cout - c - 2))),
        chain_block((w1, w2), None),
    ];
    for input_grad in [true, false] {
        let what = format!("lead and chain, input_grad {input_grad}");
        let xv = Var::from_tensor(&values(&[3, cin, 9, 9], 8, 1.0))?;
        let x = if input_grad {
            xv.as_tensor().clone()
        } else {
            xv.as_tensor().detach()
        };
        let (y, s, stats) = conv_bn_relu_chain_train(&x, lead, &blocks)?;
        assert_eq!(y.dims(), [3, cout, 5, 5]);
        let dy = values(y.dims(), 7, 1.0);
        let grads = (&y * &dy)?.sum_all()?.backward()?;

        let (h, want_s) = conv_batch_norm_train(&x, lead.0, lead.1, lead.2, lead.3, lead.4, true)?;
        let (want, want_stats) = basic_block_chain_train(&h, &blocks)?;
        let want_grads = (&want * &dy)?.sum_all()?.backward()?;
        assert!(max_diff(&y, &want) < 1e-5, "{what}: output");
        assert_same_stats(&what, std::iter::once((&s, &want_s)));
        assert_same_stats(
            &what,
            stats.iter().flatten().zip(want_stats.iter().flatten()),
        );
        assert_eq!(stats.len(), 3);
        assert_eq!(
            grads.get(&x).is_some(),
            input_grad,
            "{what}: input gradient"
        );
        let mut wanted: Vec<&Tensor> = stem[..3]
            .iter()
            .chain(&narrow)
            .chain(&down)
            .chain(&wide)
            .map(Var::as_tensor)
            .collect();
        if input_grad {
            wanted.push(&x);
        }
        assert_same_grads(&what, (&grads, &want_grads), &wanted, 1e-5)?;
    }
    // A lead layer whose output is not the first block's input does not fuse.
    let x = values(&[3, cin, 9, 9], 8, 1.0);
    assert!(fused_chain(&x, Some(lead), &blocks[2..])?.is_none());
    Ok(())
}

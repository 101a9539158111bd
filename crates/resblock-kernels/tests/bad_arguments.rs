//! Bad convolution arguments are the crate's error, never a panic, on every path (ours and
//! Candle's): zero stride/dilation/groups, empty or wrongly ranked tensors, channels that
//! do not fit the groups, kernels larger than the padded input, wrong gradient shapes.

use candle_core::{DType, Device, Tensor};
use resblock_kernels::{
    conv2d, conv2d_backward, conv2d_candle, conv2d_fused, conv2d_scale_shift, Error,
};
use resblock_kernels::{set_kernels, Kernels};

fn t(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, DType::F32, &Device::Cpu).expect("zeros")
}

/// (input, kernel, padding, stride, dilation, groups, what the message names)
type Case = (
    Vec<usize>,
    Vec<usize>,
    usize,
    usize,
    usize,
    usize,
    &'static str,
);

fn cases() -> Vec<Case> {
    vec![
        (
            vec![1, 3, 8, 8],
            vec![4, 3, 3, 3],
            1,
            0,
            1,
            1,
            "stride must be at least 1",
        ),
        (
            vec![1, 3, 8, 8],
            vec![4, 3, 3, 3],
            1,
            1,
            0,
            1,
            "dilation must be at least 1",
        ),
        (
            vec![1, 3, 8, 8],
            vec![4, 3, 3, 3],
            1,
            1,
            1,
            0,
            "groups must be at least 1",
        ),
        (
            vec![1, 0, 8, 8],
            vec![4, 0, 3, 3],
            1,
            1,
            1,
            1,
            "C, H, W > 0",
        ),
        (
            vec![1, 3, 8, 8],
            vec![0, 3, 3, 3],
            1,
            1,
            1,
            1,
            "no empty dimension",
        ),
        (
            vec![1, 3, 8, 8],
            vec![4, 3, 0, 3],
            1,
            1,
            1,
            1,
            "no empty dimension",
        ),
        (
            vec![3, 8, 8],
            vec![4, 3, 3, 3],
            1,
            1,
            1,
            1,
            "4-D (N, C, H, W) input",
        ),
        (vec![1, 3, 8, 8], vec![4, 2, 3, 3], 1, 1, 1, 1, "channels"),
        (vec![1, 4, 8, 8], vec![3, 2, 3, 3], 1, 1, 1, 2, "per group"),
        (
            vec![1, 3, 4, 4],
            vec![4, 3, 7, 7],
            1,
            1,
            1,
            1,
            "kernel's extent 7",
        ),
        (
            vec![1, 3, 8, 8],
            vec![4, 3, 3, 3],
            0,
            1,
            5,
            1,
            "kernel's extent 11",
        ),
    ]
}

#[test]
fn every_conv_entry_point_refuses_bad_arguments_with_an_error() {
    for kernels in [Kernels::Native, Kernels::Candle] {
        set_kernels(kernels);
        for (xs, ks, p, s, d, g, says) in cases() {
            let (x, k) = (t(&xs), t(&ks));
            let c_out = ks[0];
            let (scale, shift) = (t(&[c_out]), t(&[c_out]));
            let results: Vec<(&str, Result<(), Error>)> = vec![
                ("conv2d", conv2d(&x, &k, p, s, d, g).map(|_| ())),
                (
                    "conv2d_candle",
                    conv2d_candle(&x, &k, p, s, d, g).map(|_| ()),
                ),
                (
                    "conv2d_fused",
                    conv2d_fused(&x, &k, None, true, p, s, d, g).map(|_| ()),
                ),
                (
                    "conv2d_scale_shift",
                    conv2d_scale_shift(&x, &k, (&scale, &shift), false, p, s, d, g).map(|_| ()),
                ),
                (
                    "conv2d_backward",
                    conv2d_backward(&x, &k, &t(&[1, 1, 1, 1]), p, s, d, g).map(|_| ()),
                ),
            ];
            for (op, r) in results {
                let e = r.expect_err(op);
                assert!(
                    e.to_string().contains(says),
                    "{kernels:?} {op} {xs:?} {ks:?}: {e}"
                );
            }
        }
    }
}

#[test]
fn a_wrong_output_gradient_is_named() {
    let e = conv2d_backward(
        &t(&[1, 3, 8, 8]),
        &t(&[4, 3, 3, 3]),
        &t(&[1, 4, 7, 7]),
        1,
        1,
        1,
        1,
    )
    .expect_err("shape");
    assert!(e.to_string().contains("[1, 4, 8, 8]"), "{e}");
}

//! Beyond convolutions (`bad_arguments.rs`): every other public op of the crate, given
//! bad arguments on both kernel paths (ours and Candle's), returns the crate's error and
//! never panics; forward and, where it runs, backward. Shapes that are merely empty
//! (a batch of 0) are valid and give empty results.

use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::{DType, Device, Tensor, Var};
use resblock_kernels::{
    add_relu, batch_norm_add_relu_train, batch_norm_train, batch_norm_train_candle,
    conv_batch_norm_add_relu_train, conv_batch_norm_train, max_pool2d, max_pool2d_generic,
    set_kernels, subsample2d, zero_pad_shortcut, Kernels, Pool2dConfig,
};

fn t(dims: &[usize]) -> Tensor {
    Tensor::ones(dims, DType::F32, &Device::Cpu).expect("ones")
}

type Op = Box<dyn Fn() -> Result<(), String>>;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<(), String> {
    r.map(drop).map_err(|e| e.to_string())
}

/// Forward, then a backward through the output's sum where the forward worked.
fn with_backward(x: &Var, f: impl Fn(&Tensor) -> Result<Tensor, String>) -> Result<(), String> {
    let y = f(x.as_tensor())?;
    ok(y.sum_all().and_then(|s| s.backward()))
}

/// (what, op, must it fail)
fn cases() -> Vec<(&'static str, Op, bool)> {
    let geom = (1, 1, 1, 1);
    vec![
        (
            "add_relu shapes",
            Box::new(|| ok(add_relu(&t(&[2, 3]), &t(&[3, 2])))),
            true,
        ),
        (
            "add_relu dtypes",
            Box::new(|| {
                ok(add_relu(
                    &t(&[2, 3]),
                    &t(&[2, 3]).to_dtype(DType::F64).expect("f64"),
                ))
            }),
            true,
        ),
        (
            "add_relu empty",
            Box::new(|| ok(add_relu(&t(&[0, 3]), &t(&[0, 3])))),
            false,
        ),
        (
            "batch_norm_add_relu residual shape",
            Box::new(|| {
                ok(batch_norm_add_relu_train(
                    &t(&[2, 3, 4, 4]),
                    &t(&[3]),
                    &t(&[3]),
                    1e-5,
                    &t(&[2, 3, 4, 5]),
                ))
            }),
            true,
        ),
        (
            "batch_norm_add_relu one value per channel",
            Box::new(|| {
                ok(batch_norm_add_relu_train(
                    &t(&[1, 3, 1, 1]),
                    &t(&[3]),
                    &t(&[3]),
                    1e-5,
                    &t(&[1, 3, 1, 1]),
                ))
            }),
            true,
        ),
        (
            "batch_norm_add_relu forward and backward",
            Box::new(|| {
                let x = Var::from_tensor(&t(&[2, 3, 4, 4])).map_err(|e| e.to_string())?;
                with_backward(&x, |x| {
                    batch_norm_add_relu_train(x, &t(&[3]), &t(&[3]), 1e-5, &t(&[2, 3, 4, 4]))
                        .map(|(y, _)| y)
                        .map_err(|e| e.to_string())
                })
            }),
            false,
        ),
        (
            "batch_norm rank 1",
            Box::new(|| ok(batch_norm_train(&t(&[4]), &t(&[4]), &t(&[4]), 1e-5, false))),
            true,
        ),
        (
            "batch_norm weight",
            Box::new(|| {
                ok(batch_norm_train(
                    &t(&[2, 3, 2, 2]),
                    &t(&[4]),
                    &t(&[3]),
                    1e-5,
                    true,
                ))
            }),
            true,
        ),
        (
            "batch_norm bias",
            Box::new(|| {
                ok(batch_norm_train(
                    &t(&[2, 3, 2, 2]),
                    &t(&[3]),
                    &t(&[3, 1]),
                    1e-5,
                    true,
                ))
            }),
            true,
        ),
        (
            "batch_norm one value",
            Box::new(|| {
                ok(batch_norm_train(
                    &t(&[1, 3, 1, 1]),
                    &t(&[3]),
                    &t(&[3]),
                    1e-5,
                    false,
                ))
            }),
            true,
        ),
        (
            "batch_norm empty batch",
            Box::new(|| {
                ok(batch_norm_train(
                    &t(&[0, 3, 2, 2]),
                    &t(&[3]),
                    &t(&[3]),
                    1e-5,
                    false,
                ))
            }),
            true,
        ),
        (
            "batch_norm zero channels",
            Box::new(|| {
                ok(batch_norm_train(
                    &t(&[2, 0, 2, 2]),
                    &t(&[0]),
                    &t(&[0]),
                    1e-5,
                    false,
                ))
            }),
            true,
        ),
        (
            "batch_norm_candle weight",
            Box::new(|| {
                ok(batch_norm_train_candle(
                    &t(&[2, 3, 2, 2]),
                    &t(&[2]),
                    &t(&[3]),
                    1e-5,
                    false,
                ))
            }),
            true,
        ),
        (
            "batch_norm backward",
            Box::new(|| {
                let x = Var::from_tensor(&t(&[2, 3, 2, 2])).expect("var");
                with_backward(&x, |x| {
                    ok(batch_norm_train(x, &t(&[3]), &t(&[3]), 1e-5, true)).and_then(|_| {
                        batch_norm_train(x, &t(&[3]), &t(&[3]), 1e-5, true)
                            .map(|o| o.0)
                            .map_err(|e| e.to_string())
                    })
                })
            }),
            false,
        ),
        (
            "max_pool rank 3",
            Box::new(|| ok(max_pool2d(&t(&[1, 4, 4]), Pool2dConfig::new(2, 2, 0)))),
            true,
        ),
        (
            "max_pool kernel 0",
            Box::new(|| ok(max_pool2d(&t(&[1, 1, 4, 4]), Pool2dConfig::new(0, 1, 0)))),
            true,
        ),
        (
            "max_pool stride 0",
            Box::new(|| ok(max_pool2d(&t(&[1, 1, 4, 4]), Pool2dConfig::new(2, 0, 0)))),
            true,
        ),
        (
            "max_pool padding",
            Box::new(|| ok(max_pool2d(&t(&[1, 1, 4, 4]), Pool2dConfig::new(2, 1, 2)))),
            true,
        ),
        (
            "max_pool window",
            Box::new(|| ok(max_pool2d(&t(&[1, 1, 2, 2]), Pool2dConfig::new(5, 1, 1)))),
            true,
        ),
        (
            "max_pool generic window",
            Box::new(|| {
                ok(max_pool2d_generic(
                    &t(&[1, 1, 2, 2]),
                    Pool2dConfig::new(5, 1, 1),
                ))
            }),
            true,
        ),
        (
            "max_pool empty batch",
            Box::new(|| ok(max_pool2d(&t(&[0, 2, 4, 4]), Pool2dConfig::new(3, 2, 1)))),
            false,
        ),
        (
            "max_pool zero channels",
            Box::new(|| ok(max_pool2d(&t(&[1, 0, 4, 4]), Pool2dConfig::new(3, 2, 1)))),
            false,
        ),
        (
            "max_pool backward",
            Box::new(|| {
                let x = Var::from_tensor(&t(&[1, 2, 5, 5])).expect("var");
                with_backward(&x, |x| {
                    ok(max_pool2d(x, Pool2dConfig::new(3, 2, 1))).and_then(|_| {
                        max_pool2d(x, Pool2dConfig::new(3, 2, 1)).map_err(|e| e.to_string())
                    })
                })
            }),
            false,
        ),
        (
            "subsample rank 2",
            Box::new(|| ok(subsample2d(&t(&[4, 4]), 2, 2))),
            true,
        ),
        (
            "subsample stride 0",
            Box::new(|| ok(subsample2d(&t(&[1, 1, 4, 4]), 0, 2))),
            true,
        ),
        (
            "subsample empty",
            Box::new(|| ok(subsample2d(&t(&[1, 1, 0, 4]), 2, 2))),
            false,
        ),
        (
            "zero_pad rank 3",
            Box::new(|| ok(zero_pad_shortcut(&t(&[1, 4, 4]), 2, 1, 1))),
            true,
        ),
        (
            "zero_pad stride 0",
            Box::new(|| ok(zero_pad_shortcut(&t(&[1, 1, 4, 4]), 0, 1, 1))),
            true,
        ),
        (
            "zero_pad empty",
            Box::new(|| ok(zero_pad_shortcut(&t(&[0, 1, 4, 4]), 2, 1, 1))),
            false,
        ),
        (
            "conv_bn stride 0",
            Box::new(move || {
                ok(conv_batch_norm_train(
                    &t(&[2, 3, 4, 4]),
                    &t(&[4, 3, 3, 3]),
                    (1, 0, 1, 1),
                    &t(&[4]),
                    &t(&[4]),
                    1e-5,
                    true,
                ))
            }),
            true,
        ),
        (
            "conv_bn weight",
            Box::new(move || {
                ok(conv_batch_norm_train(
                    &t(&[2, 3, 4, 4]),
                    &t(&[4, 3, 3, 3]),
                    geom,
                    &t(&[3]),
                    &t(&[4]),
                    1e-5,
                    true,
                ))
            }),
            true,
        ),
        (
            "conv_bn channels",
            Box::new(move || {
                ok(conv_batch_norm_train(
                    &t(&[2, 2, 4, 4]),
                    &t(&[4, 3, 3, 3]),
                    geom,
                    &t(&[4]),
                    &t(&[4]),
                    1e-5,
                    true,
                ))
            }),
            true,
        ),
        (
            "conv_bn_add residual",
            Box::new(move || {
                ok(conv_batch_norm_add_relu_train(
                    &t(&[2, 3, 4, 4]),
                    &t(&[4, 3, 3, 3]),
                    geom,
                    &t(&[4]),
                    &t(&[4]),
                    1e-5,
                    &t(&[2, 4, 4, 3]),
                ))
            }),
            true,
        ),
        (
            "conv_bn_add residual dtype",
            Box::new(move || {
                ok(conv_batch_norm_add_relu_train(
                    &t(&[2, 3, 4, 4]),
                    &t(&[4, 3, 3, 3]),
                    geom,
                    &t(&[4]),
                    &t(&[4]),
                    1e-5,
                    &t(&[2, 4, 4, 4]).to_dtype(DType::F64).expect("f64"),
                ))
            }),
            true,
        ),
        (
            "conv_bn_add ok",
            Box::new(move || {
                ok(conv_batch_norm_add_relu_train(
                    &t(&[2, 3, 4, 4]),
                    &t(&[4, 3, 3, 3]),
                    geom,
                    &t(&[4]),
                    &t(&[4]),
                    1e-5,
                    &t(&[2, 4, 4, 4]),
                ))
            }),
            false,
        ),
    ]
}

#[test]
fn every_op_returns_errors_for_bad_arguments_never_panics() {
    let mut problems = Vec::new();
    for kernels in [Kernels::Native, Kernels::Candle] {
        set_kernels(kernels);
        for (what, op, must_fail) in cases() {
            match catch_unwind(AssertUnwindSafe(&op)) {
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    problems.push(format!("{kernels:?} {what}: panicked: {msg}"));
                }
                Ok(Ok(())) if must_fail => problems.push(format!("{kernels:?} {what}: accepted")),
                Ok(Err(e)) if !must_fail => {
                    problems.push(format!("{kernels:?} {what}: refused: {e}"))
                }
                Ok(Err(e)) if e.trim().is_empty() => {
                    problems.push(format!("{kernels:?} {what}: empty error"))
                }
                _ => {}
            }
        }
    }
    set_kernels(Kernels::Native);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

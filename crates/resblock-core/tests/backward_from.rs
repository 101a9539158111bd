//! `backward_from(y, dy)` against the stand-in it replaces, `(y * dy).sum().backward()`:
//! the same gradients for every variable, in f32 and f64, through our own ops (a fused
//! convolution and the training BatchNorm) and Candle's; a mismatched `dy` is an error.

use candle_core::{DType, Device, Tensor, Var};
use resblock_core::ops::{batch_norm_train, conv2d};
use resblock_core::{backward_from, RngHandle};

fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    RngHandle::seed_from_u64(seed)
        .normal_tensor(shape, 0., 1., dtype, &Device::Cpu)
        .expect("randn")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("diff")
}

#[test]
fn gives_the_gradients_of_the_weighted_sum() {
    for dtype in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&randn(&[2, 3, 6, 6], 1, dtype)).expect("x");
        let w = Var::from_tensor(&randn(&[4, 3, 3, 3], 2, dtype)).expect("w");
        let g = Var::from_tensor(&randn(&[4], 3, dtype)).expect("g");
        let b = Var::from_tensor(&randn(&[4], 4, dtype)).expect("b");
        let forward = || {
            let h = conv2d(x.as_tensor(), w.as_tensor(), 1, 1, 1, 1).expect("conv");
            let (y, _) =
                batch_norm_train(&h, g.as_tensor(), b.as_tensor(), 1e-5, true).expect("bn");
            // And a Candle op after ours.
            (y * 1.5).expect("scale")
        };
        let y = forward();
        let dy = randn(y.dims(), 5, dtype);
        let got = backward_from(&y, &dy).expect("backward_from");
        let want = (forward() * &dy)
            .and_then(|p| p.sum_all())
            .and_then(|s| s.backward())
            .expect("product backward");
        for (name, v) in [("x", &x), ("w", &w), ("g", &g), ("b", &b)] {
            let (a, e) = (got.get(v.as_tensor()), want.get(v.as_tensor()));
            let (a, e) = (a.expect(name), e.expect(name));
            let tol = if dtype == DType::F32 { 1e-4 } else { 1e-12 };
            let scale = max_diff(e, &e.zeros_like().expect("zeros")).max(1.);
            assert!(
                max_diff(a, e) <= tol * scale,
                "{dtype:?} d{name}: off by {}",
                max_diff(a, e)
            );
        }
    }
}

#[test]
fn a_mismatched_output_gradient_is_named() {
    let x = Var::from_tensor(&randn(&[2, 3], 1, DType::F32)).expect("x");
    let y = x.as_tensor().sqr().expect("y");
    for dy in [randn(&[3, 2], 2, DType::F32), randn(&[2, 3], 2, DType::F64)] {
        let e = backward_from(&y, &dy).expect_err("mismatch").to_string();
        assert!(e.contains("backward_from") && e.contains("[2, 3]"), "{e}");
    }
}

//! The dense op against Candle's ops in f64 (the reference: matmul, broadcast add, relu,
//! `gelu_erf`), forward and every gradient, f32 and f64, with and without a bias, 2-D and
//! 3-D inputs, shapes that leave GEMM edge tiles, and an input that needs no gradient.

use candle_core::{DType, Device, Tensor, Var};

use super::{candle_linear, linear, DenseActivation};

fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(n, seed), dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .expect("a");
    let b = b
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .expect("b");
    let (a, b) = (
        a.to_vec1::<f64>().expect("a"),
        b.to_vec1::<f64>().expect("b"),
    );
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// (output, dx, dw, db) of `sum(r * linear(...))`.
fn run(
    f: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
    (x, w, b): (&Tensor, &Tensor, Option<&Tensor>),
    r: &Tensor,
    x_grad: bool,
) -> Vec<Option<Tensor>> {
    let xv = Var::from_tensor(x).expect("x");
    let wv = Var::from_tensor(w).expect("w");
    let bv = b.map(|b| Var::from_tensor(b).expect("b"));
    let xin = if x_grad {
        xv.as_tensor().clone()
    } else {
        x.clone()
    };
    let y = f(&xin, wv.as_tensor(), bv.as_ref().map(Var::as_tensor));
    let grads = (&y * r.to_dtype(y.dtype()).expect("r"))
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("backward");
    vec![
        Some(y),
        grads.get(xv.as_tensor()).cloned(),
        grads.get(wv.as_tensor()).cloned(),
        bv.and_then(|b| grads.get(b.as_tensor()).cloned()),
    ]
}

#[test]
fn matches_candle_forward_and_backward() {
    let acts = [
        DenseActivation::Identity,
        DenseActivation::Relu,
        DenseActivation::Gelu,
    ];
    // (input dims, out): a 2-D batch with edge tiles, a 3-D one, a single row.
    for (xdims, out) in [(vec![37, 45], 70), (vec![3, 5, 16], 33), (vec![1, 9], 4)] {
        let inp = *xdims.last().expect("dims");
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let x = tensor(&xdims, 1, dtype);
            let w = tensor(&[out, inp], 2, dtype);
            let b = tensor(&[out], 3, dtype);
            let mut ydims = xdims.clone();
            *ydims.last_mut().expect("dims") = out;
            let r = tensor(&ydims, 4, DType::F64);
            for act in acts {
                for with_bias in [true, false] {
                    let bias = with_bias.then_some(&b);
                    let ours = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
                        linear(x, w, b, act).expect("linear")
                    };
                    let reference = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
                        let f = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
                        let (x, w, b) = (f(x), f(w), b.map(f));
                        if act != DenseActivation::Gelu {
                            return candle_linear(&x, &w, b.as_ref(), act).expect("candle");
                        }
                        // GELU composed from `erf`, whose backward is exact (Candle's
                        // `gelu_erf` backward rounds 1/sqrt(2 pi) to 0.398942).
                        let z = candle_linear(&x, &w, b.as_ref(), DenseActivation::Identity)
                            .expect("candle");
                        let cdf = ((&z / std::f64::consts::SQRT_2)
                            .and_then(|t| t.erf())
                            .and_then(|t| t + 1.0)
                            .and_then(|t| t * 0.5))
                        .expect("cdf");
                        (&z * cdf).expect("gelu")
                    };
                    for x_grad in [true, false] {
                        let got = run(ours, (&x, &w, bias), &r, x_grad);
                        let want = run(reference, (&x, &w, bias), &r, x_grad);
                        for (what, (g, e)) in
                            ["y", "dx", "dw", "db"].iter().zip(got.iter().zip(&want))
                        {
                            match (g, e) {
                                (Some(g), Some(e)) => {
                                    assert_eq!(g.dims(), e.dims(), "{what}");
                                    assert_eq!(g.dtype(), dtype, "{what}");
                                    let err = max_rel(g, e);
                                    assert!(
                                        err <= tol,
                                        "{act:?} {dtype:?} {xdims:?} bias {with_bias} {what}: {err:e}"
                                    );
                                }
                                (None, None) => {}
                                _ => panic!("{act:?} {what}: one side has no gradient"),
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_named() {
    let x = tensor(&[4, 5], 1, DType::F32);
    let w = tensor(&[3, 6], 2, DType::F32);
    let e = linear(&x, &w, None, DenseActivation::Identity).expect_err("mismatch");
    assert!(
        e.to_string().contains("linear") && e.to_string().contains("(..., 6)"),
        "{e}"
    );
    let w = tensor(&[3, 5], 2, DType::F32);
    let b = tensor(&[4], 3, DType::F32);
    let e = linear(&x, &w, Some(&b), DenseActivation::Identity).expect_err("bias");
    assert!(e.to_string().contains("bias of shape (3)"), "{e}");
    let w3 = tensor(&[3, 5, 1], 2, DType::F32);
    assert!(linear(&x, &w3, None, DenseActivation::Identity).is_err());
}

/// GELU's derivative is kept only when a backward will read it.
#[test]
fn derivative_kept_only_for_training() {
    use candle_core::{CustomOp2, Storage};
    let x = tensor(&[8, 16], 1, DType::F32);
    let w = tensor(&[32, 16], 2, DType::F32);
    for (act, save, kept) in [
        (DenseActivation::Gelu, false, false),
        (DenseActivation::Gelu, true, true),
        (DenseActivation::Relu, true, false),
    ] {
        let op = super::op::Dense::new((8, 16, 32), act, save);
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (Storage::Cpu(cx), Storage::Cpu(cw)) = (&*sx, &*sw) else {
            panic!("cpu tensors")
        };
        op.cpu_fwd(cx, lx, cw, lw).expect("forward");
        assert_eq!(op.keeps_derivative(), kept, "{act:?} save {save}");
    }
}

/// The bias rows added on every SIMD level, bit for bit the same (plain f32 adds), over rows
/// that leave vector tails.
#[test]
fn bias_rows_agree_on_every_simd_level() {
    use crate::dispatch::Simd;
    let (rows, n) = (5, 37);
    let z: Vec<f32> = values(rows * n, 7).into_iter().map(|v| v as f32).collect();
    let b: Vec<f32> = values(n, 8).into_iter().map(|v| v as f32).collect();
    let want: Vec<f32> = z.iter().enumerate().map(|(i, v)| v + b[i % n]).collect();
    for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
        let mut got = z.clone();
        super::op::add_rows_with(simd, &mut got, &b);
        assert_eq!(got, want, "{simd:?}");
    }
}

/// The bias gradient's column sums on every SIMD level, bit for bit the same (the same f64
/// additions in the same order), over rows that leave vector tails.
#[test]
fn column_sums_agree_on_every_simd_level() {
    use crate::dispatch::Simd;
    let (rows, n) = (6, 29);
    let z: Vec<f32> = values(rows * n, 11).into_iter().map(|v| v as f32).collect();
    let mut want = vec![0.5f64; n];
    for (i, v) in z.iter().enumerate() {
        want[i % n] += f64::from(*v);
    }
    for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
        let mut got = vec![0.5f64; n];
        super::op::column_sums_with(simd, &mut got, &z);
        assert_eq!(got, want, "{simd:?}");
    }
}

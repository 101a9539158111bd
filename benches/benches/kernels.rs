//! Single kernels on the CPU: the peak FMA rate, the GEMM peak (ours: the dense op every linear
//! layer runs, on [`resblock_core::ops`]' own sgemm where the CPU has AVX-512 or AVX2), 3x3
//! convolutions at ResNet shapes (forward; backward = input and weight gradient, which our
//! kernel computes in one pass) and BatchNorm + ReLU training forward + backward (from a
//! given output gradient, as the convolutions' backward: `backward_from`, PyTorch's
//! `autograd.grad(y, inputs, dy)`).
//! PyTorch's side: `benches/torch_bench.py`.

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use resblock_benches::{conv3x3_flop, record};
use resblock_core::ops::dense::{linear, DenseActivation};
use resblock_core::ops::{batch_norm_train, conv2d, conv2d_backward};
use resblock_core::{backward_from, configure_threads_here, RngHandle};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn randn(shape: &[usize], std: f64) -> Tensor {
    RngHandle::seed_from_u64(shape.iter().product::<usize>() as u64)
        .normal_tensor(shape, 0., std, DType::F32, &Device::Cpu)
        .expect("randn")
}

/// The CPU's peak FMA rate (every thread, widest SIMD): the ceiling of the table's % column.
fn peak(c: &mut Criterion) {
    configure_threads_here(None);
    const ITERS: u64 = 2_000_000;
    let (flop, _) = resblock_core::ops::peak::fma_peak(ITERS);
    record("cpu/peak/fma_f32", None, Some(flop));
    c.bench_function("cpu/peak/fma_f32", |b| {
        b.iter(|| resblock_core::ops::peak::fma_peak(ITERS))
    });
}

/// `a . b` for two 1024 x 1024 matrices (PyTorch's `a @ b`) through our dense op, which
/// computes `x . w^T`: `b` is handed over transposed, as a linear layer holds its weight.
/// This is the GEMM of our linear layers and of the convolutions' GEMM path (our own on
/// AVX-512 and on AVX2, not Candle's `matmul`, whose `gemm` crate runs 256-bit kernels: about
/// two thirds of the AVX-512 rate; elsewhere the `gemm` crate's), so the table's "% GEMM"
/// column is against the best GEMM the library has on the machine.
fn gemm(c: &mut Criterion) {
    configure_threads_here(None);
    let a = randn(&[1024, 1024], 1.);
    let b_t = randn(&[1024, 1024], 1.)
        .t()
        .and_then(|t| t.contiguous())
        .expect("b^T");
    record("cpu/gemm/f32_1024", None, Some(2. * 1024f64.powi(3)));
    c.bench_function("cpu/gemm/f32_1024", |bch| {
        bch.iter(|| linear(&a, &b_t, None, DenseActivation::Identity).expect("gemm"))
    });
}

/// (name, batch, c_in, c_out, size, stride): as in torch_bench.py.
const CONVS: [(&str, usize, usize, usize, usize, usize); 4] = [
    ("c16_32x32_bs128", 128, 16, 16, 32, 1),
    ("c64_56x56_bs8", 8, 64, 64, 56, 1),
    ("c128_56x56_s2_bs8", 8, 64, 128, 56, 2),
    ("c256_14x14_bs8", 8, 256, 256, 14, 1),
];

fn convs(c: &mut Criterion) {
    configure_threads_here(None);
    for (name, n, ci, co, hw, s) in CONVS {
        let x = Var::from_tensor(&randn(&[n, ci, hw, hw], 1.)).expect("x");
        let w = Var::from_tensor(&randn(&[co, ci, 3, 3], 0.1)).expect("w");
        let flop = conv3x3_flop(n, ci, co, hw, s);
        let (xp, wp) = (x.as_tensor().detach(), w.as_tensor().detach());
        let id = format!("cpu/conv3x3/{name}/fwd");
        record(&id, Some(n as f64), Some(flop));
        c.bench_function(&id, |b| {
            b.iter(|| conv2d(&xp, &wp, 1, s, 1, 1).expect("conv"))
        });
        // The backward alone: both gradients for a given upstream gradient `r`, as
        // PyTorch's `torch.autograd.grad(y, (x, w), r)` in torch_bench.py.
        let out = (hw - 1) / s + 1;
        let r = randn(&[n, co, out, out], 1.);
        let id = format!("cpu/conv3x3/{name}/bwd_data_and_weight");
        record(&id, Some(n as f64), Some(2. * flop));
        c.bench_function(&id, |b| {
            b.iter(|| conv2d_backward(x.as_tensor(), w.as_tensor(), &r, 1, s, 1, 1).expect("bwd"))
        });
    }
}

fn batch_norm(c: &mut Criterion) {
    configure_threads_here(None);
    for (name, n, ch, hw) in [
        ("c16_32x32_bs128", 128, 16, 32),
        ("c64_56x56_bs8", 8, 64, 56),
    ] {
        let x = Var::from_tensor(&randn(&[n, ch, hw, hw], 1.)).expect("x");
        let g =
            Var::from_tensor(&Tensor::ones(ch, DType::F32, &Device::Cpu).expect("g")).expect("g");
        let b =
            Var::from_tensor(&Tensor::zeros(ch, DType::F32, &Device::Cpu).expect("b")).expect("b");
        let r = randn(&[n, ch, hw, hw], 1.);
        let id = format!("cpu/batch_norm_relu/{name}/train_fwd_bwd");
        record(&id, Some(n as f64), None);
        c.bench_function(&id, |bch| {
            bch.iter(|| {
                let (y, _) =
                    batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, true)
                        .expect("bn");
                backward_from(&y, &r).expect("backward")
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = peak, gemm, convs, batch_norm
}
criterion_main!(benches);

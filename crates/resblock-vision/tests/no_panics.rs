//! The layers and networks built on the kernels (resblock-core and resblock-vision) refuse
//! bad arguments with an error, never a panic: zero widths, bad norm settings, inputs of the
//! wrong rank, channel count or size, and network configurations that cannot be built. The
//! kernels' own sweep is `resblock-kernels/tests/no_panics.rs` and `bad_arguments.rs`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resblock_core::{
    batch_norm, conv2d, linear, mlp_block, BatchNormConfig, Conv2dConfig, MlpBlockConfig, RngHandle,
};
use resblock_vision::{basic_block, resnet, BasicBlockConfig, ResNetConfig};

fn t(dims: &[usize]) -> Tensor {
    Tensor::ones(dims, DType::F32, &Device::Cpu).expect("ones")
}

fn vb(vm: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
}

fn s<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<(), String> {
    r.map(drop).map_err(|e| e.to_string())
}

type Op = Box<dyn Fn() -> Result<(), String>>;

fn cifar(edit: impl Fn(&mut ResNetConfig) + 'static) -> Op {
    Box::new(move || {
        let mut cfg = ResNetConfig::cifar(8).map_err(|e| e.to_string())?;
        edit(&mut cfg);
        let vm = VarMap::new();
        let net = resnet(&cfg, &RngHandle::seed_from_u64(0), vb(&vm)).map_err(|e| e.to_string())?;
        s(net.forward_t(&t(&[2, cfg.in_channels, 8, 8]), true))
    })
}

fn cases() -> Vec<(&'static str, Op)> {
    let conv = |i, o, k, cfg: Conv2dConfig| -> Op {
        Box::new(move || s(conv2d(i, o, k, cfg, vb(&VarMap::new()))))
    };
    vec![
        ("conv2d 0 in", conv(0, 4, 3, Conv2dConfig::default())),
        ("conv2d 0 out", conv(3, 0, 3, Conv2dConfig::default())),
        ("conv2d kernel 0", conv(3, 4, 0, Conv2dConfig::default())),
        (
            "conv2d stride 0",
            conv(
                3,
                4,
                3,
                Conv2dConfig {
                    stride: 0,
                    ..Default::default()
                },
            ),
        ),
        (
            "conv2d groups",
            conv(
                3,
                4,
                3,
                Conv2dConfig {
                    groups: 2,
                    ..Default::default()
                },
            ),
        ),
        (
            "conv2d input channels",
            Box::new(|| {
                let c = conv2d(3, 4, 3, Conv2dConfig::default(), vb(&VarMap::new()))
                    .map_err(|e| e.to_string())?;
                s(c.forward(&t(&[1, 5, 8, 8])))
            }),
        ),
        (
            "conv2d input too small",
            Box::new(|| {
                let c = conv2d(3, 4, 5, Conv2dConfig::default(), vb(&VarMap::new()))
                    .map_err(|e| e.to_string())?;
                s(c.forward(&t(&[1, 3, 2, 2])))
            }),
        ),
        (
            "batch_norm 0 channels",
            Box::new(|| {
                s(batch_norm(
                    0,
                    BatchNormConfig::default(),
                    vb(&VarMap::new()),
                ))
            }),
        ),
        (
            "batch_norm eps",
            Box::new(|| {
                s(batch_norm(
                    3,
                    BatchNormConfig {
                        eps: -1.,
                        ..Default::default()
                    },
                    vb(&VarMap::new()),
                ))
            }),
        ),
        (
            "batch_norm momentum",
            Box::new(|| {
                s(batch_norm(
                    3,
                    BatchNormConfig {
                        momentum: f64::NAN,
                        ..Default::default()
                    },
                    vb(&VarMap::new()),
                ))
            }),
        ),
        (
            "batch_norm input channels",
            Box::new(|| {
                let bn = batch_norm(3, BatchNormConfig::default(), vb(&VarMap::new()))
                    .map_err(|e| e.to_string())?;
                s(bn.forward_t(&t(&[2, 4, 3, 3]), true))
                    .and(s(bn.forward_t(&t(&[2, 4, 3, 3]), false)))
            }),
        ),
        (
            "linear 0 in",
            Box::new(|| s(linear(0, 3, vb(&VarMap::new())))),
        ),
        (
            "linear 0 out",
            Box::new(|| s(linear(3, 0, vb(&VarMap::new())))),
        ),
        (
            "linear input width",
            Box::new(|| {
                let l = linear(3, 2, vb(&VarMap::new())).map_err(|e| e.to_string())?;
                s(l.forward(&t(&[4, 5])))
            }),
        ),
        (
            "mlp block input width",
            Box::new(|| {
                let b = mlp_block(
                    10,
                    10,
                    MlpBlockConfig::default(),
                    &RngHandle::seed_from_u64(0),
                    vb(&VarMap::new()),
                )
                .map_err(|e| e.to_string())?;
                s(b.forward_t(&t(&[4, 7]), true))
            }),
        ),
        (
            "basic block input channels",
            Box::new(|| {
                let b = basic_block(
                    4,
                    8,
                    BasicBlockConfig {
                        stride: 2,
                        ..Default::default()
                    },
                    &RngHandle::seed_from_u64(0),
                    vb(&VarMap::new()),
                )
                .map_err(|e| e.to_string())?;
                s(b.forward_t(&t(&[2, 3, 8, 8]), true))
            }),
        ),
        (
            "resnet no stages",
            cifar(|c| {
                c.layers.clear();
                c.planes.clear();
            }),
        ),
        ("resnet layers/planes", cifar(|c| c.planes.push(128))),
        ("resnet 0 input channels", cifar(|c| c.in_channels = 0)),
        ("resnet 0 blocks", cifar(|c| c.layers[1] = 0)),
        ("resnet 0 planes", cifar(|c| c.planes[0] = 0)),
        (
            "resnet dilation list",
            cifar(|c| c.replace_stride_with_dilation = vec![true; 7]),
        ),
        ("resnet drop path", cifar(|c| c.drop_path_rate = 1.5)),
        ("resnet groups", cifar(|c| c.groups = 0)),
        (
            "resnet input channels",
            Box::new(|| {
                let cfg = ResNetConfig::cifar(8).map_err(|e| e.to_string())?;
                let net = resnet(&cfg, &RngHandle::seed_from_u64(0), vb(&VarMap::new()))
                    .map_err(|e| e.to_string())?;
                s(net.forward_t(&t(&[1, 1, 8, 8]), false))
            }),
        ),
        (
            "resnet input rank",
            Box::new(|| {
                let cfg = ResNetConfig::cifar(8).map_err(|e| e.to_string())?;
                let net = resnet(&cfg, &RngHandle::seed_from_u64(0), vb(&VarMap::new()))
                    .map_err(|e| e.to_string())?;
                s(net.forward_t(&t(&[3, 8, 8]), false))
            }),
        ),
        (
            "imagenet resnet input too small",
            Box::new(|| {
                let cfg = ResNetConfig::preset("resnet18").map_err(|e| e.to_string())?;
                let net = resnet(&cfg, &RngHandle::seed_from_u64(0), vb(&VarMap::new()))
                    .map_err(|e| e.to_string())?;
                s(net.forward_t(&t(&[1, 3, 0, 0]), false))
            }),
        ),
    ]
}

#[test]
fn layers_and_networks_refuse_bad_arguments_without_panicking() {
    let mut problems = Vec::new();
    for (what, op) in cases() {
        match catch_unwind(AssertUnwindSafe(&op)) {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                problems.push(format!("{what}: panicked: {msg}"));
            }
            Ok(Ok(())) => problems.push(format!("{what}: accepted")),
            Ok(Err(e)) if e.trim().is_empty() => problems.push(format!("{what}: empty error")),
            Ok(Err(_)) => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

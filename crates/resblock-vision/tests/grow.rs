//! Growing a network by identity blocks: the deeper network computes exactly what the
//! smaller one did (basic and bottleneck blocks, options A and B, post- and pre-activation),
//! the new blocks can learn, and growths that cannot start as the identity are refused.

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use resblock_core::{seeded_var_builder, Probed, RngHandle, ShortcutPolicy};
use resblock_vision::grow::{grow, identity_start_keys};
use resblock_vision::{resnet, BlockType, ResNet, ResNetConfig};

/// A small network whose every variable is random (running statistics too), so that a
/// copy that missed or misplaced anything changes the logits.
fn trained_looking(cfg: &ResNetConfig, seed: u64) -> Result<(ResNet, VarMap)> {
    let rng = RngHandle::seed_from_u64(seed);
    let vars = VarMap::new();
    let net = resnet(
        cfg,
        &rng,
        seeded_var_builder(&vars, &rng, DType::F32, &Device::Cpu),
    )?;
    for (k, v) in vars.data().lock().expect("varmap").iter() {
        let r = Tensor::rand(0f32, 1., v.dims(), &Device::Cpu)?;
        let t = if k.ends_with("running_var") {
            (r + 0.5)?
        } else if k.ends_with("num_batches_tracked") {
            continue;
        } else {
            ((r - 0.5)? * 0.6)?
        };
        v.set(&t)?;
    }
    Ok((net, vars))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Grows `from` into `to` and checks that the logits agree exactly in eval and training
/// mode, that every new block starts as the identity by the documented keys and that those
/// parameters get gradients.
fn grows_exactly(from: &ResNetConfig, to: &ResNetConfig, expect_new: &[&str]) -> Result<()> {
    let (small, small_vars) = trained_looking(from, 1)?;
    let rng = RngHandle::seed_from_u64(2);
    let g = grow(from, &small_vars, to, &rng, &Device::Cpu)?;
    assert_eq!(g.new_blocks, expect_new);
    let x = Tensor::rand(0f32, 1., (3, from.in_channels, 12, 12), &Device::Cpu)?;
    for train in [false, true] {
        let a = small.forward_t(&x, train)?;
        let b = g.model.forward_t(&x, train)?;
        assert!(
            a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? > 1e-3,
            "logits are not trivial"
        );
        assert_eq!(
            max_abs_diff(&a, &b)?,
            0.,
            "train={train}: the grown network must compute exactly the same logits"
        );
    }
    // Every copied variable is equal; the identity-start ones are zero; they get gradients.
    let grown = g.varmap.data().lock().expect("varmap");
    for (k, v) in small_vars.data().lock().expect("varmap").iter() {
        assert_eq!(
            max_abs_diff(v.as_tensor(), grown[k].as_tensor())?,
            0.,
            "{k}"
        );
    }
    let loss = g.model.forward_t(&x, true)?.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    for block in &g.new_blocks {
        for key in identity_start_keys(to, block) {
            let v = &grown[&key];
            assert_eq!(
                v.as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?,
                0.,
                "{key}"
            );
            let gr = grads.get(v.as_tensor()).expect("a gradient");
            assert!(
                gr.abs()?.sum_all()?.to_scalar::<f32>()? > 0.,
                "{key} gets no gradient: the block could never leave the identity"
            );
        }
    }
    Ok(())
}

#[test]
fn basic_blocks_option_a_resnet20_to_resnet32() -> Result<()> {
    grows_exactly(
        &ResNetConfig::preset("resnet20")?,
        &ResNetConfig::preset("resnet32")?,
        &[
            "layer1.3", "layer1.4", "layer2.3", "layer2.4", "layer3.3", "layer3.4",
        ],
    )
}

#[test]
fn basic_blocks_option_b_and_uneven_stages() -> Result<()> {
    let from = ResNetConfig {
        shortcut: ShortcutPolicy::Projection,
        ..ResNetConfig::cifar(14)?
    };
    let to = ResNetConfig {
        layers: vec![2, 4, 3],
        ..from.clone()
    };
    grows_exactly(&from, &to, &["layer2.2", "layer2.3", "layer3.2"])
}

fn small_bottleneck(pre_activation: bool) -> Result<ResNetConfig> {
    Ok(ResNetConfig {
        block: BlockType::Bottleneck,
        layers: vec![1, 1],
        planes: vec![4, 8],
        stem_width: 8,
        num_classes: 5,
        replace_stride_with_dilation: vec![false],
        shortcut: ShortcutPolicy::Projection,
        pre_activation,
        ..ResNetConfig::cifar(8)?
    })
}

#[test]
fn bottleneck_blocks_option_b() -> Result<()> {
    let from = small_bottleneck(false)?;
    let to = ResNetConfig {
        layers: vec![2, 3],
        ..from.clone()
    };
    grows_exactly(&from, &to, &["layer1.1", "layer2.1", "layer2.2"])
}

#[test]
fn pre_activation_blocks_start_with_a_zero_last_convolution() -> Result<()> {
    let from = ResNetConfig {
        layers: vec![1, 1, 1],
        shortcut: ShortcutPolicy::Projection,
        pre_activation: true,
        ..ResNetConfig::cifar(8)?
    };
    let to = ResNetConfig {
        layers: vec![2, 1, 2],
        ..from.clone()
    };
    grows_exactly(&from, &to, &["layer1.1", "layer3.1"])?;
    let from = small_bottleneck(true)?;
    let to = ResNetConfig {
        layers: vec![1, 2],
        ..from.clone()
    };
    grows_exactly(&from, &to, &["layer2.1"])
}

#[test]
fn growths_that_cannot_start_as_the_identity_are_refused() -> Result<()> {
    let rng = RngHandle::seed_from_u64(0);
    let refuse = |from: &str, to: ResNetConfig, says: &str| -> Result<()> {
        let cfg = ResNetConfig::preset(from)?;
        let vars = VarMap::new();
        resnet(
            &cfg,
            &rng,
            seeded_var_builder(&vars, &rng, DType::F32, &Device::Cpu),
        )?;
        let e = grow(&cfg, &vars, &to, &rng, &Device::Cpu)
            .err()
            .expect("refused");
        assert!(e.to_string().contains(says), "{e}");
        Ok(())
    };
    refuse("plain20", ResNetConfig::preset("plain32")?, "plain network")?;
    refuse(
        "resnet20",
        ResNetConfig {
            shortcut: ShortcutPolicy::AlwaysProjection,
            ..ResNetConfig::preset("resnet32")?
        },
        "option C",
    )?;
    refuse("resnet32", ResNetConfig::preset("resnet20")?, "shrink")?;
    refuse(
        "resnet20",
        ResNetConfig {
            planes: vec![16, 32, 128],
            ..ResNetConfig::preset("resnet32")?
        },
        "differ in more than their block counts",
    )?;
    // Variables that do not belong to the smaller network are named.
    let cfg = ResNetConfig::preset("resnet8")?;
    let vars = VarMap::new();
    resnet(
        &ResNetConfig::preset("resnet14")?,
        &rng,
        seeded_var_builder(&vars, &rng, DType::F32, &Device::Cpu),
    )?;
    let e = grow(
        &cfg,
        &vars,
        &ResNetConfig::preset("resnet20")?,
        &rng,
        &Device::Cpu,
    )
    .err()
    .expect("refused");
    assert!(
        e.to_string()
            .contains("lies in a block the deeper one adds"),
        "{e}"
    );
    Ok(())
}

#[test]
fn the_probe_sees_new_blocks_at_exactly_zero() -> Result<()> {
    let from = ResNetConfig::preset("resnet8")?;
    let to = ResNetConfig::preset("resnet14")?;
    let (_, vars) = trained_looking(&from, 4)?;
    let g = grow(
        &from,
        &vars,
        &to,
        &RngHandle::seed_from_u64(5),
        &Device::Cpu,
    )?;
    let x = Tensor::rand(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
    let before = g.model.forward_t(&x, false)?;
    let ratios = resblock_core::probe::measure(&g.model, &x, false)?;
    let names: Vec<&str> = ratios.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    );
    for (name, r) in &ratios {
        if g.new_blocks.contains(name) {
            assert_eq!(*r, 0., "{name}");
        } else {
            assert!(*r > 0., "{name}: {r}");
        }
    }
    // Measuring turns probing off again and leaves the outputs alone.
    assert!(g.model.probes().iter().all(|(_, p)| !p.is_enabled()));
    assert_eq!(max_abs_diff(&before, &g.model.forward_t(&x, false)?)?, 0.);
    Ok(())
}

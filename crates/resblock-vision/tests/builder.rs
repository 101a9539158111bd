//! Builder options: dilation (against torchvision), features, drop-path scaling,
//! zero-init residual, input channels.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use common::{assert_close, fixture, get, hash_var_builder};
use resblock_core::{seeded_var_builder, Probed, RngHandle};
use resblock_vision::{resnet, Block, ResNetConfig};

#[test]
fn dilated_resnet50_matches_torchvision() -> Result<()> {
    let f = fixture("resnet_parity.safetensors")?;
    let mut cfg = ResNetConfig::preset("resnet50")?;
    cfg.replace_stride_with_dilation = vec![false, true, true];
    let varmap = VarMap::new();
    let net = resnet(
        &cfg,
        &RngHandle::seed_from_u64(0),
        hash_var_builder(&varmap),
    )?;
    let x = get(&f, "input.imagenet")?;
    assert_close(
        "dilated",
        &net.forward_t(x, false)?,
        get(&f, "resnet50_dilated.logits_eval")?,
        1e-4,
    )?;
    // Output stride 8 instead of 32: the last stage keeps layer2's resolution.
    let feats = net.features(x, false)?;
    assert_eq!(feats[1].dims()[2..], feats[3].dims()[2..]);
    Ok(())
}

#[test]
fn features_give_every_stage() -> Result<()> {
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let net = resnet(
        &ResNetConfig::preset("resnet18")?,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    let x = Tensor::zeros((1, 3, 64, 96), DType::F32, &Device::Cpu)?;
    let shapes: Vec<Vec<usize>> = net
        .features(&x, false)?
        .iter()
        .map(|t| t.dims().to_vec())
        .collect();
    assert_eq!(
        shapes,
        [
            vec![1, 64, 16, 24],
            vec![1, 128, 8, 12],
            vec![1, 256, 4, 6],
            vec![1, 512, 2, 3]
        ]
    );
    assert!(net
        .features(
            &Tensor::zeros((1, 1, 64, 64), DType::F32, &Device::Cpu)?,
            false
        )
        .is_err());
    Ok(())
}

#[test]
fn drop_path_rate_grows_linearly_with_block_index() -> Result<()> {
    let mut cfg = ResNetConfig::preset("resnet20")?;
    cfg.drop_path_rate = 0.2;
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    let ps: Vec<f64> = net
        .stages()
        .iter()
        .flatten()
        .map(|b| match b {
            Block::Basic(b) => b.drop_path().map_or(0., |d| d.p()),
            Block::Bottleneck(b) => b.drop_path().map_or(0., |d| d.p()),
        })
        .collect();
    assert_eq!(ps.len(), 9);
    for (i, p) in ps.iter().enumerate() {
        assert!((p - 0.2 * i as f64 / 8.).abs() < 1e-12, "block {i}: {p}");
    }
    // Train mode is stochastic, eval is not.
    let x = rng.normal_tensor((4, 3, 16, 16), 0., 1., DType::F32, &Device::Cpu)?;
    let a = net.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
    let b = net.forward_t(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn zero_init_residual_makes_every_block_the_identity_at_init() -> Result<()> {
    for name in ["resnet18", "resnet50", "preact_resnet110"] {
        let mut cfg = ResNetConfig::preset(name)?;
        cfg.zero_init_residual = true;
        let rng = RngHandle::seed_from_u64(0);
        let varmap = VarMap::new();
        let net = resnet(
            &cfg,
            &rng,
            seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
        )?;
        net.set_probing(true);
        let hw = if name.starts_with("preact") { 16 } else { 64 };
        net.forward_t(
            &rng.normal_tensor((2, 3, hw, hw), 0., 1., DType::F32, &Device::Cpu)?,
            true,
        )?;
        for (block, ratio) in net.residual_ratios() {
            assert_eq!(ratio, Some(0.), "{name} {block}");
        }
    }
    Ok(())
}

#[test]
fn input_channels_and_classes_are_configurable() -> Result<()> {
    let mut cfg = ResNetConfig::preset("resnet20")?;
    cfg.in_channels = 1;
    cfg.num_classes = 4;
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    let y = net.forward_t(
        &Tensor::zeros((3, 1, 28, 28), DType::F32, &Device::Cpu)?,
        true,
    )?;
    assert_eq!(y.dims(), [3, 4]);
    let data = varmap.data().lock().expect("lock");
    assert_eq!(data["conv1.weight"].dims(), [16, 1, 3, 3]);
    // Backbone mode: no classifier.
    drop(data);
    cfg.num_classes = 0;
    let vm2 = VarMap::new();
    let backbone = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&vm2, &rng, DType::F32, &Device::Cpu),
    )?;
    let y = backbone.forward_t(
        &Tensor::zeros((3, 1, 28, 28), DType::F32, &Device::Cpu)?,
        false,
    )?;
    assert_eq!(y.dims(), [3, 64]);
    Ok(())
}

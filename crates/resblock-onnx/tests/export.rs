//! Exported graphs run in a pure-Rust ONNX runtime (tract) and give our logits, for every
//! kind of network the builder makes; the file has the promised interface.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use prost::Message;
use resblock_core::{seeded_var_builder, RngHandle, ShortcutPolicy};
use resblock_onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto, ModelProto};
use resblock_onnx::{export, ExportOptions};
use resblock_vision::{resnet, ResNetConfig, StemType};
use tract_onnx::prelude::*;

/// A small network of `cfg`'s kind with random weights and random BatchNorm statistics
/// (so a mistake in exporting the norms shows).
fn build(cfg: &ResNetConfig, seed: u64) -> anyhow::Result<resblock_vision::ResNet> {
    let rng = RngHandle::seed_from_u64(seed);
    let varmap = VarMap::new();
    let net = resnet(
        cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    for (k, v) in varmap.data().lock().expect("lock").iter() {
        let t = if k.ends_with("running_var") || (k.contains("bn") && k.ends_with("weight")) {
            rng.uniform_tensor(v.shape().clone(), 0.5, 1.5, DType::F32, &Device::Cpu)?
        } else if k.ends_with("running_mean") || k.ends_with(".bias") {
            rng.uniform_tensor(v.shape().clone(), -0.2, 0.2, DType::F32, &Device::Cpu)?
        } else {
            continue;
        };
        v.set(&t)?;
    }
    Ok(net)
}

fn tract_logits(bytes: &[u8], x: &Tensor) -> anyhow::Result<Vec<f32>> {
    let dims = x.dims().to_vec();
    let model = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(bytes))?
        .with_input_fact(0, f32::fact(dims.clone()).into())?
        .into_optimized()?
        .into_runnable()?;
    let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let input: tract_onnx::prelude::Tensor =
        tract_ndarray::ArrayD::from_shape_vec(dims, data)?.into();
    let out = model.run(tvec!(input.into()))?;
    Ok(out[0].to_array_view::<f32>()?.iter().copied().collect())
}

/// max |ours - tract| / max |ours| over a batch, for the graph kept and folded.
fn check(name: &str, cfg: &ResNetConfig, size: usize, batch: usize) -> anyhow::Result<()> {
    let net = build(cfg, 7)?;
    let rng = RngHandle::seed_from_u64(1);
    let x = rng.normal_tensor(
        (batch, cfg.in_channels, size, size),
        0.,
        1.,
        DType::F32,
        &Device::Cpu,
    )?;
    let ours: Vec<f32> = net.forward_t(&x, false)?.flatten_all()?.to_vec1()?;
    for fold in [false, true] {
        let opts = ExportOptions {
            image_size: [size, size],
            fold_batch_norm: fold,
            metadata: vec![],
        };
        let bytes = export(&net, &opts)?.encode_to_vec();
        let theirs = tract_logits(&bytes, &x)?;
        assert_eq!(theirs.len(), ours.len(), "{name}");
        let scale = ours.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(err <= 1e-4, "{name} (fold {fold}): relative error {err}");
    }
    Ok(())
}

fn small_imagenet(arch: &str) -> anyhow::Result<ResNetConfig> {
    let mut c = ResNetConfig::preset(arch)?;
    c.layers = vec![1, 2, 1, 1];
    c.num_classes = 7;
    if c.groups == 1 && c.width_per_group == 64 {
        c.planes = vec![8, 8, 16, 16];
        c.stem_width = 8;
    } else {
        // ResNeXt / wide: keep the preset's group structure, shrink the planes.
        c.planes = vec![16, 16, 32, 32];
        c.stem_width = 16;
        c.width_per_group = c.width_per_group.min(16);
        c.groups = c.groups.min(4);
    }
    Ok(c)
}

#[test]
fn cifar_nets_match_for_every_shortcut_option_and_plain() -> anyhow::Result<()> {
    for (name, policy) in [
        ("A", ShortcutPolicy::ZeroPad),
        ("B", ShortcutPolicy::Projection),
        ("C", ShortcutPolicy::AlwaysProjection),
        ("plain", ShortcutPolicy::Removed),
    ] {
        let mut c = ResNetConfig::preset("resnet8")?;
        c.shortcut = policy;
        c.in_channels = 1;
        check(&format!("resnet8 option {name}"), &c, 12, 3)?;
    }
    Ok(())
}

#[test]
fn imagenet_family_matches_basic_bottleneck_resnext_wide_dilated_and_resnet_d() -> anyhow::Result<()>
{
    check("resnet18-like", &small_imagenet("resnet18")?, 32, 2)?;
    check("resnet50-like", &small_imagenet("resnet50")?, 32, 2)?;
    check(
        "resnext50_32x4d-like",
        &small_imagenet("resnext50_32x4d")?,
        32,
        2,
    )?;
    check(
        "wide_resnet50_2-like",
        &small_imagenet("wide_resnet50_2")?,
        32,
        2,
    )?;
    let mut dilated = small_imagenet("resnet50")?;
    dilated.replace_stride_with_dilation = vec![false, true, true];
    check("resnet50 dilated", &dilated, 32, 2)?;
    let d = small_imagenet("resnet50d")?;
    assert_eq!(d.stem, StemType::Deep);
    // 36 is odd after the stem's strides: the avg-down shortcut pools partial windows.
    check("resnet50d-like", &d, 36, 2)?;
    Ok(())
}

#[test]
fn pre_activation_nets_match() -> anyhow::Result<()> {
    let mut basic = ResNetConfig::preset("preact_resnet110")?;
    basic.layers = vec![1, 1, 1];
    check("preact basic", &basic, 12, 2)?;
    let mut bottleneck = ResNetConfig::preset("preact_resnet164")?;
    bottleneck.layers = vec![1, 1, 1];
    check("preact bottleneck", &bottleneck, 12, 2)?;
    let mut wrn = ResNetConfig::wrn(10, 2)?;
    wrn.num_classes = 5;
    check("wrn-10-2", &wrn, 12, 2)
}

#[test]
fn the_file_has_opset_13_a_dynamic_batch_input_named_input_and_logits() -> anyhow::Result<()> {
    let cfg = ResNetConfig::preset("resnet8")?;
    let net = build(&cfg, 3)?;
    let opts = ExportOptions {
        image_size: [16, 20],
        metadata: vec![("resblock".into(), "{\"version\": 1}".into())],
        ..Default::default()
    };
    let bytes = export(&net, &opts)?.encode_to_vec();
    let m = ModelProto::decode(bytes.as_slice())?;
    assert!(m
        .opset_import
        .iter()
        .any(|o| o.version() >= 13 && o.domain().is_empty()));
    let g = m.graph.expect("graph");
    let dims = |v: &resblock_onnx::proto::ValueInfoProto| -> Vec<Dim> {
        match &v.r#type.as_ref().expect("type").value {
            Some(type_proto::Value::TensorType(t)) => t
                .shape
                .as_ref()
                .expect("shape")
                .dim
                .iter()
                .map(|d| d.value.clone().expect("dim"))
                .collect(),
            other => panic!("not a tensor: {other:?}"),
        }
    };
    assert_eq!(g.input.len(), 1);
    assert_eq!(g.input[0].name(), "input");
    assert_eq!(
        dims(&g.input[0]),
        [
            Dim::DimParam("N".into()),
            Dim::DimValue(3),
            Dim::DimValue(16),
            Dim::DimValue(20)
        ]
    );
    assert_eq!(g.output[0].name(), "logits");
    assert_eq!(
        dims(&g.output[0]),
        [Dim::DimParam("N".into()), Dim::DimValue(10)]
    );
    assert_eq!(m.metadata_props[0].key(), "resblock");
    // Initializers carry torchvision's names.
    assert!(g
        .initializer
        .iter()
        .any(|t| t.name() == "layer1.0.conv1.weight"));
    // One file, two batch sizes.
    for n in [1, 4] {
        let x = Tensor::ones((n, 3, 16, 20), DType::F32, &Device::Cpu)?;
        assert_eq!(tract_logits(&bytes, &x)?.len(), n * 10);
    }
    Ok(())
}

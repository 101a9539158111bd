//! Every preset has torchvision's (or the CIFAR reference port's) exact state_dict: the same
//! keys with the same shapes, and the same parameter count.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use resblock_core::params::shape_only_var_builder;
use resblock_core::RngHandle;
use resblock_vision::{resnet, ResNetConfig};

fn reference() -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(common::fixture_path("resnet_keys.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn ours(name: &str) -> Result<(BTreeMap<String, Vec<usize>>, usize)> {
    let cfg = ResNetConfig::preset(name)?;
    let (vb, rec) = shape_only_var_builder(DType::F32, &Device::Cpu);
    resnet(&cfg, &RngHandle::seed_from_u64(0), vb)?;
    Ok((rec.shapes(), rec.count_parameters()))
}

#[test]
fn presets_match_the_reference_state_dicts() -> Result<()> {
    let refs = reference()?;
    let refs = refs.as_object().context("object")?;
    for (name, entry) in refs {
        let (shapes, count) = ours(name)?;
        let want: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(entry["state_dict"].clone())?;
        let missing: Vec<_> = want.keys().filter(|k| !shapes.contains_key(*k)).collect();
        let extra: Vec<_> = shapes.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}, unexpected {extra:?}"
        );
        for (k, s) in &want {
            assert_eq!(&shapes[k], s, "{name}: {k}");
        }
        assert_eq!(
            count as u64,
            entry["params"].as_u64().context("params")?,
            "{name}"
        );
    }
    Ok(())
}

/// The counts the literature and torchvision's documentation give.
#[test]
fn parameter_counts_of_every_preset() -> Result<()> {
    let want = [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
        ("resnext50_32x4d", 25_028_904),
        ("resnext101_32x8d", 88_791_336),
        ("resnext101_64x4d", 83_455_272),
        ("wide_resnet50_2", 68_883_240),
        ("wide_resnet101_2", 126_886_696),
        // timm's resnet50d: the deep stem adds 19,232 parameters to resnet50.
        ("resnet50d", 25_576_264),
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet44", 658_586),
        ("resnet56", 853_018),
        ("resnet110", 1_727_962),
        ("resnet1202", 19_421_274),
        ("preact_resnet110", 1_730_522),
        ("preact_resnet164", 1_703_258),
        ("wrn28_10", 36_479_194),
        // Plain twins: option-A shortcuts have no parameters, so the CIFAR counts agree;
        // ImageNet plain nets lose the projection shortcuts.
        ("plain20", 269_722),
        ("plain56", 853_018),
        (
            "plain18",
            11_689_512 - (8_192 + 256) - (32_768 + 512) - (131_072 + 1_024),
        ),
    ];
    for (name, n) in want {
        assert_eq!(ours(name)?.1, n, "{name}");
    }
    for name in ResNetConfig::PRESETS {
        ours(name).with_context(|| format!("building {name}"))?;
    }
    Ok(())
}

#[test]
fn unknown_or_bad_configurations_are_errors() {
    let err = ResNetConfig::preset("resnet19").expect_err("resnet19 is not a preset");
    assert!(err.to_string().contains("known: resnet18"), "{err}");
    assert!(ResNetConfig::preset("plain19").is_err());
    assert!(ResNetConfig::cifar(21).is_err());
    assert!(ResNetConfig::wrn(27, 10).is_err());
    let mut cfg = ResNetConfig::preset("resnet18").expect("preset");
    cfg.groups = 32;
    let (vb, _) = shape_only_var_builder(DType::F32, &Device::Cpu);
    assert!(resnet(&cfg, &RngHandle::seed_from_u64(0), vb).is_err());
}

/// Totals as torchvision publishes them (weights meta `_ops`, conv + linear multiply-adds at
/// 224x224, measured with forward hooks in make_resnet_fixtures' environment: resnet18
/// 1,814,073,344; resnet50 4,089,184,256; resnext50_32x4d 4,230,479,872; wide_resnet50_2
/// 11,398,021,120), and every row with parameters names real state_dict entries.
#[test]
fn summaries_match_torchvision_totals() -> Result<()> {
    for (name, macs) in [
        ("resnet18", 1_814_073_344u64),
        ("resnet50", 4_089_184_256),
        ("resnext50_32x4d", 4_230_479_872),
        ("wide_resnet50_2", 11_398_021_120),
    ] {
        let (vb, rec) = shape_only_var_builder(DType::F32, &Device::Cpu);
        let net = resnet(
            &ResNetConfig::preset(name)?,
            &RngHandle::seed_from_u64(0),
            vb,
        )?;
        let s = net.summary(224, 224)?;
        assert_eq!(s.total_macs(), macs, "{name}");
        assert_eq!(s.total_params(), rec.count_parameters(), "{name}");
        let shapes = rec.shapes();
        for r in s.rows.iter().filter(|r| r.params > 0) {
            assert!(
                shapes.contains_key(&format!("{}.weight", r.name)),
                "{name}: row {} has no weight",
                r.name
            );
        }
        assert_eq!(s.rows.last().map(|r| r.output.clone()), Some(vec![1000]));
    }
    // ResNet-D, pre-activation and CIFAR nets summarise too, parameters adding up.
    for name in ["resnet50d", "preact_resnet164", "resnet20", "wrn28_10"] {
        let (vb, rec) = shape_only_var_builder(DType::F32, &Device::Cpu);
        let net = resnet(
            &ResNetConfig::preset(name)?,
            &RngHandle::seed_from_u64(0),
            vb,
        )?;
        let s = net.summary(32, 32)?;
        assert_eq!(s.total_params(), rec.count_parameters(), "{name}");
        let shapes = rec.shapes();
        for r in s.rows.iter().filter(|r| r.params > 0) {
            assert!(
                shapes.contains_key(&format!("{}.weight", r.name)),
                "{name}: row {} has no weight",
                r.name
            );
        }
    }
    Ok(())
}

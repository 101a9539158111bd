//! The basic block against torchvision's, and its structural properties.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use common::{assert_close, fixture, fixture_path, get};
use resblock_core::{seeded_var_builder, ResidualScale, RngHandle, ShortcutPolicy};
use resblock_vision::{basic_block, BasicBlockConfig};

#[test]
fn matches_torchvision_basic_block_in_eval_and_train() -> Result<()> {
    let f = fixture("basic_block.safetensors")?;
    let rng = RngHandle::seed_from_u64(0);
    let mut varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let cfg = BasicBlockConfig {
        stride: 2,
        ..Default::default()
    };
    let block = basic_block(4, 8, cfg, &rng, vb)?;
    // Every parameter and buffer we created is in torchvision's state_dict, and vice versa.
    let ours: std::collections::BTreeSet<String> = varmap
        .data()
        .lock()
        .expect("lock")
        .keys()
        .cloned()
        .collect();
    let theirs: std::collections::BTreeSet<String> = f
        .keys()
        .filter(|k| k.starts_with("conv") || k.starts_with("bn") || k.starts_with("downsample"))
        .cloned()
        .collect();
    assert_eq!(ours, theirs);
    varmap.load(fixture_path("basic_block.safetensors"))?;

    let x = get(&f, "x")?;
    assert_close(
        "eval",
        &block.forward_t(x, false)?,
        get(&f, "y_eval")?,
        1e-5,
    )?;

    let xv = Var::from_tensor(x)?;
    let y = block.forward_t(xv.as_tensor(), true)?;
    assert_close("train", &y, get(&f, "y_train")?, 1e-5)?;
    let grads = (&y * get(&f, "r")?)?.sum_all()?.backward()?;
    assert_close(
        "grad x",
        grads.get(xv.as_tensor()).expect("dx"),
        get(&f, "grad.x")?,
        1e-4,
    )?;
    let data = varmap.data().lock().expect("lock");
    for name in ["conv1.weight", "bn2.weight", "downsample.0.weight"] {
        let g = grads.get(data[name].as_tensor()).expect("parameter grad");
        assert_close(name, g, get(&f, &format!("grad.{name}"))?, 1e-4)?;
    }
    assert_close(
        "bn1 running_mean",
        data["bn1.running_mean"].as_tensor(),
        get(&f, "after.bn1.running_mean")?,
        1e-5,
    )?;
    assert_close(
        "bn1 running_var",
        data["bn1.running_var"].as_tensor(),
        get(&f, "after.bn1.running_var")?,
        1e-5,
    )?;
    Ok(())
}

#[test]
fn zero_init_blocks_are_exactly_the_identity() -> Result<()> {
    for pre_activation in [false, true] {
        let rng = RngHandle::seed_from_u64(1);
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
        let cfg = BasicBlockConfig {
            scale: ResidualScale::ZeroInit,
            pre_activation,
            ..Default::default()
        };
        let block = basic_block(6, 6, cfg, &rng, vb)?;
        // Post-activation blocks end in ReLU, so their inputs (a previous ReLU's output) are
        // non-negative; pre-activation blocks pass any input through.
        let x = if pre_activation {
            rng.normal_tensor((2, 6, 7, 5), 0., 1., DType::F32, &Device::Cpu)?
        } else {
            rng.uniform_tensor((2, 6, 7, 5), 0., 2., DType::F32, &Device::Cpu)?
        };
        for train in [true, false] {
            let y = block.forward_t(&x, train)?;
            assert_eq!(
                y.flatten_all()?.to_vec1::<f32>()?,
                x.flatten_all()?.to_vec1::<f32>()?,
                "pre_activation={pre_activation} train={train}"
            );
        }
    }
    Ok(())
}

#[test]
fn every_shortcut_policy_and_ordering_gives_the_right_shape() -> Result<()> {
    let x = Tensor::rand(0f32, 1., (2, 4, 9, 8), &Device::Cpu)?;
    for policy in [
        ShortcutPolicy::ZeroPad,
        ShortcutPolicy::Projection,
        ShortcutPolicy::AlwaysProjection,
        ShortcutPolicy::Removed,
    ] {
        for pre_activation in [false, true] {
            let rng = RngHandle::seed_from_u64(2);
            let varmap = VarMap::new();
            let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
            let cfg = BasicBlockConfig {
                stride: 2,
                shortcut: policy,
                pre_activation,
                drop_path: 0.2,
                ..Default::default()
            };
            let block = basic_block(4, 8, cfg, &rng, vb)?;
            let y = block.forward_t(&x, true)?;
            assert_eq!(y.dims(), [2, 8, 5, 4], "{policy:?} pre={pre_activation}");
            let has_proj = varmap
                .data()
                .lock()
                .expect("lock")
                .contains_key("downsample.0.weight");
            let want_proj = matches!(
                policy,
                ShortcutPolicy::Projection | ShortcutPolicy::AlwaysProjection
            );
            assert_eq!(has_proj, want_proj, "{policy:?}");
        }
    }
    Ok(())
}

#[test]
fn bad_configurations_are_errors() {
    let rng = RngHandle::seed_from_u64(3);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let zero_stride = BasicBlockConfig {
        stride: 0,
        ..Default::default()
    };
    assert!(basic_block(4, 8, zero_stride, &rng, vb.pp("a")).is_err());
    let bad_dp = BasicBlockConfig {
        drop_path: 2.,
        ..Default::default()
    };
    assert!(basic_block(4, 4, bad_dp, &rng, vb.pp("b")).is_err());
    // Option A cannot shrink channels.
    let shrink = BasicBlockConfig {
        stride: 2,
        shortcut: ShortcutPolicy::ZeroPad,
        ..Default::default()
    };
    assert!(basic_block(8, 4, shrink, &rng, vb.pp("c")).is_err());
}

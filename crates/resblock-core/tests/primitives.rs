//! Properties of the residual primitives: identity at init, shapes, drop-path, probes.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use common::max_abs_diff;
use resblock_core::{
    mlp_block, residual_mlp, seeded_var_builder, Activation, DropPath, MlpBlockConfig, Probed,
    ProjectionConfig, Residual, ResidualMlpConfig, ResidualScale, RngHandle, Shortcut,
    ShortcutPolicy,
};

fn setup(seed: u64) -> (RngHandle, VarMap) {
    (RngHandle::seed_from_u64(seed), VarMap::new())
}

#[test]
fn zero_init_and_rezero_blocks_are_exactly_the_identity() -> Result<()> {
    for scale in [ResidualScale::ZeroInit, ResidualScale::ReZero] {
        for hidden in [None, Some(16)] {
            let (rng, varmap) = setup(1);
            let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
            let cfg = MlpBlockConfig {
                hidden,
                activation: Activation::Relu,
                layer_norm: true,
                scale,
                ..Default::default()
            };
            let block = mlp_block(10, 10, cfg, &rng, vb)?;
            let x = rng.normal_tensor((7, 10), 0., 3., DType::F32, &Device::Cpu)?;
            for train in [false, true] {
                let y = block.forward_t(&x, train)?;
                assert_eq!(
                    max_abs_diff(&y, &x)?,
                    0.,
                    "{scale:?} {hidden:?} train={train}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn a_plain_block_is_not_the_identity() -> Result<()> {
    let (rng, varmap) = setup(2);
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let block = mlp_block(10, 10, MlpBlockConfig::article(), &rng, vb)?;
    let x = rng.normal_tensor((7, 10), 0., 1., DType::F32, &Device::Cpu)?;
    assert!(max_abs_diff(&block.forward_t(&x, false)?, &x)? > 1e-3);
    Ok(())
}

#[test]
fn every_shortcut_kind_gives_the_expected_shape() -> Result<()> {
    let (rng, varmap) = setup(3);
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let x = rng.normal_tensor((2, 4, 9, 8), 0., 1., DType::F32, &Device::Cpu)?;
    let proj = Shortcut::projection(4, 8, 2, ProjectionConfig::default(), vb.pp("downsample"))?;
    let cases: Vec<(&str, Shortcut, Option<Vec<usize>>)> = vec![
        ("identity", Shortcut::Identity, Some(vec![2, 4, 9, 8])),
        ("projection", proj, Some(vec![2, 8, 5, 4])),
        (
            "zero-pad",
            Shortcut::zero_pad(4, 8, 2)?,
            Some(vec![2, 8, 5, 4]),
        ),
        (
            "zero-pad odd",
            Shortcut::zero_pad(4, 7, 1)?,
            Some(vec![2, 7, 9, 8]),
        ),
        ("removed", Shortcut::Removed, None),
    ];
    for (name, sc, want) in cases {
        let got = sc.apply(&x, true)?.map(|t| t.dims().to_vec());
        assert_eq!(got, want, "{name}");
    }
    let lin = Shortcut::linear(10, 6, vb.pp("shortcut"))?;
    let y = lin.apply(&Tensor::zeros((3, 10), DType::F32, &Device::Cpu)?, false)?;
    assert_eq!(y.map(|t| t.dims().to_vec()), Some(vec![3, 6]));
    // Projection parameters are named as torchvision's downsample.
    let names: std::collections::BTreeSet<String> = varmap
        .data()
        .lock()
        .expect("lock")
        .keys()
        .cloned()
        .collect();
    for k in [
        "downsample.0.weight",
        "downsample.1.weight",
        "downsample.1.running_var",
        "downsample.1.num_batches_tracked",
    ] {
        assert!(names.contains(k), "{k} missing from {names:?}");
    }
    Ok(())
}

#[test]
fn shortcut_policies_pick_he_et_al_options() -> Result<()> {
    let (rng, varmap) = setup(4);
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let p = ProjectionConfig::default();
    let pick = |pol: ShortcutPolicy, i, o, s, n: &str| -> Result<&'static str> {
        Ok(Shortcut::for_conv_block(pol, i, o, s, p, vb.pp(n))?.describe())
    };
    let proj = "projection (1x1 conv + BN)";
    assert_eq!(pick("A".parse()?, 16, 16, 1, "a1")?, "identity");
    assert_eq!(pick("A".parse()?, 16, 32, 2, "a2")?, "zero-pad (option A)");
    assert_eq!(pick("B".parse()?, 16, 16, 1, "b1")?, "identity");
    assert_eq!(pick("B".parse()?, 16, 32, 2, "b2")?, proj);
    assert_eq!(pick("C".parse()?, 16, 16, 1, "c1")?, proj);
    assert_eq!(pick("none".parse()?, 16, 32, 2, "n")?, "none");
    assert!("D".parse::<ShortcutPolicy>().is_err());
    assert!(Shortcut::zero_pad(8, 4, 2).is_err());
    Ok(())
}

#[test]
fn mismatched_shortcut_is_a_clear_error() -> Result<()> {
    let (rng, varmap) = setup(5);
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let lin = resblock_core::linear(10, 6, vb.pp("linear"))?;
    let block = Residual::new(lin, Shortcut::Identity);
    let err = block
        .forward_t(&Tensor::zeros((2, 10), DType::F32, &Device::Cpu)?, false)
        .expect_err("10 -> 6 with identity shortcut must fail");
    assert!(err.to_string().contains("shortcut gives shape"), "{err}");
    Ok(())
}

#[test]
fn drop_path_statistics_and_eval_identity() -> Result<()> {
    let p = 0.3;
    let dp = DropPath::new(p, RngHandle::seed_from_u64(9))?;
    let n = 20_000;
    let x = Tensor::ones((n, 4), DType::F32, &Device::Cpu)?;
    let y = dp.forward_t(&x, true)?.to_vec2::<f32>()?;
    let dropped = y.iter().filter(|r| r[0] == 0.).count() as f64 / n as f64;
    assert!((dropped - p).abs() < 0.015, "dropped fraction {dropped}");
    // Whole samples are dropped or kept, kept ones scaled by 1/(1-p).
    let keep_val = (1. / (1. - p)) as f32;
    for r in &y {
        assert!(r.iter().all(|&v| v == r[0]) && (r[0] == 0. || (r[0] - keep_val).abs() < 1e-6));
    }
    let mean: f64 = y.iter().map(|r| r[0] as f64).sum::<f64>() / n as f64;
    assert!((mean - 1.).abs() < 0.03, "mean {mean}");
    // Eval: exactly the identity.
    assert_eq!(max_abs_diff(&dp.forward_t(&x, false)?, &x)?, 0.);
    // Seeded: the same seed gives the same mask.
    let again = DropPath::new(p, RngHandle::seed_from_u64(9))?.forward_t(&x, true)?;
    assert_eq!(again.to_vec2::<f32>()?, y);
    assert!(DropPath::new(1.5, RngHandle::seed_from_u64(0)).is_err());
    Ok(())
}

#[test]
fn probes_measure_without_changing_the_output() -> Result<()> {
    let (rng, varmap) = setup(10);
    let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
    let cfg = ResidualMlpConfig {
        in_dim: 6,
        width: 8,
        depth: 3,
        out_dim: Some(2),
        drop_path: 0.,
        block: MlpBlockConfig {
            hidden: Some(8),
            activation: Activation::Relu,
            ..Default::default()
        },
    };
    let mlp = residual_mlp(cfg, &rng, vb)?;
    let x = rng.normal_tensor((5, 6), 0., 1., DType::F32, &Device::Cpu)?;
    let before = mlp.forward_t(&x, false)?;
    assert!(mlp.residual_ratios().iter().all(|(_, r)| r.is_none()));
    mlp.set_probing(true);
    let after = mlp.forward_t(&x, false)?;
    assert_eq!(max_abs_diff(&before, &after)?, 0.);
    let ratios = mlp.residual_ratios();
    assert_eq!(ratios.len(), 3);
    assert_eq!(ratios[0].0, "blocks.0");
    // Check block 0's ratio by hand: ||g(h)|| / ||h|| with h = stem(x).
    let stem = resblock_core::linear(
        6,
        8,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu).pp("stem"),
    )?;
    let h = candle_core::Module::forward(&stem, &x)?;
    let g = (mlp.blocks()[0].forward_t(&h, false)? - &h)?;
    let want = resblock_core::sum_sq(&g)?.sqrt() / resblock_core::sum_sq(&h)?.sqrt();
    let got = ratios[0].1.expect("recorded");
    assert!((got - want).abs() < 1e-5 * want.max(1.), "{got} vs {want}");
    mlp.set_probing(false);
    assert!(mlp.residual_ratios().iter().all(|(_, r)| r.is_none()));
    Ok(())
}

#[test]
fn seeded_var_builder_is_reproducible() -> Result<()> {
    let build = |seed| -> Result<Vec<f32>> {
        let (rng, varmap) = setup(seed);
        let vb = seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu);
        let b = mlp_block(10, 10, MlpBlockConfig::article(), &rng, vb)?;
        Ok(b.branch().fc1().weight().flatten_all()?.to_vec1()?)
    };
    assert_eq!(build(11)?, build(11)?);
    assert_ne!(build(11)?, build(12)?);
    // PyTorch's Linear init bound: |w| <= 1/sqrt(fan_in).
    let bound = 1. / (10f32).sqrt();
    assert!(build(11)?.iter().all(|w| w.abs() <= bound));
    Ok(())
}

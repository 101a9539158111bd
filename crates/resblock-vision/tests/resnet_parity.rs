//! Eval logits, train-mode logits and gradients against torchvision with identical
//! (hash-generated) weights; fixtures from tests/fixtures/make_resnet_fixtures.py.

mod common;

use anyhow::Result;
use candle_core::{ModuleT, Var};
use candle_nn::VarMap;
use common::{assert_close, fixture, get, hash_var_builder};
use resblock_core::RngHandle;
use resblock_vision::{resnet, ResNetConfig};

fn eval_logits_match(name: &str, input: &str) -> Result<()> {
    let f = fixture("resnet_parity.safetensors")?;
    let varmap = VarMap::new();
    let net = resnet(
        &ResNetConfig::preset(name)?,
        &RngHandle::seed_from_u64(0),
        hash_var_builder(&varmap),
    )?;
    let x = get(&f, input)?;
    let want = get(&f, &format!("{name}.logits_eval"))?;
    let y = net.forward_t(x, false)?;
    assert_close(name, &y, want, 1e-4)?;
    // The same weights as plain tensors (inference: each BatchNorm runs in its
    // convolution's epilogue instead of as separate ops).
    let plain: std::collections::HashMap<String, candle_core::Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap lock"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let dtype = y.dtype();
    let net = resnet(
        &ResNetConfig::preset(name)?,
        &RngHandle::seed_from_u64(0),
        candle_nn::VarBuilder::from_tensors(plain, dtype, x.device()),
    )?;
    assert_close(
        &format!("{name} (plain tensors)"),
        &net.forward_t(x, false)?,
        want,
        1e-4,
    )
}

#[test]
fn resnet18_eval() -> Result<()> {
    eval_logits_match("resnet18", "input.imagenet")
}

#[test]
fn resnet50_eval() -> Result<()> {
    eval_logits_match("resnet50", "input.imagenet")
}

#[test]
fn resnext50_32x4d_eval() -> Result<()> {
    eval_logits_match("resnext50_32x4d", "input.imagenet")
}

#[test]
fn wide_resnet50_2_eval() -> Result<()> {
    eval_logits_match("wide_resnet50_2", "input.imagenet")
}

#[test]
fn cifar_resnet20_eval() -> Result<()> {
    eval_logits_match("resnet20", "input.cifar")
}

#[test]
fn resnet18_train_mode_logits_gradients_and_running_stats() -> Result<()> {
    let f = fixture("resnet_parity.safetensors")?;
    let varmap = VarMap::new();
    let net = resnet(
        &ResNetConfig::preset("resnet18")?,
        &RngHandle::seed_from_u64(0),
        hash_var_builder(&varmap),
    )?;
    let y = net.forward_t(get(&f, "input.imagenet")?, true)?;
    assert_close("train logits", &y, get(&f, "resnet18.logits_train")?, 1e-3)?;
    let grads = (&y * get(&f, "resnet18.r")?)?.sum_all()?.backward()?;
    let data = varmap.data().lock().expect("lock");
    let var = |k: &str| -> Var { data[k].clone() };
    let g_conv1 = grads
        .get(var("conv1.weight").as_tensor())
        .expect("conv1 grad");
    assert_close(
        "grad conv1.weight",
        g_conv1,
        get(&f, "resnet18.grad.conv1.weight")?,
        1e-3,
    )?;
    let g_fc = grads
        .get(var("fc.weight").as_tensor())
        .expect("fc grad")
        .narrow(0, 0, 16)?;
    assert_close(
        "grad fc.weight",
        &g_fc,
        get(&f, "resnet18.grad.fc.weight[:16]")?,
        1e-3,
    )?;
    assert_close(
        "bn1.running_mean",
        var("bn1.running_mean").as_tensor(),
        get(&f, "resnet18.after.bn1.running_mean")?,
        1e-4,
    )
}

/// Folded (conv + BN merged) networks give the unfolded eval outputs.
#[test]
fn folded_networks_match_unfolded() -> Result<()> {
    let f = fixture("resnet_parity.safetensors")?;
    for (name, input) in [
        ("resnet18", "input.imagenet"),
        ("resnet50d", "input.imagenet"),
        ("resnet20", "input.cifar"),
        ("preact_resnet110", "input.cifar"),
    ] {
        let varmap = VarMap::new();
        let net = resnet(
            &ResNetConfig::preset(name)?,
            &RngHandle::seed_from_u64(0),
            hash_var_builder(&varmap),
        )?;
        let x = get(&f, input)?;
        let folded = net.folded()?;
        let y = net.forward_t(x, false)?;
        assert_close(
            &format!("{name} folded"),
            &folded.forward_t(x, false)?,
            &y,
            1e-4,
        )?;
        if name == "resnet18" {
            assert_close(
                "folded vs torchvision",
                &folded.forward_t(x, false)?,
                get(&f, "resnet18.logits_eval")?,
                1e-4,
            )?;
        }
    }
    Ok(())
}

/// ResNet-D (deep stem, avg-down shortcuts) against timm's resnet50d.
#[test]
fn resnet50d_eval_matches_timm() -> Result<()> {
    eval_logits_match("resnet50d", "input.imagenet")
}

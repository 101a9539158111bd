//! Weight files in and out: PyTorch-written .pth/.safetensors load strictly and give
//! PyTorch's logits; saved files have torchvision's exact state_dict; bad files are clear
//! errors.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT};
use candle_nn::VarMap;
use common::{assert_close, fixture, fixture_path, get};
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_vision::weights::{load_into_varmap, load_resnet, read_state_dict, save_varmap};
use resblock_vision::{resnet, Error, ResNetConfig};

/// A path for file `name` in this test file's scratch folder.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("weights-tests");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

#[test]
fn pytorch_pth_and_safetensors_load_and_give_pytorch_logits() -> Result<()> {
    let io = fixture("resnet8_io.safetensors")?;
    let cfg = ResNetConfig::cifar(8)?;
    for file in ["resnet8_torch.pth", "resnet8_torch.safetensors"] {
        let net = load_resnet(&cfg, &fixture_path(file), &Device::Cpu)?;
        let y = net.forward_t(get(&io, "input")?, false)?;
        assert_close(file, &y, get(&io, "logits")?, 1e-5)?;
    }
    Ok(())
}

#[test]
fn loading_into_a_trainable_model_then_saving_round_trips_exactly() -> Result<()> {
    let cfg = ResNetConfig::cifar(8)?;
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    load_into_varmap(&varmap, &fixture_path("resnet8_torch.pth"))?;
    let io = fixture("resnet8_io.safetensors")?;
    assert_close(
        "after load",
        &net.forward_t(get(&io, "input")?, false)?,
        get(&io, "logits")?,
        1e-5,
    )?;

    let out = scratch("resnet8_roundtrip.safetensors");
    save_varmap(&varmap, &out)?;
    let theirs = read_state_dict(&fixture_path("resnet8_torch.safetensors"))?;
    let ours = read_state_dict(&out)?;
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (k, t) in &theirs {
        assert_eq!(ours[k].dtype(), t.dtype(), "{k}");
        assert_eq!(ours[k].dims(), t.dims(), "{k}");
        let a = ours[k]
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let b = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(a, b, "{k}");
    }
    Ok(())
}

/// What torchvision's strict `load_state_dict` checks: the same keys, shapes and dtypes
/// (float32 parameters and buffers, int64 scalar `num_batches_tracked`).
#[test]
fn saved_resnet18_has_torchvisions_state_dict() -> Result<()> {
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    resnet(
        &ResNetConfig::preset("resnet18")?,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    let out = scratch("resnet18.safetensors");
    save_varmap(&varmap, &out)?;
    let saved = read_state_dict(&out)?;
    let text = std::fs::read_to_string(fixture_path("resnet_keys.json"))?;
    let refs: serde_json::Value = serde_json::from_str(&text)?;
    let want: BTreeMap<String, Vec<usize>> =
        serde_json::from_value(refs["resnet18"]["state_dict"].clone())?;
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, shape) in &want {
        assert_eq!(saved[k].dims(), shape.as_slice(), "{k}");
        let dtype = if k.ends_with("num_batches_tracked") {
            DType::I64
        } else {
            DType::F32
        };
        assert_eq!(saved[k].dtype(), dtype, "{k}");
    }
    Ok(())
}

#[test]
fn wrong_architecture_lists_missing_and_unexpected_keys() {
    let err = load_resnet(
        &ResNetConfig::cifar(20).expect("cfg"),
        &fixture_path("resnet8_torch.pth"),
        &Device::Cpu,
    )
    .expect_err("resnet8 weights cannot load into resnet20");
    let msg = err.to_string();
    assert!(matches!(err, Error::KeyMismatch { .. }), "{msg}");
    assert!(
        msg.contains("resnet8_torch.pth") && msg.contains("60 missing key(s) (layer1.1.bn1.bias"),
        "{msg}"
    );
    // And the other way round: extra keys are named.
    let err = load_resnet(
        &ResNetConfig::preset("resnet18").expect("cfg"),
        &fixture_path("resnet8_torch.safetensors"),
        &Device::Cpu,
    )
    .expect_err("resnet8 weights cannot load into resnet18");
    assert!(err.to_string().contains("unexpected key(s)"), "{err}");
}

#[test]
fn shape_mismatch_names_the_key_and_both_shapes() {
    let mut cfg = ResNetConfig::cifar(8).expect("cfg");
    cfg.num_classes = 100;
    let err = load_resnet(&cfg, &fixture_path("resnet8_torch.pth"), &Device::Cpu)
        .expect_err("100 classes");
    let msg = err.to_string();
    assert!(
        msg.contains("fc.bias has shape [10] in the file but the model expects [100]"),
        "{msg}"
    );
}

#[test]
fn truncated_corrupt_and_missing_files_are_clear_errors() -> Result<()> {
    let cfg = ResNetConfig::cifar(8)?;
    for (src, name) in [
        ("resnet8_torch.safetensors", "truncated.safetensors"),
        ("resnet8_torch.pth", "truncated.pth"),
    ] {
        let bytes = std::fs::read(fixture_path(src))?;
        let path = scratch(name);
        std::fs::write(&path, &bytes[..bytes.len() / 2])?;
        let err = load_resnet(&cfg, &path, &Device::Cpu).expect_err("truncated");
        assert!(err.to_string().contains(name), "{err}");
    }
    let garbage = scratch("garbage.safetensors");
    std::fs::write(&garbage, b"not a tensor file at all")?;
    assert!(load_resnet(&cfg, &garbage, &Device::Cpu).is_err());
    let err = load_resnet(&cfg, &scratch("absent.pth"), &Device::Cpu).expect_err("absent");
    assert!(err.to_string().contains("absent.pth"), "{err}");
    let err = load_resnet(&cfg, &fixture_path("resnet_keys.json"), &Device::Cpu).expect_err("json");
    assert!(err.to_string().contains("unknown extension"), "{err}");
    Ok(())
}

#[test]
fn a_failed_save_leaves_the_previous_file_intact() -> Result<()> {
    let rng = RngHandle::seed_from_u64(0);
    let varmap = VarMap::new();
    resnet(
        &ResNetConfig::cifar(8)?,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )?;
    let good = scratch("keep.safetensors");
    save_varmap(&varmap, &good)?;
    let before = std::fs::read(&good)?;
    // A directory in the way of the temporary file's rename target cannot be replaced.
    let blocked = scratch("blocked-dir");
    std::fs::create_dir_all(blocked.join("inner"))?;
    assert!(save_varmap(&varmap, &blocked).is_err());
    assert_eq!(std::fs::read(&good)?, before);
    Ok(())
}

#[test]
fn pth_files_that_call_functions_on_load_are_refused_by_name() {
    // Made by tests/fixtures/make_malicious_pth.py: a valid tensor next to an object whose
    // pickle calls os.system / eval (touching a marker file) under torch.load.
    let marker = std::path::Path::new("/tmp/resblock-pth-payload-ran");
    let _ = std::fs::remove_file(marker);
    for (file, global) in [
        ("evil_system.pth", "posix.system"),
        ("evil_eval.pth", "__builtin__.eval"), // protocol 2 keeps Python 2's module name
    ] {
        let path = fixture_path(file);
        let e = read_state_dict(&path).expect_err("refused");
        let msg = e.to_string();
        assert!(matches!(e, Error::WeightsFormat { .. }), "{msg}");
        assert!(
            msg.contains(global) && msg.contains(file) && msg.contains("nothing was run"),
            "{msg}"
        );
    }
    assert!(!marker.exists(), "the payload ran");
    // A real torch.save state dict names only the allowed globals.
    let ok = read_state_dict(&fixture_path("resnet8_torch.pth")).expect("a plain state dict");
    assert!(ok.contains_key("conv1.weight"));
}

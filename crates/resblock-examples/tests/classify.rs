//! `classify` end to end: tensor mode against PyTorch's logits, several presets, image mode,
//! and clean failures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_vision::weights::{read_state_dict, save_tensors, save_varmap};
use resblock_vision::{resnet, ResNetConfig};

const CLASSIFY: &str = env!("CARGO_BIN_EXE_classify");

fn vision_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../resblock-vision/tests/fixtures")
        .join(name)
}

/// A path for file `name` in this test file's scratch folder.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("classify-tests");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(CLASSIFY)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("classify starts")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn tensor_mode_reproduces_pytorch_logits() {
    let io = vision_fixture("resnet8_io.safetensors");
    let out_path = scratch("resnet8_logits.safetensors");
    for weights in ["resnet8_torch.pth", "resnet8_torch.safetensors"] {
        let out = run(&[
            "--arch",
            "resnet8",
            "--weights",
            s(&vision_fixture(weights)),
            "--input",
            s(&io),
            "--output",
            s(&out_path),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ours = read_state_dict(&out_path).expect("logits")["logits"].clone();
        let theirs = read_state_dict(&io).expect("fixture")["logits"].clone();
        let diff = (ours - &theirs)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max");
        let scale = theirs
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flat")
            .max(0)
            .expect("max");
        let (d, m) = (
            diff.to_scalar::<f32>().expect("d"),
            scale.to_scalar::<f32>().expect("m"),
        );
        assert!(d <= 1e-4 * m, "{weights}: max diff {d} vs scale {m}");
    }
    let out = run(&[
        "--arch",
        "resnet9",
        "--weights",
        s(&vision_fixture("resnet8_torch.pth")),
        "--input",
        s(&io),
        "--output",
        s(&out_path),
    ]);
    assert_fails(&out, "known: resnet18");

    let out = run(&[
        "--arch",
        "resnet20",
        "--weights",
        s(&vision_fixture("resnet8_torch.pth")),
        "--input",
        s(&io),
        "--output",
        s(&out_path),
    ]);
    assert_fails(&out, "missing key(s)");
}

#[test]
fn tensor_mode_works_for_presets_with_matching_weights() {
    let x = Tensor::randn(0f32, 1., (2, 3, 40, 36), &Device::Cpu).expect("x");
    let input = scratch("input.safetensors");
    save_tensors(&HashMap::from([("input".to_string(), x)]), &input).expect("save input");
    for arch in [
        "resnet18",
        "resnext50_32x4d",
        "resnet50d",
        "resnet20",
        "preact_resnet164",
        "plain20",
    ] {
        let mut cfg = ResNetConfig::preset(arch).expect("preset");
        cfg.num_classes = 7;
        let rng = RngHandle::seed_from_u64(1);
        let varmap = VarMap::new();
        resnet(
            &cfg,
            &rng,
            seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
        )
        .expect("build");
        let weights = scratch(&format!("{arch}.safetensors"));
        save_varmap(&varmap, &weights).expect("save weights");
        let output = scratch(&format!("{arch}_logits.safetensors"));
        let out = run(&[
            "--arch",
            arch,
            "--weights",
            s(&weights),
            "--num-classes",
            "7",
            "--input",
            s(&input),
            "--output",
            s(&output),
        ]);
        assert!(
            out.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logits = &read_state_dict(&output).expect("logits file")["logits"];
        assert_eq!(logits.dims(), [2, 7], "{arch}");
        // Forgetting --num-classes is a shape mismatch naming fc.
        let out = run(&[
            "--arch",
            arch,
            "--weights",
            s(&weights),
            "--input",
            s(&input),
            "--output",
            s(&output),
        ]);
        assert_fails(&out, "fc.");
        // The larger presets' weights are 50-100 MB each: gone before the next is written,
        // so the suite's scratch space stays small (a CI host once ran out of disk here).
        for file in [&weights, &output] {
            std::fs::remove_file(file).expect("remove scratch file");
        }
    }
}

#[test]
fn image_mode_prints_top_classes_and_rejects_bad_images() {
    let png = scratch("gradient.png");
    let img = image::RgbImage::from_fn(50, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, 128])
    });
    img.save(&png).expect("write png");
    let weights = vision_fixture("resnet8_torch.safetensors");
    let out = run(&[
        "--arch",
        "resnet20",
        "--weights",
        s(&weights),
        "--image",
        s(&png),
    ]);
    assert_fails(&out, "resnet8_torch.safetensors");

    // resnet20 with its own random weights, 10 classes, small crop.
    let cfg = ResNetConfig::preset("resnet20").expect("preset");
    let rng = RngHandle::seed_from_u64(2);
    let varmap = VarMap::new();
    resnet(
        &cfg,
        &rng,
        seeded_var_builder(&varmap, &rng, DType::F32, &Device::Cpu),
    )
    .expect("build");
    let w20 = scratch("resnet20.safetensors");
    save_varmap(&varmap, &w20).expect("save");
    let out = run(&[
        "--arch",
        "resnet20",
        "--weights",
        s(&w20),
        "--resize",
        "36",
        "--crop",
        "32",
        "--image",
        s(&png),
        s(&png),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains("%  class ")).count(),
        10,
        "{stdout}"
    );

    let bad = scratch("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not really a png").expect("write");
    let out = run(&[
        "--arch",
        "resnet20",
        "--weights",
        s(&w20),
        "--image",
        s(&bad),
    ]);
    assert_fails(&out, "broken.png");
    let out = run(&[
        "--arch",
        "resnet20",
        "--weights",
        s(&w20),
        "--image",
        s(&scratch("missing.jpg")),
    ]);
    assert_fails(&out, "missing.jpg");

    let truncated = scratch("truncated.safetensors");
    let bytes = std::fs::read(&w20).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");
    let out = run(&[
        "--arch",
        "resnet20",
        "--weights",
        s(&truncated),
        "--image",
        s(&png),
    ]);
    assert_fails(&out, "truncated.safetensors");
    let out = run(&["--arch", "resnet20", "--weights", s(&w20)]);
    assert_fails(&out, "error");
}

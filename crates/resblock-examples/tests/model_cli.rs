//! The trained model as a product, end to end: `train` writes a self-describing model file,
//! `predict` and `evaluate` use it without being told anything else, `export` turns it into
//! ONNX, and `train --init-weights` fine-tunes it on grayscale data with another class
//! count and a frozen backbone.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use resblock_vision::weights::read_state_dict;
use resblock_vision::ModelMeta;

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("model-cli", name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("starts")
}

fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

/// Three colour classes of 10x10 RGB images (PNG and JPEG mixed).
fn rgb_folder(root: &Path) -> PathBuf {
    for (split, n) in [("train", 10u32), ("test", 4)] {
        for (class, rgb) in [
            ("red", [200u8, 40, 40]),
            ("green", [40, 200, 40]),
            ("blue", [40, 40, 200]),
        ] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).expect("mkdir");
            for i in 0..n {
                let img = image::RgbImage::from_fn(10, 10, |x, y| {
                    let d = ((x * 7 + y * 3 + i) % 25) as u8;
                    image::Rgb(rgb.map(|c| c.saturating_add(d)))
                });
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                img.save(dir.join(format!("{i}.{ext}"))).expect("save");
            }
        }
    }
    root.to_path_buf()
}

/// Two grayscale classes (dark, bright) of 10x10 PNGs.
fn gray_folder(root: &Path) -> PathBuf {
    for (split, n) in [("train", 8u32), ("val", 4)] {
        for (class, base) in [("bright", 200u8), ("dark", 40u8)] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).expect("mkdir");
            for i in 0..n {
                let img = image::GrayImage::from_fn(10, 10, |x, y| {
                    image::Luma([base.wrapping_add(((x * 5 + y + i) % 20) as u8)])
                });
                img.save(dir.join(format!("{i}.png"))).expect("save");
            }
        }
    }
    root.to_path_buf()
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> String {
    let spec = format!("folder:{}", s(data));
    let mut args = vec![
        "--arch",
        "resnet8",
        "--data",
        &spec,
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--schedule",
        "cosine",
        "--seed",
        "1",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    ok(run(env!("CARGO_BIN_EXE_train"), &args))
}

fn meta_of(path: &Path) -> ModelMeta {
    resblock_vision::read_model_meta(path)
        .expect("readable")
        .expect("has metadata")
}

#[test]
fn train_predict_evaluate_export_and_fine_tune() {
    let data = rgb_folder(&scratch("rgb"));
    let out = scratch("run");
    train(&data, &out, &[]);
    let model = out.join("model.safetensors");

    // The metadata says everything predict needs.
    let meta = meta_of(&model);
    assert_eq!(meta.arch, "resnet8");
    assert_eq!(meta.class_names, ["blue", "green", "red"]);
    assert_eq!((meta.num_classes, meta.in_channels), (3, 3));
    assert_eq!(meta.image_size, [10, 10]);
    assert_eq!(meta.mean.len(), 3);
    assert_eq!(meta.config.shortcut, resblock_core::ShortcutPolicy::ZeroPad);
    assert_eq!(
        meta.dataset.as_deref(),
        Some(format!("folder:{}", s(&data)).as_str())
    );
    let flags = meta.train_flags.as_ref().expect("flags");
    assert_eq!(flags["epochs"], 3);
    let train_acc = meta.test_accuracy.expect("accuracy");
    // The file still loads strictly as a plain state_dict (torchvision naming).
    assert!(read_state_dict(&model)
        .expect("weights")
        .contains_key("layer3.0.conv2.weight"));

    // predict --json: one object per image, top-k class names with probabilities.
    let text = ok(run(
        env!("CARGO_BIN_EXE_predict"),
        &[
            "--model",
            s(&model),
            "--json",
            "--top-k",
            "2",
            s(&data.join("test")),
        ],
    ));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 12);
    let mut hits = 0;
    for l in &lines {
        let path = l["path"].as_str().expect("path");
        let top = l["top"].as_array().expect("top");
        assert_eq!(top.len(), 2);
        let (p0, p1) = (
            top[0]["prob"].as_f64().expect("p"),
            top[1]["prob"].as_f64().expect("p"),
        );
        assert!(p0 >= p1 && p0 + p1 <= 1. + 1e-5, "{l}");
        let class = top[0]["class"].as_str().expect("class");
        assert!(meta.class_names.iter().any(|c| c == class));
        hits += usize::from(path.contains(&format!("/{class}/")));
    }

    // evaluate: the same preprocessing, so the same accuracy as train's own test pass.
    let eval_dir = out.join("eval");
    let report = ok(run(
        env!("CARGO_BIN_EXE_evaluate"),
        &[
            "--model",
            s(&model),
            "--data",
            &format!("folder:{}", s(&data)),
            "--out",
            s(&eval_dir),
        ],
    ));
    assert!(report.contains("confusion matrix"), "{report}");
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(eval_dir.join("results.json")).expect("json"),
    )
    .expect("valid");
    let acc = results["accuracy"].as_f64().expect("accuracy");
    assert!(
        (acc - train_acc).abs() < 1e-6,
        "evaluate {acc}% vs train {train_acc}%"
    );
    assert!(
        (acc - 100. * hits as f64 / 12.).abs() < 1e-6,
        "predict agrees with evaluate"
    );
    let confusion = results["confusion"].as_array().expect("confusion");
    let total: u64 = confusion
        .iter()
        .flat_map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_u64().expect("n"))
        })
        .sum();
    assert_eq!((confusion.len(), total), (3, 12));
    for c in ["blue", "green", "red"] {
        let pc = &results["per_class"][c];
        assert!(
            pc["precision"].is_number() && pc["recall"].is_number(),
            "{results}"
        );
    }
    assert!(eval_dir.join("confusion.png").is_file());

    // export: an ONNX file with the metadata.
    let onnx = out.join("model.onnx");
    ok(run(
        env!("CARGO_BIN_EXE_export"),
        &["--model", s(&model), "--onnx", s(&onnx)],
    ));
    let bytes = std::fs::read(&onnx).expect("onnx");
    assert!(bytes.len() > 100_000, "{} bytes", bytes.len());
    assert!(bytes.windows(8).any(|w| w == b"resblock"));

    // Fine-tune on grayscale data with 2 classes and a frozen backbone.
    let gray = gray_folder(&scratch("gray"));
    let ft = scratch("ft");
    let log = train(
        &gray,
        &ft,
        &["--init-weights", s(&model), "--freeze-backbone"],
    );
    assert!(log.contains("replacing the head"), "{log}");
    assert!(log.contains("replicating the channel"), "{log}");
    let ft_meta = meta_of(&ft.join("model.safetensors"));
    assert_eq!((ft_meta.num_classes, ft_meta.in_channels), (2, 3));
    assert_eq!(ft_meta.class_names, ["bright", "dark"]);
    let before = read_state_dict(&model).expect("before");
    let after = read_state_dict(&ft.join("model.safetensors")).expect("after");
    for (k, t) in &before {
        let buffer = k.ends_with("running_mean")
            || k.ends_with("running_var")
            || k.ends_with("num_batches_tracked");
        if k.starts_with("fc.") || buffer {
            continue;
        }
        let a: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("a");
        let b: Vec<f32> = after[k].flatten_all().and_then(|t| t.to_vec1()).expect("b");
        assert_eq!(a, b, "{k} changed although frozen");
    }
    assert_eq!(after["fc.weight"].dims(), [2, 64]);
    // A grayscale image through the 3-channel model.
    let one = gray.join("val/dark/0.png");
    let text = ok(run(
        env!("CARGO_BIN_EXE_predict"),
        &["--model", s(&ft.join("model.safetensors")), s(&one)],
    ));
    assert!(text.contains("dark") && text.contains("bright"), "{text}");
}

#[test]
fn bad_models_and_images_fail_cleanly() {
    let dir = scratch("bad");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resblock-vision/tests/fixtures");
    let weights = fixtures.join("resnet8_torch.safetensors");
    // Weights without metadata need the architecture.
    assert_fails(
        &run(
            env!("CARGO_BIN_EXE_predict"),
            &["--model", s(&weights), s(&dir)],
        ),
        "--arch",
    );
    assert_fails(
        &run(
            env!("CARGO_BIN_EXE_export"),
            &["--weights", s(&weights), "--onnx", s(&dir.join("x.onnx"))],
        ),
        "--arch",
    );
    assert_fails(
        &run(
            env!("CARGO_BIN_EXE_export"),
            &[
                "--arch",
                "resnet8",
                "--weights",
                s(&weights),
                "--num-classes",
                "5",
                "--onnx",
                s(&dir.join("x.onnx")),
            ],
        ),
        "--num-classes 5",
    );
    // With it, export works and says it assumed the preprocessing.
    let out = run(
        env!("CARGO_BIN_EXE_export"),
        &[
            "--arch",
            "resnet8",
            "--weights",
            s(&weights),
            "--onnx",
            s(&dir.join("x.onnx")),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no resblock metadata"));
    ok(out);
    // A corrupt image names the file.
    let bad = dir.join("broken.png");
    std::fs::write(&bad, b"\x89PNG not really").expect("write");
    assert_fails(
        &run(
            env!("CARGO_BIN_EXE_predict"),
            &["--arch", "resnet8", "--weights", s(&weights), s(&bad)],
        ),
        "broken.png",
    );
    assert_fails(
        &run(
            env!("CARGO_BIN_EXE_predict"),
            &[
                "--arch",
                "resnet8",
                "--weights",
                s(&weights),
                s(&dir.join("missing")),
            ],
        ),
        "missing",
    );
    // --pretrained without network: the file and the way out are named.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let offline = Command::new(env!("CARGO_BIN_EXE_train"))
        .args([
            "--pretrained",
            "resnet18",
            "--epochs",
            "1",
            "--out",
            s(&dir.join("p")),
        ])
        .env("RESBLOCK_CACHE_DIR", s(&dir.join("cache")))
        .env(
            "RESBLOCK_WEIGHTS_MIRROR",
            format!("http://127.0.0.1:{port}/"),
        )
        .output()
        .expect("starts");
    assert_fails(&offline, "resnet18-f37072fd.pth");
    assert_fails(&offline, "RESBLOCK_WEIGHTS_MIRROR");
    assert_fails(
        &run(
            env!("CARGO_BIN_EXE_predict"),
            &["--pretrained", "resnet20", s(&dir)],
        ),
        "unknown --pretrained",
    );
    assert_fails(
        &run(
            env!("CARGO_BIN_EXE_train"),
            &[
                "--freeze-until",
                "layer9",
                "--epochs",
                "1",
                "--out",
                s(&dir.join("r")),
            ],
        ),
        "--freeze-until",
    );
}

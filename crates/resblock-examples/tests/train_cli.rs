//! The `train` binary end to end on a tiny image folder: it learns, writes its outputs,
//! resumes to the same weights, and rejects bad input cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use resblock_vision::weights::read_state_dict;

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("train-cli", name)
}

/// Two classes of 8x8 grayscale PNGs: dark and bright, with a little texture.
fn folder(root: &Path) -> PathBuf {
    resblock_testing::two_class_folder(root, 8, 12, 4)
}

fn run(args: &[&str]) -> Output {
    Command::new(TRAIN)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("train starts")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

fn common(data: &Path, out: &Path, epochs: &str) -> Vec<String> {
    [
        "--arch",
        "resnet8",
        "--data",
        &format!("folder:{}", s(data)),
        "--epochs",
        epochs,
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--schedule",
        "cosine",
        "--out",
        s(out),
        "--seed",
        "3",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

#[test]
fn trains_on_a_folder_writes_outputs_and_resumes_identically() {
    let data = folder(&scratch("data"));
    let out_a = scratch("a");
    let args: Vec<String> = common(&data, &out_a, "3");
    let a = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&a.stdout);
    assert!(
        a.status.success(),
        "{}{}",
        stdout,
        String::from_utf8_lossy(&a.stderr)
    );
    let acc: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("test accuracy: "))
        .and_then(|r| r.split('%').next())
        .and_then(|v| v.parse().ok())
        .expect("a test accuracy line");
    assert!(
        acc >= 75.,
        "dark vs bright should be learnt: {acc}%\n{stdout}"
    );
    for f in [
        "checkpoint.safetensors",
        "metrics.jsonl",
        "loss.png",
        "accuracy.png",
        "model.safetensors",
    ] {
        assert!(out_a.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        std::fs::read_to_string(out_a.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .count(),
        3
    );

    // Interrupted after epoch 1, then resumed to 3: the same final weights as the straight run.
    let out_b = scratch("b");
    let mut first: Vec<String> = common(&data, &out_b, "3");
    first.extend(["--stop-after".to_string(), "1".to_string()]);
    assert!(run(&first.iter().map(String::as_str).collect::<Vec<_>>())
        .status
        .success());
    let mut again: Vec<String> = common(&data, &out_b, "3");
    again.extend(["--resume".to_string(), s(&out_b).to_string()]);
    let b = run(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert!(String::from_utf8_lossy(&b.stdout).contains("resumed"));
    let wa = read_state_dict(&out_a.join("model.safetensors")).expect("a");
    let wb = read_state_dict(&out_b.join("model.safetensors")).expect("b");
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    for (k, t) in &wa {
        let x = t
            .flatten_all()
            .expect("flat")
            .to_dtype(candle_core::DType::F64)
            .expect("f64")
            .to_vec1::<f64>()
            .expect("vec");
        let y = wb[k]
            .flatten_all()
            .expect("flat")
            .to_dtype(candle_core::DType::F64)
            .expect("f64")
            .to_vec1::<f64>()
            .expect("vec");
        assert_eq!(x, y, "{k}");
    }
}

fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn bad_input_fails_cleanly() {
    let data = folder(&scratch("bad-data"));
    let out = scratch("bad-out");
    assert_fails(&run(&["--data", "imagenet:/nowhere"]), "unknown --data");
    assert_fails(
        &run(&["--data", "mnist:/nonexistent-dir"]),
        "put MNIST's files",
    );
    assert_fails(&run(&["--lr", "0"]), "--lr");
    assert_fails(&run(&["--label-smoothing", "1.5"]), "--label-smoothing");
    assert_fails(&run(&["--arch", "resnet19"]), "known: resnet18");
    assert_fails(&run(&["--optimizer", "lbfgs"]), "lbfgs");
    assert_fails(&run(&["--random-erasing", "1.5"]), "--random-erasing");
    assert_fails(&run(&["--rrc", "--rrc-scale", "0"]), "--rrc-scale");
    assert_fails(&run(&["--rrc-scale", "0.5"]), "--rrc");
    assert_fails(
        &run(&[
            "--resume",
            s(&scratch("no-run")),
            "--data",
            &format!("folder:{}", s(&data)),
            "--arch",
            "resnet8",
        ]),
        "checkpoint.safetensors",
    );
    // Mixed image sizes without --image-size name the odd file.
    image::GrayImage::new(5, 5)
        .save(data.join("train/dark/odd.png"))
        .expect("png");
    assert_fails(
        &run(&[
            "--data",
            &format!("folder:{}", s(&data)),
            "--arch",
            "resnet8",
            "--out",
            s(&out),
        ]),
        "odd.png",
    );
    // An empty class folder.
    std::fs::remove_file(data.join("train/dark/odd.png")).expect("rm");
    std::fs::create_dir_all(data.join("train/empty")).expect("mkdir");
    assert_fails(
        &run(&[
            "--data",
            &format!("folder:{}", s(&data)),
            "--arch",
            "resnet8",
            "--out",
            s(&out),
        ]),
        "empty",
    );
}

#[test]
fn download_without_network_fails_with_where_to_put_the_files() {
    // A port nothing listens on stands in for a machine without network.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let dir = scratch("offline-mnist");
    let out = Command::new(TRAIN)
        .args(["--data", &format!("mnist:{}", s(&dir)), "--download"])
        .env("RESBLOCK_DATA_MIRROR", format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("run train");
    assert_fails(&out, "without network");
    assert_fails(&out, "t10k-labels-idx1-ubyte.gz");
    assert_fails(&out, s(&dir));
    assert_fails(
        &run(&["--data", "folder:/somewhere", "--download"]),
        "--download fetches",
    );
}

#[test]
fn max_steps_ends_a_streamed_run_early_with_its_outputs() {
    let data = folder(&scratch("steps-data"));
    let out = scratch("steps");
    let mut args = common(&data, &out, "5");
    args.extend(["--max-steps".to_string(), "2".to_string()]);
    let r = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        stdout.contains("stopped after 2 steps (--max-steps)"),
        "{stdout}"
    );
    // 24 images in batches of 8 are 3 steps an epoch: the run stops inside epoch 1, which
    // is still evaluated, recorded and saved.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
    assert!(out.join("model.safetensors").is_file());
    let bad = run(&["--max-steps", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--max-steps"));
}

#[test]
fn an_existing_run_is_not_overwritten_unasked() {
    let data = folder(&scratch("exist-data"));
    let out = scratch("exist");
    let args = common(&data, &out, "1");
    let first = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let model = std::fs::read(out.join("model.safetensors")).expect("model");
    let again = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(
        err.contains(s(&out)) && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).expect("model"),
        model
    );
    let mut forced = args.clone();
    forced.push("--overwrite".into());
    let o = run(&forced.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_resume_with_other_flags_is_refused_naming_them() {
    let data = folder(&scratch("flags-data"));
    let out = scratch("flags");
    let mut args = common(&data, &out, "2");
    args.extend(["--stop-after".to_string(), "1".to_string()]);
    let first = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // The first run's flags with `extra` (flag, value) pairs replaced or added.
    let resume = |extra: &[&str]| {
        let mut a: Vec<String> = common(&data, &out, "2");
        a.extend(["--resume".to_string(), s(&out).to_string()]);
        for pair in extra.chunks(2) {
            match a.iter().position(|x| x == pair[0]) {
                Some(i) => a[i + 1] = pair[1].to_string(),
                None => a.extend([pair[0].to_string(), pair[1].to_string()]),
            }
        }
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = resume(&["--lr", "0.02", "--label-smoothing", "0.2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--lr (checkpoint: 0.05, now: 0.02)") && err.contains("--label-smoothing"),
        "{err}"
    );
    let o = resume(&["--epochs", "1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--epochs may only grow"));
    // Safe changes: threads, workers.
    let o = resume(&["--threads", "1", "--workers", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn killed_runs_resume_to_bit_identical_weights() {
    let data = folder(&scratch("kill-data"));
    let whole = scratch("kill-whole");
    let args = common(&data, &whole, "4");
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = read_state_dict(&whole.join("model.safetensors")).expect("weights");

    // SIGKILL at pseudo-random moments (some inside checkpoint writes), resuming each time
    // from whatever the last complete checkpoint is.
    let out = scratch("kill-cut");
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut kills = 0;
    let mut finished = false;
    for _ in 0..200 {
        let mut a = common(&data, &out, "4");
        if out.join("checkpoint.safetensors").exists() {
            a.extend(["--resume".to_string(), s(&out).to_string()]);
        }
        let mut child = Command::new(TRAIN)
            .args(&a)
            .env("RAYON_NUM_THREADS", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("train starts");
        if kills < 20 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            std::thread::sleep(std::time::Duration::from_millis(20 + state % 400));
            if child.try_wait().expect("wait").is_none() {
                child.kill().expect("SIGKILL");
                let _ = child.wait();
                kills += 1;
                continue;
            }
        }
        let o = child.wait_with_output().expect("train ends");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if kills >= 20 {
            finished = true;
            break;
        }
        // It finished before the kill: start over into a fresh folder part of the time.
        let _ = std::fs::remove_dir_all(&out);
    }
    assert!(finished && kills >= 20, "{kills} kills");
    let got = read_state_dict(&out.join("model.safetensors")).expect("weights");
    assert_eq!(got.len(), expected.len());
    let values = |t: &candle_core::Tensor| {
        t.to_dtype(candle_core::DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("values")
    };
    for (k, t) in &expected {
        assert!(
            values(t) == values(&got[k]),
            "{k} differs after {kills} kills"
        );
    }
}

#[test]
fn random_resized_crops_and_erasing_train_and_are_part_of_the_run() {
    let data = folder(&scratch("rrc-data"));
    let out = scratch("rrc-out");
    let mut args = common(&data, &out, "1");
    args.extend(["--rrc", "--rrc-scale", "0.5", "--random-erasing", "0.5"].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The flags are in the checkpoint's run flags: a resume without them is refused.
    let mut again = common(&data, &out, "2");
    again.extend(["--resume".to_string(), s(&out).to_string()]);
    let o = run(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert_fails(&o, "--random-erasing (checkpoint: 0.5, now: unset)");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rrc (checkpoint: true, now: false)"));
}

#[test]
fn ema_is_evaluated_and_the_better_weights_are_saved() {
    let data = folder(&scratch("ema-data"));
    let out = scratch("ema-out");
    let mut args = common(&data, &out, "2");
    args.extend(["--ema", "0.9"].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("a line")).expect("json");
    let (raw, ema) = (
        last["test_acc"].as_f64().expect("test_acc"),
        last["ema_test_acc"].as_f64().expect("ema_test_acc"),
    );
    let meta = resblock_vision::model_file::read_model_meta(&out.join("model.safetensors"))
        .expect("meta")
        .expect("present");
    let chosen = meta.weights.as_deref().expect("weights said");
    assert_eq!(chosen, if ema > raw { "ema" } else { "raw" });
    let acc = meta.test_accuracy.expect("accuracy");
    assert!(
        (acc - 100. * raw.max(ema)).abs() < 1e-9,
        "{acc} vs {raw} / {ema}"
    );
    // The saved tensors are the checkpoint's average or its trained weights, as said.
    let model = read_state_dict(&out.join("model.safetensors")).expect("model");
    let ck = resblock_train::checkpoint::Checkpoint::load(&out.join("checkpoint.safetensors"))
        .expect("checkpoint");
    let source = if chosen == "ema" { &ck.ema } else { &ck.model };
    let values = |t: &candle_core::Tensor| {
        t.to_dtype(candle_core::DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("values")
    };
    for (k, t) in &model {
        assert!(
            values(t) == values(&source[k]),
            "{k} is not the {chosen} weights"
        );
    }
    assert_fails(&run(&["--ema", "1"]), "--ema");
}

#[test]
fn a_config_file_sets_flags_the_command_line_overrides_and_the_run_repeats_from_its_config() {
    let data = folder(&scratch("config-data"));
    let dir = scratch("config-files");
    let file = dir.join("recipe.toml");
    std::fs::write(
        &file,
        format!(
            "arch = \"resnet8\"\ndata = \"folder:{}\"\nepochs = 2\nbatch_size = 8\nlr = 0.5\nschedule = \"cosine\"\nrandom_erasing = 0.25\nseed = 3\n",
            s(&data)
        ),
    )
    .expect("write");
    let a = scratch("config-a");
    let o = run(&["--config", s(&file), "--lr", "0.05", "--out", s(&a)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = resblock_vision::model_file::read_model_meta(&a.join("model.safetensors"))
        .expect("meta")
        .expect("present");
    let flags = meta.train_flags.expect("flags");
    assert_eq!(flags["lr"], 0.05, "the command line wins");
    assert_eq!(flags["epochs"], 2);
    assert_eq!(flags["random_erasing"], 0.25);
    // The effective config repeats the run exactly.
    let effective = std::fs::read_to_string(a.join("config.toml")).expect("config.toml");
    assert!(effective.contains("lr = 0.05"), "{effective}");
    let b = scratch("config-b");
    let o = run(&["--config", s(&a.join("config.toml")), "--out", s(&b)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wa = read_state_dict(&a.join("model.safetensors")).expect("a");
    let wb = read_state_dict(&b.join("model.safetensors")).expect("b");
    for (k, t) in &wa {
        let d = (t - &wb[k])
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_dtype(candle_core::DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff");
        assert!(d == 0., "{k} differs by {d}");
    }
    std::fs::write(dir.join("bad.toml"), "learning_rate = 0.1\n").expect("write");
    assert_fails(
        &run(&["--config", s(&dir.join("bad.toml"))]),
        "unknown key \"learning_rate\"",
    );
}

#[test]
fn keep_best_and_early_stopping_select_on_a_held_out_validation_split() {
    let data = folder(&scratch("best-data"));
    let out = scratch("best-out");
    let mut args = common(&data, &out, "6");
    args.extend(
        [
            "--val-split",
            "0.25",
            "--keep-best",
            "--early-stop",
            "1",
            "--lr",
            "0.5",
        ]
        .map(String::from),
    );
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    // 24 training images: 6 held out.
    assert!(stdout.contains("6 images held out"), "{stdout}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    let recs: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let val: Vec<f64> = recs
        .iter()
        .map(|r| r["val_acc"].as_f64().expect("val_acc every epoch"))
        .collect();
    // The best epoch is the first with the highest validation accuracy; with patience 1
    // the run stops one epoch after an epoch that did not improve.
    let best = val
        .iter()
        .enumerate()
        .fold((0, f64::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
    let improved: Vec<bool> = val
        .iter()
        .enumerate()
        .map(|(i, v)| val[..i].iter().all(|p| v > p))
        .collect();
    match improved.iter().position(|i| !i) {
        Some(first_miss) => assert_eq!(recs.len(), first_miss + 1, "{val:?}"),
        None => assert_eq!(recs.len(), 6),
    }
    let meta = resblock_vision::model_file::read_model_meta(&out.join("best.safetensors"))
        .expect("meta")
        .expect("best.safetensors is a model file");
    assert_eq!(meta.weights.as_deref(), Some("best"));
    assert!(
        stdout.contains(&format!("best epoch {}", best.0 + 1)),
        "{stdout} {val:?}"
    );
    // Without a validation split there is nothing to select on.
    assert_fails(&run(&["--keep-best"]), "--val-split");
    assert_fails(&run(&["--val-split", "1"]), "--val-split");
}

#[test]
fn accumulating_batches_makes_fewer_steps() {
    let data = folder(&scratch("acc-data"));
    let out = scratch("acc-out");
    let mut args = common(&data, &out, "1");
    args.extend(["--accumulate", "2"].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 24 training images in batches of 8: 3 batches, 2 optimizer steps.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("2 steps per epoch"), "{stdout}");
    assert_fails(&run(&["--accumulate", "0"]), "--accumulate");
}

#[test]
fn mixup_and_cutmix_train_with_probability_targets() {
    let data = folder(&scratch("mix-data"));
    let out = scratch("mix-out");
    let mut args = common(&data, &out, "2");
    args.extend(
        [
            "--mixup",
            "0.2",
            "--cutmix",
            "1.0",
            "--label-smoothing",
            "0.1",
        ]
        .map(String::from),
    );
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    for line in metrics.lines() {
        let r: serde_json::Value = serde_json::from_str(line).expect("json");
        let (loss, acc) = (r["train_loss"].as_f64(), r["train_acc"].as_f64());
        assert!(
            loss.is_some_and(f64::is_finite) && acc.is_some_and(|a| (0. ..=1.).contains(&a)),
            "{line}"
        );
        assert!(r["test_acc"].as_f64().is_some_and(f64::is_finite), "{line}");
    }
    assert_fails(&run(&["--mixup", "0"]), "--mixup");
    assert_fails(&run(&["--cutmix=-1"]), "--cutmix");
}

#[test]
fn randaugment_and_trivial_augment_train_and_refuse_bad_settings() {
    let data = folder(&scratch("ra-data"));
    for (name, extra) in [
        ("ra", vec!["--randaugment", "2,9"]),
        ("ta", vec!["--trivial-augment"]),
    ] {
        let out = scratch(name);
        let mut args = common(&data, &out, "1");
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_fails(&run(&["--randaugment", "2,31"]), "0..=30");
    assert_fails(&run(&["--randaugment", "two"]), "N,M");
    assert_fails(
        &run(&["--randaugment", "2,9", "--trivial-augment"]),
        "--trivial-augment",
    );
}

#[test]
fn every_shipped_config_parses_and_prints_back_its_flags() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let o = run(&["--config", s(&path), "--print-config"]);
        assert!(
            o.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let printed: toml::Table =
            toml::from_str(&String::from_utf8_lossy(&o.stdout)).expect("TOML");
        let file: toml::Table =
            toml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("TOML");
        // Numbers compare by value (`warmup_epochs = 1` prints back as 1.0).
        let num = |v: &toml::Value| match v {
            toml::Value::Integer(i) => Some(*i as f64),
            toml::Value::Float(f) => Some(*f),
            _ => None,
        };
        for (k, v) in &file {
            let got = printed
                .get(k)
                .unwrap_or_else(|| panic!("{}: {k} missing", path.display()));
            match (num(v), num(got)) {
                (Some(a), Some(b)) => assert_eq!(a, b, "{}: {k}", path.display()),
                _ => assert_eq!(got, v, "{}: {k}", path.display()),
            }
        }
        seen += 1;
    }
    assert!(seen >= 5, "{seen} configs");
}

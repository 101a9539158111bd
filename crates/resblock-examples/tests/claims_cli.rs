//! The programs that show the article's claims (`degradation`, `grow`, `gradient-flow`),
//! end to end on a tiny image folder: each writes `results.json` with the documented
//! fields and its figures, the figures plot exactly the numbers in the JSON, the grown
//! network starts as exactly the small one, and bad flags are clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use resblock_examples::claims::{degradation, gradient_flow, grow, read_json};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("claims-cli", name)
}

fn data(name: &str) -> String {
    let dir = resblock_testing::two_class_folder(&scratch(name), 8, 12, 4);
    format!("folder:{}", dir.display())
}

fn run(exe: &str, args: &[&str]) -> Output {
    Command::new(exe)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("the program starts")
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("results.json")).expect("JSON")
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn is_png(path: &Path) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        img.width() > 100 && img.height() > 100,
        "{}",
        path.display()
    );
}

fn ys(line: &resblock_train::plot::Line) -> Vec<f64> {
    line.points.iter().map(|p| p.1).collect()
}

#[test]
fn degradation_writes_the_four_nets_curves_and_figures() {
    let d = data("deg-data");
    let out = scratch("deg");
    let o = run(
        env!("CARGO_BIN_EXE_degradation"),
        &[
            "--data",
            &d,
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--out",
            out.to_str().expect("utf-8"),
        ],
    );
    let stdout = ok(&o);
    assert!(stdout.contains("plain-56 vs plain-20"), "{stdout}");
    let j = json(&out.join("results.json"));
    for net in degradation::NETS {
        for key in ["train_err", "test_err"] {
            let v = numbers(&j["nets"][net][key]);
            assert_eq!(v.len(), 2, "{net} {key}");
            assert!(
                v.iter().all(|e| (0. ..=100.).contains(e)),
                "{net} {key}: {v:?}"
            );
        }
    }
    // Per-block ratios of the residual nets: 9 and 27 blocks, at init and after each epoch.
    for (net, blocks) in [("resnet20", 9), ("resnet56", 27)] {
        let r = &j["residual_ratios"][net];
        assert_eq!(r["blocks"].as_array().map(Vec::len), Some(blocks), "{net}");
        for row in r["ratios"].as_array().expect("rows") {
            let row = numbers(row);
            assert_eq!(row.len(), 3);
            assert!(row.iter().all(|x| x.is_finite() && *x >= 0.));
        }
    }
    // The figures plot exactly these numbers: plain dashed, residual solid.
    let r: degradation::Results = read_json(&out.join("results.json")).expect("results");
    let charts = r.error_charts();
    for (chart, key) in charts.iter().zip(["train_err", "test_err"]) {
        assert_eq!(chart.lines.len(), 4);
        for line in &chart.lines {
            assert_eq!(ys(line), numbers(&j["nets"][line.label.as_str()][key]));
            assert_eq!(line.dashed, line.label.starts_with("plain"));
        }
    }
    let last = |n: &str| *numbers(&j["nets"][n]["train_err"]).last().expect("epochs");
    assert_eq!(r.plain_gap, last("plain56") - last("plain20"));
    for f in [
        "degradation.png",
        "residual_ratios.png",
        "resnet56/accuracy.png",
    ] {
        is_png(&out.join(f));
    }
}

#[test]
fn grow_starts_exactly_where_the_small_net_ended() {
    let d = data("grow-data");
    let out = scratch("grow");
    let o = run(
        env!("CARGO_BIN_EXE_grow"),
        &[
            "--data",
            &d,
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            out.to_str().expect("utf-8"),
        ],
    );
    let stdout = ok(&o);
    assert!(stdout.contains("max relative logit difference"), "{stdout}");
    let j = json(&out.join("results.json"));
    assert_eq!(j["before"]["depth"], 20);
    assert_eq!(j["grown"]["depth"], 32);
    let diff = j["grown"]["max_rel_logit_diff"].as_f64().expect("number");
    assert!(diff <= 1e-6, "{diff}");
    assert_eq!(j["grown"]["test_acc"], j["before"]["test_acc"]);
    for key in ["after", "control"] {
        let acc = j[key]["test_acc"].as_f64().expect("number");
        assert!((0. ..=100.).contains(&acc), "{key}: {acc}");
    }
    assert_eq!(
        j["control"]["epochs"], 2,
        "the control trains --epochs + --grow-epochs"
    );
    // The new blocks start at exactly zero residual and are marked in the heat map.
    let r: grow::Results = read_json(&out.join("results.json")).expect("results");
    assert_eq!(r.grown.new_blocks.len(), 6);
    let log = &r.residual_ratios;
    for (block, row) in log.blocks.iter().zip(&log.ratios) {
        assert_eq!(row.len(), 2, "at growth and after the one epoch");
        if r.grown.new_blocks.contains(block) {
            assert_eq!(row[0], 0., "{block}");
        } else {
            assert!(row[0] > 0., "{block}");
        }
    }
    // The figure plots these numbers: the grown curve starts at its measured accuracy.
    let charts = r.charts();
    let acc = &charts[0];
    assert_eq!(ys(&acc.lines[0]), r.history.small.test_acc);
    assert_eq!(
        ys(&acc.lines[1]),
        [vec![r.grown.test_acc], r.history.grown.test_acc.clone()].concat()
    );
    assert_eq!(ys(&acc.lines[2]), r.history.control.test_acc);
    assert_eq!(
        ys(&charts[1].lines[2]),
        numbers(&j["history"]["control"]["train_loss"])
    );
    for f in ["grow.png", "grow_ratios.png"] {
        is_png(&out.join(f));
    }
}

#[test]
fn grow_refuses_networks_that_cannot_nest_before_training() {
    let out = scratch("grow-bad");
    let o = run(
        env!("CARGO_BIN_EXE_grow"),
        &["--to", "plain32", "--out", out.to_str().expect("utf-8")],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--to plain32") && err.contains("plain network"),
        "{err}"
    );
    assert!(!out.join("results.json").exists());
}

#[test]
fn gradient_flow_measures_every_conv_of_both_nets() {
    let d = data("flow-data");
    let out = scratch("flow");
    let o = run(
        env!("CARGO_BIN_EXE_gradient-flow"),
        &[
            "--data",
            &d,
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--out",
            out.to_str().expect("utf-8"),
        ],
    );
    let stdout = ok(&o);
    assert!(stdout.contains("after 3 steps"), "{stdout}");
    let j = json(&out.join("results.json"));
    assert_eq!(j["layers"].as_array().map(Vec::len), Some(55));
    assert_eq!(j["layers"][0], "conv1.weight");
    for net in ["plain56", "resnet56"] {
        for key in ["init", "trained"] {
            let v = numbers(&j[net][key]);
            assert_eq!(v.len(), 55, "{net} {key}");
            assert!(v.iter().all(|g| g.is_finite() && *g > 0.), "{net} {key}");
        }
    }
    assert_ne!(
        j["plain56"]["init"], j["plain56"]["trained"],
        "the steps trained"
    );
    let r: gradient_flow::Results = read_json(&out.join("results.json")).expect("results");
    let charts = r.charts();
    for (chart, key) in charts.iter().zip(["init", "trained"]) {
        assert!(chart.log_y);
        for line in &chart.lines {
            assert_eq!(ys(line), numbers(&j[line.label.as_str()][key]));
        }
    }
    is_png(&out.join("gradient_flow.png"));

    let bad = run(
        env!("CARGO_BIN_EXE_gradient-flow"),
        &["--depth", "21", "--out", out.to_str().expect("utf-8")],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--depth must be 6n + 2"));
}

//! The demo binaries end to end: output, and clean failures on bad arguments.

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("the binary starts")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const TOY: &str = env!("CARGO_BIN_EXE_toy-residual");
const CNN: &str = env!("CARGO_BIN_EXE_cnn-block");

fn toy_losses(out: &Output) -> Vec<f64> {
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split("Loss: ").nth(1))
        .map(|v| v.trim().parse::<f64>().expect("a loss value"))
        .collect()
}

#[test]
fn toy_residual_prints_100_falling_losses_and_a_test() {
    let out = run(TOY, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 102, "{stdout}");
    assert_eq!(lines[0].split(',').next(), Some("Epoch [10/1000]"));
    assert!(lines[99].starts_with("Epoch [1000/1000], Loss: "));
    assert!(lines[100].starts_with("Test input: [["));
    assert!(lines[101].starts_with("Output: [["));
    let losses = toy_losses(&out);
    assert_eq!(losses.len(), 100);
    // PyTorch with the same setup (its own random data) goes from ~2.35 to ~0.92; a
    // least-squares fit of 110 parameters to 100x10 unrelated targets cannot go much below.
    assert!(losses[0] > 1.2 && losses[0] < 3.5, "first {}", losses[0]);
    assert!(losses[99] > 0.6 && losses[99] < 1.05, "last {}", losses[99]);
    assert!(
        losses.windows(2).all(|w| w[1] <= w[0] + 1e-4),
        "not falling: {losses:?}"
    );
}

#[test]
fn toy_residual_is_seeded() {
    let a = run(TOY, &["--epochs", "20", "--seed", "5"]);
    let b = run(TOY, &["--epochs", "20", "--seed", "5"]);
    let c = run(TOY, &["--epochs", "20", "--seed", "6"]);
    assert_eq!(text(&a.stdout), text(&b.stdout));
    assert_ne!(text(&a.stdout), text(&c.stdout));
    assert_eq!(toy_losses(&a).len(), 2);
}

#[test]
fn bad_arguments_fail_cleanly() {
    let cases: [(&str, &[&str]); 9] = [
        (TOY, &["--epochs", "0"]),
        (TOY, &["--lr", "-1"]),
        (TOY, &["--lr", "nan"]),
        (TOY, &["--lr", "abc"]),
        (TOY, &["--bogus"]),
        (TOY, &["--samples", "0"]),
        (CNN, &["--stride", "0"]),
        (CNN, &["--batch", "1"]),
        (CNN, &["--in-channels", "x"]),
    ];
    for (bin, args) in cases {
        let out = run(bin, args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{bin} {args:?} succeeded");
        assert!(!err.contains("panicked"), "{bin} {args:?} panicked: {err}");
        assert!(err.contains("error"), "{bin} {args:?}: no message: {err}");
    }
}

#[test]
fn a_diverging_toy_run_stops_with_a_message() {
    let out = run(TOY, &["--lr", "1e30", "--epochs", "50"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("try a smaller --lr"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn cnn_block_shows_shapes_identity_and_a_falling_loss() {
    let out = run(CNN, &["--batch", "4", "--size", "12", "--steps", "5"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("identity_block: shortcut identity, output [4, 16, 12, 12], 4672 parameters"),
        "{s}"
    );
    // 16->32 stride 2: conv1 4608 + bn1 64 + conv2 9216 + bn2 64 + downsample 512 + 64.
    assert!(s.contains("projection_block: shortcut projection (1x1 conv + BN), output [4, 32, 6, 6], 14528 parameters"), "{s}");
    assert!(s.contains("max |block(x) - x| = 0 (identity map)"), "{s}");
    let losses: Vec<f64> = s
        .lines()
        .filter_map(|l| l.split(": loss ").nth(1))
        .map(|v| v.parse().expect("loss"))
        .collect();
    assert_eq!(losses.len(), 5);
    assert!(losses[4] < losses[0], "{losses:?}");
}

/// Without the `mpi` feature, `--distributed` says how to get it, before any work.
#[cfg(not(feature = "mpi"))]
#[test]
fn distributed_needs_the_mpi_build() {
    let out = run(
        env!("CARGO_BIN_EXE_train"),
        &["--distributed", "--epochs", "1"],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--distributed needs a build with MPI") && err.contains("--features mpi"),
        "{err}"
    );
}

//! `train` on a full disk: the failing checkpoint write is a clear error naming the file and
//! the cause, the previous checkpoint is left byte for byte with no temporary file beside
//! it, and once there is room again `--resume` finishes the run with the same weights as a
//! run that never hit the full disk.
//!
//! The disk is a 4 MiB tmpfs mounted in a private mount namespace (`unshare -rm`, so no
//! root is needed where unprivileged user namespaces are allowed); a shell script inside
//! runs `train` there and copies what the test inspects out of the mount.

use std::path::{Path, PathBuf};
use std::process::Command;

use resblock_vision::weights::read_state_dict;

const TRAIN: &str = env!("CARGO_BIN_EXE_train");

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("disk-full", name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

const SCRIPT: &str = r#"
set -eu
mount -t tmpfs -o size=4m tmpfs "$MNT"
"$TRAIN" $FLAGS --epochs 2 --stop-after 1 --out "$MNT/run" > /dev/null
cp "$MNT/run/checkpoint.safetensors" "$OUT/epoch1.safetensors"
# Fill the disk: head stops when the tmpfs is full.
head -c 64M /dev/zero > "$MNT/filler" 2> /dev/null || true
set +e
"$TRAIN" $FLAGS --epochs 2 --resume "$MNT/run" --out "$MNT/run" > /dev/null 2> "$OUT/full.err"
echo $? > "$OUT/full.rc"
set -e
ls -a "$MNT/run" > "$OUT/listing"
cp "$MNT/run/checkpoint.safetensors" "$OUT/after-full.safetensors"
rm "$MNT/filler"
"$TRAIN" $FLAGS --epochs 2 --resume "$MNT/run" --out "$MNT/run" > /dev/null
cp "$MNT/run/model.safetensors" "$OUT/resumed-model.safetensors"
"#;

#[test]
fn a_full_disk_is_a_clear_error_and_the_last_checkpoint_survives() {
    // The test needs a private mount namespace; where the system forbids one (some
    // containers), say so instead of failing on something train does not control.
    let probe_dir = scratch("probe");
    let probe = Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs \"$MNT\"",
        ])
        .env("MNT", &probe_dir)
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: this system allows no private tmpfs mount (unshare -rm): {probe:?}");
        return;
    }
    let data = resblock_testing::two_class_folder(&scratch("data"), 8, 12, 4);
    let flags = format!(
        "--arch resnet8 --data folder:{} --batch-size 8 --lr 0.05 --schedule cosine --seed 3 --threads 2",
        s(&data)
    );
    // The same run on an ordinary disk.
    let whole = scratch("whole");
    let mut args: Vec<String> = flags.split(' ').map(String::from).collect();
    args.extend(["--epochs", "2", "--out", s(&whole)].map(String::from));
    let o = Command::new(TRAIN)
        .args(&args)
        .output()
        .expect("train starts");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mnt = scratch("mnt");
    let out = scratch("out");
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", SCRIPT])
        .env("MNT", &mnt)
        .env("OUT", &out)
        .env("TRAIN", TRAIN)
        .env("FLAGS", &flags)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("unshare (util-linux) starts");
    assert!(
        o.status.success(),
        "the script failed (does this system allow `unshare -rm` and tmpfs mounts?): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |name: &str| std::fs::read_to_string(out.join(name)).expect(name);
    assert_ne!(
        read("full.rc").trim(),
        "0",
        "train succeeded on a full disk"
    );
    let err = read("full.err");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("run/checkpoint.safetensors"),
        "the error names no file: {err}"
    );
    assert!(
        err.contains("the previous file, if any, is intact"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    eprintln!("the error on a full disk: {err}");
    let listing = read("listing");
    assert!(
        !listing.contains(".tmp"),
        "a temporary file was left: {listing}"
    );
    assert_eq!(
        std::fs::read(out.join("epoch1.safetensors")).expect("epoch 1"),
        std::fs::read(out.join("after-full.safetensors")).expect("after"),
        "the previous checkpoint changed"
    );
    let want = read_state_dict(&whole.join("model.safetensors")).expect("weights");
    let got = read_state_dict(&out.join("resumed-model.safetensors")).expect("weights");
    assert_eq!(want.len(), got.len());
    for (k, t) in &want {
        let diff = (t - &got[k])
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_dtype(candle_core::DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .expect("diff");
        assert!(diff == 0.0, "{k} differs by {diff} after the resume");
    }
}

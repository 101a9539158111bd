//! `--pretrained`: download from a real HTTP server on loopback, hash check, one-time
//! conversion into a model file with metadata, the cache, and refusal of a wrong file.
#![cfg(feature = "download")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use resblock_io::sha256_file;
use resblock_vision::pretrained::{fetch_pretrained, Pretrained};

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("pretrained", name)
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resnet8_torch.pth")
}

/// A weight set like torchvision's, for the fixture: `resnet8-<sha256 prefix>.pth`.
fn entry(prefix: &str) -> Pretrained {
    let file: &'static str = Box::leak(format!("resnet8-{prefix}.pth").into_boxed_str());
    Pretrained {
        name: "resnet8",
        arch: "resnet8",
        file,
        resize: 256,
    }
}

#[test]
fn downloads_checks_converts_once_and_caches() -> anyhow::Result<()> {
    let bytes = std::fs::read(fixture())?;
    let digest = sha256_file(&fixture())?;
    let p = entry(&digest[..8]);
    let hits = Arc::new(AtomicUsize::new(0));
    let base = resblock_testing::serve_files(vec![(p.file.to_string(), bytes)], hits.clone());
    let cache = scratch("ok");

    let model = fetch_pretrained(&p, &cache, Some(&base))?;
    assert_eq!(
        model,
        cache.join(format!("resnet8-{}.safetensors", &digest[..8]))
    );
    let meta = resblock_vision::read_model_meta(&model)?.expect("metadata");
    assert_eq!((meta.arch.as_str(), meta.num_classes), ("resnet8", 10));
    assert_eq!(
        meta.source.as_deref(),
        Some(format!("{base}{}", p.file).as_str())
    );
    assert!(
        !cache.join(p.file).exists(),
        "the .pth is converted once and removed"
    );
    // The converted weights are the download's.
    let a = resblock_vision::weights::read_state_dict(&fixture())?;
    let b = resblock_vision::weights::read_state_dict(&model)?;
    assert_eq!(a.len(), b.len());
    let w =
        |m: &std::collections::BTreeMap<String, candle_core::Tensor>| -> anyhow::Result<Vec<f32>> {
            Ok(m["layer2.0.conv1.weight"].flatten_all()?.to_vec1()?)
        };
    assert_eq!(w(&a)?, w(&b)?);

    // Second call: from the cache, no request.
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    fetch_pretrained(&p, &cache, Some(&base))?;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    Ok(())
}

#[test]
fn a_file_whose_hash_differs_is_refused_and_nothing_is_kept() -> anyhow::Result<()> {
    let p = entry("00000000");
    let base = resblock_testing::serve_files(
        vec![(p.file.to_string(), std::fs::read(fixture())?)],
        Arc::new(AtomicUsize::new(0)),
    );
    let cache = scratch("bad-hash");
    let e = fetch_pretrained(&p, &cache, Some(&base)).expect_err("wrong hash");
    let msg = e.to_string();
    assert!(msg.contains("SHA-256") && msg.contains("00000000"), "{msg}");
    assert_eq!(
        std::fs::read_dir(&cache)?.count(),
        0,
        "nothing left in the cache"
    );

    // Nothing listening: the message says how to do it by hand.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let e = fetch_pretrained(&p, &cache, Some(&format!("http://127.0.0.1:{port}/")))
        .expect_err("offline");
    assert!(e.to_string().contains("RESBLOCK_WEIGHTS_MIRROR"), "{e}");
    Ok(())
}

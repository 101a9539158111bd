//! Readers on small files in the real formats, the bundled MNIST-10k, and the loader.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use resblock_train::data::{
    read_cifar, read_image_folder, read_mnist, verify_sha256sums, CifarKind,
};
use resblock_train::{BatchSource, DataLoader, Dataset, ImageDataset, Transform};

fn scratch(name: &str) -> PathBuf {
    resblock_testing::scratch_dir!("data-tests", name)
}

fn idx_images(n: u32, h: u32, w: u32, magic: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [magic, n, h, w] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend((0..n * h * w).map(|i| (i % 251) as u8));
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0000_0801u32.to_be_bytes());
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

fn write_mnist(dir: &Path, compress: bool, train_labels: &[u8]) {
    let files = [
        (
            "train-images-idx3-ubyte",
            idx_images(train_labels.len() as u32, 4, 3, 0x803),
        ),
        ("train-labels-idx1-ubyte", idx_labels(train_labels)),
        ("t10k-images-idx3-ubyte", idx_images(2, 4, 3, 0x803)),
        ("t10k-labels-idx1-ubyte", idx_labels(&[3, 9])),
    ];
    for (name, bytes) in files {
        let (name, bytes) = if compress {
            (format!("{name}.gz"), gz(&bytes))
        } else {
            (name.to_string(), bytes)
        };
        std::fs::write(dir.join(name), bytes).expect("write");
    }
}

#[test]
fn mnist_idx_raw_and_gz() -> Result<()> {
    for compress in [false, true] {
        let dir = scratch(if compress { "mnist-gz" } else { "mnist-raw" });
        write_mnist(&dir, compress, &[0, 1, 2, 7, 9]);
        let (train, test) = read_mnist(&dir)?;
        assert_eq!((train.len(), test.len()), (5, 2));
        assert_eq!(train.shape(), (1, 4, 3));
        assert_eq!(train.labels, [0, 1, 2, 7, 9]);
        assert_eq!(train.pixels[13], 13);
        let (x, y) = train.get(1)?;
        assert_eq!((x.len(), y), (12, 1));
        assert!((x[0] - 12. / 255.).abs() < 1e-7);
    }
    Ok(())
}

#[test]
fn mnist_errors_name_the_file() -> Result<()> {
    let dir = scratch("mnist-bad");
    write_mnist(&dir, false, &[0, 1, 12]);
    let err = read_mnist(&dir).expect_err("label 12").to_string();
    assert!(
        err.contains("train-labels-idx1-ubyte") && err.contains("label 12"),
        "{err}"
    );

    write_mnist(&dir, false, &[0, 1, 2]);
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx_images(3, 4, 3, 0x804),
    )?;
    let err = read_mnist(&dir).expect_err("magic").to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("wrong magic"),
        "{err}"
    );

    let mut short = idx_images(3, 4, 3, 0x803);
    short.truncate(30);
    std::fs::write(dir.join("train-images-idx3-ubyte"), short)?;
    let err = read_mnist(&dir).expect_err("short").to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("announces 3 images of 4x3"),
        "{err}"
    );

    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx_images(4, 4, 3, 0x803),
    )?;
    let err = read_mnist(&dir).expect_err("count").to_string();
    assert!(err.contains("3 labels for 4 images"), "{err}");

    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        &gz(&idx_images(3, 4, 3, 0x803))[..20],
    )?;
    assert!(read_mnist(&dir).is_err());
    let err = read_mnist(&scratch("mnist-empty"))
        .expect_err("missing")
        .to_string();
    assert!(err.contains("put MNIST's files"), "{err}");
    Ok(())
}

#[test]
fn bundled_mnist_10k_is_intact_and_readable() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist-10k");
    verify_sha256sums(&dir)?;
    let (train, test) = read_mnist(&dir)?;
    assert_eq!((train.len(), test.len()), (7996, 2004));
    assert_eq!(train.shape(), (1, 28, 28));
    let mut counts = [0usize; 10];
    for &l in &train.labels {
        counts[l as usize] += 1;
    }
    // About 1,000 per digit before the 80/20 split (measured: 690 for 5 to 901 for 1).
    assert!(
        counts.iter().all(|&c| (600..1000).contains(&c)),
        "{counts:?}"
    );
    assert_eq!(counts.iter().sum::<usize>(), 7996);
    // A tampered copy fails its checksum, naming the file.
    let copy = scratch("mnist-tampered");
    for e in std::fs::read_dir(&dir)? {
        let p = e?.path();
        std::fs::copy(&p, copy.join(p.file_name().expect("name")))?;
    }
    let f = copy.join("t10k-labels-idx1-ubyte.gz");
    let mut bytes = std::fs::read(&f)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&f, bytes)?;
    let err = verify_sha256sums(&copy).expect_err("tampered").to_string();
    assert!(err.contains("t10k-labels-idx1-ubyte.gz"), "{err}");
    Ok(())
}

fn cifar_records(n: usize, label_bytes: usize, label: u8) -> Vec<u8> {
    let mut v = Vec::new();
    for i in 0..n {
        v.extend(std::iter::repeat_n(label, label_bytes));
        v.extend((0..3072).map(|p| ((p + i) % 256) as u8));
    }
    v
}

#[test]
fn cifar10_and_cifar100_binary() -> Result<()> {
    let root = scratch("cifar");
    let d10 = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&d10)?;
    for i in 1..=5 {
        std::fs::write(
            d10.join(format!("data_batch_{i}.bin")),
            cifar_records(2, 1, i as u8),
        )?;
    }
    std::fs::write(d10.join("test_batch.bin"), cifar_records(3, 1, 9))?;
    let (train, test) = read_cifar(&root, CifarKind::Cifar10)?;
    assert_eq!(
        (train.len(), test.len(), train.shape(), train.num_classes),
        (10, 3, (3, 32, 32), 10)
    );
    assert_eq!(train.labels, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);

    let d100 = root.join("cifar-100-binary");
    std::fs::create_dir_all(&d100)?;
    std::fs::write(d100.join("train.bin"), cifar_records(4, 2, 77))?;
    std::fs::write(d100.join("test.bin"), cifar_records(1, 2, 3))?;
    let (train, _) = read_cifar(&d100, CifarKind::Cifar100)?;
    assert_eq!(
        (train.len(), train.num_classes, train.labels[0]),
        (4, 100, 77)
    );

    // Truncated and out-of-range files name themselves.
    let mut bytes = cifar_records(2, 1, 1);
    bytes.pop();
    std::fs::write(d10.join("data_batch_3.bin"), bytes)?;
    let err = read_cifar(&root, CifarKind::Cifar10)
        .expect_err("truncated")
        .to_string();
    assert!(err.contains("data_batch_3.bin"), "{err}");
    std::fs::write(d10.join("data_batch_3.bin"), cifar_records(1, 1, 10))?;
    let err = read_cifar(&root, CifarKind::Cifar10)
        .expect_err("label")
        .to_string();
    assert!(err.contains("label 10"), "{err}");
    let err = read_cifar(&scratch("no-cifar"), CifarKind::Cifar10)
        .expect_err("missing")
        .to_string();
    assert!(err.contains("unpack the official"), "{err}");
    Ok(())
}

fn png(path: &Path, w: u32, h: u32, gray: bool, v: u8) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    if gray {
        image::GrayImage::from_pixel(w, h, image::Luma([v]))
            .save(path)
            .expect("png");
    } else {
        image::RgbImage::from_pixel(w, h, image::Rgb([v, 255 - v, 7]))
            .save(path)
            .expect("png");
    }
}

#[test]
fn image_folders() -> Result<()> {
    let root = scratch("folder");
    for (class, v) in [("b_dog", 200u8), ("a_cat", 20)] {
        for i in 0..3 {
            png(&root.join(format!("train/{class}/{i}.png")), 6, 5, false, v);
        }
    }
    let ds = read_image_folder(&root.join("train"), None, None)?;
    assert_eq!(ds.class_names, ["a_cat", "b_dog"]);
    assert_eq!((ds.len(), ds.shape()), (6, (3, 5, 6)));
    assert_eq!(ds.labels, [0, 0, 0, 1, 1, 1]);
    // R, then G, then B planes.
    assert_eq!(ds.pixels[0], 20);
    assert_eq!(ds.pixels[30], 235);

    let gray = scratch("folder-gray");
    png(&gray.join("x/0.png"), 4, 4, true, 9);
    png(&gray.join("y/0.png"), 4, 4, true, 99);
    assert_eq!(read_image_folder(&gray, None, None)?.channels, 1);

    // Mixed sizes: an error naming the file, unless --image-size.
    png(&root.join("train/a_cat/odd.png"), 9, 9, false, 50);
    let err = read_image_folder(&root.join("train"), None, None)
        .expect_err("mixed")
        .to_string();
    assert!(
        err.contains("odd.png") && err.contains("--image-size"),
        "{err}"
    );
    assert_eq!(
        read_image_folder(&root.join("train"), Some(8), None)?.shape(),
        (3, 8, 8)
    );

    std::fs::write(
        root.join("train/a_cat/broken.png"),
        b"\x89PNG\r\n\x1a\nnope",
    )?;
    let err = read_image_folder(&root.join("train"), Some(8), None)
        .expect_err("broken")
        .to_string();
    assert!(err.contains("broken.png"), "{err}");
    std::fs::remove_file(root.join("train/a_cat/broken.png"))?;

    std::fs::create_dir_all(root.join("train/c_empty"))?;
    let err = read_image_folder(&root.join("train"), Some(8), None)
        .expect_err("empty")
        .to_string();
    assert!(err.contains("c_empty") && err.contains("no .png"), "{err}");
    Ok(())
}

fn toy_dataset(n: usize) -> ImageDataset {
    ImageDataset {
        pixels: (0..n * 16).map(|i| (i % 256) as u8).collect(),
        labels: (0..n as u32).map(|i| i % 3).collect(),
        channels: 1,
        height: 4,
        width: 4,
        num_classes: 3,
        class_names: vec![],
        sources: vec![],
    }
}

fn epoch_data(l: &mut DataLoader, e: usize) -> Result<Vec<(Vec<f32>, Vec<u32>)>> {
    l.epoch(e)?
        .map(|b| {
            let b = b?;
            Ok((
                b.inputs.flatten_all()?.to_vec1::<f32>()?,
                b.targets.to_vec1::<u32>()?,
            ))
        })
        .collect()
}

#[test]
fn loader_is_seeded_ordered_and_complete() -> Result<()> {
    let ds: Arc<dyn Dataset> = Arc::new(toy_dataset(23));
    let aug = vec![
        Transform::RandomCrop {
            size: 4,
            padding: 1,
        },
        Transform::RandomHorizontalFlip { p: 0.5 },
    ];
    let make = |workers| -> Result<DataLoader> {
        Ok(DataLoader::new(ds.clone(), 5)?
            .shuffle(11)
            .transforms(aug.clone())
            .workers(workers))
    };
    let (mut a, mut b) = (make(1)?, make(3)?);
    assert_eq!(a.num_batches(), 5);
    let e0 = epoch_data(&mut a, 0)?;
    assert_eq!(
        e0,
        epoch_data(&mut b, 0)?,
        "threads must not change the batches"
    );
    assert_eq!(e0, epoch_data(&mut a, 0)?, "an epoch repeats");
    assert_ne!(e0, epoch_data(&mut a, 1)?, "epochs differ");
    assert_eq!(
        e0.iter().map(|b| b.1.len()).collect::<Vec<_>>(),
        [5, 5, 5, 5, 3]
    );
    let mut order = a.order(0);
    order.sort_unstable();
    assert_eq!(order, (0..23).collect::<Vec<_>>());
    let mut dl = DataLoader::new(ds.clone(), 5)?.drop_last(true);
    assert_eq!(dl.num_batches(), 4);
    assert_eq!(epoch_data(&mut dl, 0)?.len(), 4);
    // Unshuffled: the dataset's order.
    let plain = epoch_data(&mut DataLoader::new(ds.clone(), 23)?, 0)?;
    assert_eq!(plain[0].1, (0..23u32).map(|i| i % 3).collect::<Vec<_>>());
    // Dropping an epoch's iterator early stops its workers.
    let mut it = make(2)?;
    let first = it.epoch(0)?.next().expect("a batch")?;
    assert_eq!(first.targets.dims(), [5]);
    Ok(())
}

#[test]
fn resize_matches_pytorch_bilinear() -> Result<()> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transforms.safetensors");
    let f = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    let x = f["x"].flatten_all()?.to_vec1::<f32>()?;
    let rng = resblock_core::RngHandle::seed_from_u64(0);
    for (h, w) in [(3, 4), (8, 11), (5, 7), (1, 1), (10, 3)] {
        let want = f[&format!("resize_{h}x{w}")]
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut y = x.clone();
        let hw = Transform::Resize {
            height: h,
            width: w,
        }
        .apply(&mut y, 2, 5, 7, &rng)?;
        assert_eq!(hw, (h, w));
        assert_eq!(y.len(), want.len());
        let err = y
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-6, "resize to {h}x{w}: max error {err}");
    }
    let err = Transform::Resize {
        height: 0,
        width: 3,
    }
    .apply(&mut x.clone(), 2, 5, 7, &rng)
    .expect_err("empty");
    assert!(err.to_string().contains("0x3"), "{err}");
    Ok(())
}

/// Serves `files` on loopback (see `resblock_testing::serve_files`); returns the base URL.
#[cfg(feature = "download")]
fn serve(files: Vec<(String, Vec<u8>)>) -> String {
    resblock_testing::serve_files(files, Default::default())
}

#[cfg(feature = "download")]
fn sha256_hex(bytes: &[u8]) -> String {
    resblock_io::sha256_bytes(bytes)
}

#[cfg(feature = "download")]
#[test]
fn download_verifies_and_unpacks_mnist_and_cifar() -> Result<()> {
    use resblock_train::data::{download, RemoteDataset, RemoteFile, Unpack};
    // MNIST: four generated .gz files, served and checked against their real digests.
    let src = scratch("download-src");
    write_mnist(&src, true, &[1, 2, 3]);
    let mut served = Vec::new();
    let mut ds = RemoteDataset::mnist();
    for f in &mut ds.files {
        let bytes = std::fs::read(src.join(&f.name))?;
        f.sha256 = sha256_hex(&bytes);
        served.push((f.name.clone(), bytes));
    }
    let base = serve(served.clone());
    let dir = scratch("download-mnist");
    download(&ds, &dir, Some(&base))?;
    let (train, test) = read_mnist(&dir)?;
    assert_eq!(
        (train.len(), test.len(), train.labels.clone()),
        (3, 2, vec![1, 2, 3])
    );
    for (name, bytes) in &served {
        assert_eq!(&std::fs::read(dir.join(name))?, bytes, "{name}");
    }

    // A wrong digest is refused, naming the file and both digests; nothing is left under
    // the real name, and a good file already there is kept.
    let mut bad = ds.clone();
    bad.files[1].sha256 = "0".repeat(64);
    let dir2 = scratch("download-bad");
    let err = download(&bad, &dir2, Some(&base))
        .expect_err("digest")
        .to_string();
    assert!(
        err.contains("train-labels-idx1-ubyte.gz") && err.contains(&"0".repeat(64)),
        "{err}"
    );
    assert!(!dir2.join("train-labels-idx1-ubyte.gz").exists());
    assert!(dir2.join("train-images-idx3-ubyte.gz").is_file());

    // CIFAR-10: a generated cifar-10-binary.tar.gz is unpacked and readable.
    let mut tarball = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut add = |name: &str, bytes: Vec<u8>| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tarball
            .append_data(
                &mut h,
                format!("cifar-10-batches-bin/{name}"),
                bytes.as_slice(),
            )
            .expect("tar");
    };
    for i in 1..=5 {
        add(&format!("data_batch_{i}.bin"), cifar_records(1, 1, i as u8));
    }
    add("test_batch.bin", cifar_records(2, 1, 7));
    let tgz = tarball.into_inner()?.finish()?;
    let cifar = RemoteDataset {
        files: vec![RemoteFile {
            sha256: sha256_hex(&tgz),
            ..RemoteDataset::cifar10().files[0].clone()
        }],
        ..RemoteDataset::cifar10()
    };
    assert_eq!(cifar.files[0].unpack, Unpack::TarGz);
    let base = serve(vec![("cifar-10-binary.tar.gz".into(), tgz)]);
    let dir = scratch("download-cifar");
    download(&cifar, &dir, Some(&base))?;
    let (train, test) = read_cifar(&dir, CifarKind::Cifar10)?;
    assert_eq!(
        (train.len(), test.len(), test.labels.clone()),
        (5, 2, vec![7, 7])
    );
    // Present data is not fetched again (the server is no longer asked).
    download(&cifar, &dir, Some("http://127.0.0.1:9/"))?;
    Ok(())
}

#[cfg(feature = "download")]
#[test]
fn download_without_network_says_where_to_put_the_files() -> Result<()> {
    use resblock_train::data::{download, RemoteDataset};
    // A port nothing listens on: connection refused, as without network.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = scratch("download-offline");
    let err = download(
        &RemoteDataset::mnist(),
        &dir,
        Some(&format!("http://127.0.0.1:{port}")),
    )
    .expect_err("offline")
    .to_string();
    assert!(err.contains("without network"), "{err}");
    assert!(err.contains("train-images-idx3-ubyte.gz"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(
        std::fs::read_dir(&dir)?.next().is_none(),
        "no partial files left"
    );
    Ok(())
}

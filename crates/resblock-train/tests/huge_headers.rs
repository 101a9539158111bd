//! A header that claims more data than its file can hold is an error before anything is
//! allocated for it. The whole test binary runs under an allocator capped (while each file
//! is read) at 64 MiB above what is already allocated: a reader that believed a header
//! claiming 3.4e12 bytes would abort here instead of returning an error.

use std::alloc::System;
use std::io::Write;

use cap::Cap;
use resblock_train::data::{read_idx_images, read_idx_labels};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

fn header(magic: u32, dims: &[u32]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

/// Runs `f` with at most 64 MiB of new allocations allowed.
fn capped<T>(f: impl FnOnce() -> T) -> T {
    ALLOC
        .set_limit(ALLOC.allocated() + (64 << 20))
        .expect("limit above current use");
    let out = f();
    ALLOC.set_limit(usize::MAX).expect("unlimit");
    out
}

#[test]
fn idx_headers_claiming_terabytes_are_refused_before_allocating() {
    let dir = std::env::temp_dir().join(format!("resblock-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch");
    // The cap works: a 1 GiB reservation fails inside it.
    assert!(capped(|| Vec::<u8>::new().try_reserve(1 << 30).is_err()));
    // u32::MAX images of 28x28 (3.4e12 bytes), raw and gzipped, the gzip one followed by
    // 128 MiB of zeros (a 128 KB "gzip bomb": a reader that inflates before checking
    // overruns the cap); and u32::MAX labels.
    let images = header(0x803, &[u32::MAX, 28, 28]);
    let bomb = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&images).expect("gzip");
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..128 {
            e.write_all(&zeros).expect("gzip");
        }
        e.finish().expect("gzip")
    };
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("images-raw", images.clone(), true),
        ("images.gz", gzip(&images), true),
        ("images-bomb.gz", bomb, true),
        ("labels-raw", header(0x801, &[u32::MAX]), false),
        ("labels.gz", gzip(&header(0x801, &[u32::MAX])), false),
    ];
    for (name, bytes, is_images) in cases {
        let p = dir.join(name);
        std::fs::write(&p, &bytes).expect("write");
        let err = capped(|| {
            if is_images {
                read_idx_images(&p).map(drop)
            } else {
                read_idx_labels(&p).map(drop)
            }
        })
        .expect_err("a header claiming terabytes must be refused");
        let msg = err.to_string();
        assert!(msg.contains(name), "{msg}");
        assert!(msg.contains("4294967295"), "{msg}");
        assert!(msg.contains("more than the file can hold"), "{msg}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

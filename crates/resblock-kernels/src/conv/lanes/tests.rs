use std::arch::x86_64::*;

use super::work::tiles;
use super::*;

/// The tiles this CPU runs, whatever the dispatch says.
fn runnable_tiles() -> Vec<Tile> {
    [Tile::Avx512, Tile::Avx512Half, Tile::Avx2]
        .into_iter()
        .filter(|tile| isa_of(*tile).supported())
        .collect()
}

/// The instruction set `tile` runs on.
fn isa_of(tile: Tile) -> Isa {
    match tile {
        Tile::Avx512 => Avx512::<2>::ISA,
        Tile::Avx512Half => Avx512::<1>::ISA,
        Tile::Avx2 => Avx2::ISA,
    }
}

/// [`forward`] on `tile`.
fn forward_on(
    tile: Tile,
    x: &[f32],
    w: (&[f32], Option<&Packed>),
    ep: Epilogue<'_, f32>,
    d: &Dims,
    stride: usize,
) -> Vec<f32> {
    forward_on_tile(tile, (x, Layout::plain(d)), w, ep, d, stride)
}

/// The most pixels of `tile`.
fn max_p(tile: Tile) -> usize {
    match tile {
        Tile::Avx512 => Avx512::<2>::MAX_P,
        Tile::Avx512Half => Avx512::<1>::MAX_P,
        Tile::Avx2 => Avx2::MAX_P,
    }
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

fn dims(n: usize, c: usize, h: usize, w: usize, cout: usize) -> Dims {
    dims_at(2, n, c, h, w, cout)
}

fn dims_at(stride: usize, n: usize, c: usize, h: usize, w: usize, cout: usize) -> Dims {
    let g = ConvGeom { stride, ..GEOM };
    Dims::new(&g, &[n, c, h, w], &[cout, c, 3, 3]).expect("dims")
}

const GEOM: ConvGeom = ConvGeom {
    padding: 1,
    stride: 2,
    dilation: 1,
    groups: 1,
};

/// The convolution at `stride` in f64, every image.
fn conv_ref(x: &[f32], w: &[f32], d: &Dims, stride: usize) -> Vec<f64> {
    let mut y = vec![0f64; d.n * d.cout * d.p()];
    for i in 0..d.n {
        for o in 0..d.cout {
            for oy in 0..d.oh {
                for ox in 0..d.ow {
                    let mut s = 0f64;
                    for ci in 0..d.c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (stride * oy + ky, stride * ox + kx);
                                if iy < 1 || ix < 1 || iy > d.h || ix > d.w {
                                    continue;
                                }
                                let xv = x[((i * d.c + ci) * d.h + iy - 1) * d.w + ix - 1];
                                let wv = w[((o * d.c + ci) * 3 + ky) * 3 + kx];
                                s += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    y[((i * d.cout + o) * d.oh + oy) * d.ow + ox] = s;
                }
            }
        }
    }
    y
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool")
}

#[test]
fn transpose16_transposes() {
    if !crate::dispatch::avx512() {
        return;
    }
    let v: Vec<f32> = (0..256).map(|i| i as f32).collect();
    // SAFETY: AVX-512 runs (checked above); each load reads 16 of the 256 values.
    let t = unsafe {
        let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(v[16 * i..].as_ptr()));
        avx512::transpose16(rows)
    };
    let mut got = [0f32; 256];
    for (j, t) in t.iter().enumerate() {
        // SAFETY: as above; each store writes 16 of the 256 values.
        unsafe { _mm512_storeu_ps(got[16 * j..].as_mut_ptr(), *t) };
    }
    for j in 0..16 {
        for i in 0..16 {
            assert_eq!(got[16 * j + i], v[16 * i + j], "row {j}, lane {i}");
        }
    }
}

#[test]
fn tiles_cover_the_row_evenly() {
    for (max_p, max_row) in [
        (Avx512::<2>::MAX_P, Avx512::<2>::MAX_P_ROW),
        (Avx512::<1>::MAX_P, Avx512::<1>::MAX_P_ROW),
        (Avx2::MAX_P, Avx2::MAX_P_ROW),
    ] {
        for ow in 1..100 {
            let t = tiles(ow, (max_p, max_row));
            let count = if ow <= max_row {
                1
            } else {
                ow.div_ceil(max_p).max(2)
            };
            assert_eq!(t.len(), count, "{ow}");
            let mut next = 0;
            for &(first, p) in &t {
                assert_eq!(first, next, "{ow}: tiles in order, no gap");
                assert!(
                    (1..=max_p).contains(&p) && p + 1 >= t[0].1,
                    "{ow}: tile of {p}"
                );
                next += p;
            }
            assert_eq!(next, ow);
        }
    }
    assert_eq!(tiles(28, (14, 14)), [(0, 14), (14, 14)]);
    assert_eq!(tiles(16, (14, 14)), [(0, 8), (8, 8)]);
    assert_eq!(
        tiles(28, (6, 5)),
        [(0, 6), (6, 6), (12, 6), (18, 5), (23, 5)]
    );
    assert_eq!(tiles(6, (6, 5)), [(0, 3), (3, 3)]);
    assert_eq!(tiles(5, (6, 5)), [(0, 5)]);
}

#[test]
fn transpose8_transposes() {
    if !Isa::Avx2.supported() {
        return;
    }
    let v: Vec<f32> = (0..64).map(|i| i as f32).collect();
    // SAFETY: AVX2 runs (checked above); each load reads 8 of the 64 values.
    let t = unsafe {
        let rows: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(v[8 * i..].as_ptr()));
        avx2::transpose8(rows)
    };
    let mut got = [0f32; 64];
    for (j, t) in t.iter().enumerate() {
        // SAFETY: as above; each store writes 8 of the 64 values.
        unsafe { _mm256_storeu_ps(got[8 * j..].as_mut_ptr(), *t) };
    }
    for j in 0..8 {
        for i in 0..8 {
            assert_eq!(got[8 * j + i], v[8 * i + j], "({j}, {i})");
        }
    }
}

/// On every tile the CPU has: every tile width (1 to 14 pixels on AVX-512's 32-channel tile,
/// 1 to 16 on its 16-channel one, 1 to 6 on AVX2,
/// a row's first, last, both or neither), odd and even heights (and, at stride 1, widths),
/// one input channel to several passes of 16 (the sums kept between passes), one block of
/// output channels to eight, batch 1 (the channel blocks shared among the threads) and
/// more, at strides 1 and 2, on one thread and on three; with the weights packed whole,
/// by the work items, and beforehand ([`Packed`]).
#[test]
fn matches_a_plain_convolution() {
    let cases: [(usize, usize, usize, usize, usize); 17] = [
        (2, 3, 8, 8, 32),
        (1, 5, 7, 6, 64),
        (1, 2, 2, 2, 32),
        (1, 1, 3, 4, 32),
        (1, 4, 9, 30, 32),
        (1, 2, 5, 58, 32),
        (2, 16, 6, 56, 32),
        (1, 8, 2, 14, 96),
        (3, 7, 11, 20, 64),
        (1, 3, 4, 26, 32),
        (1, 40, 6, 30, 32),
        (2, 33, 5, 16, 64),
        (1, 17, 14, 14, 128),
        (2, 5, 6, 12, 16),
        (1, 18, 7, 10, 48),
        (1, 3, 3, 14, 16),
        // Rows of three 16-pixel tiles at both strides.
        (1, 2, 3, 96, 16),
    ];
    // At stride 1 the cases' widths give every tile width too (1 and 2 from the 2 and 4
    // wide inputs at stride 2, here their own widths), and odd widths.
    let strided = cases.iter().map(|&case| (2, case));
    let max_tile = runnable_tiles().into_iter().map(max_p).max().unwrap_or(0);
    assert!(
        max_tile == 0 || cases.iter().any(|c| c.3 / 2 >= 2 * max_tile),
        "a row of full tiles"
    );
    let same = cases
        .iter()
        .map(|&(n, c, h, w, cout)| (1, (n, c, h, (w / 2).max(1) + w % 3, cout)))
        // Rows of one AVX2 tile (5 wide) and of two where one would fit (6 wide).
        .chain([(1, (1, 4, 5, 5, 16)), (1, (2, 3, 4, 6, 32))]);
    for tile in runnable_tiles() {
        // Weights packed whole and packed by the work items, block by block.
        let mut packings = [false, false];
        for &(stride, (n, c, h, w, cout)) in strided
            .clone()
            .chain(same.clone())
            .collect::<Vec<_>>()
            .iter()
        {
            if !cout.is_multiple_of(tile.co()) || (stride == 1 && w < 2) {
                continue;
            }
            let d = dims_at(stride, n, c, h, w, cout);
            packings[usize::from(packs_per_block(&d))] = true;
            let (x, wt) = (values(n * c * h * w, 1), values(cout * c * 9, 2));
            let want = conv_ref(&x, &wt, &d, stride);
            let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
            let packed = Packed::packed_for(&wt, (cout, tile.co()), c);
            for (threads, pre) in [(1, None), (3, None), (2, Some(&packed))] {
                let y = pool(threads)
                    .install(|| forward_on(tile, &x, (&wt, pre), Epilogue::NONE, &d, stride));
                assert_eq!(y.len(), want.len());
                for (i, (g, w)) in y.iter().zip(&want).enumerate() {
                    let e = (f64::from(*g) - w).abs() / scale;
                    assert!(
                        e < 1e-5,
                        "{tile:?} s{stride} n{n} {c}->{cout} {h}x{w}, {threads} threads: element {i} is {g}, want {w}"
                    );
                }
            }
        }
        assert_eq!(packings, [true, true], "{tile:?}: both packings covered");
    }
}

/// The finish in the tile's stores gives the bits of the epilogue's separate pass over
/// the raw output, for every combination of its parts.
#[test]
fn finish_matches_the_epilogue_pass() {
    // Two passes over the input channels: the finish follows a pass's partial sums.
    let (n, c, h, w, cout) = (2, 20, 9, 18, 64);
    let d = dims(n, c, h, w, cout);
    let (x, wt) = (values(n * c * h * w, 3), values(cout * c * 9, 4));
    let scale = values(cout, 5);
    let bias = values(cout, 6);
    let residual = values(n * cout * d.p(), 7);
    for tile in runnable_tiles() {
        let raw = forward_on(tile, &x, (&wt, None), Epilogue::NONE, &d, 2);
        for parts in 0..16 {
            let ep = Epilogue {
                scale: (parts & 1 != 0).then_some(&scale[..]),
                bias: (parts & 2 != 0).then_some(&bias[..]),
                residual: (parts & 4 != 0).then_some(&residual[..]),
                relu: parts & 8 != 0,
            };
            let got = forward_on(tile, &x, (&wt, None), ep, &d, 2);
            let mut want = raw.clone();
            let len = cout * d.p();
            for (ni, img) in want.chunks_exact_mut(len).enumerate() {
                ep.image(ni, len).apply_planes(0, img, d.p());
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{tile:?} parts {parts:04b}: element {i}"
                );
            }
        }
    }
}

#[test]
fn applies_only_where_it_can() {
    let ok = |n, c, h, w, cout| applies(&dims(n, c, h, w, cout), &GEOM);
    let Some(isa) = Isa::detect() else {
        assert!(!ok(1, 3, 8, 8, 32));
        return;
    };
    assert!(ok(1, 3, 8, 8, 32) && ok(8, 64, 56, 56, 128) && ok(1, 2, 7, 8, 64));
    // An odd width at stride 2 (a tap right of the row).
    assert!(!ok(1, 3, 8, 7, 32));
    // Whole blocks of the tile's output channels: 16 (AVX-512's 32-channel tile where they
    // are whole blocks of 32, its 16-channel one else).
    assert!(
        ok(1, 16, 8, 8, 48) && ok(1, 16, 8, 8, 16) && !ok(1, 3, 8, 8, 8) && !ok(1, 3, 8, 8, 40)
    );
    // AVX-512's 16-channel tile not on a stem (AVX2's tile of 16 takes it).
    assert_eq!(ok(1, 3, 8, 8, 16), isa == Isa::Avx2);
    assert_eq!(
        Tile::for_layer(isa, 64).co(),
        if isa == Isa::Avx512 { 32 } else { 16 }
    );
    assert_eq!(Tile::for_layer(isa, 48).co(), 16);
    // Stride 1, any width from 2.
    let same = ConvGeom { stride: 1, ..GEOM };
    assert!(applies(&dims_at(1, 1, 3, 8, 7, 32), &same));
    assert!(!applies(&dims_at(1, 1, 3, 8, 1, 32), &same));
    let d = dims(1, 3, 8, 8, 32);
    for g in [
        ConvGeom { padding: 0, ..GEOM },
        ConvGeom { stride: 3, ..GEOM },
        ConvGeom {
            dilation: 2,
            ..GEOM
        },
    ] {
        let d = Dims::new(&g, &[1, 3, 8, 8], &[32, 3, 3, 3]).expect("dims");
        assert!(!applies(&d, &g));
    }
    let d5 = Dims::new(&GEOM, &[1, 3, 8, 8], &[32, 3, 5, 5]).expect("dims");
    assert!(!applies(&d5, &GEOM) && applies(&d, &GEOM));
}

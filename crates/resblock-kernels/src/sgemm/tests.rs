//! Each micro-kernel's GEMM (AVX-512 and AVX2, every one this CPU has, forced with
//! [`force`]) against a plain f64 triple loop: edge tiles in every dimension, more than one
//! block of each size, transposed operands, accumulation, one and two threads.

use super::*;

/// The kernels this CPU has (whatever `RESBLOCK_SIMD` says), each named on stderr when
/// skipped.
fn kernels_here() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|isa| {
            let runs = isa.runs_here();
            if !runs {
                eprintln!("{isa:?} kernel skipped: not on this CPU");
            }
            runs
        })
        .collect()
}

/// The tile (`MR`, `NR`) of the kernel products run on in this thread.
fn tile() -> (usize, usize) {
    match isa().expect("a kernel is forced") {
        Isa::Avx512 => (Avx512Kernel::MR, Avx512Kernel::NR),
        Isa::Avx2 => (Avx2Kernel::MR, Avx2Kernel::NR),
    }
}

/// A deterministic pseudo-random matrix of `len` values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.
        })
        .collect()
}

fn reference(
    (m, n, k): (usize, usize, usize),
    init: &[f32],
    accumulate: bool,
    a: Operand<'_>,
    b: Operand<'_>,
) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = if accumulate {
                f64::from(init[i * n + j])
            } else {
                0.
            };
            for p in 0..k {
                s +=
                    f64::from(a.data[i * a.rs + p * a.cs]) * f64::from(b.data[p * b.rs + j * b.cs]);
            }
            out[i * n + j] = s;
        }
    }
    out
}

fn check(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, accumulate: bool, threads: usize) {
    let av = values(m * k, 1 + m as u64);
    let bv = values(k * n, 2 + n as u64);
    // Row-major, or stored transposed (column-major) and read through strides.
    let a = if a_t {
        Operand {
            data: &av,
            rs: 1,
            cs: m,
        }
    } else {
        Operand {
            data: &av,
            rs: k,
            cs: 1,
        }
    };
    let b = if b_t {
        Operand {
            data: &bv,
            rs: 1,
            cs: k,
        }
    } else {
        Operand {
            data: &bv,
            rs: n,
            cs: 1,
        }
    };
    let init = values(m * n, 3);
    let mut dst = init.clone();
    sgemm((m, n, k), &mut dst, accumulate, a, b, threads);
    let want = reference((m, n, k), &init, accumulate, a, b);
    // The same product with `a` packed beforehand.
    let mut packed = init.clone();
    sgemm_packed(
        &PackedA::new(a, m, k),
        n,
        &mut packed,
        accumulate,
        b,
        threads,
    );
    // The same bits, but where the raw product's column parts read `a` in place in
    // blocks of another depth (`KC_IN_PLACE`), which sum in another order (checked against
    // the triple loop as `dst` is, below).
    if parts(Lhs::Raw(a), (m, n), tile(), threads) == (Parts::Columns { a_in_place: true }) {
        assert_close(&packed, &want, k, &format!("({m}, {n}, {k}) packed lhs"));
    } else {
        assert_eq!(packed, dst, "({m}, {n}, {k}): packed lhs differs");
    }
    if !accumulate {
        // Into uninitialised memory, here NaN (which any value read would carry into the
        // result): the same product, bit for bit.
        let mut fresh = vec![MaybeUninit::new(f32::NAN); m * n];
        sgemm_uninit((m, n, k), &mut fresh, a, b, None, threads);
        let mut fresh_packed = vec![MaybeUninit::new(f32::NAN); m * n];
        sgemm_packed_uninit(
            &PackedA::new(a, m, k),
            n,
            &mut fresh_packed,
            b,
            None,
            threads,
        );
        for (what, out, same) in [("plain", fresh, &dst), ("packed", fresh_packed, &packed)] {
            let what = format!("({m}, {n}, {k}) threads {threads}: uninit {what}");
            assert_same(&assume_init(out), same, &what);
        }
        check_finishes((m, n, k), (&dst, &packed), a, b, threads);
    }
    let what = format!(
        "{:?} ({m}, {n}, {k}) a_t {a_t} b_t {b_t} acc {accumulate} threads {threads}",
        isa()
    );
    assert_close(&dst, &want, k, &what);
}

/// `v`, every value initialised.
fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    // SAFETY: the callers' buffers were filled (with NaN) before the GEMMs wrote them.
    v.into_iter().map(|v| unsafe { v.assume_init() }).collect()
}

/// Within the triple loop's tolerance of `want` (a product `k` deep).
fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
    let tol = 1e-5 * (k as f64).sqrt() * 4. + 1e-6;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= tol,
            "{what}: element {i} is {g}, want {w}"
        );
    }
}

fn assert_same(got: &[f32], want: &[f32], what: &str) {
    let same = got.len() == want.len()
        && got
            .iter()
            .zip(want)
            .all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "{what} differs");
}

/// Each kind of finish, plain and packed, against the products `plain` and `packed` (the
/// same two unfinished) with the convolutions' separate epilogue pass applied: the same
/// bits.
fn check_finishes(
    (m, n, k): (usize, usize, usize),
    (plain, plain_packed): (&[f32], &[f32]),
    a: Operand<'_>,
    b: Operand<'_>,
    threads: usize,
) {
    let scale = values(m, 5);
    let bias = values(m, 6);
    let residual = values(m * n, 7);
    let kinds = [
        (Some(&scale[..]), Some(&bias[..]), None, true),
        (None, Some(&bias[..]), Some(&residual[..]), true),
        (Some(&scale[..]), None, Some(&residual[..]), false),
        (None, None, None, true),
    ];
    let packed = PackedA::new(a, m, k);
    for (scale, bias, residual, relu) in kinds {
        let ep = crate::conv::epilogue::Epilogue {
            scale,
            bias,
            relu,
            residual,
        };
        let mut want = plain.to_vec();
        ep.apply_planes(0, &mut want, n);
        let mut want_packed = plain_packed.to_vec();
        ep.apply_planes(0, &mut want_packed, n);
        let finish = Finish {
            scale,
            bias,
            residual,
            relu,
        };
        let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
        sgemm_uninit((m, n, k), &mut got, a, b, Some(finish), threads);
        let mut got_packed = vec![MaybeUninit::new(f32::NAN); m * n];
        sgemm_packed_uninit(&packed, n, &mut got_packed, b, Some(finish), threads);
        let what = format!(
            "({m}, {n}, {k}) threads {threads} finish (scale {}, bias {}, residual {}, relu {relu})",
            scale.is_some(),
            bias.is_some(),
            residual.is_some()
        );
        assert_same(&assume_init(got), &want, &what);
        assert_same(
            &assume_init(got_packed),
            &want_packed,
            &format!("{what}, packed"),
        );
    }
}

#[test]
fn matches_the_triple_loop() {
    // Edges: 1 row / column, one short of a tile, one past it; several blocks of K, M, N.
    let shapes = [
        (1, 1, 1),
        // AVX2's 6 x 16 tile: exact, one past, and last panels of exactly 8 columns (one
        // vector, unmasked) and of 4 (one vector, masked).
        (6, 16, 16),
        (7, 17, 3),
        (12, 40, 33),
        (11, 20, 9),
        (7, 31, 5),
        (8, 32, 16),
        (9, 33, 17),
        (17, 65, 300),
        (130, 40, 20),
        (64, 49, 576),
        // With `n` past `STRIDED_A_PANELS` panels `A` is packed; the last `NC` block of
        // these two (76 and 6 columns), and every shape above, read a row-major `A` in place.
        (3, 1100, 9),
        // A last panel of exactly 16 columns (one-vector kernel, unmasked stores) and of 4.
        (9, 48, 20),
        (12, 196, 30),
        (140, 1030, 260),
        // `a` above `PARALLEL_PACK` (packed on all threads): 3 x 2 blocks of `MC x KC`.
        (260, 40, 300),
        // More rows than columns, split by columns on two threads (`columns_pay`, for a
        // row-major `a`): each part reads `a` in place; 100 rows end in a 4-row panel.
        // `PARTS_PER_THREAD` parts a thread: one panel each (4 on AVX-512, 8 on AVX2).
        (100, 128, 300),
        // The same with parts of several panels (AVX-512: 20 panels in parts of 3, the last
        // of 2; AVX2: 40 in parts of 5), two blocks of `MC` rows (the second ending in a
        // 4-row panel) and two of `KC_IN_PLACE` depth (512 + 8), walked along the rows.
        (204, 640, 520),
    ];
    for isa in kernels_here() {
        force(isa, || {
            for &(m, n, k) in &shapes {
                for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                    for accumulate in [false, true] {
                        for threads in [1, 2] {
                            check(m, n, k, a_t, b_t, accumulate, threads);
                        }
                    }
                }
            }
        });
    }
}

#[test]
fn columns_split_where_they_spare_packing_all_of_b() {
    let a = |cs: usize| Operand {
        data: &[],
        rs: 1,
        cs,
    };
    let pays = |cs: usize, m: usize, n: usize, nr: usize| columns_pay(a(cs), (m, n), nr, 2);
    // The MLP block's second layer at batch 128: 256 columns, 4 panels a thread.
    assert!(pays(1, 128, 256, 32));
    assert!(pays(1, 100, 128, 32));
    // A square product: 16 panels a thread, `a` in place all the same.
    assert!(pays(1, 1024, 1024, 32));
    // A transposed `a` is packed by every column part: rows stay the split.
    assert!(!pays(128, 128, 256, 32));
    assert!(!pays(1024, 1024, 1024, 32));
    // Uneven parts (196 = 128 + 68), or many rows (each part would read all of them).
    assert!(!pays(1, 256, 196, 32));
    assert!(!pays(1, 2048, 256, 32));
    // Whole panels of the kernel's own width: 96 columns are 6 of AVX2's 16 (3 a thread)
    // but 3 of AVX-512's 32; 48 are uneven on both.
    assert!(pays(1, 64, 96, 16));
    assert!(!pays(1, 64, 96, 32));
    assert!(!pays(1, 64, 48, 16));
    assert!(!pays(1, 64, 48, 32));
    // The split that follows: where the rows outnumber the columns, and only there.
    let split = |cs: usize, m: usize, n: usize, threads: usize| {
        parts(Lhs::Raw(a(cs)), (m, n), (8, 32), threads)
    };
    assert_eq!(split(1, 1024, 1024, 2), Parts::Columns { a_in_place: true });
    assert_eq!(split(1, 204, 640, 2), Parts::Columns { a_in_place: true });
    assert_eq!(split(1024, 1024, 1024, 2), Parts::Rows);
    assert_eq!(split(1, 2048, 256, 2), Parts::Rows);
    assert_eq!(split(1, 128, 1024, 2), Parts::Columns { a_in_place: false });
    assert_eq!(split(1, 1024, 1024, 1), Parts::One);
    // Panels are counted in the kernel's tile: 40 rows x 60 columns are 5 x 2 panels of
    // 8 x 32 (rows the split) but 7 x 4 of 6 x 16 (rows again), 20 x 60 are 3 x 2 and
    // 4 x 4 (columns: as many row panels as column panels).
    let split_on =
        |m: usize, n: usize, tile: (usize, usize)| parts(Lhs::Raw(a(7)), (m, n), tile, 2);
    assert_eq!(split_on(40, 60, (8, 32)), Parts::Rows);
    assert_eq!(split_on(40, 60, (6, 16)), Parts::Rows);
    assert_eq!(split_on(20, 60, (8, 32)), Parts::Rows);
    assert_eq!(
        split_on(20, 60, (6, 16)),
        Parts::Columns { a_in_place: false }
    );
}

#[test]
fn padded_columns() {
    // AVX-512's panels of 32 (a last one of 16 where the rest fits in it) ...
    assert_eq!(columns_on(32, 49), 64);
    assert_eq!(columns_on(32, 196), 208);
    assert_eq!(columns_on(32, 784), 784);
    assert_eq!(columns_on(32, 392), 400);
    assert_eq!(columns_on(32, 1), 16);
    // ... and AVX2's of 16 (a last one of 8).
    assert_eq!(columns_on(16, 49), 56);
    assert_eq!(columns_on(16, 196), 200);
    assert_eq!(columns_on(16, 392), 392);
    assert_eq!(columns_on(16, 1), 8);
    for isa in kernels_here() {
        force(isa, || {
            assert_eq!(computed_columns(49), columns_on(isa.nr(), 49))
        });
    }
}

#[test]
fn packing_is_the_same_on_one_and_two_threads() {
    for isa in kernels_here() {
        match isa {
            Isa::Avx512 => packs_alike::<Avx512Kernel, { Avx512Kernel::MR }>(isa),
            Isa::Avx2 => packs_alike::<Avx2Kernel, { Avx2Kernel::MR }>(isa),
        }
    }
}

/// [`packing_is_the_same_on_one_and_two_threads`] for kernel `K` (`isa`, `MR` its rows).
fn packs_alike<K: Micro, const MR: usize>(isa: Isa) {
    let (m, k) = (260, 300);
    assert!(m * k >= PARALLEL_PACK);
    let av = values(m * k, 9);
    let a = Operand {
        data: &av,
        rs: k,
        cs: 1,
    };
    let packed: Vec<Vec<f32>> = [1, 2]
        .into_iter()
        .map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| force(isa, || PackedA::new(a, m, k))).data
        })
        .collect();
    assert_eq!(packed[0], packed[1]);
    // And the same as packing block by block, as `serial` does with a raw operand.
    let mut want = Vec::new();
    let mut block = Vec::new();
    for pc in (0..k).step_by(KC) {
        for ic in (0..m).step_by(K::MC) {
            pack_a::<MR>(&mut block, a, ic, K::MC.min(m - ic), pc, KC.min(k - pc));
            want.extend_from_slice(&block);
        }
    }
    assert_eq!(packed[0], want);
}

#[test]
fn empty_depth_clears_or_keeps() {
    for isa in kernels_here() {
        force(isa, empty_depth);
    }
}

fn empty_depth() {
    let a = Operand {
        data: &[],
        rs: 0,
        cs: 1,
    };
    let mut dst = vec![2f32; 6];
    sgemm((2, 3, 0), &mut dst, true, a, a, 1);
    assert_eq!(dst, vec![2.; 6]);
    sgemm((2, 3, 0), &mut dst, false, a, a, 1);
    assert_eq!(dst, vec![0.; 6]);
    let mut fresh = vec![MaybeUninit::new(f32::NAN); 6];
    sgemm_uninit((2, 3, 0), &mut fresh, a, a, None, 1);
    // SAFETY: initialised (to NaN) above.
    assert!(fresh.iter().all(|v| unsafe { v.assume_init() } == 0.));
}

use super::*;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

fn dims(n: usize, c: usize, cout: usize, h: usize, w: usize) -> Dims {
    let g = ConvGeom {
        padding: 1,
        stride: 1,
        dilation: 1,
        groups: 1,
    };
    Dims::new(&g, &[n, c, h, w], &[cout, c, 3, 3]).expect("valid test shape")
}

/// The 3x3, padding-1 convolution in f64.
fn conv_ref(x: &[f32], w: &[f32], d: &Dims) -> Vec<f64> {
    let mut y = vec![0f64; d.n * d.cout * d.p()];
    for n in 0..d.n {
        for o in 0..d.cout {
            for c in 0..d.c {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let wv = f64::from(w[((o * d.c + c) * 3 + ky) * 3 + kx]);
                        for oy in 0..d.h {
                            for ox in 0..d.w {
                                let (iy, ix) = (oy + ky, ox + kx);
                                if iy < 1 || ix < 1 || iy > d.h || ix > d.w {
                                    continue;
                                }
                                let xi = ((n * d.c + c) * d.h + iy - 1) * d.w + ix - 1;
                                y[((n * d.cout + o) * d.h + oy) * d.w + ox] +=
                                    wv * f64::from(x[xi]);
                            }
                        }
                    }
                }
            }
        }
    }
    y
}

/// Every element within `tol` of the largest magnitude of `want`.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (f64::from(*g) - w).abs() / scale;
        assert!(
            e < tol,
            "{what}: element {i} is {g}, want {w} ({e:.1e} of the scale)"
        );
    }
}

/// The bound of each algorithm's error, relative to the largest output: F(2x2)'s
/// transforms multiply by halves only, F(4x4)'s by up to 8 and by sixths.
const F2_TOL: f64 = 1e-5;
const F4_TOL: f64 = 4e-5;

/// Odd and even sizes (a last tile row or column partly outside the image), one-pixel
/// images, and a batch split into several groups of images, on both algorithms. Planes 3
/// and 7 tiles wide (6, 9-13, 14 and 28 wide) take the input transform's whole-tile-row
/// steps, with an even and an odd number of tile rows.
#[test]
fn matches_a_plain_convolution() {
    for (n, c, cout, h, w) in [
        (2, 3, 5, 7, 9),
        (1, 4, 6, 6, 6),
        (3, 2, 3, 1, 1),
        (2, 5, 4, 8, 3),
        (1, 2, 2, 2, 5),
        (2, 3, 2, 13, 10),
        (2, 3, 5, 14, 14),
        (1, 3, 4, 9, 13),
        (1, 2, 3, 6, 28),
        (16, 128, 3, 32, 32),
    ] {
        let d = dims(n, c, cout, h, w);
        let (x, k) = (values(n * c * h * w, 1), values(cout * c * 9, 2));
        let want = conv_ref(&x, &k, &d);
        let name = format!("{n}x{c}x{h}x{w} -> {cout}");
        let f2 = forward_with::<F2>(&x, &k, Epilogue::NONE, &d);
        assert_close(&format!("F2 {name}"), &f2, &want, F2_TOL);
        let f4 = forward_with::<F4>(&x, &k, Epilogue::NONE, &d);
        assert_close(&format!("F4 {name}"), &f4, &want, F4_TOL);
        let chosen = if uses_f4(&d, false) { f4 } else { f2 };
        assert_eq!(
            forward(&x, &k, Epilogue::NONE, &d),
            chosen,
            "forward's choice"
        );
    }
    let d = dims(16, 128, 3, 32, 32);
    for per_image in [
        F2::POS * Tiles::of::<F2>(&d).per_image(),
        F4::POS * Tiles::of::<F4>(&d).per_image(),
    ] {
        assert!(GROUP_BYTES / (per_image * d.c * 4) < d.n, "several groups");
    }
}

/// The blocked forward (each thread whole images, a band of tile rows at a time) gives the
/// grouped one's values, bit for bit (the same transforms, and GEMMs that sum the input
/// channels in the same order), with an epilogue: odd sizes (a last tile row and column
/// partly outside the image), several bands of tile rows and a last one shorter, several
/// groups of images for the grouped forward, on both algorithms.
#[test]
fn blocked_and_grouped_agree() {
    if !crate::sgemm::available() {
        return;
    }
    fn both<A: Algo>(d: &Dims, x: &[f32], k: &[f32], ep: Epilogue<'_, f32>, want: &[f64]) {
        let u = transform_weights::<A>(k, d.cout, d.c);
        let len = d.n * d.cout * d.p();
        let (mut by_blocks, mut by_groups) = (vec![0f32; len], vec![0f32; len]);
        blocked::forward::<A, f32>(x, &u, ep, d, &mut by_blocks);
        grouped::<A, f32>(x, &u, ep, d, &mut by_groups, true);
        let name = format!("F{} {:?}", A::M, (d.n, d.c, d.cout, d.h, d.w));
        assert!(by_blocks == by_groups, "{name}");
        let mut plain = vec![0f32; len];
        blocked::forward::<A, f32>(x, &u, Epilogue::NONE, d, &mut plain);
        assert_close(&name, &plain, want, if A::M == 2 { F2_TOL } else { F4_TOL });
    }
    for (n, c, cout, h, w) in [(2, 3, 5, 7, 9), (3, 5, 4, 13, 10), (20, 96, 16, 34, 30)] {
        let d = dims(n, c, cout, h, w);
        let (x, k) = (values(n * c * h * w, 1), values(cout * c * 9, 2));
        let (scale, bias) = (values(cout, 3), values(cout, 4));
        let residual = values(n * cout * h * w, 5);
        let ep = Epilogue {
            scale: Some(&scale),
            bias: Some(&bias),
            relu: true,
            residual: Some(&residual),
        };
        let want = conv_ref(&x, &k, &d);
        both::<F2>(&d, &x, &k, ep, &want);
        both::<F4>(&d, &x, &k, ep, &want);
    }
    let d = dims(20, 96, 16, 34, 30);
    for (pos, m) in [(F2::POS, 2), (F4::POS, 4)] {
        let (th, tw) = (34usize.div_ceil(m), 30usize.div_ceil(m));
        let band = blocked::band_rows_for(pos, &d, tw);
        assert!(
            band < th && th % band != 0,
            "F{m}: several bands, the last shorter"
        );
        assert!(
            GROUP_BYTES / (pos * th * tw * d.c * 4) < d.n,
            "F{m}: several groups"
        );
    }
}

/// Groups are as few as the bound allows and of equal size but for the last.
#[test]
fn groups_split_the_batch_evenly() {
    let per_image = GROUP_BYTES / 5;
    assert_eq!(
        group_of(per_image, 8),
        4,
        "8 images, at most 5 a group: 4 + 4"
    );
    assert_eq!(group_of(per_image, 11), 4, "11 images: 4 + 4 + 3");
    assert_eq!(group_of(per_image, 5), 5, "one group");
    assert_eq!(group_of(per_image, 3), 3, "a batch smaller than the bound");
    assert_eq!(
        group_of(2 * GROUP_BYTES, 3),
        1,
        "an image larger than the bound"
    );
    assert_eq!(group_of(per_image, 0), 1, "no images");
}

/// The weight transforms against `G g G^T` with the matrices written out.
#[test]
fn weight_tiles_are_g_g_gt() {
    let k = values(9, 5);
    let half = 0.5;
    let g2: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [half, half, half],
        [half, -half, half],
        [0.0, 0.0, 1.0],
    ];
    let (s, t, w) = (1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0);
    let g4: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-s, -s, -s],
        [-s, s, -s],
        [w, t, s],
        [w, -t, s],
        [0.0, 0.0, 1.0],
    ];
    fn check(what: &str, g: &[[f64; 3]], k: &[f32], got: &[f32]) {
        let p = g.len();
        for i in 0..p {
            for j in 0..p {
                let mut want = 0f64;
                for a in 0..3 {
                    for b in 0..3 {
                        want += g[i][a] * f64::from(k[a * 3 + b]) * g[j][b];
                    }
                }
                let e = (f64::from(got[i * p + j]) - want).abs();
                assert!(
                    e < 1e-6,
                    "{what}: position {i},{j} is {}, want {want}",
                    got[i * p + j]
                );
            }
        }
    }
    let k: [f32; 9] = k.try_into().expect("9 values");
    let mut u = [0f32; 36];
    F2::weight_tile(&k, &mut u);
    check("F2", &g2, &k, &u[..16]);
    F4::weight_tile(&k, &mut u);
    check("F4", &g4, &k, &u);
}

/// Both gradients against f64 sums, for odd and even sizes (35 wide: whole vectors of the
/// weight gradient's row split, then single values; 13, 14 and 28 wide: the input
/// transform's whole-tile-row steps) and a batch split into
/// several groups of images (whose weight gradients are added in f64); the last case's
/// input gradient runs on F(4x4), the others' on F(2x2).
#[test]
fn backward_matches_plain_gradients() {
    for (n, c, cout, h, w) in [
        (2, 3, 5, 7, 9),
        (1, 4, 2, 6, 6),
        (3, 2, 3, 1, 2),
        (1, 3, 2, 5, 35),
        (2, 3, 5, 14, 14),
        (1, 3, 4, 9, 13),
        (1, 2, 3, 6, 28),
        (9, 140, 2, 32, 31),
    ] {
        let d = dims(n, c, cout, h, w);
        let (x, k) = (values(n * c * h * w, 1), values(cout * c * 9, 2));
        let dy = values(n * cout * d.p(), 3);
        let (dx, dw) = backward(&x, &k, &dy, &d);
        let mut want_dx = vec![0f64; x.len()];
        let mut want_dw = vec![0f64; k.len()];
        for i in 0..n {
            for o in 0..cout {
                for oy in 0..h {
                    for ox in 0..w {
                        let g = f64::from(dy[((i * cout + o) * h + oy) * w + ox]);
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < 1 || ix < 1 || iy > h || ix > w {
                                        continue;
                                    }
                                    let xi = ((i * c + ci) * h + iy - 1) * w + ix - 1;
                                    let wi = ((o * c + ci) * 3 + ky) * 3 + kx;
                                    want_dx[xi] += g * f64::from(k[wi]);
                                    want_dw[wi] += g * f64::from(x[xi]);
                                }
                            }
                        }
                    }
                }
            }
        }
        let name = format!("{n}x{c}x{h}x{w} -> {cout}");
        assert_close(&format!("{name} dx"), &dx, &want_dx, F4_TOL);
        assert_close(&format!("{name} dw"), &dw, &want_dw, F2_TOL);
    }
    let d = dims(9, 140, 2, 32, 31);
    assert!(uses_f4(&dims(9, 2, 140, 32, 31), false) && !uses_f4(&dims(2, 5, 3, 7, 9), false));
    let per_image = F2::POS * Tiles::of::<F2>(&d).per_image() * (d.c + d.cout) * 4;
    assert!(
        GROUP_BYTES / per_image < d.n,
        "the last case has several groups"
    );
}

/// On one thread (inside an outer parallel loop) the result is the same, bit for bit,
/// and the epilogue (scale, shift, residual, ReLU) is that of the other paths; on both
/// algorithms and every SIMD level of the transforms.
#[test]
fn serial_and_epilogue_agree() {
    fn check<A: Algo>() {
        let (n, c, cout, h, w) = (3, 6, 5, 5, 7);
        let d = dims(n, c, cout, h, w);
        let (x, k) = (values(n * c * h * w, 3), values(cout * c * 9, 4));
        let u = transform_weights::<A>(&k, cout, c);
        let plain = forward_with::<A>(&x, &k, Epilogue::NONE, &d);
        let mut serial = vec![0f32; plain.len()];
        forward_into::<A, f32>(&x, &u, Epilogue::NONE, &d, &mut serial, false);
        assert_eq!(plain, serial);
        let (scale, shift) = (values(cout, 5), values(cout, 6));
        let residual = values(plain.len(), 7);
        let ep = Epilogue {
            scale: Some(&scale),
            bias: Some(&shift),
            relu: true,
            residual: Some(&residual),
        };
        let got = forward_with::<A>(&x, &k, ep, &d);
        let mut want = plain.clone();
        for (i, plane) in want.chunks_exact_mut(d.p()).enumerate() {
            ep.image(i / cout, cout * d.p())
                .apply_in_place(i % cout, plane);
        }
        assert_eq!(got, want);
    }
    check::<F2>();
    check::<F4>();
}

/// Both algorithms' plane transforms compiled for each SIMD level give the portable
/// build's values, bit for bit (no level contracts a multiply and an add).
#[test]
fn plane_transforms_agree_on_every_level() {
    use crate::dispatch::Simd;
    use crate::simd::with_simd;
    use f2::{input_plane as f2_in, output_row as f2_out};
    use f4::{input_plane as f4_in, output_row as f4_out};
    // 3 x 5 tiles (a partial step of 16 and, for F(2x2)'s 40 padded columns, a whole one);
    // 3 x 7 and 5 x 3 (whole tile rows per step, the last step partial).
    for (n, m, th, tw) in [(4, 2), (6, 4)]
        .into_iter()
        .flat_map(|(n, m)| [(n, m, 3, 5), (n, m, 3, 7), (n, m, 5, 3)])
    {
        let t_all = th * tw + 2;
        let pp = values((m * th + 2) * m * (tw + 1) + 2, 8);
        let mt = values(n * n * t_all, 9);
        let run = |simd: Simd| {
            let mut buf = vec![0f32; plane::input_buffer_len(n, m, th, tw)];
            let mut v = vec![0f32; n * n * t_all];
            let (pp, b, vs) = (pp.as_slice(), buf.as_mut_slice(), v.as_mut_slice());
            let tiles = (th, tw);
            let tp = th * tw;
            let mut y = vec![0f32; m * m * tp];
            let (ms, ys) = (mt.as_slice(), y.as_mut_slice());
            let wide = crate::dispatch::usable(simd) == Simd::Avx512;
            if m == 2 {
                with_simd!(simd, f2_in(pp: &[f32], b: &mut [f32], tiles: (usize, usize), vs: &mut [f32], t_all: usize, wide: bool));
                with_simd!(simd, f2_out(ms: &[f32], t_all: usize, ys: &mut [f32], tp: usize));
            } else {
                with_simd!(simd, f4_in(pp: &[f32], b: &mut [f32], tiles: (usize, usize), vs: &mut [f32], t_all: usize, wide: bool));
                with_simd!(simd, f4_out(ms: &[f32], t_all: usize, ys: &mut [f32], tp: usize));
            }
            (buf, v, y)
        };
        let portable = run(Simd::Portable);
        for simd in [Simd::Avx2, Simd::Avx512] {
            assert!(run(simd) == portable, "F({m}x{m}) {th}x{tw} {simd:?}");
        }
    }
}

/// The weight rows (16 input channels at a time, and a remainder) on each SIMD level are
/// the single-kernel transforms, bit for bit.
#[test]
fn weight_rows_match_single_tiles_on_every_level() {
    use crate::dispatch::Simd;
    use crate::simd::with_simd;
    use f2::weight_row as f2_row;
    use f4::weight_row as f4_row;
    let c = 21;
    let k = values(c * 9, 11);
    let single = |tile: fn(&[f32; 9], &mut [f32; 36]), pos: usize| {
        let mut want = vec![0f32; pos * c];
        for ci in 0..c {
            let mut u = [0f32; 36];
            tile(k[ci * 9..][..9].try_into().expect("9 values"), &mut u);
            for xi in 0..pos {
                want[xi * c + ci] = u[xi];
            }
        }
        want
    };
    let (want2, want4) = (single(F2::weight_tile, 16), single(F4::weight_tile, 36));
    for simd in [Simd::Portable, Simd::Avx2, Simd::Avx512] {
        let (mut got2, mut got4) = (vec![0f32; 16 * c], vec![0f32; 36 * c]);
        let (k, d2, d4) = (k.as_slice(), got2.as_mut_slice(), got4.as_mut_slice());
        with_simd!(simd, f2_row(k: &[f32], d2: &mut [f32], c: usize));
        with_simd!(simd, f4_row(k: &[f32], d4: &mut [f32], c: usize));
        assert!(got2 == want2, "F2 {simd:?}");
        assert!(got4 == want4, "F4 {simd:?}");
    }
}

/// Where 512-bit FMAs run at full width Winograd keeps to the shapes it was measured faster
/// on: forwards of outputs 14 wide and more; backwards of 128 channels and more, 14 wide and
/// more, 300 tiles and more; the input gradient alone of outputs 56 wide and more.
#[test]
fn full_width_shapes() {
    for (n, c, hw) in [(8, 64, 56), (1, 64, 56), (1, 128, 28), (8, 256, 14)] {
        assert!(forward_pays_at_full_width(&dims(n, c, c, hw, hw)));
    }
    assert!(!forward_pays_at_full_width(&dims(8, 512, 512, 7, 7)));
    // ResNet-18/50 at batch 8: 128 channels 28x28 (1568 tiles), 256 channels 14x14 (392).
    assert!(backward_pays_at_full_width(&dims(8, 128, 128, 28, 28)));
    assert!(backward_pays_at_full_width(&dims(8, 256, 256, 14, 14)));
    // 64 channels at 56x56 (slower), 512 channels at 7x7, 128 channels at batch 1 (196
    // tiles).
    assert!(!backward_pays_at_full_width(&dims(8, 64, 64, 56, 56)));
    assert!(!backward_pays_at_full_width(&dims(8, 128, 64, 28, 28)));
    assert!(!backward_pays_at_full_width(&dims(8, 512, 512, 7, 7)));
    assert!(!backward_pays_at_full_width(&dims(1, 128, 128, 28, 28)));
    // The input gradient alone: 64 channels at 56x56 from batch 1, not at 28x28 or 14x14.
    let g = ConvGeom {
        padding: 1,
        stride: 1,
        dilation: 1,
        groups: 1,
    };
    assert!(input_grad_pays(&dims(8, 64, 64, 56, 56)));
    assert!(input_grad_pays(&dims(1, 64, 64, 56, 56)));
    assert!(!input_grad_pays(&dims(8, 64, 64, 28, 28)));
    assert!(!input_grad_applies(&dims(8, 64, 64, 28, 28), &g));
    assert!(!input_grad_applies(&dims(4, 64, 64, 14, 14), &g));
    assert!(!input_grad_applies(&dims(8, 32, 64, 56, 56), &g));
}

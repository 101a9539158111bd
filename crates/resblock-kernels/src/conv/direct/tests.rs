//! Every kernel set the CPU has (AVX-512 and AVX2 on a machine with both, whatever the
//! dispatch says) against a plain f64 convolution: forward, input gradient and weight
//! gradient (per image and summed over images through the padded layout), over output
//! channels that fill no tile exactly, rows whose flattened length leaves a tail, and
//! non-square kernels and paddings.

use super::{Isa, Plan};
use crate::conv::epilogue::Epilogue;
use crate::conv::geom::{ConvGeom, Dims};
use crate::conv::path::{backward_direct, forward_direct};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

/// `y[o, oy, ox] = sum w[o, c, ky, kx] * x[c, oy + ky - p, ox + kx - p]` in f64, one image.
fn conv_ref(x: &[f32], w: &[f32], d: &Dims, pad: usize) -> Vec<f64> {
    let mut y = vec![0f64; d.cout * d.oh * d.ow];
    for o in 0..d.cout {
        for c in 0..d.c {
            for ky in 0..d.kh {
                for kx in 0..d.kw {
                    let wv = f64::from(w[((o * d.c + c) * d.kh + ky) * d.kw + kx]);
                    for oy in 0..d.oh {
                        for ox in 0..d.ow {
                            let (iy, ix) = (oy + ky, ox + kx);
                            if iy < pad || ix < pad || iy - pad >= d.h || ix - pad >= d.w {
                                continue;
                            }
                            let xv = f64::from(x[(c * d.h + iy - pad) * d.w + ix - pad]);
                            y[(o * d.oh + oy) * d.ow + ox] += wv * xv;
                        }
                    }
                }
            }
        }
    }
    y
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (f64::from(*g) - w).abs() / scale;
        assert!(e < tol, "{what}: element {i} is {g}, want {w}");
    }
}

#[test]
fn every_kernel_set_matches_a_plain_convolution() {
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
        .collect();
    // (n, c, cout, h, w, k, pad): same and valid convolutions, outputs of 3, 6, 13 and 16
    // channels (no tile of 4 or 8 filled exactly, then exactly), rows of 5 to 17 pixels;
    // flattened outputs ending in whole tiles and in tail tiles: on AVX-512 a half vector
    // (the first four, shared padding: 72, 40, 72 and 136 pixels; the last, masked: 40),
    // one vector (the fourth on copies and masked: 112) and both (the fifth: 120); on AVX2
    // one vector (the fifth). The seventh is shorter than a vector on every layout (6
    // pixels masked, 8 shared). The third and the last three have whole blocks of 16 output
    // channels, so that on AVX-512 their masked weight gradient is the transposed one
    // (`avx512::wgrad_t_tile`): 4 input channels (a block of 3 and one of 1), 5 (3 and 2)
    // with 32 output channels, rows 2 wide (edge columns only), and 7 input channels at
    // 7x7. The last has 48 input channels, enough that the 3-wide forward tiles prefetch
    // each next channel (`Plan::prefetches`).
    let cases = [
        (2, 3, 6, 7, 9, 3, 1),
        (3, 5, 13, 6, 5, 3, 1),
        (1, 4, 16, 8, 8, 3, 1),
        (2, 2, 3, 11, 10, 5, 2),
        (2, 4, 8, 9, 17, 3, 0),
        (2, 3, 5, 5, 8, 3, 1),
        (2, 3, 5, 2, 3, 3, 1),
        (2, 5, 32, 4, 3, 3, 1),
        (1, 2, 16, 3, 2, 3, 1),
        (2, 7, 16, 7, 7, 3, 1),
        (1, 48, 8, 6, 9, 3, 1),
    ];
    for isa in isas {
        for (n, c, cout, h, w, k, pad) in cases {
            let g = ConvGeom {
                padding: pad,
                stride: 1,
                dilation: 1,
                groups: 1,
            };
            let d = Dims::new(&g, &[n, c, h, w], &[cout, c, k, k]).expect("dims");
            let name = format!("{isa:?} n{n} {c}->{cout} {h}x{w} k{k} p{pad}");
            let shared = Plan::unmasked(isa, (c, h, w), cout, (k, k), (pad, pad), 1).expect("plan");
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                assert_eq!(shared.prefetches(), c == 48, "{name}: prefetching");
            }
            let back_pad = k - 1 - pad;
            let back_shared =
                Plan::unmasked(isa, (cout, d.oh, d.ow), c, (k, k), (back_pad, back_pad), 1)
                    .expect("back plan");
            // Every layout of a "same" convolution (`with_copies` is `None` for the others,
            // `with_masks` also on AVX2).
            let layouts = [
                ("shared", Some((shared.clone(), back_shared.clone()))),
                (
                    "copies",
                    shared.with_copies().zip(back_shared.with_copies()),
                ),
                ("masked", shared.with_masks().zip(back_shared.with_masks())),
            ];
            assert_eq!(
                layouts[1].1.is_some(),
                2 * pad + 1 == k,
                "{name}: copies layout"
            );
            assert_eq!(
                layouts[2].1.is_some(),
                2 * pad + 1 == k && isa == Isa::Avx512,
                "{name}: masked layout"
            );
            for (layout, plans) in layouts {
                let Some((fwd, back)) = plans else {
                    continue;
                };
                let name = format!("{name} {layout}");
                let (x, wt) = (values(n * c * h * w, 1), values(cout * c * k * k, 2));
                let dy = values(n * cout * d.p(), 3);

                let y = forward_direct(&fwd, &x, &wt, Epilogue::NONE, &d);
                let want: Vec<f64> = (0..n)
                    .flat_map(|i| conv_ref(&x[i * d.chw()..(i + 1) * d.chw()], &wt, &d, pad))
                    .collect();
                assert_close(&format!("{name} y"), &y, &want, 1e-5);

                // The input gradient is a stride-1 convolution of dY padded by k - 1 - pad with
                // the flipped, transposed kernel; the weight gradient a correlation of x and dY.
                let (dx, dw) = backward_direct(&(fwd.clone(), back), &x, &wt, &dy, &d, &g);
                let mut want_dx = vec![0f64; n * d.chw()];
                let mut want_dw = vec![0f64; wt.len()];
                for i in 0..n {
                    for o in 0..cout {
                        for oy in 0..d.oh {
                            for ox in 0..d.ow {
                                let gy = f64::from(dy[((i * cout + o) * d.oh + oy) * d.ow + ox]);
                                for ci in 0..c {
                                    for ky in 0..k {
                                        for kx in 0..k {
                                            let (iy, ix) = (oy + ky, ox + kx);
                                            if iy < pad
                                                || ix < pad
                                                || iy - pad >= h
                                                || ix - pad >= w
                                            {
                                                continue;
                                            }
                                            let xi = ((i * c + ci) * h + iy - pad) * w + ix - pad;
                                            let wi = ((o * c + ci) * k + ky) * k + kx;
                                            want_dx[xi] += gy * f64::from(wt[wi]);
                                            want_dw[wi] += gy * f64::from(x[xi]);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                assert_close(&format!("{name} dx"), &dx, &want_dx, 1e-5);
                assert_close(&format!("{name} dw"), &dw, &want_dw, 1e-5);
            }
        }
    }
}

/// The weight gradient summed over images through the input-gradient plan's padded `dY`
/// (the fused op's layout) equals the per-image sums.
#[test]
fn padded_weight_gradient_sums_images() {
    for isa in [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
    {
        // The second shape's masked plans take the transposed kernel on AVX-512.
        for (c, cout, h, w) in [(3, 10, 6, 7), (4, 16, 5, 6)] {
            let shared = Plan::unmasked(isa, (c, h, w), cout, (3, 3), (1, 1), 1).expect("plan");
            let back_shared =
                Plan::unmasked(isa, (cout, h, w), c, (3, 3), (1, 1), 1).expect("back");
            let masked = shared.with_masks().zip(back_shared.with_masks());
            for (fwd, back) in [Some((shared, back_shared)), masked].into_iter().flatten() {
                summed_weight_gradient_matches(isa, &fwd, &back, (c, cout, h, w));
            }
        }
    }
}

/// [`padded_weight_gradient_sums_images`] on one pair of plans.
fn summed_weight_gradient_matches(
    isa: Isa,
    fwd: &Plan,
    back: &Plan,
    (c, cout, h, w): (usize, usize, usize, usize),
) {
    {
        let images = 3;
        let (mut xps, mut dyps) = (Vec::new(), Vec::new());
        let mut want = vec![0f32; cout * c * 9];
        for i in 0..images {
            let x = values(c * h * w, 10 + i);
            let dy = values(cout * h * w, 20 + i);
            let mut xp = Vec::new();
            fwd.pad(&x, &mut xp);
            let mut dyp = back.padded_buffer(fwd.cout_rounded());
            let planes = dyp.chunks_exact_mut(back.plane_stride());
            for (co, plane) in planes.take(cout).enumerate() {
                back.write_padded_plane(plane, &dy[co * h * w..], false);
            }
            let (mut dyf, mut dw) = (Vec::new(), vec![0f32; want.len()]);
            fwd.flatten(&dy, &mut dyf);
            fwd.weight_grad(&xp, &dyf, &mut dw);
            want.iter_mut().zip(&dw).for_each(|(a, b)| *a += b);
            xps.push(xp);
            dyps.push(dyp);
        }
        let mut got = vec![0f32; want.len()];
        let xr: Vec<&[f32]> = xps.iter().map(Vec::as_slice).collect();
        let dr: Vec<&[f32]> = dyps.iter().map(Vec::as_slice).collect();
        fwd.weight_grad_padded(&xr, back, &dr, &mut got)
            .expect("same layouts");
        let want64: Vec<f64> = want.iter().map(|v| f64::from(*v)).collect();
        let what = format!("{isa:?} masked {} summed dw", fwd.masked);
        assert_close(&what, &got, &want64, 1e-5);
    }
}

/// A plane written by `write_padded_plane` (into new memory, and over a zeroed buffer; from
/// a source with and without slack past the plane) is the plane `pad` writes.
#[test]
fn written_planes_are_padded_planes() {
    for isa in [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
    {
        let shapes = [(3, 6, 7, 3), (2, 5, 16, 3), (2, 7, 7, 5), (1, 9, 3, 1)];
        for (c, h, w, k) in shapes {
            let shared =
                Plan::unmasked(isa, (c, h, w), 4, (k, k), (k / 2, k / 2), 1).expect("plan");
            let masked = shared.with_masks();
            for plan in [Some(shared), masked].into_iter().flatten() {
                written_plane_matches(isa, &plan, (c, h, w, k));
            }
        }
    }
}

/// [`written_planes_are_padded_planes`] on one plan.
fn written_plane_matches(isa: Isa, plan: &Plan, (c, h, w, k): (usize, usize, usize, usize)) {
    {
        {
            assert!(plan.takes_written_planes());
            let x = values(c * h * w, 3);
            let mut want = Vec::new();
            plan.pad(&x, &mut want);
            let ps = plan.plane_stride();
            // SAFETY: `write_padded_plane` with `fresh` writes each plane whole.
            let fresh = unsafe {
                crate::buffer::vec_written_by(c * ps, |buf| {
                    for (ci, plane) in buf.chunks_exact_mut(ps).enumerate() {
                        plan.write_padded_plane(plane, &x[ci * h * w..], true);
                    }
                })
            };
            let mut reused = plan.padded_buffer(c);
            for (ci, plane) in reused.chunks_exact_mut(ps).enumerate() {
                // The plane alone: no slack past its values.
                plan.write_padded_plane(plane, &x[ci * h * w..(ci + 1) * h * w], false);
            }
            let what = format!("{isa:?} {c}x{h}x{w} k{k} masked {}", plan.masked);
            assert_eq!(fresh, want, "{what}: fresh");
            assert_eq!(reused[..want.len()], want[..], "{what}: reused");
        }
    }
}

/// Stride 2 (the polyphase layout): forward and weight gradient against plain f64 loops,
/// at odd and even sizes and paddings, 2x2 to 7x7 kernels (the ResNet stem's 7x7 / 2 / 3).
#[test]
fn stride_two_matches_a_plain_convolution() {
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.supported())
        .collect();
    // (n, c, cout, h, w, k, pad)
    let cases = [
        (2, 3, 6, 7, 9, 3, 1),
        (2, 4, 16, 8, 8, 3, 1),
        // 3x3 with whole blocks of 16 output channels: on AVX-512 the transposed weight
        // gradient, with 3 + 2 input channels per pass.
        (2, 5, 32, 9, 7, 3, 1),
        (1, 3, 8, 12, 11, 7, 3),
        (2, 2, 5, 10, 9, 5, 2),
        (1, 3, 4, 6, 6, 3, 0),
        (1, 2, 3, 9, 8, 2, 0),
        (1, 2, 9, 1, 1, 3, 1),
    ];
    for isa in isas {
        for (n, c, cout, h, w, k, pad) in cases {
            let g = ConvGeom {
                padding: pad,
                stride: 2,
                dilation: 1,
                groups: 1,
            };
            let d = Dims::new(&g, &[n, c, h, w], &[cout, c, k, k]).expect("dims");
            let name = format!("{isa:?} n{n} {c}->{cout} {h}x{w} k{k} p{pad} s2");
            let plan = Plan::strided(isa, (c, h, w), cout, (k, k), (pad, pad), 2).expect("plan");
            assert_eq!((plan.oh, plan.ow), (d.oh, d.ow), "{name}: output size");
            let (x, wt) = (values(n * c * h * w, 4), values(cout * c * k * k, 5));
            let dy = values(n * cout * d.p(), 6);
            let mut want_y = vec![0f64; n * cout * d.p()];
            let mut want_dw = vec![0f64; wt.len()];
            for i in 0..n {
                for o in 0..cout {
                    for oy in 0..d.oh {
                        for ox in 0..d.ow {
                            let at = ((i * cout + o) * d.oh + oy) * d.ow + ox;
                            for ci in 0..c {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let (iy, ix) = (2 * oy + ky, 2 * ox + kx);
                                        if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                                            continue;
                                        }
                                        let xv = f64::from(
                                            x[((i * c + ci) * h + iy - pad) * w + ix - pad],
                                        );
                                        let wi = ((o * c + ci) * k + ky) * k + kx;
                                        want_y[at] += f64::from(wt[wi]) * xv;
                                        want_dw[wi] += f64::from(dy[at]) * xv;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let y = forward_direct(&plan, &x, &wt, Epilogue::NONE, &d);
            assert_close(&format!("{name} y"), &y, &want_y, 1e-5);
            let mut dw = vec![0f32; wt.len()];
            let (mut xp, mut dyf) = (Vec::new(), Vec::new());
            for i in 0..n {
                plan.pad(&x[i * d.chw()..(i + 1) * d.chw()], &mut xp);
                plan.flatten(&dy[i * cout * d.p()..(i + 1) * cout * d.p()], &mut dyf);
                let mut dw_n = vec![0f32; wt.len()];
                plan.weight_grad(&xp, &dyf, &mut dw_n);
                dw.iter_mut().zip(&dw_n).for_each(|(a, b)| *a += b);
            }
            assert_close(&format!("{name} dw"), &dw, &want_dw, 1e-5);
        }
    }
}

/// `pack_weights` against the layout it documents (`[cout block][ci][tap][cb]`, zero past
/// `cout`), for a layer large enough to pack in parallel, on one thread and on two.
#[test]
fn packed_weights_have_the_documented_layout_on_any_thread_count() {
    for isa in [Isa::Avx512, Isa::Avx2] {
        // 100 output channels leave the last block of 8 (AVX-512) part empty; 100 * 80 * 9
        // floats is above `PARALLEL_PACK`.
        let (cout, c, nt) = (100, 80, 9);
        assert!(cout * c * nt >= crate::sgemm::PARALLEL_PACK);
        let Some(plan) = Plan::with_isa(isa, (c, 6, 6), cout, (3, 3), (1, 1)) else {
            continue;
        };
        let w = values(cout * c * nt, 5);
        let cb = isa.cb();
        let mut want = vec![0f32; plan.cout_rounded() * c * nt];
        for co in 0..cout {
            for ci in 0..c {
                for t in 0..nt {
                    want[(((co / cb) * c + ci) * nt + t) * cb + co % cb] =
                        w[(co * c + ci) * nt + t];
                }
            }
        }
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let got = pool.install(|| plan.pack_weights(&w));
            assert_eq!(got, want, "{isa:?} on {threads} thread(s)");
        }
    }
}

/// The batch-1 forward that packs each channel block on its own thread gives the same
/// output as the forward on weights packed whole, on every kernel set, with a last block
/// part empty.
#[test]
fn packing_per_block_matches_packing_whole() {
    for isa in [Isa::Avx512, Isa::Avx2] {
        let (c, h, w, cout) = (5, 7, 9, 13);
        let Some(plan) = Plan::with_isa(isa, (c, h, w), cout, (3, 3), (1, 1)) else {
            continue;
        };
        let (x, k) = (values(c * h * w, 11), values(cout * c * 9, 12));
        let mut xp = Vec::new();
        plan.pad(&x, &mut xp);
        let (mut whole, mut per_block) = (Vec::new(), Vec::new());
        plan.forward(&xp, &plan.pack_weights(&k), &mut whole, true);
        plan.forward_raw_weights(&xp, &k, &mut per_block);
        assert_eq!(whole, per_block, "{isa:?}");
        let mut y = vec![0f32; cout * h * w];
        plan.unflatten(&per_block, &mut y, Epilogue::NONE);
        let d = Dims::new(
            &ConvGeom {
                padding: 1,
                stride: 1,
                dilation: 1,
                groups: 1,
            },
            &[1, c, h, w],
            &[cout, c, 3, 3],
        )
        .expect("valid test shape");
        assert_close(&format!("{isa:?}"), &y, &conv_ref(&x, &k, &d, 1), 1e-5);
    }
}

/// The micro-tiles of a flattened row cover it once, in order, with whole tiles first and
/// at most one tail of each kind; over the shapes of
/// [`every_kernel_set_matches_a_plain_convolution`], AVX-512 plans reach all three tile
/// sizes (so that test runs each AVX-512 forward kernel and the masked weight-gradient
/// tail).
#[test]
fn tiles_cover_each_row_once() {
    let mut seen = std::collections::BTreeSet::new();
    let shapes = [
        (3, 7, 9, 3, 1),
        (5, 6, 5, 3, 1),
        (2, 11, 10, 5, 2),
        (4, 9, 17, 3, 0),
    ];
    for isa in [Isa::Avx512, Isa::Avx2] {
        for (c, h, w, k, pad) in shapes {
            let Some(shared) = Plan::unmasked(isa, (c, h, w), 8, (k, k), (pad, pad), 1) else {
                continue;
            };
            for plan in [
                Some(shared.clone()),
                shared.with_copies(),
                shared.with_masks(),
            ]
            .into_iter()
            .flatten()
            {
                let mut next = 0;
                let mut lens = Vec::new();
                for t in 0..plan.tiles() {
                    let (q0, len) = plan.tile(t);
                    assert_eq!(q0, next, "{isa:?} {h}x{w}: tile {t} starts at {q0}");
                    next += len;
                    lens.push(len);
                }
                assert_eq!(next, plan.qlen, "{isa:?} {h}x{w}: tiles cover the row");
                let mut sorted = lens.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                assert_eq!(lens, sorted, "{isa:?} {h}x{w}: whole tiles first");
                let tails = lens.iter().filter(|&&l| l != isa.tq()).count();
                assert!(tails <= 2, "{isa:?} {h}x{w}: {lens:?}");
                if isa == Isa::Avx512 {
                    seen.extend(lens);
                }
            }
        }
    }
    if Isa::Avx512.supported() {
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [8, 16, 32]);
    }
}

/// `pad` writes rows in pieces that can run past a row's end; every value outside the
/// interior must still be zero, on a fresh buffer and on one an earlier image filled, for
/// row widths below, at and above a piece and paddings that are and are not shared.
#[test]
fn padding_stays_zero_for_every_row_width() {
    for isa in [Isa::Avx512, Isa::Avx2] {
        for w in 1..=20 {
            for (k, pad) in [(3, 1), (3, 0), (1, 1), (5, 2), (3, 2)] {
                let (c, h) = (2, 3);
                let Some(shared) = Plan::unmasked(isa, (c, h, w), 4, (k, k), (pad, pad), 1) else {
                    continue;
                };
                for plan in [Some(shared.clone()), shared.with_masks()]
                    .into_iter()
                    .flatten()
                {
                    let mut xp = Vec::new();
                    for seed in [1, 2] {
                        let img = values(c * h * w, seed);
                        plan.pad(&img, &mut xp);
                        for (ci, plane) in xp.chunks_exact(plan.ps).enumerate() {
                            for (i, v) in plane.iter().enumerate() {
                                // The masked layout's rows have no padding columns: its
                                // values are one run after `pad` rows and `pad` zeros.
                                let at = if plan.masked {
                                    let first = pad * w + pad;
                                    (first..first + h * w).contains(&i).then(|| i - first)
                                } else {
                                    let (py, px) = (i / plan.wp, i % plan.wp);
                                    let inside = (pad..pad + h).contains(&py)
                                        && (pad..pad + w).contains(&px)
                                        && i < (pad + h) * plan.wp;
                                    inside.then(|| (py - pad) * w + px - pad)
                                };
                                let want = at.map_or(0.0, |at| img[ci * h * w + at]);
                                let what = format!("{isa:?} w {w} k {k} pad {pad} at {i}");
                                assert_eq!(*v, want, "{what} masked {}", plan.masked);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `pack_flipped_weights` of a forward kernel is `pack_weights` of the flipped, transposed
/// kernel, on every kernel set and on one and two threads (large enough to pack in
/// parallel), with a last block part empty.
#[test]
fn flipped_packing_is_packing_of_the_flipped_kernel() {
    let (c, cout, k) = (100, 90, 3);
    let g = ConvGeom {
        padding: 1,
        stride: 1,
        dilation: 1,
        groups: 1,
    };
    let d = Dims::new(&g, &[1, c, 5, 5], &[cout, c, k, k]).expect("valid test shape");
    let w = values(cout * c * k * k, 13);
    let flipped = crate::conv::gemm::flip_kernel(&w, &d, &g);
    for isa in [Isa::Avx512, Isa::Avx2] {
        // The input gradient's plan: `cout` channels in, `c` out.
        let Some(back) = Plan::with_isa(isa, (cout, 5, 5), c, (k, k), (1, 1)) else {
            continue;
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let (got, want) =
                pool.install(|| (back.pack_flipped_weights(&w), back.pack_weights(&flipped)));
            assert_eq!(got, want, "{isa:?} on {threads} thread(s)");
        }
    }
}

/// Where the flattened output is the plain one (masked layout, no tail, whole channel
/// tiles), `forward_plain` writes into fresh memory what `forward` and `unflatten` write, on
/// one thread's loop and on the parallel one; elsewhere the plan says it does not.
#[test]
fn plain_forward_matches_the_flattened_one() {
    if !Isa::Avx512.supported() {
        return;
    }
    let (c, h, w, cout) = (3, 4, 8, 16);
    let plan = Plan::unmasked(Isa::Avx512, (c, h, w), cout, (3, 3), (1, 1), 1)
        .and_then(|p| p.with_masks())
        .expect("masked plan");
    assert!(plan.writes_plain());
    let (x, k) = (values(c * h * w, 21), values(cout * c * 9, 22));
    let mut xp = Vec::new();
    plan.pad(&x, &mut xp);
    let wk = plan.pack_weights(&k);
    let mut flat = Vec::new();
    plan.forward(&xp, &wk, &mut flat, false);
    let mut want = vec![0f32; cout * h * w];
    plan.unflatten(&flat, &mut want, Epilogue::NONE);
    for parallel in [false, true] {
        // SAFETY: `forward_plain` writes every element.
        let got = unsafe {
            crate::buffer::vec_written_by(cout * h * w, |out| {
                plan.forward_plain(&xp, &wk, out, parallel);
            })
        };
        assert_eq!(got, want, "parallel {parallel}");
    }
    // A tail (5x5: 25 pixels in 32), a part-empty channel tile, the shared layout: no.
    let tail = Plan::unmasked(Isa::Avx512, (c, 5, 5), cout, (3, 3), (1, 1), 1)
        .and_then(|p| p.with_masks());
    let part =
        Plan::unmasked(Isa::Avx512, (c, h, w), 12, (3, 3), (1, 1), 1).and_then(|p| p.with_masks());
    let shared = Plan::unmasked(Isa::Avx512, (c, h, w), cout, (3, 3), (1, 1), 1);
    for p in [tail, part, shared] {
        assert!(!p.expect("plan").writes_plain());
    }
}

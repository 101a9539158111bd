//! One 3x3 convolution (padding 1) forward with Winograd allowed and not, interleaved call by
//! call, for choosing `conv/winograd`'s thresholds: prints the minimum and median of each
//! (with Winograd allowed, `winograd::forward_applies` and `uses_f4` pick F(2x2) or
//! F(4x4) or neither). The figures we report come from `cargo xtask bench`.
//!
//! `cargo run --release -p resblock-benches --example winograd-ab -- N C HW COUT REPS [bwd]
//! [s2] [FLAG]`: with `bwd`, the backward (both gradients for a given upstream gradient, as
//! the `bwd_data_and_weight` bench rows) instead of the forward; with `s2`, stride 2; with
//! `FLAG`, that `Dispatch` switch toggled instead of `winograd`: `transposed_wgrad`,
//! `masked_taps`, `own_gemm`, `direct_conv`, `channel_lanes`.

use std::time::Instant;

use candle_core::{DType, Device};
use resblock_core::ops::{conv2d, conv2d_backward, dispatch};
use resblock_core::{configure_threads_here, RngHandle};

#[global_allocator]
static ALLOC: resblock_core::ops::alloc::HugePageAlloc = resblock_core::ops::alloc::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take = |word: &str| {
        let found = args.iter().position(|a| a == word);
        found.map(|i| args.remove(i)).is_some()
    };
    let (bwd, stride) = (take("bwd"), if take("s2") { 2 } else { 1 });
    let flag = [
        "transposed_wgrad",
        "masked_taps",
        "own_gemm",
        "direct_conv",
        "channel_lanes",
    ]
    .into_iter()
    .find(|f| take(f))
    .unwrap_or("winograd");
    let args: Vec<usize> = args.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let [n, c, hw, cout, reps] = args[..] else {
        anyhow::bail!("usage: winograd-ab N C HW COUT REPS [bwd] [s2] [FLAG]");
    };
    let ohw = (hw - 1) / stride + 1;
    configure_threads_here(None);
    let rng = RngHandle::seed_from_u64(1);
    let x = rng.normal_tensor((n, c, hw, hw), 0., 1., DType::F32, &Device::Cpu)?;
    let w = rng.normal_tensor((cout, c, 3, 3), 0., 0.1, DType::F32, &Device::Cpu)?;
    let r = rng.normal_tensor((n, cout, ohw, ohw), 0., 1., DType::F32, &Device::Cpu)?;
    let base = dispatch::current();
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..2 * reps.max(1) {
        let on = i % 2 == 1;
        let mut d = base;
        *match flag {
            "transposed_wgrad" => &mut d.transposed_wgrad,
            "masked_taps" => &mut d.masked_taps,
            "own_gemm" => &mut d.own_gemm,
            "direct_conv" => &mut d.direct_conv,
            "channel_lanes" => &mut d.channel_lanes,
            _ => &mut d.winograd,
        } = on;
        dispatch::set(d);
        let t = Instant::now();
        if bwd {
            conv2d_backward(&x, &w, &r, 1, stride, 1, 1)?;
        } else {
            conv2d(&x, &w, 1, stride, 1, 1)?;
        }
        times[usize::from(on)].push(1e3 * t.elapsed().as_secs_f64());
    }
    dispatch::set(base);
    for (name, t) in ["off", "on"].iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        println!(
            "{n}x{c}x{hw}x{hw} -> {cout}{}{}, {flag} {name}: min {:.2} ms, median {:.2} ms",
            if stride == 2 { " stride 2" } else { "" },
            if bwd { " backward" } else { "" },
            t[0],
            t[t.len() / 2]
        );
    }
    Ok(())
}

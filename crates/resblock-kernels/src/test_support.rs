//! Helpers shared by the unit tests.

use candle_core::{Device, Tensor};

/// A fixed pseudo-random tensor (xorshift from `seed`), uniform in `[-half_width, half_width)`.
pub(crate) fn uniform_tensor(dims: &[usize], seed: u64, half_width: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2. - 1.) * half_width
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("a tensor of its own length")
}

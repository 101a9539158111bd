//! The weights as [`super::forward`] reads them: per block of `co` output channels (the tile's
//! [`super::tile::Kernel::CO`]), `[ci][tap][co]`, packed whole before the work items run (or
//! once for a frozen kernel: [`Packed`]), or block by block by the work items themselves
//! ([`Weights::Raw`]).

use rayon::prelude::*;

use super::work::row_runs;
use crate::aligned::aligned_mut;
use crate::conv::direct::Isa;
use crate::conv::geom::Dims;

/// Packed weights of at least this many floats are packed on all threads.
const PARALLEL_PACK: usize = 1 << 16;

/// Weights packed for [`super::forward`] once (a frozen kernel's form): the packed values from a
/// cache line on.
pub(crate) struct Packed {
    buf: Vec<f32>,
    start: usize,
    len: usize,
    /// The output channels of a block.
    co: usize,
}

impl Packed {
    /// `w` (`cout x c x 3 x 3`) packed as [`pack_weights`] packs it for the tile that runs
    /// now for `cout` channels ([`super::Tile::for_layer`] on [`Isa::detect`]; for none, as
    /// for AVX2: never read then).
    pub(crate) fn new(w: &[f32], cout: usize, c: usize) -> Packed {
        let co = Isa::detect().map_or(16, |isa| super::Tile::for_layer(isa, cout).co());
        Packed::packed_for(w, (cout, co), c)
    }

    /// `w` (`cout x c x 3 x 3`) packed in blocks of `co` output channels.
    pub(super) fn packed_for(w: &[f32], (cout, co): (usize, usize), c: usize) -> Packed {
        let mut buf = Vec::new();
        let len = pack_weights(w, (cout, co), c, &mut buf).len();
        let start = crate::aligned::first_line(&buf);
        Packed {
            buf,
            start,
            len,
            co,
        }
    }

    /// The input gradient's kernel of a stride-1 convolution with kernel `w` (`cout x c x
    /// 3 x 3`): `w` flipped in both axes with its channels swapped (`c x cout x 3 x 3`),
    /// packed.
    pub(crate) fn flipped(w: &[f32], cout: usize, c: usize) -> Packed {
        assert_eq!(w.len(), cout * c * 9, "lanes: weights of the wrong length");
        let mut f = vec![0f32; w.len()];
        for co in 0..cout {
            for ci in 0..c {
                for t in 0..9 {
                    f[(ci * cout + co) * 9 + 8 - t] = w[(co * c + ci) * 9 + t];
                }
            }
        }
        Packed::new(&f, c, cout)
    }

    pub(crate) fn values(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    /// The packed values where they were packed in blocks of `co` output channels.
    pub(crate) fn values_for(&self, co: usize) -> Option<&[f32]> {
        (self.co == co).then(|| self.values())
    }
}

/// `w` (`cout x c x 3 x 3`) packed per block of `co` output channels as
/// `[block][ci * 9 + tap][co]` into `dst` (from a cache line on).
pub(super) fn pack_weights<'d>(
    w: &[f32],
    (cout, co): (usize, usize),
    c: usize,
    dst: &'d mut Vec<f32>,
) -> &'d [f32] {
    let k = c * 9;
    assert_eq!(w.len(), cout * k, "lanes: weights of the wrong length");
    let dst = aligned_mut(dst, cout * k);
    let pack = |(b, block): (usize, &mut [f32])| interleave_block(w, (k, co), (b * co, 0), block);
    if cout * k >= PARALLEL_PACK && rayon::current_num_threads() > 1 {
        dst.par_chunks_exact_mut(co * k).enumerate().for_each(pack);
    } else {
        dst.chunks_exact_mut(co * k).enumerate().for_each(pack);
    }
    dst
}

/// `dst[t * co + j] = w[(co0 + j) * k + t0 + t]` for `j < co` and `t < dst.len() / co`:
/// `co` output channels from `co0` on, of the weights `w` with `k` values per output
/// channel, from value `t0` of each on, interleaved.
///
/// # Panics
/// If `co` is not one of the tiles' 16 and 32, or the values are not in `w`.
pub(super) fn interleave_block(
    w: &[f32],
    (k, co): (usize, usize),
    (co0, t0): (usize, usize),
    dst: &mut [f32],
) {
    fn rows<const R: usize>(
        w: &[f32],
        k: usize,
        (co0, t0): (usize, usize),
        len: usize,
    ) -> [&[f32]; R] {
        std::array::from_fn(|j| &w[(co0 + j) * k + t0..][..len])
    }
    let len = dst.len() / co;
    match co {
        16 => crate::interleave::interleave_rows(rows::<16>(w, k, (co0, t0), len), dst),
        32 => crate::interleave::interleave_rows(rows::<32>(w, k, (co0, t0), len), dst),
        _ => panic!("lanes: blocks of {co} output channels"),
    }
}

/// The weights as [`super::work::run`] takes them: packed whole ([`pack_weights`]), or as they
/// are, each work item packing a block's weights for a pass as it comes to them.
#[derive(Clone, Copy)]
pub(super) enum Weights<'a> {
    Packed(&'a [f32]),
    Raw(&'a [f32]),
}

impl Weights<'_> {
    /// Panics unless the weights are as long as `d` says.
    pub(super) fn check(&self, d: &Dims) {
        let (Weights::Packed(w) | Weights::Raw(w)) = self;
        assert_eq!(w.len(), d.cout * d.c * 9, "lanes: weights' length");
    }
}

/// Whether [`super::forward_in`] leaves unpacked weights to the work items ([`Weights::Raw`]):
/// where few of them read each block of output channels (at batch 1, up to 14x14 outputs).
/// Packed whole, the weights go out to memory and come back; at batch 1 that was an eighth of a
/// ResNet-18 inference.
pub(super) fn packs_per_block(d: &Dims) -> bool {
    d.n * row_runs(d) <= RAW_MAX_RUNS
}

/// The most runs of rows (over the batch) for which the work items pack their own blocks.
const RAW_MAX_RUNS: usize = 4;

//! What a convolution does to its output as it writes it: bias or a per-channel
//! scale + shift (eval-mode BatchNorm), a residual (an inference block's shortcut), then an
//! optional ReLU.

use candle_core::WithDType;

/// What a forward applies to each output value while the image's output is in cache:
/// `relu?(residual? + (v * scale[c] + bias[c]))`, each part optional (a bias; an eval-mode
/// BatchNorm's scale and shift; the shortcut's output of an inference residual block).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a, T> {
    pub scale: Option<&'a [T]>,
    pub bias: Option<&'a [T]>,
    pub relu: bool,
    /// The values added before the ReLU, laid out as the output: the whole batch's, until
    /// [`Epilogue::image`] narrows them to the image being written.
    pub residual: Option<&'a [T]>,
}

impl<'a, T: WithDType> Epilogue<'a, T> {
    /// The plain convolution.
    pub(crate) const NONE: Self = Epilogue {
        scale: None,
        bias: None,
        relu: false,
        residual: None,
    };

    pub(crate) fn is_identity(&self) -> bool {
        self.scale.is_none() && self.bias.is_none() && !self.relu && self.residual.is_none()
    }

    /// The epilogue of image `ni`, whose output is `len` values: the residual narrowed to
    /// that image's.
    pub(crate) fn image(self, ni: usize, len: usize) -> Self {
        Epilogue {
            residual: self.residual.map(|r| &r[ni * len..(ni + 1) * len]),
            ..self
        }
    }

    /// Applies the epilogue in place to consecutive output planes of `plane_len` values,
    /// the first of channel `first_co` (nothing to do for the identity): the forwards that
    /// write their raw output in its final place and finish it while it is in cache.
    pub(crate) fn apply_planes(&self, first_co: usize, planes: &mut [T], plane_len: usize) {
        if self.is_identity() {
            return;
        }
        for (j, plane) in planes.chunks_exact_mut(plane_len).enumerate() {
            self.apply_in_place(first_co + j, plane);
        }
    }

    pub(crate) fn apply_in_place(&self, co: usize, plane: &mut [T]) {
        let s = self.scale.map(|s| s[co]);
        let b = self.bias.map_or(T::zero(), |b| b[co]);
        let zero = T::zero();
        let relu = |r: T| if self.relu && r < zero { zero } else { r };
        let affine = |v: T| match s {
            Some(s) => v * s + b,
            None => v + b,
        };
        let len = plane.len();
        // Zipped, not indexed: the loops vectorise.
        match self.residual.map(|r| &r[co * len..(co + 1) * len]) {
            Some(res) => {
                for (v, r) in plane.iter_mut().zip(res) {
                    *v = relu(*r + affine(*v));
                }
            }
            None => {
                for v in plane {
                    *v = relu(affine(*v));
                }
            }
        }
    }
}

impl Epilogue<'_, f32> {
    /// Writes the epilogue of output channel `co` applied to the raw values `src` into `dst`,
    /// which starts `at` values into the image's output (where the residual's values are
    /// read).
    pub(crate) fn apply_to<S: crate::buffer::Slot>(
        &self,
        (co, at): (usize, usize),
        src: &[f32],
        dst: &mut [S],
    ) {
        let s = self.scale.map(|s| s[co]);
        let b = self.bias.map_or(0.0, |b| b[co]);
        let relu = |r: f32| if self.relu && r < 0.0 { 0.0 } else { r };
        let affine = |v: f32| match s {
            Some(s) => v * s + b,
            None => v + b,
        };
        match self.residual.map(|r| &r[at..at + dst.len()]) {
            Some(res) => {
                for ((o, v), r) in dst.iter_mut().zip(src).zip(res) {
                    o.put(relu(*r + affine(*v)));
                }
            }
            None => {
                for (o, v) in dst.iter_mut().zip(src) {
                    o.put(relu(affine(*v)));
                }
            }
        }
    }
}

/// What the third input of a convolution op holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Affine {
    /// A bias, (C_out).
    Bias,
    /// `[scale; shift]`, (2 * C_out): an eval-mode BatchNorm applied in the epilogue.
    ScaleShift,
}

/// The epilogue for an optional third input of kind `affine`.
pub(crate) fn epilogue<'a, T>(
    third: Option<&'a [T]>,
    affine: Affine,
    relu: bool,
) -> Epilogue<'a, T> {
    match (third, affine) {
        (None, _) => Epilogue {
            scale: None,
            bias: None,
            relu,
            residual: None,
        },
        (Some(b), Affine::Bias) => Epilogue {
            scale: None,
            bias: Some(b),
            relu,
            residual: None,
        },
        (Some(ss), Affine::ScaleShift) => {
            let (scale, shift) = ss.split_at(ss.len() / 2);
            Epilogue {
                scale: Some(scale),
                bias: Some(shift),
                relu,
                residual: None,
            }
        }
    }
}

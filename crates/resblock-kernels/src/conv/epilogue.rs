//! What a convolution does to its output as it writes it: bias or a per-channel
//! scale + shift (eval-mode BatchNorm), then an optional ReLU.

use candle_core::WithDType;

/// What a forward applies to each output value while the image's output is in cache:
/// `relu?(v * scale[c] + bias[c])`, each part optional (a bias; an eval-mode BatchNorm's
/// scale and shift).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a, T> {
    pub scale: Option<&'a [T]>,
    pub bias: Option<&'a [T]>,
    pub relu: bool,
}

impl<'a, T: WithDType> Epilogue<'a, T> {
    /// The plain convolution.
    pub(crate) const NONE: Self = Epilogue {
        scale: None,
        bias: None,
        relu: false,
    };

    pub(crate) fn is_identity(&self) -> bool {
        self.scale.is_none() && self.bias.is_none() && !self.relu
    }

    pub(crate) fn apply_in_place(&self, co: usize, plane: &mut [T]) {
        let s = self.scale.map(|s| s[co]);
        let b = self.bias.map_or(T::zero(), |b| b[co]);
        let zero = T::zero();
        for v in plane {
            let r = match s {
                Some(s) => *v * s + b,
                None => *v + b,
            };
            *v = if self.relu && r < zero { zero } else { r };
        }
    }
}

impl Epilogue<'_, f32> {
    /// Writes the epilogue of output channel `co` applied to the raw values `src` into `dst`.
    pub(crate) fn apply_to<S: crate::buffer::Slot>(&self, co: usize, src: &[f32], dst: &mut [S]) {
        let s = self.scale.map(|s| s[co]);
        let b = self.bias.map_or(0.0, |b| b[co]);
        for (o, v) in dst.iter_mut().zip(src) {
            let r = match s {
                Some(s) => *v * s + b,
                None => *v + b,
            };
            o.put(if self.relu && r < 0.0 { 0.0 } else { r });
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
        },
        (Some(b), Affine::Bias) => Epilogue {
            scale: None,
            bias: Some(b),
            relu,
        },
        (Some(ss), Affine::ScaleShift) => {
            let (scale, shift) = ss.split_at(ss.len() / 2);
            Epilogue {
                scale: Some(scale),
                bias: Some(shift),
                relu,
            }
        }
    }
}

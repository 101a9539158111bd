//! A convolution's geometry: padding, stride, dilation, groups ([`ConvGeom`]) and the
//! sizes they give for an input and a kernel ([`Dims`]).

/// Geometry of one convolution (same padding/stride/dilation in both dims).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeom {
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl ConvGeom {
    /// Refuses arguments no convolution can take, before any arithmetic on them: a zero
    /// stride, dilation or group count, inputs or kernels that are not 4-D or have an empty
    /// dimension, channels that do not split into the groups, and a (dilated) kernel larger
    /// than the padded input.
    pub(crate) fn check(&self, op: &'static str, x: &[usize], k: &[usize]) -> crate::Result<()> {
        let config = |m: String| Err(crate::Error::config(format!("{op}: {m}")));
        for (name, v) in [
            ("stride", self.stride),
            ("dilation", self.dilation),
            ("groups", self.groups),
        ] {
            if v == 0 {
                return config(format!("{name} must be at least 1, got 0"));
            }
        }
        let shape = |expected: String, got: &[usize]| {
            Err(crate::Error::Shape {
                op,
                expected,
                got: got.to_vec(),
            })
        };
        if x.len() != 4 || x[1..].contains(&0) {
            return shape("a 4-D (N, C, H, W) input with C, H, W > 0".into(), x);
        }
        if k.len() != 4 || k.contains(&0) {
            return shape(
                "a 4-D (C_out, C_in / groups, KH, KW) kernel with no empty dimension".into(),
                k,
            );
        }
        if k[1] * self.groups != x[1] || !k[0].is_multiple_of(self.groups) {
            return shape(
                format!(
                    "an input with {} channels ({} per group x {} groups) for kernel {k:?}",
                    k[1] * self.groups,
                    k[1],
                    self.groups
                ),
                x,
            );
        }
        for (size, kk) in [(x[2], k[2]), (x[3], k[3])] {
            let extent = self.dilation.saturating_mul(kk - 1).saturating_add(1);
            if extent > size.saturating_add(self.padding.saturating_mul(2)) {
                return shape(
                    format!(
                        "an input at least as large as the kernel's extent {extent} after padding {}",
                        self.padding
                    ),
                    x,
                );
            }
        }
        Ok(())
    }
}

/// Sizes of one convolution call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) cout: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

impl Dims {
    pub(crate) fn new(g: &ConvGeom, x: &[usize], k: &[usize]) -> candle_core::Result<Dims> {
        if x.len() != 4 || k.len() != 4 || k[1] * g.groups != x[1] {
            candle_core::bail!(
                "conv2d: input {x:?} does not fit kernel {k:?}, groups {}",
                g.groups
            )
        }
        let out = |size: usize, k: usize| -> candle_core::Result<usize> {
            let eff = g.dilation * (k - 1) + 1;
            match (size + 2 * g.padding).checked_sub(eff) {
                Some(v) => Ok(v / g.stride + 1),
                None => candle_core::bail!("conv2d: kernel larger than the padded input"),
            }
        };
        Ok(Dims {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            cout: k[0],
            kh: k[2],
            kw: k[3],
            oh: out(x[2], k[2])?,
            ow: out(x[3], k[3])?,
        })
    }
    /// Output pixels per image.
    pub(crate) fn p(&self) -> usize {
        self.oh * self.ow
    }
    /// Rows of `cols` (all groups).
    pub(crate) fn k_all(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub(crate) fn chw(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Whether `cols` is the input itself (1x1, stride 1, no padding).
    pub(crate) fn direct(&self, g: &ConvGeom) -> bool {
        self.kh == 1 && self.kw == 1 && g.stride == 1 && g.padding == 0
    }
}

//! A layer-by-layer summary of a ResNet: output shapes, parameters and multiply-adds.
//!
//! Multiply-adds count convolutions and the classifier, the convention of torchvision's
//! published `GFLOPS` (e.g. 4.089 G for resnet50 at 224x224); batch norms, activations,
//! pooling and additions are listed with 0.

use std::fmt;

use candle_core::Tensor;
use resblock_core::{BatchNorm, Conv2d, Norm, Shortcut};

use crate::error::{Error, Result};
use crate::resnet::{Block, ResNet, StemLayer};

/// One row of a [`Summary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    /// The layer's parameter path (`layer1.0.conv1`) or a description (`maxpool`).
    pub name: String,
    /// What kind of layer it is.
    pub kind: &'static str,
    /// Output shape for a batch of one.
    pub output: Vec<usize>,
    /// Trainable parameters.
    pub params: usize,
    /// Multiply-adds for a batch of one.
    pub macs: u64,
}

/// The summary of a network for one input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The rows, in execution order.
    pub rows: Vec<SummaryRow>,
    /// The input shape (batch of one).
    pub input: Vec<usize>,
}

impl Summary {
    /// Total trainable parameters.
    pub fn total_params(&self) -> usize {
        self.rows.iter().map(|r| r.params).sum()
    }
    /// Total multiply-adds for one image.
    pub fn total_macs(&self) -> u64 {
        self.rows.iter().map(|r| r.macs).sum()
    }
}

fn numel(t: &Tensor) -> usize {
    t.elem_count()
}

struct Walker {
    rows: Vec<SummaryRow>,
    shape: [usize; 3],
}

impl Walker {
    fn conv(&mut self, name: String, c: &Conv2d, from: [usize; 3]) -> Result<[usize; 3]> {
        let (c_out, c_in_g, kh, kw) = c.weight().dims4()?;
        let cfg = c.config();
        let out = |size: usize, k: usize| -> Result<usize> {
            let eff = cfg.dilation * (k - 1) + 1;
            (size + 2 * cfg.padding)
                .checked_sub(eff)
                .map(|v| v / cfg.stride + 1)
                .ok_or_else(|| {
                    Error::config(format!("{name}: input {from:?} is smaller than the kernel"))
                })
        };
        let shape = [c_out, out(from[1], kh)?, out(from[2], kw)?];
        let macs = (shape.iter().product::<usize>() * c_in_g * kh * kw) as u64;
        let params = numel(c.weight()) + c.bias().map_or(0, numel);
        self.rows.push(SummaryRow {
            name,
            kind: "Conv2d",
            output: shape.to_vec(),
            params,
            macs,
        });
        Ok(shape)
    }

    fn bn(&mut self, name: String, bn: &BatchNorm, shape: [usize; 3]) {
        let params = numel(bn.weight()) + numel(bn.bias());
        self.rows.push(SummaryRow {
            name,
            kind: "BatchNorm2d",
            output: shape.to_vec(),
            params,
            macs: 0,
        });
    }

    fn other(&mut self, name: &str, kind: &'static str, shape: &[usize]) {
        self.rows.push(SummaryRow {
            name: name.into(),
            kind,
            output: shape.to_vec(),
            params: 0,
            macs: 0,
        });
    }

    fn shortcut(&mut self, prefix: &str, s: &Shortcut, from: [usize; 3]) -> Result<()> {
        match s {
            Shortcut::Projection(l) => {
                let o = self.conv(format!("{prefix}.downsample.0"), l.conv(), from)?;
                if let Some(n) = l.norm() {
                    self.bn(format!("{prefix}.downsample.1"), n, o);
                }
            }
            Shortcut::AvgDown { stride, layer } => {
                let pooled = [
                    from[0],
                    from[1].div_ceil(*stride),
                    from[2].div_ceil(*stride),
                ];
                self.other(&format!("{prefix}.downsample.0"), "AvgPool2d", &pooled);
                let o = self.conv(format!("{prefix}.downsample.1"), layer.conv(), pooled)?;
                if let Some(n) = layer.norm() {
                    self.bn(format!("{prefix}.downsample.2"), n, o);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn block(&mut self, prefix: &str, b: &Block) -> Result<()> {
        let from = self.shape;
        let pre_norm = |n: Option<&resblock_core::PreActivation>| match n.map(|p| &p.norm) {
            Some(Norm::Batch(bn)) => Some(bn.clone()),
            _ => None,
        };
        let (pre, convs): (Option<BatchNorm>, Vec<(&Conv2d, Option<&BatchNorm>)>) = match b {
            Block::Basic(b) => (
                pre_norm(b.pre()),
                vec![
                    (b.branch().conv1(), b.branch().mid_norm()),
                    (b.branch().conv2(), b.branch().last_norm()),
                ],
            ),
            Block::Bottleneck(b) => {
                let [c1, c2, c3] = b.branch().convs();
                let [n1, n2, n3] = b.branch().norms_by_conv();
                (pre_norm(b.pre()), vec![(c1, n1), (c2, n2), (c3, n3)])
            }
        };
        // Pre-activation blocks name their norms bn1 (before conv1), bn2, ...; post-activation
        // ones bn_k after conv_k.
        let offset = usize::from(pre.is_some());
        if let Some(bn) = &pre {
            self.bn(format!("{prefix}.bn1"), bn, from);
        }
        let mut shape = from;
        for (i, (c, n)) in convs.into_iter().enumerate() {
            shape = self.conv(format!("{prefix}.conv{}", i + 1), c, shape)?;
            if let Some(n) = n {
                self.bn(format!("{prefix}.bn{}", i + 1 + offset), n, shape);
            }
        }
        self.shortcut(prefix, b.shortcut(), from)?;
        self.shape = shape;
        Ok(())
    }
}

impl ResNet {
    /// The layer-by-layer summary for one (in_channels, height, width) image.
    ///
    /// # Errors
    /// An input too small for a kernel.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use resblock_core::{params::shape_only_var_builder, RngHandle};
    /// use resblock_vision::{resnet, ResNetConfig};
    /// let (vb, _) = shape_only_var_builder(DType::F32, &Device::Cpu);
    /// let net = resnet(&ResNetConfig::preset("resnet50")?, &RngHandle::seed_from_u64(0), vb)?;
    /// let s = net.summary(224, 224)?;
    /// assert_eq!(s.total_params(), 25_557_032);
    /// assert_eq!(s.total_macs(), 4_089_184_256); // torchvision: 4.089 GFLOPS
    /// # Ok::<(), resblock_vision::Error>(())
    /// ```
    pub fn summary(&self, height: usize, width: usize) -> Result<Summary> {
        let input = [self.config().in_channels, height, width];
        let mut w = Walker {
            rows: Vec::new(),
            shape: input,
        };
        // A deep stem is timm's `conv1` Sequential: its first seven layers are `conv1.{i}`.
        let deep = self.config().stem == crate::StemType::Deep;
        for (idx, l) in self.stem_layers().iter().enumerate() {
            let name = |base: &str| {
                if deep && idx <= 6 {
                    format!("conv1.{idx}")
                } else {
                    base.to_string()
                }
            };
            match l {
                StemLayer::Conv(c) => w.shape = w.conv(name("conv1"), c, w.shape)?,
                StemLayer::Norm(n) => w.bn(name("bn1"), n, w.shape),
                StemLayer::Relu => {
                    let s = w.shape;
                    w.other("relu", "ReLU", &s);
                }
                StemLayer::MaxPool => {
                    let s = w.shape;
                    w.shape = [s[0], (s[1] + 2 - 3) / 2 + 1, (s[2] + 2 - 3) / 2 + 1];
                    let s = w.shape;
                    w.other("maxpool", "MaxPool2d", &s);
                }
            }
        }
        for (s, stage) in self.stages().iter().enumerate() {
            for (i, b) in stage.iter().enumerate() {
                w.block(&format!("layer{}.{i}", s + 1), b)?;
            }
        }
        if let Some(n) = self.final_norm() {
            let shape = w.shape;
            w.bn("bn_final".into(), n, shape);
        }
        let c = w.shape[0];
        w.other("avgpool", "AdaptiveAvgPool2d", &[c]);
        if let Some(fc) = self.fc() {
            let (o, i) = fc.weight().dims2()?;
            let params = o * i + fc.bias().map_or(0, numel);
            w.rows.push(SummaryRow {
                name: "fc".into(),
                kind: "Linear",
                output: vec![o],
                params,
                macs: (o * i) as u64,
            });
        }
        Ok(Summary {
            rows: w.rows,
            input: input.to_vec(),
        })
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<name_w$}  {:<18}  {:<16}  {:>12}  {:>16}",
            "layer", "type", "output", "params", "mult-adds"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<name_w$}  {:<18}  {:<16}  {:>12}  {:>16}",
                r.name,
                r.kind,
                format!("{:?}", r.output),
                thousands(r.params as u64),
                thousands(r.macs)
            )?;
        }
        writeln!(f, "input {:?}", self.input)?;
        writeln!(
            f,
            "total parameters: {}",
            thousands(self.total_params() as u64)
        )?;
        write!(
            f,
            "total mult-adds: {} ({:.3} G)",
            thousands(self.total_macs()),
            self.total_macs() as f64 / 1e9
        )
    }
}

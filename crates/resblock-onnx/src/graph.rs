//! Building the ONNX graph of a [`ResNet`] from its layers.

use candle_core::{DType, Tensor};
use resblock_core::{Activation, BatchNorm, Conv2d, Norm, Residual, Shortcut};
use resblock_vision::{Block, ResNet, StemLayer};

use crate::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::{Error, Result, OPSET};

/// How to export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    /// `[height, width]` of the input (the batch dimension is dynamic, `N`).
    pub image_size: [usize; 2],
    /// Fold every convolution + batch norm pair into the convolution (pre-activation
    /// norms, which precede a convolution, stay `BatchNormalization` nodes).
    pub fold_batch_norm: bool,
    /// `metadata_props` of the model (e.g. the model file's `resblock` metadata).
    pub metadata: Vec<(String, String)>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            image_size: [224, 224],
            fold_batch_norm: false,
            metadata: Vec::new(),
        }
    }
}

/// The graph under construction: nodes in topological order and their initializers.
struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    next: usize,
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn i64s(v: usize) -> i64 {
    v as i64
}

impl Builder {
    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    /// Adds a node with one output named after `hint`; returns the output name.
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        hint: &str,
        attrs: Vec<AttributeProto>,
    ) -> String {
        let out = self.fresh(hint);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(out.clone()),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// An f32 initializer named `name` (the torchvision key, so the file reads like a
    /// state_dict).
    fn init_f32(&mut self, name: &str, t: &Tensor) -> Result<String> {
        let t = t
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            dims: t.dims().iter().map(|&d| i64s(d)).collect(),
            data_type: Some(DataType::Float as i32),
            name: Some(name.into()),
            raw_data: Some(raw),
            ..Default::default()
        });
        Ok(name.to_string())
    }

    fn init_i64(&mut self, hint: &str, v: &[i64]) -> String {
        let name = self.fresh(hint);
        self.inits.push(TensorProto {
            dims: vec![i64s(v.len())],
            data_type: Some(DataType::Int64 as i32),
            name: Some(name.clone()),
            int64_data: v.to_vec(),
            ..Default::default()
        });
        name
    }

    fn conv(&mut self, x: &str, c: &Conv2d, key: &str) -> Result<String> {
        let cfg = c.config();
        let (_, _, kh, kw) = c.weight().dims4()?;
        let w = self.init_f32(&format!("{key}.weight"), c.weight())?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = c.bias() {
            inputs.push(self.init_f32(&format!("{key}.bias"), b)?);
        }
        let p = i64s(cfg.padding);
        let attrs = vec![
            attr_ints("kernel_shape", &[i64s(kh), i64s(kw)]),
            attr_ints("strides", &[i64s(cfg.stride); 2]),
            attr_ints("pads", &[p, p, p, p]),
            attr_ints("dilations", &[i64s(cfg.dilation); 2]),
            attr_int("group", i64s(cfg.groups)),
        ];
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.node("Conv", &refs, key, attrs))
    }

    fn bn(&mut self, x: &str, bn: &BatchNorm, key: &str) -> Result<String> {
        let scale = self.init_f32(&format!("{key}.weight"), bn.weight())?;
        let bias = self.init_f32(&format!("{key}.bias"), bn.bias())?;
        let mean = self.init_f32(&format!("{key}.running_mean"), bn.running_mean())?;
        let var = self.init_f32(&format!("{key}.running_var"), bn.running_var())?;
        let eps = bn.config().eps as f32;
        Ok(self.node(
            "BatchNormalization",
            &[x, &scale, &bias, &mean, &var],
            key,
            vec![attr_float("epsilon", eps)],
        ))
    }

    fn activation(&mut self, x: &str, a: Activation, key: &str) -> Result<String> {
        Ok(match a {
            Activation::Relu => self.node("Relu", &[x], &format!("{key}.relu"), vec![]),
            Activation::Tanh => self.node("Tanh", &[x], &format!("{key}.tanh"), vec![]),
            Activation::Silu => {
                let s = self.node("Sigmoid", &[x], &format!("{key}.sigmoid"), vec![]);
                self.node("Mul", &[x, &s], &format!("{key}.silu"), vec![])
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "{key}: activation {other:?} (ReLU, tanh and SiLU export)"
                )))
            }
        })
    }

    fn scalar_mul(&mut self, x: &str, v: &Tensor, key: &str) -> Result<String> {
        let c = self.init_f32(key, &v.flatten_all()?)?;
        Ok(self.node("Mul", &[x, &c], key, vec![]))
    }

    fn shortcut(&mut self, x: &str, s: &Shortcut, key: &str) -> Result<Option<String>> {
        Ok(Some(match s {
            Shortcut::Identity => x.to_string(),
            Shortcut::Removed => return Ok(None),
            Shortcut::Projection(l) => {
                let y = self.conv(x, l.conv(), &format!("{key}.0"))?;
                match l.norm() {
                    Some(n) => self.bn(&y, n, &format!("{key}.1"))?,
                    None => y,
                }
            }
            Shortcut::AvgDown { stride, layer } => {
                let pooled = if *stride > 1 {
                    let s = i64s(*stride);
                    self.node(
                        "AveragePool",
                        &[x],
                        &format!("{key}.0"),
                        vec![
                            attr_ints("kernel_shape", &[s, s]),
                            attr_ints("strides", &[s, s]),
                            attr_int("ceil_mode", 1),
                            attr_int("count_include_pad", 0),
                        ],
                    )
                } else {
                    x.to_string()
                };
                let y = self.conv(&pooled, layer.conv(), &format!("{key}.1"))?;
                match layer.norm() {
                    Some(n) => self.bn(&y, n, &format!("{key}.2"))?,
                    None => y,
                }
            }
            Shortcut::ZeroPad {
                stride,
                front,
                back,
            } => {
                // x[:, :, ::s, ::s], then zero channels before and after.
                let starts = self.init_i64(&format!("{key}.starts"), &[0, 0]);
                let ends = self.init_i64(&format!("{key}.ends"), &[i64::MAX, i64::MAX]);
                let axes = self.init_i64(&format!("{key}.axes"), &[2, 3]);
                let steps = self.init_i64(&format!("{key}.steps"), &[i64s(*stride); 2]);
                let sub = self.node(
                    "Slice",
                    &[x, &starts, &ends, &axes, &steps],
                    &format!("{key}.subsample"),
                    vec![],
                );
                let (f, b) = (i64s(*front), i64s(*back));
                let pads = self.init_i64(&format!("{key}.pads"), &[0, f, 0, 0, 0, b, 0, 0]);
                self.node(
                    "Pad",
                    &[&sub, &pads],
                    &format!("{key}.zero_pad"),
                    vec![attr_string("mode", "constant")],
                )
            }
            Shortcut::Linear(_) => {
                return Err(Error::Unsupported(format!(
                    "{key}: a linear shortcut in a convolutional network"
                )))
            }
        }))
    }

    /// One residual block: `post(shortcut(s) + scale * branch(pre(x)))`, where the branch is
    /// a chain of convolutions, each followed by its norm (if any) and, but for the last, a
    /// ReLU.
    fn block<G>(
        &mut self,
        x: &str,
        r: &Residual<G>,
        convs: &[(&Conv2d, Option<&BatchNorm>)],
        key: &str,
    ) -> Result<String> {
        // Pre-activation nets name the norm before conv1 `bn1` and those after conv_k
        // `bn{k+1}`; post-activation nets name the norm after conv_k `bn{k}`.
        let (a, offset) = match r.pre() {
            Some(pre) => {
                let Norm::Batch(bn) = &pre.norm else {
                    return Err(Error::Unsupported(format!(
                        "{key}: a layer-norm pre-activation"
                    )));
                };
                let y = self.bn(x, bn, &format!("{key}.bn1"))?;
                let y = match pre.activation {
                    Some(act) => self.activation(&y, act, &format!("{key}.pre"))?,
                    None => y,
                };
                (y, 1)
            }
            None => (x.to_string(), 0),
        };
        let mut h = a.clone();
        for (i, (conv, norm)) in convs.iter().enumerate() {
            h = self.conv(&h, conv, &format!("{key}.conv{}", i + 1))?;
            if let Some(n) = norm {
                h = self.bn(&h, n, &format!("{key}.bn{}", i + 1 + offset))?;
            }
            if i + 1 < convs.len() {
                h = self.activation(&h, Activation::Relu, &format!("{key}.conv{}", i + 1))?;
            }
        }
        if let Some(alpha) = r.alpha() {
            h = self.scalar_mul(&h, alpha, &format!("{key}.alpha"))?;
        }
        if let Some(s) = r.fixed_scale() {
            let t = Tensor::new(&[s as f32], &candle_core::Device::Cpu)?;
            h = self.scalar_mul(&h, &t, &format!("{key}.scale"))?;
        }
        let s_in = if r.shortcut_reads_pre() { &a } else { x };
        if let Some(s) = self.shortcut(s_in, r.shortcut(), &format!("{key}.downsample"))? {
            h = self.node("Add", &[&s, &h], &format!("{key}.add"), vec![]);
        }
        match r.post() {
            Some(act) => self.activation(&h, act, key),
            None => Ok(h),
        }
    }
}

fn value_info(name: &str, dims: &[tensor_shape_proto::dimension::Value]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: Some(d.clone()),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ONNX model of `net` (see the crate docs).
///
/// # Errors
/// A part the exporter does not cover ([`Error::Unsupported`], naming it), or a tensor
/// that cannot be read.
pub fn export(net: &ResNet, opts: &ExportOptions) -> Result<ModelProto> {
    let folded;
    let net = if opts.fold_batch_norm {
        folded = net
            .folded()
            .map_err(|e| Error::Unsupported(format!("folding the batch norms: {e}")))?;
        &folded
    } else {
        net
    };
    let cfg = net.config();
    let mut b = Builder {
        nodes: Vec::new(),
        inits: Vec::new(),
        next: 0,
    };
    let mut h = "input".to_string();
    // A deep stem is timm's `conv1` Sequential (`conv1.0`, `conv1.1`, ...) for its first
    // seven layers.
    let deep = cfg.stem == resblock_vision::StemType::Deep;
    for (i, layer) in net.stem_layers().iter().enumerate() {
        let key = |base: &str| {
            if deep && i <= 6 {
                format!("conv1.{i}")
            } else {
                base.to_string()
            }
        };
        h = match layer {
            StemLayer::Conv(c) => b.conv(&h, c, &key("conv1"))?,
            StemLayer::Norm(n) => b.bn(&h, n, &key("bn1"))?,
            StemLayer::Relu => b.activation(&h, Activation::Relu, &key("stem"))?,
            StemLayer::MaxPool => b.node(
                "MaxPool",
                &[&h],
                "maxpool",
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[2, 2]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                ],
            ),
        };
    }
    for (s, stage) in net.stages().iter().enumerate() {
        for (i, block) in stage.iter().enumerate() {
            let key = format!("layer{}.{i}", s + 1);
            h = match block {
                Block::Basic(r) => {
                    let g = r.branch();
                    b.block(
                        &h,
                        r,
                        &[(g.conv1(), g.mid_norm()), (g.conv2(), g.last_norm())],
                        &key,
                    )?
                }
                Block::Bottleneck(r) => {
                    let [c1, c2, c3] = r.branch().convs();
                    let [n1, n2, n3] = r.branch().norms_by_conv();
                    b.block(&h, r, &[(c1, n1), (c2, n2), (c3, n3)], &key)?
                }
            };
        }
    }
    if let Some(n) = net.final_norm() {
        h = b.bn(&h, n, "bn_final")?;
        h = b.activation(&h, Activation::Relu, "bn_final")?;
    }
    h = b.node("GlobalAveragePool", &[&h], "avgpool", vec![]);
    h = b.node("Flatten", &[&h], "flatten", vec![attr_int("axis", 1)]);
    let out_dim = match net.fc() {
        Some(fc) => {
            let w = b.init_f32("fc.weight", fc.weight())?;
            let mut inputs = vec![h.clone(), w];
            if let Some(bias) = fc.bias() {
                inputs.push(b.init_f32("fc.bias", bias)?);
            }
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            b.node("Gemm", &refs, "fc", vec![attr_int("transB", 1)]);
            fc.weight().dims2()?.0
        }
        None => cfg.feature_channels(),
    };
    // The last node's output is the graph output `logits`.
    if let Some(last) = b.nodes.last_mut() {
        last.output = vec!["logits".into()];
    }
    use tensor_shape_proto::dimension::Value as Dim;
    let [ih, iw] = opts.image_size;
    let graph = GraphProto {
        node: b.nodes,
        name: Some("resblock".into()),
        initializer: b.inits,
        input: vec![value_info(
            "input",
            &[
                Dim::DimParam("N".into()),
                Dim::DimValue(i64s(cfg.in_channels)),
                Dim::DimValue(i64s(ih)),
                Dim::DimValue(i64s(iw)),
            ],
        )],
        output: vec![value_info(
            "logits",
            &[Dim::DimParam("N".into()), Dim::DimValue(i64s(out_dim))],
        )],
        ..Default::default()
    };
    Ok(ModelProto {
        // IR version 7 is the one that introduced opset 13 support in runtimes of that era.
        ir_version: Some(7),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("resblock".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        metadata_props: opts
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some(k.clone()),
                value: Some(v.clone()),
            })
            .collect(),
        ..Default::default()
    })
}

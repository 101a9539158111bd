//! Per-layer gradient norms: every convolution weight in forward order, the values of a
//! direct backward, and the model left as it was.

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use resblock_core::{seeded_var_builder, RngHandle};
use resblock_train::grad_flow::{conv_grad_norms, conv_weight_names};
use resblock_train::{Batch, LossKind};
use resblock_vision::{resnet, ResNet, ResNetConfig};

fn net(name: &str) -> Result<(ResNet, VarMap)> {
    let rng = RngHandle::seed_from_u64(7);
    let vars = VarMap::new();
    let cfg = ResNetConfig::preset(name)?;
    let net = resnet(
        &cfg,
        &rng,
        seeded_var_builder(&vars, &rng, DType::F32, &Device::Cpu),
    )?;
    Ok((net, vars))
}

fn snapshot(vars: &VarMap) -> Result<Vec<(String, Vec<f64>)>> {
    let data = vars.data().lock().expect("varmap");
    let mut v: Vec<_> = data
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.as_tensor()
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?,
            ))
        })
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

#[test]
fn gradient_norms_of_every_conv_in_forward_order() -> Result<()> {
    let (model, vars) = net("resnet8")?;
    let names = conv_weight_names(&vars);
    assert_eq!(
        names,
        [
            "conv1.weight",
            "layer1.0.conv1.weight",
            "layer1.0.conv2.weight",
            "layer2.0.conv1.weight",
            "layer2.0.conv2.weight",
            "layer3.0.conv1.weight",
            "layer3.0.conv2.weight",
        ]
    );
    let rng = RngHandle::seed_from_u64(1);
    let batch = Batch {
        inputs: rng.normal_tensor((4, 3, 8, 8), 0., 1., DType::F32, &Device::Cpu)?,
        targets: Tensor::new(&[0u32, 3, 9, 3], &Device::Cpu)?,
    };
    let loss = LossKind::CrossEntropy {
        label_smoothing: 0.,
    };
    let before = snapshot(&vars)?;
    let norms = conv_grad_norms(&model, &vars, &batch, loss)?;
    // Nothing about the model changed (running statistics were put back).
    assert_eq!(before, snapshot(&vars)?);
    // The same numbers as a direct training-mode backward.
    let grads = loss
        .compute(&model.forward_t(&batch.inputs, true)?, &batch.targets)?
        .backward()?;
    let data = vars.data().lock().expect("varmap");
    assert_eq!(norms.len(), names.len());
    for ((name, n), expected_name) in norms.iter().zip(&names) {
        assert_eq!(name, expected_name);
        let g = grads.get(data[name].as_tensor()).expect("gradient");
        let direct = g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?
            .sqrt();
        assert!(
            *n > 0. && (n - direct).abs() <= 1e-9 * direct,
            "{name}: {n} vs {direct}"
        );
    }
    Ok(())
}

#[test]
fn deep_networks_list_blocks_by_number() -> Result<()> {
    let (_, vars) = net("plain110")?;
    let names = conv_weight_names(&vars);
    assert_eq!(
        names.len(),
        109,
        "plain-110: 109 convolutions and the classifier"
    );
    let at = |n: &str| names.iter().position(|x| x == n).expect(n);
    assert!(at("layer1.9.conv2.weight") < at("layer1.10.conv1.weight"));
    assert!(at("layer1.17.conv2.weight") < at("layer2.0.conv1.weight"));
    assert_eq!(
        names.last().map(String::as_str),
        Some("layer3.17.conv2.weight")
    );
    Ok(())
}

//! Growing a trained ResNet into a deeper one that computes exactly the same function
//! (nested function classes: the deeper network contains the shallower one).
//!
//! The deeper network has the same stem, stages, widths and classifier and more blocks per
//! stage. Every variable of the smaller network is copied under its own name; the new blocks
//! are appended at the end of their stage, where input and output shapes agree and the
//! shortcut is the identity (options A and B), and their residual branch starts at exactly
//! zero:
//!
//! - post-activation blocks: the branch's last batch norm has gamma = 0 and beta = 0
//!   (`bn2` of a basic block, `bn3` of a bottleneck), so `g(x) = 0` in training and eval
//!   mode, and the block computes `relu(x + 0) = x` on the non-negative output of the block
//!   before it;
//! - pre-activation blocks (no norm after the last convolution): the last convolution's
//!   weight is zero (`conv2` / `conv3`), and the block computes `x + 0 = x`.
//!
//! The other weights of a new block keep their (seeded) initialisation, so gradients reach
//! the zeroed parameters and the block can learn away from the identity.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use resblock_core::{seeded_var_builder, RngHandle, ShortcutPolicy};

use crate::error::{Error, Result};
use crate::resnet::{resnet, BlockType, ResNet, ResNetConfig};

/// A grown network: its model, its variables and the blocks that were added.
pub struct Grown {
    /// The deeper network (its variables are in `varmap`).
    pub model: ResNet,
    /// Its variables: the smaller network's, copied, plus the new blocks'.
    pub varmap: VarMap,
    /// The new blocks' parameter paths (`layer1.3`, ...), stage by stage.
    pub new_blocks: Vec<String>,
}

/// The variables of a new block (under `block`, e.g. `layer2.4`) that are set to zero so
/// that its residual branch is exactly zero.
pub fn identity_start_keys(cfg: &ResNetConfig, block: &str) -> Vec<String> {
    let names: &[&str] = match (cfg.block, cfg.pre_activation) {
        (BlockType::Basic, false) => &["bn2.weight", "bn2.bias"],
        (BlockType::Bottleneck, false) => &["bn3.weight", "bn3.bias"],
        (BlockType::Basic, true) => &["conv2.weight"],
        (BlockType::Bottleneck, true) => &["conv3.weight"],
    };
    names.iter().map(|n| format!("{block}.{n}")).collect()
}

/// Checks that `to` is `from` with at least as many blocks in every stage and that new
/// blocks can start as the identity (what [`grow`] checks first; call it to refuse a
/// growth before training anything).
///
/// # Errors
/// As [`grow`], for the configurations.
pub fn check(from: &ResNetConfig, to: &ResNetConfig) -> Result<()> {
    let bad = |m: String| Err(Error::config(format!("cannot grow: {m}")));
    match to.shortcut {
        ShortcutPolicy::Removed => {
            return bad(
                "a plain network has no shortcut, so a new block cannot start as the identity"
                    .into(),
            )
        }
        ShortcutPolicy::AlwaysProjection => {
            return bad(
                "option C puts a projection on every shortcut, so a new block cannot start as the identity (use option A or B)"
                    .into(),
            )
        }
        ShortcutPolicy::ZeroPad | ShortcutPolicy::Projection => {}
    }
    if from.layers.len() != to.layers.len() {
        return bad(format!(
            "the networks have {} and {} stages",
            from.layers.len(),
            to.layers.len()
        ));
    }
    for (s, (a, b)) in from.layers.iter().zip(&to.layers).enumerate() {
        if b < a {
            return bad(format!(
                "stage {} would shrink from {a} to {b} blocks",
                s + 1
            ));
        }
    }
    // Everything but the block counts (and the drop-path rates, which depend on the block
    // count and do nothing in eval mode) must agree.
    let same_shape = ResNetConfig {
        layers: from.layers.clone(),
        drop_path_rate: from.drop_path_rate,
        ..to.clone()
    };
    if &same_shape != from {
        return bad(format!(
            "the networks differ in more than their block counts:\n  from {from:?}\n  to   {to:?}"
        ));
    }
    Ok(())
}

/// Builds the network `to` from the trained network `from` (configuration and variables):
/// copies every variable and starts each added block as the identity (see the module
/// documentation). The added blocks' other weights are initialised from `rng`.
///
/// # Errors
/// `to` is not `from` with more blocks per stage, its shortcuts cannot be the identity
/// (plain networks, option C), or `from_vars` does not hold the variables of `from`.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::VarMap;
/// use resblock_core::{seeded_var_builder, RngHandle};
/// use resblock_vision::{grow::grow, resnet, ResNetConfig};
///
/// let rng = RngHandle::seed_from_u64(0);
/// let (small_cfg, big_cfg) = (ResNetConfig::preset("resnet8")?, ResNetConfig::preset("resnet14")?);
/// let vars = VarMap::new();
/// let small = resnet(&small_cfg, &rng, seeded_var_builder(&vars, &rng, DType::F32, &Device::Cpu))?;
/// let grown = grow(&small_cfg, &vars, &big_cfg, &rng, &Device::Cpu)?;
/// assert_eq!(grown.new_blocks, ["layer1.1", "layer2.1", "layer3.1"]);
/// let x = Tensor::rand(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
/// let (a, b) = (small.forward_t(&x, false)?, grown.model.forward_t(&x, false)?);
/// assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
/// # Ok::<(), resblock_vision::Error>(())
/// ```
pub fn grow(
    from: &ResNetConfig,
    from_vars: &VarMap,
    to: &ResNetConfig,
    rng: &RngHandle,
    device: &Device,
) -> Result<Grown> {
    check(from, to)?;
    let dtype = {
        let data = from_vars.data().lock().unwrap_or_else(|e| e.into_inner());
        // The weights' dtype (`num_batches_tracked` counters are integers).
        data.iter()
            .find(|(k, _)| k.ends_with(".weight"))
            .map_or(DType::F32, |(_, v)| v.dtype())
    };
    let varmap = VarMap::new();
    let model = resnet(to, rng, seeded_var_builder(&varmap, rng, dtype, device))?;
    let new_blocks: Vec<String> = from
        .layers
        .iter()
        .zip(&to.layers)
        .enumerate()
        .flat_map(|(s, (&a, &b))| (a..b).map(move |i| format!("layer{}.{i}", s + 1)))
        .collect();
    let is_new = |k: &str| {
        new_blocks.iter().any(|b| {
            k.strip_prefix(b.as_str())
                .is_some_and(|r| r.starts_with('.'))
        })
    };

    let source = from_vars.data().lock().unwrap_or_else(|e| e.into_inner());
    let target = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut copied = BTreeSet::new();
    for (k, v) in source.iter() {
        if is_new(k) {
            return Err(Error::config(format!(
                "cannot grow: variable {k} of the smaller network lies in a block the deeper one adds (do the variables belong to the smaller configuration?)"
            )));
        }
        let Some(t) = target.get(k) else {
            return Err(Error::config(format!(
                "cannot grow: variable {k} of the smaller network has no place in the deeper one"
            )));
        };
        if t.dims() != v.dims() {
            return Err(Error::config(format!(
                "cannot grow: variable {k} has shape {:?} in the smaller network and {:?} in the deeper one",
                v.dims(),
                t.dims()
            )));
        }
        t.set(&v.as_tensor().to_dtype(t.dtype())?.to_device(device)?)?;
        copied.insert(k.as_str());
    }
    if let Some(k) = target
        .keys()
        .find(|k| !copied.contains(k.as_str()) && !is_new(k))
    {
        return Err(Error::config(format!(
            "cannot grow: variable {k} of the deeper network is not in the smaller one and not in a new block"
        )));
    }
    for block in &new_blocks {
        for key in identity_start_keys(to, block) {
            let v = target.get(&key).ok_or_else(|| {
                Error::config(format!("cannot grow: the new block has no variable {key}"))
            })?;
            v.set(&Tensor::zeros(v.dims(), v.dtype(), v.device())?)?;
        }
    }
    drop(target);
    Ok(Grown {
        model,
        varmap,
        new_blocks,
    })
}

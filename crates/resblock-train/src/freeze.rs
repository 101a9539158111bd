//! Which parameters of a ResNet fine-tuning keeps fixed (`--freeze-backbone`,
//! `--freeze-until STAGE`), by torchvision's parameter names: the stem (`conv1`, `bn1`,
//! ResNet-D's `conv1.*`), the stages `layer1` ... `layerN`, then `bn_final` and `fc`.
//! Frozen parameters are left out of the optimizer; BatchNorm running statistics still
//! update in training mode, as with `requires_grad = False` in PyTorch.

use crate::error::{Error, Result};
use crate::optim::ParamGroup;

/// What stays fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Freeze {
    /// Everything trains.
    #[default]
    Nothing,
    /// Everything but the classifier `fc`.
    Backbone,
    /// The stem and the stages up to `layerN` (0: the stem alone).
    Until(usize),
}

impl Freeze {
    /// Parses a `--freeze-until` value: `stem`, `layerN` or `N`, for a net of `stages`
    /// stages.
    ///
    /// # Errors
    /// Anything else, or a stage the net does not have.
    pub fn until(stage: &str, stages: usize) -> Result<Self> {
        let n = match stage {
            "stem" => Some(0),
            s => s
                .strip_prefix("layer")
                .unwrap_or(s)
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= stages),
        };
        n.map(Self::Until).ok_or_else(|| {
            Error::config(format!(
                "--freeze-until {stage:?}: expected stem, layer1 ... layer{stages} or 0 ... {stages}"
            ))
        })
    }

    /// Whether the parameter called `key` stays fixed.
    pub fn is_frozen(&self, key: &str) -> bool {
        let head = key.starts_with("fc.") || key.starts_with("bn_final.");
        match *self {
            Self::Nothing => false,
            Self::Backbone => !key.starts_with("fc."),
            Self::Until(n) => {
                !head
                    && match key.strip_prefix("layer").and_then(|r| r.split('.').next()) {
                        Some(stage) => stage.parse::<usize>().is_ok_and(|s| s <= n),
                        None => true, // the stem
                    }
            }
        }
    }

    /// `groups` without the frozen parameters.
    pub fn apply(&self, mut groups: Vec<ParamGroup>) -> Vec<ParamGroup> {
        for g in &mut groups {
            g.params.retain(|(k, _)| !self.is_frozen(k));
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_by_name() -> Result<()> {
        let keys = [
            "conv1.weight",
            "conv1.0.weight",
            "bn1.bias",
            "layer1.0.conv1.weight",
            "layer2.1.bn2.weight",
            "layer3.0.downsample.0.weight",
            "bn_final.weight",
            "fc.weight",
        ];
        let frozen = |f: Freeze| -> Vec<bool> { keys.iter().map(|k| f.is_frozen(k)).collect() };
        assert_eq!(frozen(Freeze::Nothing), [false; 8]);
        assert_eq!(
            frozen(Freeze::Backbone),
            [true, true, true, true, true, true, true, false]
        );
        assert_eq!(
            frozen(Freeze::until("stem", 3)?),
            [true, true, true, false, false, false, false, false]
        );
        assert_eq!(
            frozen(Freeze::until("layer2", 3)?),
            [true, true, true, true, true, false, false, false]
        );
        assert_eq!(Freeze::until("3", 3)?, Freeze::Until(3));
        assert!(Freeze::until("layer4", 3).is_err());
        assert!(Freeze::until("head", 3).is_err());
        Ok(())
    }
}

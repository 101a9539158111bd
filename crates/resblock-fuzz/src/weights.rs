//! Weight files: `.safetensors` (with or without `train`'s model metadata) and PyTorch's
//! `.pth` (a zip of pickles and storages), as `predict`, `evaluate` and `--init` read them.

use candle_core::Device;
use resblock_vision::model_file::{load_model, read_model_meta};
use resblock_vision::weights::read_state_dict;

use crate::{scratch, shown, Outcome};

/// A `.safetensors` file: its model metadata, its tensors, and the model it describes
/// (as `predict` loads it; a file without metadata as a `resnet20`).
pub fn safetensors(bytes: &[u8]) -> Outcome {
    let p = scratch::put("model.safetensors", bytes);
    read_model_meta(&p).map_err(shown)?;
    read_state_dict(&p).map_err(shown)?;
    load_model(&p, None, &Device::Cpu)
        .or_else(|_| load_model(&p, Some("resnet20"), &Device::Cpu))
        .map(drop)
        .map_err(shown)
}

/// A `.pth` file: the pickle's globals checked, then its tensors.
pub fn pth(bytes: &[u8]) -> Outcome {
    read_state_dict(&scratch::put("weights.pth", bytes))
        .map(drop)
        .map_err(shown)
}

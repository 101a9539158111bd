//! ONNX export of the ResNet family: every preset (CIFAR option-A zero-pad shortcuts, basic
//! and bottleneck blocks, ResNeXt groups, wide, dilation, ResNet-D's deep stem and avg-down,
//! pre-activation nets), opset 13, a dynamic batch dimension, input `input` (N, C, H, W,
//! normalised as the model file's metadata says) and output `logits`.
//!
//! The messages are the official `onnx.proto` compiled by `prost` ([`proto`]); the graph is
//! written from the network's own layers (walking a [`resblock_vision::ResNet`] as its
//! `summary` does), so what is exported is what runs. Batch norms are kept as `BatchNormalization` nodes or folded into
//! the convolutions ([`ExportOptions::fold_batch_norm`]).
//!
//! ```no_run
//! use resblock_onnx::{export, ExportOptions};
//! # fn f(net: &resblock_vision::ResNet) -> Result<(), resblock_onnx::Error> {
//! let opts = ExportOptions { image_size: [224, 224], ..Default::default() };
//! resblock_onnx::write(net, &opts, std::path::Path::new("resnet50.onnx"))?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod graph;

pub use graph::{export, ExportOptions};

use std::path::Path;

use prost::Message;

/// The ONNX messages, generated from `proto/onnx.proto` at build time.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// The opset the exported graphs import.
pub const OPSET: i64 = 13;

/// Errors of the exporter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor could not be read.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The network has a part ONNX export does not cover (named).
    #[error("cannot export: {0}")]
    Unsupported(String),
    /// The file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Exports `net` and writes the serialised model to `path` atomically.
///
/// # Errors
/// As [`export`], or an unwritable destination.
pub fn write(net: &resblock_vision::ResNet, opts: &ExportOptions, path: &Path) -> Result<()> {
    let model = export(net, opts)?;
    resblock_io::write_atomic(path, &model.encode_to_vec()).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })
}

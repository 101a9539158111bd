//! The error type of resblock-train.

/// Errors raised while training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An error from the residual primitives.
    #[error(transparent)]
    Core(#[from] resblock_core::Error),

    /// A hyper-parameter out of its range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The loss (or a gradient) stopped being finite; training cannot continue.
    #[error("non-finite {what} at epoch {epoch}, step {step}: {value}")]
    NonFinite {
        /// What was not finite (`loss`, a parameter's gradient, a batch-norm statistic).
        what: String,
        /// The epoch in progress (1-based).
        epoch: usize,
        /// The optimizer step at which it happened (0-based, counted over the whole run).
        step: u64,
        /// The value seen.
        value: f64,
    },

    /// A checkpoint (or another output file) could not be read or written, or does not fit
    /// the model/optimizer being restored.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What went wrong (naming the key where one is at fault).
        msg: String,
    },

    /// A data file or folder is missing, malformed or inconsistent.
    #[error("{path}: {msg}")]
    Data {
        /// The file or folder.
        path: String,
        /// What is wrong with it.
        msg: String,
    },

    /// Two tensors that must agree in shape do not.
    #[error("{op}: shapes {a:?} and {b:?} do not match")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The first shape.
        a: Vec<usize>,
        /// The second shape.
        b: Vec<usize>,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }
}

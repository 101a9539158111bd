//! The error type of resblock-vision.

/// Errors raised by resblock-vision.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the residual primitives.
    #[error(transparent)]
    Core(#[from] resblock_core::Error),

    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A network was configured with values that cannot work together.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A weight file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },

    /// Pretrained weights could not be fetched, or the download is not what its name says.
    #[error("{path}: {msg}")]
    Download {
        /// The file (the cache entry).
        path: String,
        /// What went wrong (naming the URL).
        msg: String,
    },

    /// A weight file is not a readable safetensors / PyTorch file (corrupt, truncated, wrong
    /// format or extension).
    #[error("{path}: cannot read weights: {msg}")]
    WeightsFormat {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
    },

    /// A model file's `resblock` metadata is missing where needed, unreadable, of a newer
    /// version, or inconsistent with itself or the weights.
    #[error("{path}: model metadata: {msg}")]
    Metadata {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
    },

    /// An image could not be read or decoded.
    #[error("{path}: cannot read image: {msg}")]
    Image {
        /// The file.
        path: String,
        /// What went wrong.
        msg: String,
    },

    /// The weight file's keys are not the model's (strict loading, as PyTorch's
    /// `load_state_dict(strict=True)`).
    #[error("{path}: the weights do not fit this architecture: {} missing key(s){}, {} unexpected key(s){}",
        missing.len(), list(missing), unexpected.len(), list(unexpected))]
    KeyMismatch {
        /// The file.
        path: String,
        /// Keys the model has and the file lacks.
        missing: Vec<String>,
        /// Keys the file has and the model lacks.
        unexpected: Vec<String>,
    },

    /// A tensor in the weight file has another shape than the model's.
    #[error("{path}: {key} has shape {file:?} in the file but the model expects {model:?}")]
    ShapeMismatch {
        /// The file.
        path: String,
        /// The tensor's key.
        key: String,
        /// Its shape in the file.
        file: Vec<usize>,
        /// The model's shape.
        model: Vec<usize>,
    },
}

/// At most 8 keys, for messages.
fn list(keys: &[String]) -> String {
    if keys.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = keys.iter().take(8).map(String::as_str).collect();
    let more = if keys.len() > 8 {
        format!(", ... ({} more)", keys.len() - 8)
    } else {
        String::new()
    };
    format!(" ({}{more})", shown.join(", "))
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }
}

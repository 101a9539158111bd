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
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }
}

//! The error type of resblock-kernels.

/// Errors raised by the ops; messages name the op and the shape it rejected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An op was given parameters that cannot work together.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A tensor reached an op with a shape it cannot take.
    #[error("{op}: expected {expected}, got shape {got:?}")]
    Shape {
        /// The op that rejected the input.
        op: &'static str,
        /// What the op expected, in words.
        expected: String,
        /// The shape it got.
        got: Vec<usize>,
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

/// Converts our error into Candle's, for code that has to return `candle_core::Result`.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}

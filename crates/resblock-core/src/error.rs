//! The error type of resblock-core.

/// Errors raised by resblock-core.
///
/// Messages name the offending value (layer, shape, parameter) so that a user can fix the
/// configuration without reading the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from Candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An op rejected its input (resblock-kernels).
    #[error(transparent)]
    Kernel(#[from] resblock_kernels::Error),

    /// A layer or block was configured with values that cannot work together.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A tensor reached a layer with a shape the layer cannot take.
    #[error("{op}: expected {expected}, got shape {got:?}")]
    Shape {
        /// The layer or op that rejected the input.
        op: &'static str,
        /// What the layer expected, in words.
        expected: String,
        /// The shape it got.
        got: Vec<usize>,
    },

    /// A device was asked for by name and is not available in this build or on this machine.
    #[error("device {0:?} is not available: {1}")]
    Device(String, String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(msg: impl Into<String>) -> Self {
        Self::Config(msg.into())
    }
}

/// Converts our error into Candle's, for code that has to return `candle_core::Result`
/// (the `Module`/`ModuleT` traits, custom ops).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}

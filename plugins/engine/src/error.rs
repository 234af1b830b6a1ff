//! Engine errors, mapped onto the plugin ABI's error kinds at the boundary.

use inference_pio_core::{ErrorKind, PluginError};

#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Io(String),
    #[error("config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    ResourceLimit(String),
    #[error("{0}")]
    Device(String),
}

impl EngineError {
    /// Prefixes the message with where it happened (a file).
    pub fn context(self, place: &str) -> Self {
        let wrap = |m: String| format!("{place}: {m}");
        match self {
            EngineError::Io(m) => EngineError::Io(wrap(m)),
            EngineError::Config(m) => EngineError::Config(wrap(m)),
            EngineError::Weights(m) => EngineError::Weights(wrap(m)),
            EngineError::Tokenizer(m) => EngineError::Tokenizer(wrap(m)),
            EngineError::Template(m) => EngineError::Template(wrap(m)),
            EngineError::Unsupported(m) => EngineError::Unsupported(wrap(m)),
            other => other,
        }
    }
}

impl From<EngineError> for PluginError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            EngineError::Io(_) | EngineError::Weights(_) | EngineError::Tokenizer(_) => ErrorKind::Io,
            EngineError::Config(_) | EngineError::Unsupported(_) => ErrorKind::Unsupported,
            EngineError::Template(_) | EngineError::InvalidRequest(_) => ErrorKind::InvalidInput,
            EngineError::ResourceLimit(_) => ErrorKind::ResourceLimit,
            EngineError::Device(_) => ErrorKind::Internal,
        };
        PluginError::new(kind, e.to_string())
    }
}

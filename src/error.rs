//! The crate's error type: every failure names the file, tensor or field involved.

use std::path::PathBuf;

/// Errors from loading, validating and running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file that is not read at all: not a regular file, over its size limit, or not text.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why it is refused.
        msg: String,
    },
    /// A JSON file (config, index, tokenizer config) is malformed or missing a field.
    #[error("{path}: {msg}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A configuration value is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint file is malformed (bad header, truncated data, wrong dtype or shape).
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, naming the tensor.
        msg: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// Tokenizer loading, encoding or chat template rendering failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request cannot be served (e.g. the prompt exceeds the context window).
    #[error("{0}")]
    Request(String),
    /// A backend failed (e.g. no GPU adapter).
    #[error("backend: {0}")]
    Backend(String),
}

/// Shorthand result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// A format error in `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// A JSON error in `path`.
    pub fn json(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Json {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

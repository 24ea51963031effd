//! Typed errors of every qadapt op. Library code never exits or panics on bad input.

use std::path::PathBuf;

/// Everything an op can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer's length or a tensor's shape does not fit the op.
    #[error("{op}: expected {expected}, got {got}")]
    Shape {
        /// The op that checked.
        op: &'static str,
        /// What it needed.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// An argument outside the op's domain (block size not a power of two, ...).
    #[error("{op}: {reason}")]
    Invalid {
        /// The op that checked.
        op: &'static str,
        /// Why the argument is refused.
        reason: String,
    },
    /// No CUDA driver or no CUDA device on this machine.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// qadapt was built without nvcc, so it has no kernels to run.
    #[error(
        "qadapt was built without CUDA kernels (nvcc was not found at build time); run `just setup` and rebuild"
    )]
    CudaNotCompiled,
    /// The CUDA driver reported an error.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A file is not in the format it should be.
    #[error("{file}: {reason}")]
    Format {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error on a file.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Driver(e.to_string())
    }
}

/// Result of a qadapt op.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, expected: impl ToString, got: impl ToString) -> Error {
    Error::Shape {
        op,
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

pub(crate) fn invalid(op: &'static str, reason: impl ToString) -> Error {
    Error::Invalid {
        op,
        reason: reason.to_string(),
    }
}

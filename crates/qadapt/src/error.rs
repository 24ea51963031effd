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
    /// The device has no memory left for an allocation (the driver's
    /// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS' `CUBLAS_STATUS_ALLOC_FAILED`): a smaller batch or
    /// sequence may fit, unlike the other driver errors.
    #[error("out of device memory ({0})")]
    OutOfMemory(String),
    /// The CUDA driver reported an error: `code` is its `CUresult`, as `cuda.h` numbers them.
    #[error("CUDA driver: {message} (CUresult {code})")]
    Driver {
        /// The `CUresult`.
        code: u32,
        /// The driver's name and description of it.
        message: String,
    },
    /// cuBLAS reported an error: `status` is its `cublasStatus_t`.
    #[error("cuBLAS: {message} (cublasStatus_t {status})")]
    Blas {
        /// The `cublasStatus_t`.
        status: u32,
        /// Its name.
        message: String,
    },
    /// A CUDA library the op needs could not be loaded (libcublas not on the library path).
    #[error("{0}")]
    Library(String),
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
        use cudarc::driver::sys::CUresult;
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return Error::OutOfMemory(e.to_string());
        }
        Error::Driver {
            code: e.0 as u32,
            message: e.to_string(),
        }
    }
}

impl From<cudarc::cublas::result::CublasError> for Error {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        use cudarc::cublas::sys::cublasStatus_t;
        if e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
            return Error::OutOfMemory(format!("cuBLAS: {e:?}"));
        }
        Error::Blas {
            status: e.0 as u32,
            message: format!("{:?}", e.0),
        }
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

//! qadapt-vgpu: a virtual H200 that cudarc loads as `libcuda.so` and `libcublas.so`.
//!
//! The library exports the subset of the CUDA 13.0 driver API and of cuBLAS that cudarc calls on
//! qadapt's code paths, with the C signatures of `cuda.h` and `cublas_api.h` (cudarc's sys
//! bindings load them by these names; see [`driver`] and [`cublas`]). Behind them:
//!
//! - device memory is host memory fenced by guard pages and tracked in a table (`memory.rs`):
//!   copies, memsets and cuBLAS operands are range-checked against it, a kernel's stray access
//!   faults in a guard page and is reported with the allocation it missed;
//! - kernels are `kernels/*.cu` compiled as host C++ and run by the emulator of `kernels/emu`
//!   (`vgpu_abi.h`), after the launch checks of the real driver against the H200's limits and the
//!   registers and shared memory ptxas reported for the real build (`launch.rs`);
//! - streams run their work in order at enqueue time, so every call is synchronous; events record
//!   host time.
//!
//! Everything is per process: one device (ordinal 0), its primary context and any contexts
//! created on it. README.md says what it checks and what it cannot prove.
//!
//! **Its `unsafe`.** qadapt's own `unsafe` sits in one launch layer (`qadapt::cuda::launch`);
//! this crate is the other side of that door, a test double of the driver, and cannot avoid its
//! own: the driver and cuBLAS APIs it implements are C functions that receive raw pointers from
//! cudarc. Each exported function is an `unsafe extern "C" fn` under the contract `cuda.h` or
//! `cublas_api.h` documents for it; out-parameters are written through `write`, which refuses
//! NULL; device addresses are looked up in the allocation table before a copy, a memset or a
//! cuBLAS operand touches them; and every block carries its own `// SAFETY:` (clippy's
//! `undocumented_unsafe_blocks` is denied). No crate of the library or the binary depends on
//! it: it reaches a process only as the `libcuda.so` a test run puts first on the library path.

pub mod cublas;
pub mod driver;

mod abi;
mod device;
mod errors;
mod gemm;
mod image;
mod launch;
mod memory;
mod state;

pub use abi::QvCounters;

pub(crate) use cudarc::driver::sys::CUresult;

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs the body of an exported driver function: its error becomes the returned code, and a panic
/// (a bug here) becomes CUDA_ERROR_UNKNOWN instead of unwinding into C.
pub(crate) fn entry(api: &str, f: impl FnOnce() -> Result<(), CUresult>) -> CUresult {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CUresult::CUDA_SUCCESS,
        Ok(Err(e)) => {
            if trace() {
                eprintln!("qadapt-vgpu: {api} -> {}", errors::name(e as i32));
            }
            e
        }
        Err(_) => {
            eprintln!("qadapt-vgpu: {api}: internal error (panic in the virtual driver)");
            CUresult::CUDA_ERROR_UNKNOWN
        }
    }
}

/// Whether `QADAPT_VGPU_TRACE=1`: every launch and every failing call is printed on stderr.
pub(crate) fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var("QADAPT_VGPU_TRACE").is_ok_and(|v| v == "1"))
}

/// Writes `v` through the out-parameter `p`, refusing NULL with CUDA_ERROR_INVALID_VALUE.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
pub(crate) unsafe fn write<T>(p: *mut T, v: T) -> Result<(), CUresult> {
    if p.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: non-null, and valid for writes by this function's contract.
    unsafe { p.write(v) };
    Ok(())
}

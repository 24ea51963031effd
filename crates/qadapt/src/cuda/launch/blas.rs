//! cuBLAS (through cudarc): dense bf16 GEMMs where a plain matmul is all that is needed, and the
//! baselines of the fused kernels' benchmarks.
//!
//! Row-major convention of the whole crate: `c[m, n] = alpha * op(a) · op(b) + beta * c`, where
//! `op(a)` is `[m, k]` (a stored `[m, k]`, or `[k, m]` with [`Op::T`]) and `op(b)` is `[k, n]`
//! (b stored `[k, n]`, or `[n, k]` with [`Op::T`], the nn.Linear weight layout). cuBLAS is
//! column-major, and a row-major matrix read column-major is its transpose, so the call computes
//! `c^T = op(b)^T · op(a)^T` with the operands swapped: `c` is the column-major `[n, m]`
//! (ldc = n), b's storage goes first with `op = N` when it is stored `[k, n]` (ld = n) and `op = T`
//! when stored `[n, k]` (ld = k); a's storage second, `op = N` for `[m, k]` (ld = k), `op = T` for
//! `[k, m]` (ld = m). bf16 in and out, f32 compute (CUBLAS_COMPUTE_32F).

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use super::on_device;
use crate::cuda::{CudaDevice, Op};
use crate::error::{Result, invalid, shape_err};

/// `c[m, n] = alpha * op(a) · op(b) + beta * c` with cuBLAS (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16(
    dev: &CudaDevice,
    a: &CudaSlice<bf16>,
    a_op: Op,
    b: &CudaSlice<bf16>,
    b_op: Op,
    c: &mut CudaSlice<bf16>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    const OP: &str = "gemm bf16 (cublas)";
    if m == 0 || n == 0 || k == 0 {
        return Err(invalid(OP, format!("empty shape m={m} n={n} k={k}")));
    }
    if m.max(n).max(k) > i32::MAX as usize {
        return Err(invalid(OP, "a dimension exceeds cuBLAS' 32-bit range"));
    }
    for (what, have, need) in [
        ("a", a.len(), m * k),
        ("b", b.len(), k * n),
        ("c", c.len(), m * n),
    ] {
        if have != need {
            return Err(shape_err(OP, format!("{what} of {need} elements"), have));
        }
    }
    on_device(OP, dev, "a", a)?;
    on_device(OP, dev, "b", b)?;
    on_device(OP, dev, "c", c)?;
    // SAFETY: a holds m*k, b k*n and c m*n bf16 elements (checked above), all on this device.
    unsafe { gemm_unchecked(dev, a, a_op, b, b_op, c, (m, n, k), alpha, beta) }
}

/// [`gemm_bf16`] on buffers or views of buffers, without the checks.
///
/// # Safety
/// `a`, `b` and `c` hold at least `m*k`, `k*n` and `m*n` bf16 elements on `dev`'s context, and
/// `m`, `n`, `k` are non-zero and fit in an i32.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_unchecked(
    dev: &CudaDevice,
    a: &impl DevicePtr<bf16>,
    a_op: Op,
    b: &impl DevicePtr<bf16>,
    b_op: Op,
    c: &mut impl DevicePtrMut<bf16>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let blas = dev.blas()?;
    let (transa, lda) = match b_op {
        Op::N => (CUBLAS_OP_N, n),
        Op::T => (CUBLAS_OP_T, k),
    };
    let (transb, ldb) = match a_op {
        Op::N => (CUBLAS_OP_N, k),
        Op::T => (CUBLAS_OP_T, m),
    };
    let cfg = GemmConfig {
        transa,
        transb,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: bf16::from_f32(alpha),
        lda: lda as i32,
        ldb: ldb as i32,
        beta: bf16::from_f32(beta),
        ldc: n as i32,
    };
    // SAFETY: the caller guarantees the lengths and the device; the handle is bound to the
    // device's stream; the leading dimensions are the row lengths of the stored matrices as the
    // module docs derive, so cuBLAS reads and writes exactly a's m*k, b's k*n and c's m*n.
    Ok(unsafe { blas.gemm(cfg, b, a, c) }?)
}

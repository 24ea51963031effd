//! cuBLAS of the virtual device: handles, streams, modes, and the GEMMs cudarc's `Gemm` impls
//! call (`cublasGemmEx` and `cublasGemmStridedBatchedEx` for bf16 and f16, `cublasSgemm_v2` and
//! `cublasSgemmStridedBatched` for f32), plus `cublasGemmBatchedEx`, with the C signatures of
//! CUDA 13.0's `cublas_api.h`.
//!
//! Argument checks are cuBLAS': an invalid operation, `m`, `n` or `k` < 0, `lda` < max(1, rows of
//! the stored A), `ldb` likewise, `ldc` < max(1, m), a negative batch count: INVALID_VALUE; a type
//! combination cuBLAS does not offer: NOT_SUPPORTED. Then every operand is range-checked against
//! the allocation table: an operand that leaves its allocation (a leading dimension or stride too
//! large for the buffer) would read or write a neighbour's memory or fault on a GPU; here it is
//! reported on stderr and the call fails with EXECUTION_FAILED, leaving the context in the sticky
//! CUDA_ERROR_ILLEGAL_ADDRESS state a faulting kernel would. The work runs before the call returns
//! (`gemm.rs` has the arithmetic). alpha and beta are read from host memory, or from device
//! memory in CUBLAS_POINTER_MODE_DEVICE (cudarc uses the host mode).
#![allow(non_snake_case)]
// The contract of each function is the cuBLAS documentation of the same name.
#![allow(clippy::missing_safety_doc)]
#![allow(clippy::too_many_arguments)]

use std::ffi::{c_char, c_int, c_longlong, c_void};

use cudarc::cublas::sys::{cublasHandle_t, cublasStatus_t};

use crate::gemm::{Dt, Gemm, InputRounding};
use crate::memory;
use crate::state::{self, Blas, TAG_BLAS};
use crate::{CUresult, errors};

use cublasStatus_t::{
    CUBLAS_STATUS_EXECUTION_FAILED as EXEC_FAILED, CUBLAS_STATUS_INVALID_VALUE as INVALID,
    CUBLAS_STATUS_NOT_INITIALIZED as NOT_INIT, CUBLAS_STATUS_NOT_SUPPORTED as NOT_SUPPORTED,
    CUBLAS_STATUS_SUCCESS as SUCCESS,
};

type R = Result<(), cublasStatus_t>;

fn run(api: &str, f: impl FnOnce() -> R) -> cublasStatus_t {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => SUCCESS,
        Ok(Err(e)) => {
            if crate::trace() {
                eprintln!("qadapt-vgpu: {api} -> {e:?}");
            }
            e
        }
        Err(_) => {
            eprintln!("qadapt-vgpu: {api}: internal error (panic in the virtual cuBLAS)");
            cublasStatus_t::CUBLAS_STATUS_INTERNAL_ERROR
        }
    }
}

/// Writes an out-parameter, INVALID_VALUE for NULL.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
unsafe fn out<T>(p: *mut T, v: T) -> R {
    // SAFETY: forwarded.
    unsafe { crate::write(p, v) }.map_err(|_| INVALID)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut cublasHandle_t) -> cublasStatus_t {
    run("cublasCreate", || {
        let mut st = state::state();
        if !st.initialized {
            return Err(NOT_INIT);
        }
        let cur = state::current_raw();
        let ctx = if cur != 0 { cur } else { st.primary };
        if ctx == 0 {
            return Err(NOT_INIT);
        }
        let h = st.handle(TAG_BLAS);
        st.blas.insert(
            h,
            Blas {
                ctx,
                stream: 0,
                pointer_mode: 0,
                math_mode: 0,
                atomics_mode: 0,
            },
        );
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { out(handle, h as cublasHandle_t) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasDestroy_v2(handle: cublasHandle_t) -> cublasStatus_t {
    run("cublasDestroy", || {
        state::state()
            .blas
            .remove(&(handle as u64))
            .map(drop)
            .ok_or(NOT_INIT)
    })
}

/// Applies `f` to the handle's state.
fn with<T>(
    handle: cublasHandle_t,
    f: impl FnOnce(&mut Blas) -> Result<T, cublasStatus_t>,
) -> Result<T, cublasStatus_t> {
    let mut st = state::state();
    let b = st.blas.get_mut(&(handle as u64)).ok_or(NOT_INIT)?;
    f(b)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSetStream_v2(
    handle: cublasHandle_t,
    streamId: *mut c_void,
) -> cublasStatus_t {
    run("cublasSetStream", || {
        let s = streamId as u64;
        {
            let st = state::state();
            if !matches!(s, 0 | state::STREAM_LEGACY | state::STREAM_PER_THREAD)
                && !st.streams.contains_key(&s)
            {
                return Err(INVALID);
            }
        }
        with(handle, |b| {
            b.stream = s;
            Ok(())
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetStream_v2(
    handle: cublasHandle_t,
    streamId: *mut *mut c_void,
) -> cublasStatus_t {
    run("cublasGetStream", || {
        let s = with(handle, |b| Ok(b.stream))?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { out(streamId, s as *mut c_void) }
    })
}

/// A mode of a handle: `cublasSet<Mode>` (INVALID_VALUE for a value outside `$valid`) and
/// `cublasGet<Mode>` (the last value set, 0 at creation), over the handle's field `$field`.
macro_rules! handle_mode {
    ($set:ident, $get:ident, $field:ident, $valid:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $set(handle: cublasHandle_t, mode: c_int) -> cublasStatus_t {
            run(stringify!($set), || {
                if !$valid(mode) {
                    return Err(INVALID);
                }
                with(handle, |b| {
                    b.$field = mode;
                    Ok(())
                })
            })
        }

        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $get(handle: cublasHandle_t, mode: *mut c_int) -> cublasStatus_t {
            run(stringify!($get), || {
                let m = with(handle, |b| Ok(b.$field))?;
                // SAFETY: out-parameter of the caller (NULL refused).
                unsafe { out(mode, m) }
            })
        }
    };
}

// CUBLAS_POINTER_MODE_HOST (0) or _DEVICE (1).
handle_mode!(
    cublasSetPointerMode_v2,
    cublasGetPointerMode_v2,
    pointer_mode,
    |m: c_int| (0..=1).contains(&m)
);
// A math mode (0 to 4, or 8), optionally or-ed with
// CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION (16).
handle_mode!(
    cublasSetMathMode,
    cublasGetMathMode,
    math_mode,
    |m: c_int| matches!(m & !16, 0..=4 | 8)
);
// CUBLAS_ATOMICS_NOT_ALLOWED (0) or _ALLOWED (1).
handle_mode!(
    cublasSetAtomicsMode,
    cublasGetAtomicsMode,
    atomics_mode,
    |m: c_int| (0..=1).contains(&m)
);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSetWorkspace_v2(
    handle: cublasHandle_t,
    workspace: *mut c_void,
    workspaceSizeInBytes: usize,
) -> cublasStatus_t {
    run("cublasSetWorkspace", || {
        if workspaceSizeInBytes > 0 {
            memory::range(workspace as u64, workspaceSizeInBytes).map_err(|why| {
                eprintln!("qadapt-vgpu: cublasSetWorkspace: {why}");
                INVALID
            })?;
        }
        with(handle, |_| Ok(()))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetVersion_v2(
    handle: cublasHandle_t,
    version: *mut c_int,
) -> cublasStatus_t {
    run("cublasGetVersion", || {
        with(handle, |_| Ok(()))?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { out(version, 130_000) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGetProperty(kind: c_int, value: *mut c_int) -> cublasStatus_t {
    run("cublasGetProperty", || {
        let v = match kind {
            0 => 13,
            1 | 2 => 0,
            _ => return Err(INVALID),
        };
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { out(value, v) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cublasGetStatusName(status: c_int) -> *const c_char {
    errors::blas_lookup(status).0.as_ptr().cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn cublasGetStatusString(status: c_int) -> *const c_char {
    errors::blas_lookup(status).1.as_ptr().cast()
}

// ---- GEMM --------------------------------------------------------------------------------------

/// `(context, pointer mode, math mode)` of a handle, checked: the context of its stream must be
/// usable (after a sticky error, cuBLAS' kernels cannot launch: EXECUTION_FAILED).
fn handle_state(api: &str, handle: cublasHandle_t) -> Result<(u64, i32, i32), cublasStatus_t> {
    let st = state::state();
    let b = st.blas.get(&(handle as u64)).ok_or(NOT_INIT)?;
    let ctx = match st.streams.get(&b.stream) {
        Some(s) => s.ctx,
        None => b.ctx,
    };
    if let Err(e) = st.check_ctx(ctx) {
        eprintln!(
            "qadapt-vgpu: {api}: the handle's context is unusable ({}): CUBLAS_STATUS_EXECUTION_FAILED",
            errors::name(e as i32)
        );
        return Err(EXEC_FAILED);
    }
    Ok((ctx, b.pointer_mode, b.math_mode))
}

fn op(t: c_int) -> Result<bool, cublasStatus_t> {
    match t {
        0 => Ok(false),
        1 | 2 => Ok(true),
        _ => Err(INVALID),
    }
}

fn data_type(t: c_int) -> Option<Dt> {
    match t {
        0 => Some(Dt::F32),
        2 => Some(Dt::F16),
        14 => Some(Dt::Bf16),
        _ => None,
    }
}

/// The element types and input rounding of a `*Ex` GEMM, NOT_SUPPORTED for what cuBLAS (or this
/// emulation) does not offer.
fn ex_types(
    api: &str,
    at: c_int,
    bt: c_int,
    ct: c_int,
    compute: c_int,
) -> Result<(Dt, Dt, Dt, InputRounding), cublasStatus_t> {
    let (a, b, c) = match (data_type(at), data_type(bt), data_type(ct)) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => {
            eprintln!(
                "qadapt-vgpu: {api}: data types ({at}, {bt}, {ct}) are not emulated: CUBLAS_STATUS_NOT_SUPPORTED"
            );
            return Err(NOT_SUPPORTED);
        }
    };
    let rounding = match compute {
        68 | 69 => InputRounding::None,
        74 => InputRounding::F16,
        75 => InputRounding::Bf16,
        77 => InputRounding::Tf32,
        _ => {
            eprintln!(
                "qadapt-vgpu: {api}: compute type {compute} is not emulated (only CUBLAS_COMPUTE_32F \
                 and its _PEDANTIC / _FAST_16F / _FAST_16BF / _FAST_TF32 variants): \
                 CUBLAS_STATUS_NOT_SUPPORTED"
            );
            return Err(NOT_SUPPORTED);
        }
    };
    let ok = a == b
        && match rounding {
            InputRounding::None => matches!(
                (a, c),
                (Dt::Bf16, Dt::Bf16 | Dt::F32) | (Dt::F16, Dt::F16 | Dt::F32) | (Dt::F32, Dt::F32)
            ),
            _ => a == Dt::F32 && c == Dt::F32,
        };
    if !ok {
        eprintln!(
            "qadapt-vgpu: {api}: A {a:?}, B {b:?}, C {c:?} with compute type {compute} is not a \
             combination cuBLAS offers: CUBLAS_STATUS_NOT_SUPPORTED"
        );
        return Err(NOT_SUPPORTED);
    }
    Ok((a, b, c, rounding))
}

/// Reads alpha or beta (f32) from host or device memory.
///
/// # Safety
/// In host mode, `p` must point to an f32.
unsafe fn scalar(
    api: &str,
    what: &str,
    p: *const c_void,
    device_mode: bool,
) -> Result<f32, cublasStatus_t> {
    if p.is_null() {
        return Err(INVALID);
    }
    if device_mode {
        memory::range(p as u64, 4).map_err(|why| {
            eprintln!("qadapt-vgpu: {api}: {what} (device pointer mode): {why}");
            EXEC_FAILED
        })?;
    }
    // SAFETY: a host f32 by contract, or 4 bytes of a live allocation (checked above).
    Ok(unsafe { p.cast::<f32>().read_unaligned() })
}

/// The shape of one GEMM call, before its operands' addresses.
struct Shape {
    ta: bool,
    tb: bool,
    m: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
}

impl Shape {
    /// cuBLAS' argument checks.
    fn check(&self, api: &str) -> R {
        let rows_a = if self.ta { self.k } else { self.m };
        let rows_b = if self.tb { self.n } else { self.k };
        let bad = if self.m < 0 || self.n < 0 || self.k < 0 {
            Some(format!("m={}, n={}, k={}", self.m, self.n, self.k))
        } else if self.lda < rows_a.max(1) {
            Some(format!(
                "lda={} < max(1, {rows_a}), the rows of the stored A",
                self.lda
            ))
        } else if self.ldb < rows_b.max(1) {
            Some(format!(
                "ldb={} < max(1, {rows_b}), the rows of the stored B",
                self.ldb
            ))
        } else if self.ldc < self.m.max(1) {
            Some(format!("ldc={} < max(1, m={})", self.ldc, self.m))
        } else {
            None
        };
        match bad {
            Some(why) => {
                eprintln!("qadapt-vgpu: {api}: {why}: CUBLAS_STATUS_INVALID_VALUE");
                Err(INVALID)
            }
            None => Ok(()),
        }
    }

    /// Elements an operand spans: `(cols - 1) * ld + rows` (0 if empty).
    fn span(rows: i32, cols: i32, ld: i32) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (cols as usize - 1) * ld as usize + rows as usize
        }
    }

    fn spans(&self) -> (usize, usize, usize) {
        let (ra, ca) = if self.ta {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (rb, cb) = if self.tb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (
            Self::span(ra, ca, self.lda),
            Self::span(rb, cb, self.ldb),
            Self::span(self.m, self.n, self.ldc),
        )
    }

    fn describe(&self, which: char, t: Dt) -> String {
        let (tr, rows, cols, ld) = match which {
            'A' => (
                self.ta,
                if self.ta { self.k } else { self.m },
                if self.ta { self.m } else { self.k },
                self.lda,
            ),
            'B' => (
                self.tb,
                if self.tb { self.n } else { self.k },
                if self.tb { self.k } else { self.n },
                self.ldb,
            ),
            _ => (false, self.m, self.n, self.ldc),
        };
        format!(
            "operand {which} ({t:?}, stored {rows}x{cols}{}, ld{} = {ld})",
            if tr { " transposed" } else { "" },
            which.to_ascii_lowercase()
        )
    }
}

/// One batch entry's operands.
struct Operands {
    a: u64,
    b: u64,
    c: u64,
}

/// Range-checks, then runs, the GEMMs of a call (one per batch entry).
#[allow(clippy::too_many_arguments)]
fn gemm_batch(
    api: &str,
    handle: cublasHandle_t,
    shape: Shape,
    types: (Dt, Dt, Dt, InputRounding),
    alpha: *const c_void,
    beta: *const c_void,
    entries: &dyn Fn(usize) -> Result<Operands, cublasStatus_t>,
    batch: i32,
) -> R {
    let (ctx, pointer_mode, _) = handle_state(api, handle)?;
    shape.check(api)?;
    if batch < 0 {
        eprintln!("qadapt-vgpu: {api}: batchCount={batch}: CUBLAS_STATUS_INVALID_VALUE");
        return Err(INVALID);
    }
    if shape.m == 0 || shape.n == 0 || batch == 0 {
        return Ok(());
    }
    let device_mode = pointer_mode == 1;
    // SAFETY: cuBLAS' contract: alpha and beta point to the scale type (f32 for these calls).
    let alpha = unsafe { scalar(api, "alpha", alpha, device_mode) }.inspect_err(|_| poison(ctx))?;
    // SAFETY: as above.
    let beta = unsafe { scalar(api, "beta", beta, device_mode) }.inspect_err(|_| poison(ctx))?;
    if (alpha == 0.0 || shape.k == 0) && beta == 1.0 {
        return Ok(());
    }
    let (at, bt, ct, rounding) = types;
    let (sa, sb, sc) = shape.spans();
    let use_ab = alpha != 0.0 && shape.k > 0;
    let mut gemms = Vec::with_capacity(batch as usize);
    for i in 0..batch as usize {
        let ops = entries(i).inspect_err(|_| poison(ctx))?;
        let mut checks = vec![('C', ops.c, sc * ct.size(), ct)];
        if use_ab {
            checks.insert(0, ('B', ops.b, sb * bt.size(), bt));
            checks.insert(0, ('A', ops.a, sa * at.size(), at));
        }
        for (which, addr, bytes, t) in checks {
            if let Err(why) = memory::range(addr, bytes) {
                eprintln!(
                    "qadapt-vgpu: {api} (m={}, n={}, k={}{}): {} leaves its allocation: {why}. \
                     A GPU would read or write another buffer there, or fault: \
                     CUBLAS_STATUS_EXECUTION_FAILED, and the context keeps \
                     CUDA_ERROR_ILLEGAL_ADDRESS",
                    shape.m,
                    shape.n,
                    shape.k,
                    if batch > 1 {
                        format!(", batch entry {i}")
                    } else {
                        String::new()
                    },
                    shape.describe(which, t)
                );
                poison(ctx);
                return Err(EXEC_FAILED);
            }
        }
        gemms.push(Gemm {
            trans_a: shape.ta,
            trans_b: shape.tb,
            m: shape.m as usize,
            n: shape.n as usize,
            k: shape.k as usize,
            alpha,
            beta,
            a: ops.a as usize,
            a_type: at,
            lda: shape.lda as usize,
            b: ops.b as usize,
            b_type: bt,
            ldb: shape.ldb as usize,
            c: ops.c as usize,
            c_type: ct,
            ldc: shape.ldc as usize,
            rounding,
        });
    }
    for g in &gemms {
        // SAFETY: every operand's span is inside a live allocation (checked above); A and B are
        // only read when alpha != 0 and k > 0, C only read when beta != 0 (as in cuBLAS).
        unsafe { g.run() };
    }
    Ok(())
}

fn poison(ctx: u64) {
    state::state().poison(ctx, CUresult::CUDA_ERROR_ILLEGAL_ADDRESS);
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmEx(
    handle: cublasHandle_t,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    A: *const c_void,
    Atype: c_int,
    lda: c_int,
    B: *const c_void,
    Btype: c_int,
    ldb: c_int,
    beta: *const c_void,
    C: *mut c_void,
    Ctype: c_int,
    ldc: c_int,
    computeType: c_int,
    _algo: c_int,
) -> cublasStatus_t {
    const API: &str = "cublasGemmEx";
    run(API, || {
        let shape = Shape {
            ta: op(transa)?,
            tb: op(transb)?,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
        };
        let types = ex_types(API, Atype, Btype, Ctype, computeType)?;
        let ops = |_| {
            Ok(Operands {
                a: A as u64,
                b: B as u64,
                c: C as u64,
            })
        };
        gemm_batch(API, handle, shape, types, alpha, beta, &ops, 1)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    handle: cublasHandle_t,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    A: *const c_void,
    Atype: c_int,
    lda: c_int,
    strideA: c_longlong,
    B: *const c_void,
    Btype: c_int,
    ldb: c_int,
    strideB: c_longlong,
    beta: *const c_void,
    C: *mut c_void,
    Ctype: c_int,
    ldc: c_int,
    strideC: c_longlong,
    batchCount: c_int,
    computeType: c_int,
    _algo: c_int,
) -> cublasStatus_t {
    const API: &str = "cublasGemmStridedBatchedEx";
    run(API, || {
        let shape = Shape {
            ta: op(transa)?,
            tb: op(transb)?,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
        };
        let types = ex_types(API, Atype, Btype, Ctype, computeType)?;
        let (sa, sb, sc) = (
            types.0.size() as i64,
            types.1.size() as i64,
            types.2.size() as i64,
        );
        let ops = |i: usize| {
            let i = i as i64;
            Ok(Operands {
                a: (A as i64).wrapping_add(i * strideA * sa) as u64,
                b: (B as i64).wrapping_add(i * strideB * sb) as u64,
                c: (C as i64).wrapping_add(i * strideC * sc) as u64,
            })
        };
        gemm_batch(API, handle, shape, types, alpha, beta, &ops, batchCount)
    })
}

/// Reads entry `i` of a device array of device pointers.
fn pointer_entry(api: &str, what: &str, array: u64, i: usize) -> Result<u64, cublasStatus_t> {
    let at = array + 8 * i as u64;
    memory::range(at, 8).map_err(|why| {
        eprintln!(
            "qadapt-vgpu: {api}: the {what} pointer array: {why}: CUBLAS_STATUS_EXECUTION_FAILED"
        );
        EXEC_FAILED
    })?;
    // SAFETY: 8 bytes of a live allocation (checked above).
    Ok(unsafe { (at as *const u64).read_unaligned() })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasGemmBatchedEx(
    handle: cublasHandle_t,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    Aarray: *const *const c_void,
    Atype: c_int,
    lda: c_int,
    Barray: *const *const c_void,
    Btype: c_int,
    ldb: c_int,
    beta: *const c_void,
    Carray: *const *mut c_void,
    Ctype: c_int,
    ldc: c_int,
    batchCount: c_int,
    computeType: c_int,
    _algo: c_int,
) -> cublasStatus_t {
    const API: &str = "cublasGemmBatchedEx";
    run(API, || {
        let shape = Shape {
            ta: op(transa)?,
            tb: op(transb)?,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
        };
        let types = ex_types(API, Atype, Btype, Ctype, computeType)?;
        let ops = |i: usize| {
            Ok(Operands {
                a: pointer_entry(API, "A", Aarray as u64, i)?,
                b: pointer_entry(API, "B", Barray as u64, i)?,
                c: pointer_entry(API, "C", Carray as u64, i)?,
            })
        };
        gemm_batch(API, handle, shape, types, alpha, beta, &ops, batchCount)
    })
}

/// f32 GEMMs follow the handle's math mode: CUBLAS_TF32_TENSOR_OP_MATH rounds inputs to tf32.
fn sgemm_rounding(handle: cublasHandle_t) -> Result<InputRounding, cublasStatus_t> {
    let math = with(handle, |b| Ok(b.math_mode))?;
    Ok(if math & 0xf == 3 {
        InputRounding::Tf32
    } else {
        InputRounding::None
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSgemm_v2(
    handle: cublasHandle_t,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    A: *const f32,
    lda: c_int,
    B: *const f32,
    ldb: c_int,
    beta: *const f32,
    C: *mut f32,
    ldc: c_int,
) -> cublasStatus_t {
    const API: &str = "cublasSgemm";
    run(API, || {
        let shape = Shape {
            ta: op(transa)?,
            tb: op(transb)?,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
        };
        let types = (Dt::F32, Dt::F32, Dt::F32, sgemm_rounding(handle)?);
        let ops = |_| {
            Ok(Operands {
                a: A as u64,
                b: B as u64,
                c: C as u64,
            })
        };
        gemm_batch(
            API,
            handle,
            shape,
            types,
            alpha.cast(),
            beta.cast(),
            &ops,
            1,
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cublasSgemmStridedBatched(
    handle: cublasHandle_t,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    A: *const f32,
    lda: c_int,
    strideA: c_longlong,
    B: *const f32,
    ldb: c_int,
    strideB: c_longlong,
    beta: *const f32,
    C: *mut f32,
    ldc: c_int,
    strideC: c_longlong,
    batchCount: c_int,
) -> cublasStatus_t {
    const API: &str = "cublasSgemmStridedBatched";
    run(API, || {
        let shape = Shape {
            ta: op(transa)?,
            tb: op(transb)?,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
        };
        let types = (Dt::F32, Dt::F32, Dt::F32, sgemm_rounding(handle)?);
        let ops = |i: usize| {
            let i = i as i64;
            Ok(Operands {
                a: (A as i64).wrapping_add(i * strideA * 4) as u64,
                b: (B as i64).wrapping_add(i * strideB * 4) as u64,
                c: (C as i64).wrapping_add(i * strideC * 4) as u64,
            })
        };
        gemm_batch(
            API,
            handle,
            shape,
            types,
            alpha.cast(),
            beta.cast(),
            &ops,
            batchCount,
        )
    })
}

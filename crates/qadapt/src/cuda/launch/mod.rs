//! The one `unsafe` door of qadapt (this module and its children `nf4`, ...): every kernel launch and every raw driver call is here.
//!
//! Each launch function validates before it launches: lengths against the shape, block size, that
//! every buffer lives on this device, and 16-byte alignment where the kernel does 16-byte accesses.
//! Device addresses go into the bindgen-generated argument struct of `qadapt.h`, which the kernel
//! takes by value. The guards returned by `device_ptr` are held until the launch is queued, so
//! cudarc's stream-ordering events cover the raw addresses too.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use qadapt_kernels::{KernelName, ffi};

use super::CudaDevice;
use crate::error::{Result, invalid};
use crate::plan::LaunchPlan;

mod blas;
mod counters;
mod lora;
mod memory;
mod model;
mod nf4;
mod optim;
pub(crate) use blas::gemm_bf16;
pub use counters::{EmulatorCounters, EmulatorMemory, MemoryScope};
pub(crate) use counters::{
    emulator_counters, emulator_memory, reset_emulator_counters, reset_emulator_memory_peak,
};
pub(crate) use lora::{CudaLoraRef, CudaWeightRef, LoraScratch, lora_backward, lora_forward};
pub(crate) use memory::{pool_peak, reset_pool_peak};
pub use model::{AttentionKernels, FLASH_HEAD_DIMS};
pub(crate) use model::{
    SwigluOut, attention_backward, attention_cached, attention_forward, cross_entropy,
    embedding_backward, embedding_forward, kv_cache_write, lm_head_cross_entropy, mask_mix,
    rmsnorm_backward, rmsnorm_forward, rope, swiglu, targets_i32,
};
pub(crate) use nf4::{CudaScalesRef, nf4_dequantize, nf4_double_quant, nf4_quantize};
pub(crate) use optim::{Moments, adamw, alloc_managed_f32, sum_squares};

/// A kernel argument struct from `qadapt.h`, passed to the kernel by value.
///
/// # Safety
/// Implement only for bindgen-generated `#[repr(C)]` structs of plain integer and float fields
/// (bindgen's layout tests check their size and offsets against the C header).
pub(super) unsafe trait KernelArgs: Copy {}
// SAFETY: #[repr(C)] struct of u64/u32 fields generated from qadapt.h.
unsafe impl KernelArgs for ffi::QadaptNf4QuantizeArgs {}
// SAFETY: #[repr(C)] struct of u64 fields generated from qadapt.h.
unsafe impl KernelArgs for ffi::QadaptNf4DoubleQuantArgs {}
// SAFETY: #[repr(C)] struct of u64/u32/f32 fields generated from qadapt.h.
unsafe impl KernelArgs for ffi::QadaptNf4DequantizeArgs {}
// SAFETY: #[repr(C)] struct of u64 and f32 fields generated from qadapt.h.
unsafe impl KernelArgs for ffi::QadaptAdamwArgs {}
// SAFETY: #[repr(C)] struct of u64 fields generated from qadapt.h.
unsafe impl KernelArgs for ffi::QadaptSumSquaresArgs {}
// SAFETY: #[repr(C)] struct of u64/u32/f32 fields generated from qadapt.h (14 device addresses,
// then 10 four-byte fields, no padding); bindgen's layout test pins its 152-byte size.
unsafe impl KernelArgs for ffi::QadaptLoraFwdArgs {}
// SAFETY: #[repr(C)] struct of u64/u32/f32 fields generated from qadapt.h (16 device addresses,
// then 8 four-byte fields, no padding); bindgen's layout test pins its 160-byte size.
unsafe impl KernelArgs for ffi::QadaptLoraBwdArgs {}
// SAFETY: #[repr(C)] struct of 6 u64 then 10 u32 fields generated from qadapt.h (the last, unused,
// makes the size a multiple of 8), no padding; bindgen's layout test pins its 88-byte size.
unsafe impl KernelArgs for ffi::QadaptLoraRankArgs {}
// SAFETY: #[repr(C)] struct of 9 u64 then 6 four-byte (u32/f32) fields generated from qadapt.h,
// no padding; bindgen's layout test pins its 96-byte size.
unsafe impl KernelArgs for ffi::QadaptRmsNormArgs {}
// SAFETY: #[repr(C)] struct of 7 u64 then 2 u32 fields generated from qadapt.h, no padding
// (64 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptSwigluArgs {}
// SAFETY: #[repr(C)] struct of 6 u64 then 6 four-byte (f32/u32) fields generated from qadapt.h,
// no padding (72 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptMaskMixArgs {}
// SAFETY: #[repr(C)] struct of 4 u64 then 4 u32 fields generated from qadapt.h, no padding
// (48 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptRopeArgs {}
// SAFETY: #[repr(C)] struct of 9 u64 then 4 u32 fields generated from qadapt.h, no padding
// (88 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptEmbeddingArgs {}
// SAFETY: #[repr(C)] struct of 5 u64, 4 four-byte (u32/f32) fields and 1 u64 generated from
// qadapt.h, no padding (64 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptCrossEntropyArgs {}
// SAFETY: #[repr(C)] struct of 10 u64, 6 four-byte (u32/f32) fields and 1 u64 generated from
// qadapt.h, no padding (112 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptAttentionArgs {}
// SAFETY: #[repr(C)] struct of 9 u64 then 6 four-byte (u32/f32) fields generated from qadapt.h,
// no padding (96 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptKvCacheArgs {}

// SAFETY: #[repr(C, align(64))] struct of three 128-byte tensor maps (u64 arrays), the
// QadaptLoraFwdArgs above (152 bytes) and an explicit 104-byte tail, no implicit padding (640
// bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptLoraSm90Args {}
// SAFETY: #[repr(C, align(64))] struct of three 128-byte tensor maps, QadaptLoraBwdArgs (176
// bytes: 16 u64, 8 four-byte fields, a u64, 2 u32) and an explicit 16-byte tail, no implicit
// padding (576 bytes, pinned by bindgen's layout test).
unsafe impl KernelArgs for ffi::QadaptLoraBwdSm90Args {}

/// How a TMA box is laid out in shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Swizzle {
    /// Row after row, as in global memory.
    None,
    /// 64-byte rows whose 16-byte chunk j of row r sits at j ^ ((r / 2) % 4) (the sm_90a dx
    /// GEMM's codes, against bank conflicts).
    B64,
    /// 128-byte rows whose 16-byte chunk j of row r sits at j ^ (r % 8): what wgmma's
    /// 128-byte-swizzle descriptors read (`kernels/include/qadapt_sm90.cuh`).
    B128,
}

/// The TMA tensor map of a row-major `rows x cols` tensor of `elem_bytes`-byte elements
/// (`dtype`) at device address `base`, read in boxes of `box_rows x box_cols` elements; elements outside
/// the tensor read as zeros. The driver checks what TMA needs (16-byte aligned base and row
/// pitch, box sizes) and fails with CUDA_ERROR_INVALID_VALUE otherwise.
pub(super) fn tensor_map_2d(
    base: u64,
    dtype: cudarc::driver::sys::CUtensorMapDataType,
    elem_bytes: u64,
    (rows, cols): (u64, u64),
    (box_rows, box_cols): (u32, u32),
    swizzle: Swizzle,
) -> Result<ffi::QadaptTensorMap> {
    use cudarc::driver::sys;
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let dims: [u64; 2] = [cols, rows];
    let strides: [u64; 1] = [cols * elem_bytes];
    let boxes: [u32; 2] = [box_cols, box_rows];
    let element_strides: [u32; 2] = [1, 1];
    // SAFETY: cuTensorMapEncodeTiled writes only the 128-byte map it is given (a live local) and
    // reads rank-sized arrays (dims, boxes, element strides: 2 entries; strides: rank - 1 = 1),
    // all live locals of those lengths. It records `base` without touching device memory.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            2,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            match swizzle {
                Swizzle::None => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
                Swizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
                Swizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            },
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()?;
    Ok(ffi::QadaptTensorMap { opaque: map.opaque })
}

/// The by-value kernel parameter: the C struct's bytes, unchanged.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct ByValue<A: KernelArgs>(A);
// SAFETY: repr(transparent) over a KernelArgs struct, whose bytes are a valid parameter of the
// struct type the kernel declares.
unsafe impl<A: KernelArgs> DeviceRepr for ByValue<A> {}

/// Whether the CUDA driver library can be loaded (CudaContext::new panics without it).
pub(crate) fn driver_library_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the driver library by its known names and
    // drops the handle; it touches no global state of ours.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the cuBLAS library can be loaded (cudarc panics on first use without it).
pub(crate) fn cublas_library_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen libcublas by its known names and drops the
    // handle; it touches no global state of ours.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

pub(super) fn on_device<T>(
    op: &'static str,
    dev: &CudaDevice,
    what: &str,
    s: &CudaSlice<T>,
) -> Result<()> {
    if !Arc::ptr_eq(s.context(), &dev.inner.ctx) {
        return Err(invalid(op, format!("{what} lives on another CUDA context")));
    }
    Ok(())
}

pub(super) fn aligned16(op: &'static str, what: &str, addr: u64) -> Result<()> {
    if !addr.is_multiple_of(16) {
        return Err(invalid(op, format!("{what} is not 16-byte aligned")));
    }
    Ok(())
}

/// Queues `k` with `args` on the device's stream.
///
/// # Safety
/// `args` must be the argument struct `k` declares in `qadapt.h`, and every address in it must be
/// a live allocation of this device large enough for what `k` reads and writes given `plan`.
pub(super) unsafe fn launch<A: KernelArgs>(
    dev: &CudaDevice,
    k: KernelName,
    plan: LaunchPlan,
    args: &A,
) -> Result<()> {
    // Past the 48 KiB every kernel may use, dynamic shared memory needs the kernel's opt-in.
    let f = if plan.shared_bytes > 48 * 1024 {
        dev.function_with_smem(k, plan.shared_bytes)?
    } else {
        dev.function(k)?
    };
    let stream = dev.stream();
    let param = ByValue(*args);
    let mut b = stream.launch_builder(&f);
    b.arg(&param);
    // SAFETY: forwarded from this function's contract.
    unsafe { b.launch(plan.config()) }?;
    Ok(())
}

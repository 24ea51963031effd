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
pub(crate) use model::{
    FLASH_HEAD_DIMS, SwigluOut, attention_backward, attention_cached, attention_forward,
    cross_entropy, embedding_backward, embedding_forward, flash_attention_backward,
    flash_attention_forward, kv_cache_write, lm_head_cross_entropy, mask_mix, rmsnorm_backward,
    rmsnorm_forward, rope, swiglu, targets_i32,
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
// SAFETY: #[repr(C)] struct of u64/u32/f32 fields generated from qadapt.h (13 device addresses,
// then 8 four-byte fields, no padding); bindgen's layout test pins its 136-byte size.
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
    let f = dev.function(k)?;
    let stream = dev.stream();
    let param = ByValue(*args);
    let mut b = stream.launch_builder(&f);
    b.arg(&param);
    // SAFETY: forwarded from this function's contract.
    unsafe { b.launch(plan.config()) }?;
    Ok(())
}

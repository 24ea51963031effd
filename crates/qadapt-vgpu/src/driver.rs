//! The CUDA driver API of the virtual device: the functions cudarc 0.19 calls (with
//! `cuda-13000`: `cuMemAlloc_v2`, `cuEventElapsedTime_v2`, `cuMemPrefetchAsync_v2`, ...) and a few
//! neighbours, with the C signatures of CUDA 13.0's `cuda.h`. Enum parameters are taken as plain
//! integers so that a value outside the enum is an error code, not undefined behaviour.
//!
//! Every call does its work before returning: streams run in order at enqueue time, so the async
//! variants are the sync ones plus a stream check, and synchronization only reports errors.
//! Launches are in `launch.rs`.
#![allow(non_snake_case)]
// The contract of each function is the CUDA driver API documentation of the same name; the
// pointers it dereferences are its out-parameters and host buffers, checked for NULL.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::time::Instant;

use cudarc::driver::sys::{
    CUcontext, CUctxCreateParams, CUdevice, CUdeviceptr, CUevent, CUfunction, CUhostFn, CUmodule,
    CUoccupancyB2DSize, CUstream, CUuuid,
};

use crate::memory::{self, Kind};
use crate::state::{
    self, Context, Event, Function, Module, Stream, TAG_CTX, TAG_EVENT, TAG_STREAM,
};
use crate::{CUresult, device, entry, errors, image, write};

type R = Result<(), CUresult>;

const INVALID_VALUE: CUresult = CUresult::CUDA_ERROR_INVALID_VALUE;
const INVALID_HANDLE: CUresult = CUresult::CUDA_ERROR_INVALID_HANDLE;

/// `CUmemLocation` with its type as a plain integer (same layout: two 32-bit fields).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MemLocation {
    type_: c_int,
    id: c_int,
}

fn check_device(dev: CUdevice) -> R {
    if dev == 0 {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_INVALID_DEVICE)
    }
}

fn init_checked() -> R {
    state::state().check_init()
}

/// Copies a Rust string into a caller's `char[len]`, NUL-terminated and truncated to fit.
///
/// # Safety
/// `dst` must be NULL or valid for `len` bytes of writes.
unsafe fn write_str(dst: *mut c_char, len: c_int, s: &str) -> R {
    if dst.is_null() || len <= 0 {
        return Err(INVALID_VALUE);
    }
    let n = s.len().min(len as usize - 1);
    // SAFETY: n + 1 <= len bytes, which the caller made writable.
    let out = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), n + 1) };
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out[n] = 0;
    Ok(())
}

// ---- initialization, version, device ----------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(Flags: c_uint) -> CUresult {
    entry("cuInit", || {
        if Flags != 0 {
            return Err(INVALID_VALUE);
        }
        let mut st = state::state();
        if !st.initialized {
            st.initialized = true;
            if let Some(n) = std::env::var("QADAPT_VGPU_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                crate::abi::set_workers(n);
            }
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(driverVersion: *mut c_int) -> CUresult {
    // SAFETY: out-parameter of the caller (NULL refused).
    entry("cuDriverGetVersion", || unsafe {
        write(driverVersion, device::DRIVER_VERSION)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    entry("cuDeviceGetCount", || {
        init_checked()?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(count, 1) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    entry("cuDeviceGet", || {
        init_checked()?;
        check_device(ordinal)?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(device, 0) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetName", || {
        init_checked()?;
        check_device(dev)?;
        // SAFETY: the caller's buffer of len bytes.
        unsafe { write_str(name, len, device::NAME) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetPCIBusId(
    pciBusId: *mut c_char,
    len: c_int,
    dev: CUdevice,
) -> CUresult {
    entry("cuDeviceGetPCIBusId", || {
        init_checked()?;
        check_device(dev)?;
        // SAFETY: the caller's buffer of len bytes.
        unsafe { write_str(pciBusId, len, "0000:18:00.0") }
    })
}

fn uuid() -> CUuuid {
    let mut bytes = [0 as c_char; 16];
    for (b, c) in bytes.iter_mut().zip(b"qadapt-vgpu-h200") {
        *b = *c as c_char;
    }
    CUuuid { bytes }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid_out: *mut CUuuid, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetUuid", || {
        init_checked()?;
        check_device(dev)?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(uuid_out, uuid()) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid_out: *mut CUuuid, dev: CUdevice) -> CUresult {
    // SAFETY: same contract as cuDeviceGetUuid.
    unsafe { cuDeviceGetUuid(uuid_out, dev) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    entry("cuDeviceTotalMem", || {
        init_checked()?;
        check_device(dev)?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(bytes, device::TOTAL_MEM) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    entry("cuDeviceGetAttribute", || {
        init_checked()?;
        check_device(dev)?;
        let v = device::attribute(attrib).ok_or(INVALID_VALUE)?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(pi, v) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    dev: CUdevice,
) -> CUresult {
    entry("cuDeviceComputeCapability", || {
        init_checked()?;
        check_device(dev)?;
        // SAFETY: out-parameters of the caller (NULL refused).
        unsafe { write(major, 9) }?;
        // SAFETY: as above.
        unsafe { write(minor, 0) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceCanAccessPeer(
    canAccessPeer: *mut c_int,
    dev: CUdevice,
    peerDev: CUdevice,
) -> CUresult {
    entry("cuDeviceCanAccessPeer", || {
        init_checked()?;
        check_device(dev)?;
        check_device(peerDev)?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(canAccessPeer, 0) }
    })
}

// ---- contexts ----------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRetain", || {
        let mut st = state::state();
        st.check_init()?;
        check_device(dev)?;
        if pctx.is_null() {
            return Err(INVALID_VALUE);
        }
        if st.primary == 0 {
            let h = st.handle(TAG_CTX);
            st.contexts.insert(h, Context::new(true, 0));
            st.primary = h;
        }
        let h = st.primary;
        let c = st.contexts.get_mut(&h).expect("primary context");
        if c.refcount == 0 {
            // A fresh activation: the previous one's sticky error does not carry over.
            c.sticky = None;
        }
        c.refcount += 1;
        // SAFETY: out-parameter of the caller (checked non-NULL above).
        unsafe { write(pctx, h as CUcontext) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRelease", || {
        let mut st = state::state();
        st.check_init()?;
        check_device(dev)?;
        let h = st.primary;
        let c = st
            .contexts
            .get_mut(&h)
            .filter(|c| c.refcount > 0)
            .ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)?;
        c.refcount -= 1;
        if c.refcount == 0 {
            c.sticky = None;
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxReset", || {
        let mut st = state::state();
        st.check_init()?;
        check_device(dev)?;
        let h = st.primary;
        if let Some(c) = st.contexts.get_mut(&h) {
            c.sticky = None;
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    entry("cuDevicePrimaryCtxGetState", || {
        let st = state::state();
        st.check_init()?;
        check_device(dev)?;
        let (f, a) = st
            .contexts
            .get(&st.primary)
            .map_or((0, 0), |c| (c.flags, i32::from(c.refcount > 0)));
        // SAFETY: out-parameters of the caller (NULL refused).
        unsafe { write(flags, f) }?;
        // SAFETY: as above.
        unsafe { write(active, a) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    entry("cuDevicePrimaryCtxSetFlags", || {
        let mut st = state::state();
        st.check_init()?;
        check_device(dev)?;
        if st.primary == 0 {
            let h = st.handle(TAG_CTX);
            st.contexts.insert(h, Context::new(true, flags));
            st.primary = h;
        }
        let h = st.primary;
        st.contexts.get_mut(&h).expect("primary").flags = flags;
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut CUcontext,
    _ctxCreateParams: *mut CUctxCreateParams,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    entry("cuCtxCreate", || {
        let mut st = state::state();
        st.check_init()?;
        check_device(dev)?;
        if pctx.is_null() {
            return Err(INVALID_VALUE);
        }
        let h = st.handle(TAG_CTX);
        let mut c = Context::new(false, flags);
        c.refcount = 1;
        st.contexts.insert(h, c);
        state::push_current(h);
        // SAFETY: out-parameter of the caller (checked non-NULL above).
        unsafe { write(pctx, h as CUcontext) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxDestroy", || {
        let mut st = state::state();
        st.check_init()?;
        let h = ctx as u64;
        match st.contexts.get(&h) {
            Some(c) if !c.primary => {}
            _ => return Err(INVALID_VALUE),
        }
        st.contexts.remove(&h);
        if state::current_raw() == h {
            state::pop_current();
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxGetCurrent", || {
        init_checked()?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(pctx, state::current_raw() as CUcontext) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    entry("cuCtxSetCurrent", || {
        let st = state::state();
        st.check_init()?;
        let h = ctx as u64;
        if h != 0 && !st.contexts.contains_key(&h) {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        state::set_current(h);
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxPushCurrent", || {
        let st = state::state();
        st.check_init()?;
        let h = ctx as u64;
        if !st.contexts.contains_key(&h) {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        state::push_current(h);
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxPopCurrent", || {
        init_checked()?;
        if state::current_raw() == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        let h = state::pop_current();
        if !pctx.is_null() {
            // SAFETY: out-parameter of the caller, non-NULL.
            unsafe { write(pctx, h as CUcontext) }?;
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    entry("cuCtxGetDevice", || {
        init_checked()?;
        if state::current_raw() == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(device, 0) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetApiVersion(ctx: CUcontext, version: *mut c_uint) -> CUresult {
    entry("cuCtxGetApiVersion", || {
        let st = state::state();
        st.check_init()?;
        let h = if ctx.is_null() {
            state::current_raw()
        } else {
            ctx as u64
        };
        if !st.contexts.contains_key(&h) {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(version, 13000) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    entry("cuCtxSynchronize", || state::state().current().map(drop))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetFlags(flags: c_uint) -> CUresult {
    entry("cuCtxSetFlags", || {
        let mut st = state::state();
        let h = st.current()?;
        st.contexts.get_mut(&h).expect("current").flags = flags;
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetFlags(flags: *mut c_uint) -> CUresult {
    entry("cuCtxGetFlags", || {
        let st = state::state();
        let h = st.current()?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(flags, st.contexts[&h].flags) }
    })
}

/// Defaults of `cuCtxGetLimit` (stack size, printf FIFO, malloc heap, ...).
fn default_limit(limit: c_int) -> Option<usize> {
    Some(match limit {
        0 => 1024,    // CU_LIMIT_STACK_SIZE
        1 => 1 << 20, // CU_LIMIT_PRINTF_FIFO_SIZE
        2 => 8 << 20, // CU_LIMIT_MALLOC_HEAP_SIZE
        3 => 2,       // CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH
        4 => 2048,    // CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT
        5 => 32,      // CU_LIMIT_MAX_L2_FETCH_GRANULARITY
        6 => 0,       // CU_LIMIT_PERSISTING_L2_CACHE_SIZE
        _ => return None,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetLimit(pvalue: *mut usize, limit: c_int) -> CUresult {
    entry("cuCtxGetLimit", || {
        let st = state::state();
        let h = st.current()?;
        let v = st.contexts[&h]
            .limits
            .get(&limit)
            .copied()
            .or_else(|| default_limit(limit))
            .ok_or(CUresult::CUDA_ERROR_UNSUPPORTED_LIMIT)?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(pvalue, v) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetLimit(limit: c_int, value: usize) -> CUresult {
    entry("cuCtxSetLimit", || {
        let mut st = state::state();
        let h = st.current()?;
        default_limit(limit).ok_or(CUresult::CUDA_ERROR_UNSUPPORTED_LIMIT)?;
        st.contexts
            .get_mut(&h)
            .expect("current")
            .limits
            .insert(limit, value);
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCacheConfig(pconfig: *mut c_int) -> CUresult {
    entry("cuCtxGetCacheConfig", || {
        let st = state::state();
        let h = st.current()?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(pconfig, st.contexts[&h].cache_config) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCacheConfig(config: c_int) -> CUresult {
    entry("cuCtxSetCacheConfig", || {
        let mut st = state::state();
        let h = st.current()?;
        if !(0..=3).contains(&config) {
            return Err(INVALID_VALUE);
        }
        st.contexts.get_mut(&h).expect("current").cache_config = config;
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    leastPriority: *mut c_int,
    greatestPriority: *mut c_int,
) -> CUresult {
    entry("cuCtxGetStreamPriorityRange", || {
        state::state().current()?;
        if !leastPriority.is_null() {
            // SAFETY: out-parameter of the caller, non-NULL.
            unsafe { write(leastPriority, 0) }?;
        }
        if !greatestPriority.is_null() {
            // SAFETY: out-parameter of the caller, non-NULL.
            unsafe { write(greatestPriority, -5) }?;
        }
        Ok(())
    })
}

// ---- errors ------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: c_int, pStr: *mut *const c_char) -> CUresult {
    entry("cuGetErrorName", || match errors::lookup(error) {
        // SAFETY: out-parameter of the caller (NULL refused); the string is static.
        Some((name, _)) => unsafe { write(pStr, name.as_ptr().cast()) },
        None => {
            if !pStr.is_null() {
                // SAFETY: out-parameter of the caller, non-NULL.
                unsafe { write(pStr, std::ptr::null()) }?;
            }
            Err(INVALID_VALUE)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: c_int, pStr: *mut *const c_char) -> CUresult {
    entry("cuGetErrorString", || match errors::lookup(error) {
        // SAFETY: out-parameter of the caller (NULL refused); the string is static.
        Some((_, desc)) => unsafe { write(pStr, desc.as_ptr().cast()) },
        None => {
            if !pStr.is_null() {
                // SAFETY: out-parameter of the caller, non-NULL.
                unsafe { write(pStr, std::ptr::null()) }?;
            }
            Err(INVALID_VALUE)
        }
    })
}

// ---- memory ------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    entry("cuMemAlloc", || {
        state::state().current()?;
        if dptr.is_null() || bytesize == 0 {
            return Err(INVALID_VALUE);
        }
        let p = memory::allocate(bytesize, Kind::Device)?;
        // SAFETY: out-parameter of the caller, non-NULL.
        unsafe { write(dptr, p) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemAllocAsync", || {
        state::state().stream_ctx(hStream as u64)?;
        if dptr.is_null() {
            return Err(INVALID_VALUE);
        }
        // A zero-byte request gives the NULL pointer (as the stream-ordered allocator does).
        let p = if bytesize == 0 {
            0
        } else {
            memory::allocate(bytesize, Kind::DeviceAsync)?
        };
        // SAFETY: out-parameter of the caller, non-NULL.
        unsafe { write(dptr, p) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    entry("cuMemAllocManaged", || {
        state::state().current()?;
        // CU_MEM_ATTACH_GLOBAL (1) or CU_MEM_ATTACH_HOST (2).
        if dptr.is_null() || bytesize == 0 || !(flags == 1 || flags == 2) {
            return Err(INVALID_VALUE);
        }
        let p = memory::allocate(bytesize, Kind::Managed)?;
        // SAFETY: out-parameter of the caller, non-NULL.
        unsafe { write(dptr, p) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytesize: usize,
    _Flags: c_uint,
) -> CUresult {
    entry("cuMemHostAlloc", || {
        state::state().current()?;
        if pp.is_null() || bytesize == 0 {
            return Err(INVALID_VALUE);
        }
        let p = memory::allocate(bytesize, Kind::Host)?;
        // SAFETY: out-parameter of the caller, non-NULL.
        unsafe { write(pp, p as *mut c_void) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    // SAFETY: same contract as cuMemHostAlloc.
    unsafe { cuMemHostAlloc(pp, bytesize, 0) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    entry("cuMemFreeHost", || {
        let sticky = state::state().current().err();
        memory::free(p as u64, &[Kind::Host], "cuMemFreeHost")?;
        sticky.map_or(Ok(()), Err)
    })
}

/// Frees a device allocation, then reports a sticky error if the context has one (the memory
/// is released either way).
fn free_device(dptr: CUdeviceptr, ctx: Result<u64, CUresult>, api: &str) -> R {
    if let Err(e @ (CUresult::CUDA_ERROR_NOT_INITIALIZED | CUresult::CUDA_ERROR_INVALID_CONTEXT)) =
        ctx
    {
        return Err(e);
    }
    if dptr != 0 {
        memory::free(dptr, &[Kind::Device, Kind::DeviceAsync, Kind::Managed], api)?;
    }
    ctx.map(drop)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    entry("cuMemFree", || {
        let ctx = state::state().current();
        free_device(dptr, ctx, "cuMemFree")
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, hStream: CUstream) -> CUresult {
    entry("cuMemFreeAsync", || {
        let ctx = state::state().stream_ctx(hStream as u64);
        free_device(dptr, ctx, "cuMemFreeAsync")
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    entry("cuMemGetInfo", || {
        state::state().current()?;
        let (used, limit) = memory::usage();
        let avail = limit.min(device::TOTAL_MEM).saturating_sub(used);
        // SAFETY: out-parameters of the caller (NULL refused).
        unsafe { write(free, avail) }?;
        // SAFETY: as above.
        unsafe { write(total, device::TOTAL_MEM) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    pbase: *mut CUdeviceptr,
    psize: *mut usize,
    dptr: CUdeviceptr,
) -> CUresult {
    entry("cuMemGetAddressRange", || {
        state::state().current()?;
        let a = memory::find(dptr).ok_or(CUresult::CUDA_ERROR_NOT_FOUND)?;
        if !pbase.is_null() {
            // SAFETY: out-parameter of the caller, non-NULL.
            unsafe { write(pbase, a.base) }?;
        }
        if !psize.is_null() {
            // SAFETY: out-parameter of the caller, non-NULL.
            unsafe { write(psize, a.size) }?;
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: c_int,
    ptr: CUdeviceptr,
) -> CUresult {
    entry("cuPointerGetAttribute", || {
        let st = state::state();
        let ctx = st.current()?;
        drop(st);
        let a = memory::find(ptr).ok_or(INVALID_VALUE)?;
        let managed = a.kind == Kind::Managed;
        let host_visible = a.kind == Kind::Host || managed;
        // Each arm writes the attribute's documented type through the caller's out-parameter
        // (NULL refused by `write`).
        match attribute {
            // SAFETY: CU_POINTER_ATTRIBUTE_CONTEXT: a CUcontext.
            1 => unsafe { write(data.cast::<CUcontext>(), ctx as CUcontext) },
            // SAFETY: MEMORY_TYPE: a CUmemorytype (HOST 1, DEVICE 2; managed memory reports
            // DEVICE, as the driver does).
            2 => unsafe {
                write(
                    data.cast::<c_uint>(),
                    if a.kind == Kind::Host { 1 } else { 2 },
                )
            },
            // SAFETY: DEVICE_POINTER: a CUdeviceptr.
            3 => unsafe { write(data.cast::<CUdeviceptr>(), ptr) },
            // SAFETY: HOST_POINTER: a void*.
            4 if host_visible => unsafe { write(data.cast::<*mut c_void>(), ptr as *mut c_void) },
            // SAFETY: SYNC_MEMOPS (6), IS_MANAGED (8), MAPPED (13): unsigned ints.
            6 | 13 => unsafe { write(data.cast::<c_uint>(), 1) },
            // SAFETY: as above.
            8 => unsafe { write(data.cast::<c_uint>(), c_uint::from(managed)) },
            // SAFETY: BUFFER_ID: an unsigned long long.
            7 => unsafe { write(data.cast::<u64>(), a.id) },
            // SAFETY: DEVICE_ORDINAL: an int.
            9 => unsafe { write(data.cast::<c_int>(), 0) },
            // SAFETY: RANGE_START_ADDR: a CUdeviceptr.
            11 => unsafe { write(data.cast::<CUdeviceptr>(), a.base) },
            // SAFETY: RANGE_SIZE: a size_t.
            12 => unsafe { write(data.cast::<usize>(), a.size) },
            _ => Err(INVALID_VALUE),
        }
    })
}

/// Checks the stream (or the current context when `stream` is None) of a copy or memset.
fn check_queue(stream: Option<CUstream>) -> Result<u64, CUresult> {
    let st = state::state();
    match stream {
        Some(s) => st.stream_ctx(s as u64),
        None => st.current(),
    }
}

fn htod(api: &str, stream: Option<CUstream>, dst: CUdeviceptr, src: *const c_void, n: usize) -> R {
    check_queue(stream)?;
    if n == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(INVALID_VALUE);
    }
    memory::check_range(dst, n, &format!("{api} destination"))?;
    // SAFETY: [dst, dst + n) is inside a live allocation (checked above); src is the caller's
    // host buffer of n bytes (cuMemcpyHtoD's contract). ptr::copy allows overlap.
    unsafe { std::ptr::copy(src.cast::<u8>(), dst as *mut u8, n) };
    Ok(())
}

fn dtoh(api: &str, stream: Option<CUstream>, dst: *mut c_void, src: CUdeviceptr, n: usize) -> R {
    check_queue(stream)?;
    if n == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(INVALID_VALUE);
    }
    memory::check_range(src, n, &format!("{api} source"))?;
    // SAFETY: [src, src + n) is inside a live allocation (checked above); dst is the caller's
    // host buffer of n bytes.
    unsafe { std::ptr::copy(src as *const u8, dst.cast::<u8>(), n) };
    Ok(())
}

fn dtod(api: &str, stream: Option<CUstream>, dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> R {
    check_queue(stream)?;
    if n == 0 {
        return Ok(());
    }
    memory::check_range(src, n, &format!("{api} source"))?;
    memory::check_range(dst, n, &format!("{api} destination"))?;
    // SAFETY: both ranges are inside live allocations (checked above).
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, n) };
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
) -> CUresult {
    entry("cuMemcpyHtoD", || {
        htod("cuMemcpyHtoD", None, dstDevice, srcHost, ByteCount)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemcpyHtoDAsync", || {
        htod(
            "cuMemcpyHtoDAsync",
            Some(hStream),
            dstDevice,
            srcHost,
            ByteCount,
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    entry("cuMemcpyDtoH", || {
        dtoh("cuMemcpyDtoH", None, dstHost, srcDevice, ByteCount)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemcpyDtoHAsync", || {
        dtoh(
            "cuMemcpyDtoHAsync",
            Some(hStream),
            dstHost,
            srcDevice,
            ByteCount,
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    entry("cuMemcpyDtoD", || {
        dtod("cuMemcpyDtoD", None, dstDevice, srcDevice, ByteCount)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemcpyDtoDAsync", || {
        dtod(
            "cuMemcpyDtoDAsync",
            Some(hStream),
            dstDevice,
            srcDevice,
            ByteCount,
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyPeer(
    dstDevice: CUdeviceptr,
    _dstContext: CUcontext,
    srcDevice: CUdeviceptr,
    _srcContext: CUcontext,
    ByteCount: usize,
) -> CUresult {
    entry("cuMemcpyPeer", || {
        dtod("cuMemcpyPeer", None, dstDevice, srcDevice, ByteCount)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyPeerAsync(
    dstDevice: CUdeviceptr,
    _dstContext: CUcontext,
    srcDevice: CUdeviceptr,
    _srcContext: CUcontext,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemcpyPeerAsync", || {
        dtod(
            "cuMemcpyPeerAsync",
            Some(hStream),
            dstDevice,
            srcDevice,
            ByteCount,
        )
    })
}

/// `cuMemcpy` with unified addressing: an address inside a device allocation is checked against
/// it, any other is taken for host memory.
fn unified(api: &str, stream: Option<CUstream>, dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> R {
    check_queue(stream)?;
    if n == 0 {
        return Ok(());
    }
    if dst == 0 || src == 0 {
        return Err(INVALID_VALUE);
    }
    for (p, what) in [(src, "source"), (dst, "destination")] {
        if memory::near_allocation(p) {
            memory::check_range(p, n, &format!("{api} {what}"))?;
        }
    }
    // SAFETY: device operands are inside live allocations (checked above); host operands are
    // the caller's buffers of n bytes (cuMemcpy's contract).
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, n) };
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpy(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    entry("cuMemcpy", || {
        unified("cuMemcpy", None, dst, src, ByteCount)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyAsync(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemcpyAsync", || {
        unified("cuMemcpyAsync", Some(hStream), dst, src, ByteCount)
    })
}

/// `cuMemsetD{8,16,32}`: `n` elements of `width` bytes, each `value`.
fn memset(
    api: &str,
    stream: Option<CUstream>,
    dst: CUdeviceptr,
    value: u32,
    width: usize,
    n: usize,
) -> R {
    check_queue(stream)?;
    if n == 0 {
        return Ok(());
    }
    if !dst.is_multiple_of(width as u64) {
        eprintln!(
            "qadapt-vgpu: {api}: destination {dst:#x} is not {width}-byte aligned: CUDA_ERROR_INVALID_VALUE"
        );
        return Err(INVALID_VALUE);
    }
    let bytes = n.checked_mul(width).ok_or(INVALID_VALUE)?;
    memory::check_range(dst, bytes, &format!("{api} destination"))?;
    // SAFETY: [dst, dst + bytes) is inside a live allocation (checked above), aligned to width.
    let out = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, bytes) };
    let pattern = value.to_le_bytes();
    for chunk in out.chunks_exact_mut(width) {
        chunk.copy_from_slice(&pattern[..width]);
    }
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8_v2(dstDevice: CUdeviceptr, uc: u8, N: usize) -> CUresult {
    entry("cuMemsetD8", || {
        memset("cuMemsetD8", None, dstDevice, u32::from(uc), 1, N)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8Async(
    dstDevice: CUdeviceptr,
    uc: u8,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemsetD8Async", || {
        memset(
            "cuMemsetD8Async",
            Some(hStream),
            dstDevice,
            u32::from(uc),
            1,
            N,
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD16_v2(dstDevice: CUdeviceptr, us: u16, N: usize) -> CUresult {
    entry("cuMemsetD16", || {
        memset("cuMemsetD16", None, dstDevice, u32::from(us), 2, N)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD16Async(
    dstDevice: CUdeviceptr,
    us: u16,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemsetD16Async", || {
        memset(
            "cuMemsetD16Async",
            Some(hStream),
            dstDevice,
            u32::from(us),
            2,
            N,
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD32_v2(dstDevice: CUdeviceptr, ui: u32, N: usize) -> CUresult {
    entry("cuMemsetD32", || {
        memset("cuMemsetD32", None, dstDevice, ui, 4, N)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD32Async(
    dstDevice: CUdeviceptr,
    ui: u32,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemsetD32Async", || {
        memset("cuMemsetD32Async", Some(hStream), dstDevice, ui, 4, N)
    })
}

/// A managed range for prefetch/advise/attach: inside one cuMemAllocManaged allocation.
fn managed_range(api: &str, p: CUdeviceptr, n: usize) -> Result<memory::Alloc, CUresult> {
    let a = memory::check_range(p, n.max(1), api)?;
    if a.kind != Kind::Managed {
        eprintln!(
            "qadapt-vgpu: {api}: {p:#x} is in {a}, not managed memory: CUDA_ERROR_INVALID_VALUE"
        );
        return Err(INVALID_VALUE);
    }
    Ok(a)
}

fn check_location(loc: MemLocation) -> R {
    match loc.type_ {
        1 => check_device(loc.id),
        2..=4 => Ok(()),
        _ => Err(INVALID_VALUE),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync_v2(
    devPtr: CUdeviceptr,
    count: usize,
    location: MemLocation,
    flags: c_uint,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemPrefetchAsync", || {
        state::state().stream_ctx(hStream as u64)?;
        if flags != 0 || count == 0 {
            return Err(INVALID_VALUE);
        }
        check_location(location)?;
        managed_range("cuMemPrefetchAsync", devPtr, count).map(drop)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAdvise_v2(
    devPtr: CUdeviceptr,
    count: usize,
    advice: c_int,
    location: MemLocation,
) -> CUresult {
    entry("cuMemAdvise", || {
        state::state().current()?;
        if !(1..=6).contains(&advice) || count == 0 {
            return Err(INVALID_VALUE);
        }
        if matches!(advice, 3 | 5) {
            check_location(location)?;
        }
        managed_range("cuMemAdvise", devPtr, count).map(drop)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamAttachMemAsync(
    hStream: CUstream,
    dptr: CUdeviceptr,
    length: usize,
    flags: c_uint,
) -> CUresult {
    entry("cuStreamAttachMemAsync", || {
        state::state().stream_ctx(hStream as u64)?;
        // CU_MEM_ATTACH_GLOBAL 1, HOST 2, SINGLE 4 (which needs a real stream).
        if !matches!(flags, 1 | 2 | 4) || (flags == 4 && hStream.is_null()) {
            return Err(INVALID_VALUE);
        }
        let a = managed_range("cuStreamAttachMemAsync", dptr, length)?;
        if dptr != a.base || !(length == 0 || length == a.size) {
            eprintln!(
                "qadapt-vgpu: cuStreamAttachMemAsync: only a whole managed allocation can be \
                 attached ({length} bytes at {dptr:#x} of {a}): CUDA_ERROR_INVALID_VALUE"
            );
            return Err(INVALID_VALUE);
        }
        Ok(())
    })
}

// ---- streams and events ------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(phStream: *mut CUstream, Flags: c_uint) -> CUresult {
    // SAFETY: same contract as cuStreamCreateWithPriority.
    unsafe { cuStreamCreateWithPriority(phStream, Flags, 0) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    phStream: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    entry("cuStreamCreate", || {
        let mut st = state::state();
        let ctx = st.current()?;
        if phStream.is_null() || flags > 1 {
            return Err(INVALID_VALUE);
        }
        let h = st.handle(TAG_STREAM);
        st.streams.insert(
            h,
            Stream {
                ctx,
                flags,
                priority: priority.clamp(-5, 0),
            },
        );
        // SAFETY: out-parameter of the caller, non-NULL.
        unsafe { write(phStream, h as CUstream) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(hStream: CUstream) -> CUresult {
    entry("cuStreamDestroy", || {
        let mut st = state::state();
        st.check_init()?;
        let s = st.streams.remove(&(hStream as u64)).ok_or(INVALID_HANDLE)?;
        st.check_ctx(s.ctx)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(hStream: CUstream) -> CUresult {
    entry("cuStreamSynchronize", || {
        state::state().stream_ctx(hStream as u64).map(drop)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(hStream: CUstream) -> CUresult {
    entry("cuStreamQuery", || {
        state::state().stream_ctx(hStream as u64).map(drop)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamWaitEvent(
    hStream: CUstream,
    hEvent: CUevent,
    Flags: c_uint,
) -> CUresult {
    entry("cuStreamWaitEvent", || {
        let st = state::state();
        st.stream_ctx(hStream as u64)?;
        if Flags > 1 {
            return Err(INVALID_VALUE);
        }
        st.events.get(&(hEvent as u64)).ok_or(INVALID_HANDLE)?;
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetPriority(hStream: CUstream, priority: *mut c_int) -> CUresult {
    entry("cuStreamGetPriority", || {
        let st = state::state();
        st.stream_ctx(hStream as u64)?;
        let p = st.streams.get(&(hStream as u64)).map_or(0, |s| s.priority);
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(priority, p) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetFlags(hStream: CUstream, flags: *mut c_uint) -> CUresult {
    entry("cuStreamGetFlags", || {
        let st = state::state();
        st.stream_ctx(hStream as u64)?;
        let f = st.streams.get(&(hStream as u64)).map_or(0, |s| s.flags);
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(flags, f) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetCtx(hStream: CUstream, pctx: *mut CUcontext) -> CUresult {
    entry("cuStreamGetCtx", || {
        let ctx = state::state().stream_ctx(hStream as u64)?;
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(pctx, ctx as CUcontext) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchHostFunc(
    hStream: CUstream,
    func: CUhostFn,
    userData: *mut c_void,
) -> CUresult {
    entry("cuLaunchHostFunc", || {
        state::state().stream_ctx(hStream as u64)?;
        let f = func.ok_or(INVALID_VALUE)?;
        // SAFETY: the caller's host function with its own argument, run in stream order (which
        // is now: all earlier work on the stream is done).
        unsafe { f(userData) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(phEvent: *mut CUevent, Flags: c_uint) -> CUresult {
    entry("cuEventCreate", || {
        let mut st = state::state();
        let ctx = st.current()?;
        // CU_EVENT_BLOCKING_SYNC 1 | DISABLE_TIMING 2 | INTERPROCESS 4 (needs DISABLE_TIMING).
        if phEvent.is_null() || Flags > 7 || (Flags & 4 != 0 && Flags & 2 == 0) {
            return Err(INVALID_VALUE);
        }
        let h = st.handle(TAG_EVENT);
        st.events.insert(
            h,
            Event {
                ctx,
                flags: Flags,
                recorded: None,
            },
        );
        // SAFETY: out-parameter of the caller, non-NULL.
        unsafe { write(phEvent, h as CUevent) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(hEvent: CUevent, hStream: CUstream) -> CUresult {
    entry("cuEventRecord", || {
        let mut st = state::state();
        let ctx = st.stream_ctx(hStream as u64)?;
        let e = st.events.get_mut(&(hEvent as u64)).ok_or(INVALID_HANDLE)?;
        if e.ctx != ctx {
            return Err(INVALID_HANDLE);
        }
        e.recorded = Some(Instant::now());
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecordWithFlags(
    hEvent: CUevent,
    hStream: CUstream,
    flags: c_uint,
) -> CUresult {
    if flags > 1 {
        return INVALID_VALUE;
    }
    // SAFETY: same contract as cuEventRecord.
    unsafe { cuEventRecord(hEvent, hStream) }
}

fn event_ctx(hEvent: CUevent) -> R {
    let st = state::state();
    st.check_init()?;
    let e = st.events.get(&(hEvent as u64)).ok_or(INVALID_HANDLE)?;
    st.check_ctx(e.ctx)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventQuery(hEvent: CUevent) -> CUresult {
    entry("cuEventQuery", || event_ctx(hEvent))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventSynchronize(hEvent: CUevent) -> CUresult {
    entry("cuEventSynchronize", || event_ctx(hEvent))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(hEvent: CUevent) -> CUresult {
    entry("cuEventDestroy", || {
        let mut st = state::state();
        st.check_init()?;
        st.events.remove(&(hEvent as u64)).ok_or(INVALID_HANDLE)?;
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    pMilliseconds: *mut f32,
    hStart: CUevent,
    hEnd: CUevent,
) -> CUresult {
    entry("cuEventElapsedTime", || {
        let st = state::state();
        st.check_init()?;
        let s = st.events.get(&(hStart as u64)).ok_or(INVALID_HANDLE)?;
        let e = st.events.get(&(hEnd as u64)).ok_or(INVALID_HANDLE)?;
        st.check_ctx(s.ctx)?;
        if s.ctx != e.ctx || s.flags & 2 != 0 || e.flags & 2 != 0 {
            return Err(INVALID_HANDLE);
        }
        let (Some(t0), Some(t1)) = (s.recorded, e.recorded) else {
            return Err(INVALID_HANDLE);
        };
        let ms = if t1 >= t0 {
            t1.duration_since(t0).as_secs_f64() * 1e3
        } else {
            -(t0.duration_since(t1).as_secs_f64() * 1e3)
        };
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(pMilliseconds, ms as f32) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(
    pMilliseconds: *mut f32,
    hStart: CUevent,
    hEnd: CUevent,
) -> CUresult {
    // SAFETY: same contract as cuEventElapsedTime_v2.
    unsafe { cuEventElapsedTime_v2(pMilliseconds, hStart, hEnd) }
}

// ---- modules and functions ---------------------------------------------------------------------

/// Loads an image (see [`image`]) as a module of the current context.
///
/// # Safety
/// `img` must point to a complete image.
unsafe fn load_image(module: *mut CUmodule, img: *const c_void) -> R {
    let ctx = state::state().current()?;
    if module.is_null() {
        return Err(INVALID_VALUE);
    }
    // SAFETY: forwarded from this function's contract.
    let image = unsafe { image::read(img.cast()) }?;
    let kernels: Vec<String> = crate::abi::kernel_names()
        .into_iter()
        .filter(|k| image::has_symbol(&image.bytes, k))
        .collect();
    let mut st = state::state();
    let h = st.handle(state::TAG_MODULE);
    st.modules.insert(
        h,
        Module {
            ctx,
            kernels,
            ptx: image.ptx,
            functions: Default::default(),
        },
    );
    drop(st);
    // A copy of the image bytes is kept only while looking kernels up.
    module_images().insert(h, image.bytes);
    // SAFETY: out-parameter of the caller, non-NULL.
    unsafe { write(module, h as CUmodule) }
}

/// The bytes of each loaded module (for telling "not in the image" from "not emulated").
fn module_images() -> std::sync::MutexGuard<'static, std::collections::HashMap<u64, Vec<u8>>> {
    static IMAGES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>> =
        std::sync::LazyLock::new(Default::default);
    IMAGES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    // SAFETY: cuModuleLoadData's contract: image points to a complete image.
    entry("cuModuleLoadData", || unsafe { load_image(module, image) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    _numOptions: c_uint,
    _options: *mut c_int,
    _optionValues: *mut *mut c_void,
) -> CUresult {
    // SAFETY: as cuModuleLoadData (JIT options do not apply: nothing is compiled).
    entry("cuModuleLoadDataEx", || unsafe {
        load_image(module, image)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoad(module: *mut CUmodule, fname: *const c_char) -> CUresult {
    entry("cuModuleLoad", || {
        if fname.is_null() {
            return Err(INVALID_VALUE);
        }
        // SAFETY: a NUL-terminated path (cuModuleLoad's contract).
        let path = unsafe { CStr::from_ptr(fname) }
            .to_string_lossy()
            .into_owned();
        let mut bytes = std::fs::read(&path).map_err(|_| CUresult::CUDA_ERROR_FILE_NOT_FOUND)?;
        bytes.push(0);
        // SAFETY: the whole file, NUL-terminated in case it is PTX text.
        unsafe { load_image(module, bytes.as_ptr().cast()) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleUnload(hmod: CUmodule) -> CUresult {
    entry("cuModuleUnload", || {
        let mut st = state::state();
        st.check_init()?;
        let m = st.modules.remove(&(hmod as u64)).ok_or(INVALID_HANDLE)?;
        for f in m.functions.values() {
            st.functions.remove(f);
        }
        drop(st);
        module_images().remove(&(hmod as u64));
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    hfunc: *mut CUfunction,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    entry("cuModuleGetFunction", || {
        if hfunc.is_null() || name.is_null() {
            return Err(INVALID_VALUE);
        }
        // SAFETY: a NUL-terminated kernel name (cuModuleGetFunction's contract).
        let cname = unsafe { CStr::from_ptr(name) };
        let n = cname.to_string_lossy().into_owned();
        let mut st = state::state();
        st.check_init()?;
        let hm = hmod as u64;
        let m = st.modules.get(&hm).ok_or(INVALID_HANDLE)?;
        st.check_ctx(m.ctx)?;
        if let Some(&f) = m.functions.get(&n) {
            // SAFETY: out-parameter of the caller, non-NULL.
            return unsafe { write(hfunc, f as CUfunction) };
        }
        if !m.kernels.contains(&n) {
            let in_image = module_images()
                .get(&hm)
                .is_some_and(|b| image::has_symbol(b, &n));
            if in_image {
                eprintln!(
                    "qadapt-vgpu: cuModuleGetFunction({n}): the image has this kernel but the \
                     virtual device cannot run it ({}): CUDA_ERROR_NOT_FOUND",
                    if crate::abi::HAS_RUNTIME {
                        "no emulation of it is registered in kernels/emu"
                    } else {
                        "built without the `emu` feature, so no kernel is compiled in"
                    }
                );
            }
            return Err(CUresult::CUDA_ERROR_NOT_FOUND);
        }
        let ptx_max = image::max_threads(&m.ptx, &n);
        let res = image::RESOURCES.get(&n).copied();
        if res.is_none() {
            warn_once(&n);
        }
        let args_size = crate::abi::args_size(cname);
        let h = st.handle(state::TAG_FUNC);
        st.functions.insert(
            h,
            Function {
                module: hm,
                name: cname.to_owned(),
                args_size,
                res,
                max_ntid: ptx_max,
                max_dyn_smem: device::SMEM_DEFAULT - res.map_or(0, |r| r.smem),
                carveout: -1,
                cache_config: 0,
            },
        );
        st.modules
            .get_mut(&hm)
            .expect("module")
            .functions
            .insert(n, h);
        // SAFETY: out-parameter of the caller, non-NULL.
        unsafe { write(hfunc, h as CUfunction) }
    })
}

fn warn_once(kernel: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !seen.iter().any(|k| k == kernel) {
        eprintln!(
            "qadapt-vgpu: no ptxas report for kernel {kernel} (qadapt_kernels::MODULES): its \
             registers and static shared memory are not checked at launch"
        );
        seen.push(kernel.to_string());
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(
    _dptr: *mut CUdeviceptr,
    _bytes: *mut usize,
    hmod: CUmodule,
    _name: *const c_char,
) -> CUresult {
    entry("cuModuleGetGlobal", || {
        let st = state::state();
        st.check_init()?;
        st.modules.get(&(hmod as u64)).ok_or(INVALID_HANDLE)?;
        // The emulated kernels have no module-scope __device__ variables the host can see.
        Err(CUresult::CUDA_ERROR_NOT_FOUND)
    })
}

/// The kernel's limit on threads per CTA: 1024, `.maxntid`, and what its registers allow.
pub(crate) fn func_max_threads(f: &Function) -> u32 {
    let mut max = device::MAX_THREADS_PER_BLOCK;
    if let Some(n) = f.max_ntid {
        max = max.min(n);
    }
    if let Some(r) = f.res
        && r.regs > 0
    {
        let per_warp = device::regs_per_block(r.regs, device::WARP);
        let warps = u64::from(device::REGS_PER_BLOCK) / per_warp;
        max = max.min((warps as u32) * device::WARP);
    }
    max
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    hfunc: CUfunction,
) -> CUresult {
    entry("cuFuncGetAttribute", || {
        let st = state::state();
        st.check_init()?;
        let f = st.functions.get(&(hfunc as u64)).ok_or(INVALID_HANDLE)?;
        let res = f.res.unwrap_or_default();
        let v = match attrib {
            0 => func_max_threads(f) as i32,
            1 => res.smem as i32,
            2 => 0,
            3 => res.stack as i32,
            4 => res.regs as i32,
            5 | 6 => 90,
            7 => 0,
            8 => f.max_dyn_smem as i32,
            9 => f.carveout,
            10..=15 => 0,
            16 => 0,
            17 => 0,
            _ => return Err(INVALID_VALUE),
        };
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(pi, v) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncSetAttribute(
    hfunc: CUfunction,
    attrib: c_int,
    value: c_int,
) -> CUresult {
    entry("cuFuncSetAttribute", || {
        let mut st = state::state();
        st.check_init()?;
        let f = st
            .functions
            .get_mut(&(hfunc as u64))
            .ok_or(INVALID_HANDLE)?;
        let name = f.name.to_string_lossy().into_owned();
        match attrib {
            8 => {
                let stat = f.res.map_or(0, |r| r.smem);
                let max = device::SMEM_OPTIN - stat;
                if value < 0 || value as u32 > max {
                    eprintln!(
                        "qadapt-vgpu: cuFuncSetAttribute({name}, MAX_DYNAMIC_SHARED_SIZE_BYTES, \
                         {value}): at most {max} (227 KiB less {stat} bytes of static shared \
                         memory): CUDA_ERROR_INVALID_VALUE"
                    );
                    return Err(INVALID_VALUE);
                }
                f.max_dyn_smem = value as u32;
            }
            9 => {
                if !(-1..=100).contains(&value) {
                    return Err(INVALID_VALUE);
                }
                f.carveout = value;
            }
            10..=15 | 17 => {}
            _ => return Err(INVALID_VALUE),
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncSetCacheConfig(hfunc: CUfunction, config: c_int) -> CUresult {
    entry("cuFuncSetCacheConfig", || {
        let mut st = state::state();
        st.check_init()?;
        let f = st
            .functions
            .get_mut(&(hfunc as u64))
            .ok_or(INVALID_HANDLE)?;
        if !(0..=3).contains(&config) {
            return Err(INVALID_VALUE);
        }
        f.cache_config = config;
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetName(name: *mut *const c_char, hfunc: CUfunction) -> CUresult {
    entry("cuFuncGetName", || {
        let st = state::state();
        st.check_init()?;
        let f = st.functions.get(&(hfunc as u64)).ok_or(INVALID_HANDLE)?;
        // SAFETY: out-parameter of the caller (NULL refused); the CString lives as long as the
        // function handle (until its module is unloaded), as the driver's name does.
        unsafe { write(name, f.name.as_ptr()) }
    })
}

// ---- occupancy ---------------------------------------------------------------------------------

fn func_usage(hfunc: CUfunction) -> Result<(u32, u32, u32), CUresult> {
    let st = state::state();
    st.check_init()?;
    let f = st.functions.get(&(hfunc as u64)).ok_or(INVALID_HANDLE)?;
    let r = f.res.unwrap_or_default();
    Ok((r.regs, r.smem, func_max_threads(f)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
    _flags: c_uint,
) -> CUresult {
    entry("cuOccupancyMaxActiveBlocksPerMultiprocessor", || {
        let (regs, smem, max_threads) = func_usage(func)?;
        if blockSize <= 0 {
            return Err(INVALID_VALUE);
        }
        let n = if blockSize as u32 > max_threads {
            0
        } else {
            device::blocks_per_sm(regs, blockSize as u32, smem + dynamicSMemSize as u32)
        };
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(numBlocks, n as c_int) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
) -> CUresult {
    // SAFETY: same contract as the WithFlags variant.
    unsafe {
        cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
            numBlocks,
            func,
            blockSize,
            dynamicSMemSize,
            0,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    dynamicSmemSize: *mut usize,
    func: CUfunction,
    numBlocks: c_int,
    blockSize: c_int,
) -> CUresult {
    entry("cuOccupancyAvailableDynamicSMemPerBlock", || {
        let (_, smem, _) = func_usage(func)?;
        if numBlocks <= 0 || blockSize <= 0 {
            return Err(INVALID_VALUE);
        }
        let per = (device::SMEM_PER_SM / numBlocks as u32).saturating_sub(device::RESERVED_SMEM);
        let avail = per.min(device::SMEM_OPTIN).saturating_sub(smem);
        // SAFETY: out-parameter of the caller (NULL refused).
        unsafe { write(dynamicSmemSize, avail as usize) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSizeWithFlags(
    minGridSize: *mut c_int,
    blockSize: *mut c_int,
    func: CUfunction,
    blockSizeToDynamicSMemSize: CUoccupancyB2DSize,
    dynamicSMemSize: usize,
    blockSizeLimit: c_int,
    _flags: c_uint,
) -> CUresult {
    entry("cuOccupancyMaxPotentialBlockSize", || {
        let (regs, smem, max_threads) = func_usage(func)?;
        let limit = if blockSizeLimit <= 0 {
            max_threads
        } else {
            max_threads.min(blockSizeLimit as u32)
        };
        let (mut best_threads, mut best_blocks) = (0u32, 0u32);
        let mut b = limit / device::WARP * device::WARP;
        while b >= device::WARP {
            let dyn_smem = match blockSizeToDynamicSMemSize {
                // SAFETY: the caller's callback, called with a block size as documented.
                Some(cb) => unsafe { cb(b as c_int) },
                None => dynamicSMemSize,
            };
            let blocks = device::blocks_per_sm(regs, b, smem + dyn_smem as u32);
            if blocks * b > best_blocks * best_threads {
                best_threads = b;
                best_blocks = blocks;
            }
            b -= device::WARP;
        }
        // SAFETY: out-parameters of the caller (NULL refused).
        unsafe { write(minGridSize, (best_blocks * device::SM_COUNT) as c_int) }?;
        // SAFETY: as above.
        unsafe { write(blockSize, best_threads as c_int) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSize(
    minGridSize: *mut c_int,
    blockSize: *mut c_int,
    func: CUfunction,
    blockSizeToDynamicSMemSize: CUoccupancyB2DSize,
    dynamicSMemSize: usize,
    blockSizeLimit: c_int,
) -> CUresult {
    // SAFETY: same contract as the WithFlags variant.
    unsafe {
        cuOccupancyMaxPotentialBlockSizeWithFlags(
            minGridSize,
            blockSize,
            func,
            blockSizeToDynamicSMemSize,
            dynamicSMemSize,
            blockSizeLimit,
            0,
        )
    }
}

// ---- launches ----------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gridDimX: c_uint,
    gridDimY: c_uint,
    gridDimZ: c_uint,
    blockDimX: c_uint,
    blockDimY: c_uint,
    blockDimZ: c_uint,
    sharedMemBytes: c_uint,
    hStream: CUstream,
    kernelParams: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    entry("cuLaunchKernel", || {
        // SAFETY: cuLaunchKernel's contract: kernelParams[0] points to the kernel's argument.
        unsafe {
            crate::launch::launch(
                "cuLaunchKernel",
                f as u64,
                [gridDimX, gridDimY, gridDimZ],
                [blockDimX, blockDimY, blockDimZ],
                sharedMemBytes,
                hStream as u64,
                kernelParams,
                extra,
                false,
            )
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    gridDimX: c_uint,
    gridDimY: c_uint,
    gridDimZ: c_uint,
    blockDimX: c_uint,
    blockDimY: c_uint,
    blockDimZ: c_uint,
    sharedMemBytes: c_uint,
    hStream: CUstream,
    kernelParams: *mut *mut c_void,
) -> CUresult {
    entry("cuLaunchCooperativeKernel", || {
        // SAFETY: as cuLaunchKernel.
        unsafe {
            crate::launch::launch(
                "cuLaunchCooperativeKernel",
                f as u64,
                [gridDimX, gridDimY, gridDimZ],
                [blockDimX, blockDimY, blockDimZ],
                sharedMemBytes,
                hStream as u64,
                kernelParams,
                std::ptr::null_mut(),
                true,
            )
        }
    })
}

// ---- profiler ----------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuProfilerStart() -> CUresult {
    entry("cuProfilerStart", || state::state().current().map(drop))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuProfilerStop() -> CUresult {
    entry("cuProfilerStop", || state::state().current().map(drop))
}

// ---- the virtual device's own entry points -----------------------------------------------------

/// Adds the counters of every launch of `kernel` (all kernels for NULL) since the last reset into
/// `*out`; returns the number of launches counted. Not part of CUDA: tests and benchmarks find it
/// with dlsym to read what the emulator counted (docs/design-notes.md).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qadapt_vgpu_counters(
    kernel: *const c_char,
    out: *mut crate::QvCounters,
) -> u64 {
    let name = if kernel.is_null() {
        None
    } else {
        // SAFETY: a NUL-terminated kernel name.
        Some(
            unsafe { CStr::from_ptr(kernel) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    let (launches, c) = crate::launch::counters(name.as_deref());
    if !out.is_null() {
        // SAFETY: the caller's QvCounters, non-NULL.
        unsafe { crate::abi::add_counters(&mut *out, &c) };
    }
    launches
}

/// Clears the launch counters.
#[unsafe(no_mangle)]
pub extern "C" fn qadapt_vgpu_reset_counters() {
    crate::launch::reset_counters();
}

/// Device memory in bytes (the requested sizes of cuMemAlloc, cuMemAllocAsync and
/// cuMemAllocManaged allocations, minus frees; pinned host memory not counted): the bytes live now
/// into `*live` and their high-water mark since the library loaded or the last
/// [`qadapt_vgpu_reset_memory_peak`] into `*peak`. Either may be NULL. With `thread_only` nonzero,
/// only the allocations made by the calling host thread (freed by any), so that tests running in
/// parallel in one process each see their own. Not part of CUDA (found with dlsym, like
/// [`qadapt_vgpu_counters`]): memory-planner tests compare their prediction with it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn qadapt_vgpu_memory(thread_only: i32, live: *mut u64, peak: *mut u64) {
    let (l, p) = memory::device_usage(thread_only != 0);
    if !live.is_null() {
        // SAFETY: the caller's u64, non-NULL.
        unsafe { live.write(l as u64) };
    }
    if !peak.is_null() {
        // SAFETY: the caller's u64, non-NULL.
        unsafe { peak.write(p as u64) };
    }
}

/// Restarts the high-water marks of [`qadapt_vgpu_memory`] (the process's and the calling
/// thread's) from the bytes live now.
#[unsafe(no_mangle)]
pub extern "C" fn qadapt_vgpu_reset_memory_peak() {
    memory::reset_device_peak();
}

/// Live allocations right now (leak checks).
#[unsafe(no_mangle)]
pub extern "C" fn qadapt_vgpu_live_allocations() -> usize {
    memory::live_count()
}

// ---- tensor maps (TMA) ----------------------------------------------------------------------------

/// The virtual device's encoding of a `CUtensorMap`: `kernels/emu/vgpu_tmap.h`'s `QvTensorMap`,
/// field for field (that header documents it; the emulated `cp.async.bulk.tensor` reads it). It
/// fills the first 80 of the map's 128 opaque bytes, the rest zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QvTensorMap {
    pub(crate) magic: u64,
    pub(crate) global_addr: u64,
    pub(crate) rank: u32,
    pub(crate) elem_size: u32,
    pub(crate) dtype: u32,
    pub(crate) swizzle: u32,
    pub(crate) dims: [u64; 2],
    pub(crate) stride1: u64,
    pub(crate) boxdim: [u32; 2],
    pub(crate) oob_fill: u32,
    pub(crate) interleave: u32,
    pub(crate) l2_promotion: u32,
    pub(crate) reserved: u32,
}
const _: () = assert!(std::mem::size_of::<QvTensorMap>() == 80);

/// `QV_TMAP_MAGIC` of vgpu_tmap.h (the bytes "@QVTAM01").
pub(crate) const QV_TMAP_MAGIC: u64 = 0x3130_4d41_5456_5140;

/// Bytes per element of a `CUtensorMapDataType` (UINT8 .. TFLOAT32_FTZ), or None.
fn tmap_elem_size(dtype: c_uint) -> Option<u32> {
    const SIZES: [u32; 13] = [1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4];
    SIZES.get(dtype as usize).copied()
}

/// cuTensorMapEncodeTiled's checks, as the real driver makes them (plus what the emulator does not
/// model: rank other than 2, element strides other than 1, interleaved layouts), then the
/// encoding. `Err(why)` for CUDA_ERROR_INVALID_VALUE.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_tensor_map(
    dtype: c_uint,
    rank: c_uint,
    addr: u64,
    dims: &[u64],
    strides: &[u64],
    boxdim: &[u32],
    elem_strides: &[u32],
    interleave: c_uint,
    swizzle: c_uint,
    l2: c_uint,
    oob: c_uint,
) -> Result<QvTensorMap, String> {
    let es = tmap_elem_size(dtype).ok_or_else(|| format!("unknown data type {dtype}"))?;
    if !(1..=5).contains(&rank) {
        return Err(format!("rank {rank} outside 1..5"));
    }
    if rank != 2 {
        return Err(format!(
            "rank {rank}: the virtual device emulates 2-D tensor maps only"
        ));
    }
    if addr == 0 || !addr.is_multiple_of(16) {
        return Err(format!("global address {addr:#x} is not 16-byte aligned"));
    }
    if dims.iter().any(|&d| d == 0 || d > 1 << 32) {
        return Err(format!("globalDim {dims:?}: each must be in 1..=2^32"));
    }
    if strides
        .iter()
        .any(|&s| !s.is_multiple_of(16) || s >= 1 << 40)
    {
        return Err(format!(
            "globalStrides {strides:?}: each must be a multiple of 16 below 2^40"
        ));
    }
    if strides[0] < dims[0] * u64::from(es) {
        return Err(format!(
            "globalStrides[0] = {} is smaller than a row of {} elements of {es} bytes",
            strides[0], dims[0]
        ));
    }
    if boxdim.iter().any(|&b| b == 0 || b > 256) {
        return Err(format!("boxDim {boxdim:?}: each must be in 1..=256"));
    }
    if !(boxdim[0] * es).is_multiple_of(16) {
        return Err(format!(
            "boxDim[0] * elementSize = {} bytes is not a multiple of 16",
            boxdim[0] * es
        ));
    }
    if elem_strides.iter().any(|&e| e == 0 || e > 8) {
        return Err(format!(
            "elementStrides {elem_strides:?}: each must be in 1..=8"
        ));
    }
    if elem_strides.iter().any(|&e| e != 1) {
        return Err(format!(
            "elementStrides {elem_strides:?}: the virtual device emulates 1 only"
        ));
    }
    if interleave > 2 {
        return Err(format!("unknown interleave {interleave}"));
    }
    if interleave != 0 {
        return Err("interleaved layouts are not emulated".into());
    }
    if swizzle > 3 {
        return Err(format!("unknown swizzle {swizzle}"));
    }
    if swizzle != 0 && boxdim[0] * es > 16 << swizzle {
        return Err(format!(
            "boxDim[0] * elementSize = {} bytes exceeds the {}-byte swizzle span",
            boxdim[0] * es,
            16 << swizzle
        ));
    }
    if l2 > 3 {
        return Err(format!("unknown L2 promotion {l2}"));
    }
    if oob > 1 || (oob == 1 && dtype < 6) {
        return Err(format!(
            "oobFill {oob} (NaN fill needs a floating-point type)"
        ));
    }
    Ok(QvTensorMap {
        magic: QV_TMAP_MAGIC,
        global_addr: addr,
        rank,
        elem_size: es,
        dtype,
        swizzle,
        dims: [dims[0], dims[1]],
        stride1: strides[0],
        boxdim: [boxdim[0], boxdim[1]],
        oob_fill: oob,
        interleave,
        l2_promotion: l2,
        reserved: 0,
    })
}

/// `cuTensorMapEncodeTiled` (CUDA 12.0+): validates like the real driver and writes the virtual
/// device's encoding (`QvTensorMap`) into the 128 opaque bytes. Enum parameters as integers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuTensorMapEncodeTiled(
    tensorMap: *mut c_void,
    tensorDataType: c_uint,
    tensorRank: c_uint,
    globalAddress: *mut c_void,
    globalDim: *const u64,
    globalStrides: *const u64,
    boxDim: *const u32,
    elementStrides: *const u32,
    interleave: c_uint,
    swizzle: c_uint,
    l2Promotion: c_uint,
    oobFill: c_uint,
) -> CUresult {
    entry("cuTensorMapEncodeTiled", || {
        if tensorMap.is_null()
            || globalDim.is_null()
            || boxDim.is_null()
            || elementStrides.is_null()
            || (tensorRank > 1 && globalStrides.is_null())
            || !(1..=5).contains(&tensorRank)
        {
            return Err(INVALID_VALUE);
        }
        let r = tensorRank as usize;
        // SAFETY: the caller passes arrays of tensorRank entries (globalStrides: tensorRank - 1),
        // checked non-NULL above; likewise for the three below.
        let dims = unsafe { std::slice::from_raw_parts(globalDim, r) };
        let strides = if r > 1 {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(globalStrides, r - 1) }
        } else {
            &[][..]
        };
        // SAFETY: as above.
        let boxdim = unsafe { std::slice::from_raw_parts(boxDim, r) };
        // SAFETY: as above.
        let es = unsafe { std::slice::from_raw_parts(elementStrides, r) };
        match encode_tensor_map(
            tensorDataType,
            tensorRank,
            globalAddress as u64,
            dims,
            strides,
            boxdim,
            es,
            interleave,
            swizzle,
            l2Promotion,
            oobFill,
        ) {
            Ok(m) => {
                let mut bytes = [0u8; 128];
                // SAFETY: QvTensorMap is 80 bytes of plain integers (repr(C), no padding).
                let src = unsafe {
                    std::slice::from_raw_parts((&m as *const QvTensorMap).cast::<u8>(), 80)
                };
                bytes[..80].copy_from_slice(src);
                // SAFETY: a CUtensorMap is 128 writable bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), tensorMap.cast::<u8>(), 128)
                };
                Ok(())
            }
            Err(why) => {
                eprintln!("qadapt-vgpu: cuTensorMapEncodeTiled: {why}: CUDA_ERROR_INVALID_VALUE");
                Err(INVALID_VALUE)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_map_layout_matches_vgpu_tmap_h() {
        assert_eq!(std::mem::offset_of!(QvTensorMap, dims), 32);
        assert_eq!(std::mem::offset_of!(QvTensorMap, stride1), 48);
        assert_eq!(std::mem::offset_of!(QvTensorMap, boxdim), 56);
        assert_eq!(std::mem::offset_of!(QvTensorMap, reserved), 76);
        assert_eq!(&QV_TMAP_MAGIC.to_le_bytes(), b"@QVTAM01");
        let h = include_str!("../../../kernels/emu/vgpu_tmap.h");
        assert!(h.contains("#define QV_TMAP_MAGIC 0x31304d4154565140ull"));
    }

    #[test]
    fn tensor_maps_are_validated_like_the_driver() {
        let enc = |dtype, addr, dims: [u64; 2], stride, boxd: [u32; 2], es: [u32; 2], swz| {
            encode_tensor_map(dtype, 2, addr, &dims, &[stride], &boxd, &es, 0, swz, 0, 0)
        };
        let m = enc(9, 0x1000, [200, 50], 400, [64, 64], [1, 1], 3).unwrap();
        assert_eq!(
            (m.elem_size, m.dims, m.stride1, m.boxdim, m.swizzle),
            (2, [200, 50], 400, [64, 64], 3)
        );
        assert!(
            enc(9, 0x1008, [200, 50], 400, [64, 64], [1, 1], 3).is_err(),
            "unaligned address"
        );
        assert!(
            enc(9, 0x1000, [200, 50], 408, [64, 64], [1, 1], 3).is_err(),
            "stride % 16"
        );
        assert!(
            enc(9, 0x1000, [200, 50], 384, [64, 64], [1, 1], 3).is_err(),
            "stride below a row"
        );
        assert!(
            enc(9, 0x1000, [200, 50], 400, [128, 64], [1, 1], 3).is_err(),
            "256-byte rows, 128B swizzle"
        );
        assert!(
            enc(9, 0x1000, [200, 50], 400, [128, 64], [1, 1], 0).is_ok(),
            "no swizzle"
        );
        assert!(
            enc(9, 0x1000, [200, 50], 400, [4, 64], [1, 1], 0).is_err(),
            "8-byte box rows"
        );
        assert!(
            enc(9, 0x1000, [200, 50], 400, [64, 257], [1, 1], 0).is_err(),
            "box above 256"
        );
        assert!(
            enc(9, 0x1000, [0, 50], 400, [64, 64], [1, 1], 0).is_err(),
            "empty dimension"
        );
        assert!(
            enc(9, 0x1000, [200, 50], 400, [64, 64], [2, 1], 0).is_err(),
            "element stride 2 not emulated"
        );
        assert!(
            enc(42, 0x1000, [200, 50], 400, [64, 64], [1, 1], 0).is_err(),
            "unknown type"
        );
        assert!(
            enc(0, 0x1000, [200, 50], 208, [128, 64], [1, 1], 3).is_ok(),
            "uint8, 128-byte rows"
        );
        assert!(
            encode_tensor_map(
                9,
                3,
                0x1000,
                &[1, 1, 1],
                &[16, 16],
                &[1, 1, 1],
                &[1, 1, 1],
                0,
                0,
                0,
                0
            )
            .is_err()
        );
    }
}

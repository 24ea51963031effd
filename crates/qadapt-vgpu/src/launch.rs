//! `cuLaunchKernel`: the real driver's launch checks against the H200's limits, then the
//! emulator, then the memory checks.
//!
//! Checks, each with the error code the real driver returns:
//! - block dimensions: each >= 1, x, y <= 1024, z <= 64, x*y*z <= 1024: CUDA_ERROR_INVALID_VALUE;
//! - grid dimensions: each >= 1, x <= 2^31-1, y, z <= 65535: CUDA_ERROR_INVALID_VALUE;
//! - shared memory: dynamic bytes above the function's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_
//!   BYTES (by default 48 KiB less the kernel's static shared memory, raised up to 227 KiB less it
//!   by cuFuncSetAttribute): CUDA_ERROR_INVALID_VALUE;
//! - registers: ptxas' count per thread, rounded up to the allocation unit (8), times the threads
//!   of the CTA rounded up to whole warps, above 65536; or more threads than `.maxntid`
//!   (`__launch_bounds__`): CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
//! - cooperative launches: more CTAs than can be resident at once: CUDA_ERROR_COOPERATIVE_LAUNCH_
//!   TOO_LARGE.
//!
//! A launch that passes runs to completion before cuLaunchKernel returns. What went wrong inside
//! is reported on stderr and returned from the launch itself (a GPU reports it at the next
//! synchronization), and the context keeps the error (sticky, see `state`):
//! - a fault in a guard page, or a canary in an allocation's slack overwritten:
//!   CUDA_ERROR_ILLEGAL_ADDRESS, with the allocation and offset;
//! - a misaligned address (an emulated instruction's alignment rule, e.g. cp.async or ldmatrix
//!   addresses): CUDA_ERROR_MISALIGNED_ADDRESS;
//!   any other PTX rule broken (lanes disagreeing on a .sync op, ...): CUDA_ERROR_ILLEGAL_INSTRUCTION;
//! - `assert` failing: CUDA_ERROR_ASSERT; `__trap()`: CUDA_ERROR_LAUNCH_FAILED;
//! - a barrier that not every thread reaches: CUDA_ERROR_LAUNCH_FAILED (a GPU would hang, or
//!   finish with undefined results: neither is a useful test outcome).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{LazyLock, Mutex, PoisonError};

use crate::abi::{self, QvCounters, QvDim3, QvStatus};
use crate::memory;
use crate::state::state;
use crate::{CUresult, device, errors};

/// Launches and counters per kernel since the last reset.
static COUNTERS: LazyLock<Mutex<HashMap<String, (u64, QvCounters)>>> =
    LazyLock::new(Default::default);

/// `(launches, counters)` of `kernel`, or of every kernel.
pub(crate) fn counters(kernel: Option<&str>) -> (u64, QvCounters) {
    let map = COUNTERS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut total = (0, QvCounters::default());
    for (k, (n, c)) in map.iter() {
        if kernel.is_none_or(|want| want == k) {
            total.0 += n;
            abi::add_counters(&mut total.1, c);
        }
    }
    total
}

pub(crate) fn reset_counters() {
    COUNTERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
}

const CU_LAUNCH_PARAM_END: usize = 0x00;
const CU_LAUNCH_PARAM_BUFFER_POINTER: usize = 0x01;
const CU_LAUNCH_PARAM_BUFFER_SIZE: usize = 0x02;

fn refuse(api: &str, kernel: &str, code: CUresult, why: String) -> Result<(), CUresult> {
    eprintln!(
        "qadapt-vgpu: {api}({kernel}): {why}: {}",
        errors::name(code as i32)
    );
    Err(code)
}

/// Validates and runs one launch.
///
/// # Safety
/// As `cuLaunchKernel`: `params[0]` (or the `extra` buffer) points to the kernel's argument.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch(
    api: &str,
    f: u64,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    stream: u64,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    cooperative: bool,
) -> Result<(), CUresult> {
    let (ctx, name, args_size, res, max_threads, max_dyn) = {
        let st = state();
        st.check_init()?;
        let func = st
            .functions
            .get(&f)
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        let module = st
            .modules
            .get(&func.module)
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        let ctx = st.stream_ctx(stream)?;
        if module.ctx != ctx {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        (
            ctx,
            func.name.clone(),
            func.args_size,
            func.res,
            crate::driver::func_max_threads(func),
            func.max_dyn_smem,
        )
    };
    let kname = name.to_string_lossy().into_owned();
    let k = kname.as_str();
    use CUresult::{
        CUDA_ERROR_INVALID_VALUE as INVALID, CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES as OOR,
    };

    let [bx, by, bz] = block;
    if bx == 0 || by == 0 || bz == 0 {
        return refuse(
            api,
            k,
            INVALID,
            format!("block {bx}x{by}x{bz} has an empty dimension"),
        );
    }
    for (d, (&b, &max)) in ["x", "y", "z"]
        .iter()
        .zip(block.iter().zip(&device::MAX_BLOCK))
    {
        if b > max {
            return refuse(api, k, INVALID, format!("blockDim.{d} = {b} exceeds {max}"));
        }
    }
    let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
    if threads > u64::from(device::MAX_THREADS_PER_BLOCK) {
        return refuse(
            api,
            k,
            INVALID,
            format!("{threads} threads per block exceed 1024"),
        );
    }
    for (d, (&g, &max)) in ["x", "y", "z"]
        .iter()
        .zip(grid.iter().zip(&device::MAX_GRID))
    {
        if g == 0 || g > max {
            return refuse(
                api,
                k,
                INVALID,
                format!("gridDim.{d} = {g} is not in 1..={max}"),
            );
        }
    }
    let stat = res.map_or(0, |r| r.smem);
    if dyn_smem > max_dyn {
        let why = if max_dyn == device::SMEM_DEFAULT - stat {
            format!(
                "{dyn_smem} bytes of dynamic shared memory (+ {stat} static) exceed the 48 KiB \
                 default; opt in with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_\
                 BYTES) first (at most {} bytes)",
                device::SMEM_OPTIN - stat
            )
        } else {
            format!(
                "{dyn_smem} bytes of dynamic shared memory exceed the {max_dyn} set with \
                 CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES"
            )
        };
        return refuse(api, k, INVALID, why);
    }
    if u64::from(stat) + u64::from(dyn_smem) > u64::from(device::SMEM_OPTIN) {
        return refuse(
            api,
            k,
            INVALID,
            format!("{stat} static + {dyn_smem} dynamic bytes of shared memory exceed 227 KiB"),
        );
    }
    if let Some(r) = res {
        let need = device::regs_per_block(r.regs, threads as u32);
        if need > u64::from(device::REGS_PER_BLOCK) {
            return refuse(
                api,
                k,
                OOR,
                format!(
                    "{threads} threads x {} registers (ptxas: {}, allocated in units of 8 per \
                     thread and whole warps) = {need} registers exceed the 65536 of a CTA",
                    r.regs.div_ceil(8) * 8,
                    r.regs
                ),
            );
        }
    }
    if threads > u64::from(max_threads) {
        return refuse(
            api,
            k,
            OOR,
            format!("{threads} threads exceed the kernel's limit of {max_threads} (.maxntid)"),
        );
    }
    if cooperative {
        let per_sm =
            device::blocks_per_sm(res.map_or(0, |r| r.regs), threads as u32, stat + dyn_smem);
        let ctas = u64::from(grid[0]) * u64::from(grid[1]) * u64::from(grid[2]);
        if ctas > u64::from(per_sm) * u64::from(device::SM_COUNT) {
            return refuse(
                api,
                k,
                CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE,
                format!("{ctas} CTAs, at most {per_sm} per SM x 132 SMs can be resident"),
            );
        }
    }

    // The argument: one struct, passed by value.
    let args: Vec<u8> = if !params.is_null() {
        if !extra.is_null() {
            return refuse(api, k, INVALID, "both kernelParams and extra given".into());
        }
        // SAFETY: kernelParams has one entry per kernel parameter (ours take one).
        let p0 = unsafe { *params };
        if p0.is_null() {
            return refuse(api, k, INVALID, "kernelParams[0] is NULL".into());
        }
        // SAFETY: kernelParams[0] points to the argument struct, args_size bytes
        // (cuLaunchKernel's contract; the size is the emulated kernel's sizeof(Args)).
        unsafe { std::slice::from_raw_parts(p0.cast::<u8>(), args_size) }.to_vec()
    } else if !extra.is_null() {
        // SAFETY: the extra array of cuLaunchKernel, terminated by CU_LAUNCH_PARAM_END.
        let (buf, size) = unsafe { read_extra(extra) };
        if buf.is_null() || size != args_size {
            return refuse(
                api,
                k,
                INVALID,
                format!("extra gives a {size}-byte buffer, the kernel takes {args_size} bytes"),
            );
        }
        // SAFETY: the caller's argument buffer of `size` bytes.
        unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) }.to_vec()
    } else {
        return refuse(
            api,
            k,
            INVALID,
            "neither kernelParams nor extra given".into(),
        );
    };

    if crate::trace() {
        eprintln!(
            "qadapt-vgpu: launch {k} grid {}x{}x{} block {bx}x{by}x{bz} dyn smem {dyn_smem}",
            grid[0], grid[1], grid[2]
        );
    }
    let mut counts = QvCounters::default();
    let mut status = abi::empty_status();
    let code = abi::launch(
        &name,
        &args,
        QvDim3 {
            x: grid[0],
            y: grid[1],
            z: grid[2],
        },
        QvDim3 {
            x: bx,
            y: by,
            z: bz,
        },
        dyn_smem,
        &mut counts,
        &mut status,
    );
    {
        let mut map = COUNTERS.lock().unwrap_or_else(PoisonError::into_inner);
        let e = map.entry(kname.clone()).or_default();
        e.0 += 1;
        abi::add_counters(&mut e.1, &counts);
    }
    let canaries = memory::check_canaries();
    let where_ = format!(
        "kernel {k} (grid {}x{}x{}, block {bx}x{by}x{bz})",
        grid[0], grid[1], grid[2]
    );
    let at = format!(
        "CTA ({},{},{}) thread ({},{},{})",
        status.cta.x, status.cta.y, status.cta.z, status.thread.x, status.thread.y, status.thread.z
    );
    let result = match code {
        abi::QV_OK => Ok(()),
        abi::QV_UNKNOWN_KERNEL => {
            eprintln!("qadapt-vgpu: {where_}: the emulator has no such kernel");
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        }
        abi::QV_BAD_ARGS => {
            eprintln!("qadapt-vgpu: {where_}: argument size {args_size} refused by the emulator");
            return Err(INVALID);
        }
        abi::QV_MEMORY_FAULT => {
            // A general protection fault (a misaligned vector access, a non-canonical address)
            // has no address to look up.
            let place =
                if status.fault_addr == 0 && abi::status_message(&status).contains("protection") {
                    String::new()
                } else {
                    format!(
                        ": address {:#x} is {}",
                        status.fault_addr,
                        memory::describe(status.fault_addr)
                    )
                };
            eprintln!("qadapt-vgpu: {where_}: {}{place}", with_place(&status, &at));
            Err(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS)
        }
        abi::QV_PTX_ERROR => {
            let msg = abi::status_message(&status);
            eprintln!("qadapt-vgpu: {where_}: {}", with_place(&status, &at));
            if msg.contains("aligned") || msg.contains("alignment") {
                Err(CUresult::CUDA_ERROR_MISALIGNED_ADDRESS)
            } else {
                Err(CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION)
            }
        }
        abi::QV_TRAP => {
            let msg = abi::status_message(&status);
            eprintln!("qadapt-vgpu: {where_}: {}", with_place(&status, &at));
            if msg.contains("assert") {
                Err(CUresult::CUDA_ERROR_ASSERT)
            } else {
                Err(CUresult::CUDA_ERROR_LAUNCH_FAILED)
            }
        }
        abi::QV_BARRIER_DEADLOCK => {
            eprintln!("qadapt-vgpu: {where_}: {}", with_place(&status, &at));
            Err(CUresult::CUDA_ERROR_LAUNCH_FAILED)
        }
        other => {
            eprintln!(
                "qadapt-vgpu: {where_}: emulator status {other}: {}",
                abi::status_message(&status)
            );
            Err(CUresult::CUDA_ERROR_LAUNCH_FAILED)
        }
    };
    let result = result.and_then(|()| {
        if canaries.is_empty() {
            return Ok(());
        }
        for (a, off) in &canaries {
            eprintln!(
                "qadapt-vgpu: {where_}: wrote past the end of {a}: byte at offset {off} (in the \
                 slack up to the 16-byte-rounded end, which no one may write) was changed"
            );
        }
        Err(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS)
    });
    if let Err(e) = result {
        eprintln!(
            "qadapt-vgpu: {where_} -> {}; the context keeps this error, as on a GPU",
            errors::name(e as i32)
        );
        state().poison(ctx, e);
    }
    result
}

/// The emulator's message, with the CTA and thread added unless it names them itself.
fn with_place(status: &QvStatus, at: &str) -> String {
    let msg = abi::status_message(status);
    if msg.contains("CTA") {
        msg
    } else {
        format!("{msg} at {at}")
    }
}

/// `(CU_LAUNCH_PARAM_BUFFER_POINTER, *CU_LAUNCH_PARAM_BUFFER_SIZE)` of an `extra` array.
///
/// # Safety
/// `extra` must be a valid `extra` array of cuLaunchKernel.
unsafe fn read_extra(extra: *mut *mut c_void) -> (*const c_void, usize) {
    let (mut buf, mut size) = (std::ptr::null(), 0usize);
    let mut i = 0;
    loop {
        // SAFETY: the array is terminated by CU_LAUNCH_PARAM_END, and each key but END is
        // followed by its value.
        let key = unsafe { *extra.wrapping_add(i) } as usize;
        match key {
            CU_LAUNCH_PARAM_END => break,
            CU_LAUNCH_PARAM_BUFFER_POINTER => {
                // SAFETY: as above.
                buf = unsafe { *extra.wrapping_add(i + 1) };
            }
            CU_LAUNCH_PARAM_BUFFER_SIZE => {
                // SAFETY: as above; the value points to a size_t.
                let p = unsafe { *extra.wrapping_add(i + 1) }.cast::<usize>();
                if !p.is_null() {
                    // SAFETY: a pointer to the buffer's size_t.
                    size = unsafe { *p };
                }
            }
            _ => break,
        }
        i += 2;
    }
    (buf, size)
}

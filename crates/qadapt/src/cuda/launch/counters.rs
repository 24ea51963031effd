//! What the virtual device (`crates/qadapt-vgpu`) counted while it emulated our
//! kernels: a stand-in for a profiler's counters where no GPU is at hand. The virtual driver
//! exports two functions of its own beside the CUDA API, found here by name in the driver library
//! cudarc loaded; NVIDIA's driver has neither, so every call says `None` there.

use std::ffi::{CString, c_char};

/// Per-kernel counts of the instructions the emulator executes and of the memory traffic it sees
/// (every load and store of kernel code, grouped into warp-level requests), summed over launches.
/// Field for field the `QvCounters` struct of `kernels/emu/vgpu_abi.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmulatorCounters {
    /// `mma.sync` instructions (per warp).
    pub mma: u64,
    /// `ldmatrix` instructions (per warp).
    pub ldmatrix: u64,
    /// Shared-memory wavefronts those `ldmatrix` took (1 per 8x8 matrix when conflict-free).
    pub ldmatrix_wavefronts: u64,
    /// `cp.async` instructions (per thread).
    pub cp_async: u64,
    /// Bytes requested by those `cp.async`.
    pub cp_async_bytes: u64,
    /// Warp shuffles (per warp).
    pub shfl: u64,
    /// `__syncthreads` completions (per CTA).
    pub bar_sync: u64,
    /// CTAs run.
    pub ctas: u64,
    /// Bytes loaded from global memory (plain loads and `cp.async` sources, per thread, summed).
    pub global_ld_bytes: u64,
    /// Bytes stored to global memory (atomics included).
    pub global_st_bytes: u64,
    /// Warp-level global load instructions.
    pub global_ld_requests: u64,
    /// Warp-level global store instructions.
    pub global_st_requests: u64,
    /// Distinct 32-byte sectors per global load request, summed (4 per request when 32 lanes read consecutive words, 32 when each reads its own sector).
    pub global_ld_sectors: u64,
    /// Distinct 32-byte sectors per global store request, summed.
    pub global_st_sectors: u64,
    /// Bytes loaded from shared memory (`ldmatrix` included).
    pub shared_ld_bytes: u64,
    /// Bytes stored to shared memory (`cp.async` destinations included).
    pub shared_st_bytes: u64,
    /// Warp-level shared-memory instructions (`ldmatrix` included).
    pub shared_requests: u64,
    /// Shared-memory wavefronts those took, bank conflicts included.
    pub shared_wavefronts: u64,
    /// Shared-memory wavefronts without bank conflicts (one per phase or 8x8 matrix).
    pub shared_ideal_wavefronts: u64,
    /// Bytes of the emulated threads' own stacks (host frames: no GPU meaning).
    pub local_bytes: u64,
    /// Bytes read from the kernel's argument struct.
    pub param_bytes: u64,
    /// Accesses counted in bytes but not grouped into requests (the emulator's tables were full).
    pub ungrouped_accesses: u64,
}

type CountersFn = unsafe extern "C" fn(*const c_char, *mut EmulatorCounters) -> u64;
type ResetFn = unsafe extern "C" fn();

/// The launches of `kernel` since the last reset and what they counted, or `None` when the loaded
/// driver is not the virtual device.
pub(crate) fn emulator_counters(kernel: &str) -> Option<(u64, EmulatorCounters)> {
    let name = CString::new(kernel).ok()?;
    // SAFETY: culib() returns the driver library cudarc already loaded (the caller holds an open
    // CudaDevice, so the load succeeded and this does not panic).
    let lib = unsafe { cudarc::driver::sys::culib() };
    // SAFETY: the symbol, when present, is the virtual driver's
    // `uint64_t qadapt_vgpu_counters(const char*, QvCounters*)`, whose C signature CountersFn
    // spells; EmulatorCounters is QvCounters' #[repr(C)] twin.
    let f = unsafe { lib.get::<CountersFn>(b"qadapt_vgpu_counters\0") }.ok()?;
    let mut out = EmulatorCounters::default();
    // SAFETY: a NUL-terminated name and a valid, exclusively borrowed out-struct; the function
    // only reads the name and adds into the struct.
    let launches = unsafe { f(name.as_ptr(), &mut out) };
    Some((launches, out))
}

/// Clears the virtual device's counters; `false` when the driver is not the virtual device.
pub(crate) fn reset_emulator_counters() -> bool {
    // SAFETY: as in emulator_counters, the library cudarc loaded.
    let lib = unsafe { cudarc::driver::sys::culib() };
    // SAFETY: when present, the virtual driver's `void qadapt_vgpu_reset_counters(void)`.
    let Ok(f) = (unsafe { lib.get::<ResetFn>(b"qadapt_vgpu_reset_counters\0") }) else {
        return false;
    };
    // SAFETY: takes no arguments and only clears the driver's own tallies.
    unsafe { f() };
    true
}

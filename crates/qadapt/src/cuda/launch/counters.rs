//! What the virtual device (`crates/qadapt-vgpu`) counted while it emulated our
//! kernels: a stand-in for a profiler's counters where no GPU is at hand. The virtual driver
//! exports two functions of its own beside the CUDA API, found here by name in the driver library
//! cudarc loaded; NVIDIA's driver has neither, so every call says `None` there.

use std::ffi::{CString, c_char};

/// Per-kernel counts of the instructions the emulator executes and of the memory traffic it sees
/// (every load and store of kernel code, grouped into warp-level requests), summed over launches:
/// the `QvCounters` struct of `kernels/emu/vgpu_abi.h`, whose field comments are its documentation
/// (bindgen's output, committed in qadapt-kernels).
pub type EmulatorCounters = qadapt_kernels::vgpu_ffi::QvCounters;

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
    // spells; EmulatorCounters is that QvCounters.
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

/// Device memory the virtual device holds: the requested bytes of its live cuMemAlloc,
/// cuMemAllocAsync and cuMemAllocManaged allocations (pinned host memory not counted), now and at
/// their high-water mark since the driver loaded or the last
/// [`CudaDevice::reset_emulator_memory_peak`](crate::cuda::CudaDevice::reset_emulator_memory_peak).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmulatorMemory {
    /// Bytes live now.
    pub live: u64,
    /// The most bytes live at once.
    pub peak: u64,
}

/// Whose allocations [`EmulatorMemory`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryScope {
    /// Every allocation of the process.
    Process,
    /// Those made by the calling host thread (freed by any thread): a test's own, while other
    /// tests run in parallel threads on the same device.
    Thread,
}

type MemoryFn = unsafe extern "C" fn(i32, *mut u64, *mut u64);

/// What the virtual device's allocation table says, or `None` when the driver is not the virtual
/// device.
pub(crate) fn emulator_memory(scope: MemoryScope) -> Option<EmulatorMemory> {
    // SAFETY: as in emulator_counters, the library cudarc loaded.
    let lib = unsafe { cudarc::driver::sys::culib() };
    // SAFETY: when present, the virtual driver's
    // `void qadapt_vgpu_memory(int32_t thread_only, uint64_t* live, uint64_t* peak)`.
    let f = unsafe { lib.get::<MemoryFn>(b"qadapt_vgpu_memory\0") }.ok()?;
    let (mut live, mut peak) = (0u64, 0u64);
    let thread_only = i32::from(scope == MemoryScope::Thread);
    // SAFETY: two valid, exclusively borrowed u64 out-parameters, which it only writes.
    unsafe { f(thread_only, &mut live, &mut peak) };
    Some(EmulatorMemory { live, peak })
}

/// Restarts the virtual device's high-water mark from the bytes live now; `false` when the
/// driver is not the virtual device.
pub(crate) fn reset_emulator_memory_peak() -> bool {
    // SAFETY: as in emulator_counters, the library cudarc loaded.
    let lib = unsafe { cudarc::driver::sys::culib() };
    // SAFETY: when present, the virtual driver's `void qadapt_vgpu_reset_memory_peak(void)`.
    let Ok(f) = (unsafe { lib.get::<ResetFn>(b"qadapt_vgpu_reset_memory_peak\0") }) else {
        return false;
    };
    // SAFETY: takes no arguments and only resets the driver's own tally.
    unsafe { f() };
    true
}

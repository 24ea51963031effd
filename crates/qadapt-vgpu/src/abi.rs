//! The kernel emulator behind `kernels/emu/vgpu_abi.h`: the structs of that header, and safe
//! wrappers over its five functions.
//!
//! Which emulator is linked is decided by build.rs:
//! - `cfg(qv_runtime)`: `kernels/emu/vgpu_runtime.cpp` and `kernels/*.cu`, compiled as host C++
//!   (feature `emu`), so every kernel of the project runs;
//! - neither: no kernel is registered; modules load but `cuModuleGetFunction` finds nothing.

use std::ffi::{CStr, c_char};

/// `QvDim3`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QvDim3 {
    pub(crate) x: u32,
    pub(crate) y: u32,
    pub(crate) z: u32,
}

/// `QvCounters`: what a launch did, counted by the emulator (added to, never cleared).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QvCounters {
    /// mma.sync instructions (per warp).
    pub mma: u64,
    /// ldmatrix instructions (per warp).
    pub ldmatrix: u64,
    /// Shared-memory wavefronts those ldmatrix needed.
    pub ldmatrix_wavefronts: u64,
    /// cp.async instructions (per thread).
    pub cp_async: u64,
    /// Bytes requested by them.
    pub cp_async_bytes: u64,
    /// Warp shuffles (per warp).
    pub shfl: u64,
    /// `__syncthreads` completions (per CTA).
    pub bar_sync: u64,
    /// CTAs run.
    pub ctas: u64,
    /// Bytes loaded from global memory (plain loads and cp.async sources, per thread, summed).
    pub global_ld_bytes: u64,
    /// Bytes stored to global memory (atomics included).
    pub global_st_bytes: u64,
    /// Warp-level global load instructions.
    pub global_ld_requests: u64,
    /// Warp-level global store instructions.
    pub global_st_requests: u64,
    /// Distinct 32-byte sectors per global load request, summed (4 per request when 32 lanes read consecutive words).
    pub global_ld_sectors: u64,
    /// Distinct 32-byte sectors per global store request, summed.
    pub global_st_sectors: u64,
    /// Bytes loaded from shared memory (ldmatrix included).
    pub shared_ld_bytes: u64,
    /// Bytes stored to shared memory (cp.async destinations included).
    pub shared_st_bytes: u64,
    /// Warp-level shared-memory instructions (ldmatrix included).
    pub shared_requests: u64,
    /// Shared-memory wavefronts those took, bank conflicts included.
    pub shared_wavefronts: u64,
    /// Shared-memory wavefronts without bank conflicts (one per phase or 8x8 matrix).
    pub shared_ideal_wavefronts: u64,
    /// Bytes of the threads' own stacks (host frames: no GPU meaning).
    pub local_bytes: u64,
    /// Bytes read from the kernel's argument struct.
    pub param_bytes: u64,
    /// Accesses counted in bytes but not grouped into requests (tables full).
    pub ungrouped_accesses: u64,
}

impl QvCounters {
    pub(crate) fn add(&mut self, o: &QvCounters) {
        self.mma += o.mma;
        self.ldmatrix += o.ldmatrix;
        self.ldmatrix_wavefronts += o.ldmatrix_wavefronts;
        self.cp_async += o.cp_async;
        self.cp_async_bytes += o.cp_async_bytes;
        self.shfl += o.shfl;
        self.bar_sync += o.bar_sync;
        self.ctas += o.ctas;
        self.global_ld_bytes += o.global_ld_bytes;
        self.global_st_bytes += o.global_st_bytes;
        self.global_ld_requests += o.global_ld_requests;
        self.global_st_requests += o.global_st_requests;
        self.global_ld_sectors += o.global_ld_sectors;
        self.global_st_sectors += o.global_st_sectors;
        self.shared_ld_bytes += o.shared_ld_bytes;
        self.shared_st_bytes += o.shared_st_bytes;
        self.shared_requests += o.shared_requests;
        self.shared_wavefronts += o.shared_wavefronts;
        self.shared_ideal_wavefronts += o.shared_ideal_wavefronts;
        self.local_bytes += o.local_bytes;
        self.param_bytes += o.param_bytes;
        self.ungrouped_accesses += o.ungrouped_accesses;
    }
}

pub(crate) const QV_OK: i32 = 0;
pub(crate) const QV_UNKNOWN_KERNEL: i32 = 1;
pub(crate) const QV_BAD_ARGS: i32 = 2;
pub(crate) const QV_BARRIER_DEADLOCK: i32 = 3;
pub(crate) const QV_MEMORY_FAULT: i32 = 4;
pub(crate) const QV_PTX_ERROR: i32 = 5;
pub(crate) const QV_TRAP: i32 = 6;

/// `QvStatus`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct QvStatus {
    pub(crate) code: i32,
    pub(crate) fault_addr: u64,
    pub(crate) cta: QvDim3,
    pub(crate) thread: QvDim3,
    pub(crate) message: [c_char; 512],
}

impl Default for QvStatus {
    fn default() -> Self {
        QvStatus {
            code: QV_OK,
            fault_addr: 0,
            cta: QvDim3::default(),
            thread: QvDim3::default(),
            message: [0; 512],
        }
    }
}

impl QvStatus {
    /// The emulator's message (empty if it wrote none).
    pub(crate) fn message(&self) -> String {
        let bytes: Vec<u8> = self
            .message
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(qv_runtime)]
mod ffi {
    use super::{QvCounters, QvDim3, QvStatus};
    use std::ffi::c_char;

    unsafe extern "C" {
        pub(super) fn qv_kernel_count() -> usize;
        pub(super) fn qv_kernel_name(i: usize) -> *const c_char;
        pub(super) fn qv_kernel_args_size(name: *const c_char) -> usize;
        pub(super) fn qv_launch(
            name: *const c_char,
            args: *const std::ffi::c_void,
            args_size: usize,
            grid: QvDim3,
            block: QvDim3,
            dyn_smem: u32,
            counters: *mut QvCounters,
            status: *mut QvStatus,
        ) -> i32;
        pub(super) fn qv_set_workers(n: u32);
        pub(super) fn qv_mem_register(p: *const std::ffi::c_void, n: usize);
        pub(super) fn qv_mem_unregister(p: *const std::ffi::c_void);
    }
}

/// The names of every kernel the emulator can run.
pub(crate) fn kernel_names() -> Vec<String> {
    #[cfg(qv_runtime)]
    {
        // SAFETY: qv_kernel_count takes no argument and reads the emulator's static registry.
        let n = unsafe { ffi::qv_kernel_count() };
        (0..n)
            .filter_map(|i| {
                // SAFETY: i < qv_kernel_count(); the header promises a NUL-terminated name that
                // lives as long as the library (or NULL, handled below).
                let p = unsafe { ffi::qv_kernel_name(i) };
                if p.is_null() {
                    return None;
                }
                // SAFETY: non-null, NUL-terminated, static (see above).
                Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            })
            .collect()
    }
    #[cfg(not(qv_runtime))]
    {
        Vec::new()
    }
}

/// `sizeof` the argument struct of kernel `name`, 0 if no kernel has that name.
pub(crate) fn args_size(name: &CStr) -> usize {
    #[cfg(qv_runtime)]
    {
        // SAFETY: name is a valid NUL-terminated string for the duration of the call.
        unsafe { ffi::qv_kernel_args_size(name.as_ptr()) }
    }
    #[cfg(not(qv_runtime))]
    {
        let _ = name;
        0
    }
}

/// One launch, as `qv_launch` documents it. `args` holds exactly the kernel's argument struct.
pub(crate) fn launch(
    name: &CStr,
    args: &[u8],
    grid: QvDim3,
    block: QvDim3,
    dyn_smem: u32,
    counters: &mut QvCounters,
    status: &mut QvStatus,
) -> i32 {
    #[cfg(qv_runtime)]
    {
        // SAFETY: name is NUL-terminated; args points to args.len() readable bytes (a copy of
        // the kernel's parameter made by cuLaunchKernel); counters and status are valid for
        // writes. The device addresses inside args are the caller's responsibility, as on a GPU:
        // a bad one faults inside the emulator, which reports it in status.
        unsafe {
            ffi::qv_launch(
                name.as_ptr(),
                args.as_ptr().cast(),
                args.len(),
                grid,
                block,
                dyn_smem,
                counters,
                status,
            )
        }
    }
    #[cfg(not(qv_runtime))]
    {
        let _ = (name, args, grid, block, dyn_smem, counters);
        status.code = QV_UNKNOWN_KERNEL;
        QV_UNKNOWN_KERNEL
    }
}

/// Host threads that run CTAs in parallel.
pub(crate) fn set_workers(n: u32) {
    #[cfg(qv_runtime)]
    {
        // SAFETY: plain integer argument; the emulator documents it as thread-safe.
        unsafe { ffi::qv_set_workers(n) }
    }
    #[cfg(not(qv_runtime))]
    {
        let _ = n;
    }
}

/// Enters `[base, base + size)` in the emulator's allocation table: while it holds any range,
/// every global access of a kernel must fall inside one, to the exact byte.
pub(crate) fn mem_register(base: u64, size: usize) {
    #[cfg(qv_runtime)]
    {
        // SAFETY: the emulator only records the numbers (it never dereferences them here).
        unsafe { ffi::qv_mem_register(base as usize as *const std::ffi::c_void, size) }
    }
    #[cfg(not(qv_runtime))]
    {
        let _ = (base, size);
    }
}

/// Removes the range that starts at `base` from the emulator's allocation table.
pub(crate) fn mem_unregister(base: u64) {
    #[cfg(qv_runtime)]
    {
        // SAFETY: as in mem_register, a number the emulator looks up in its table.
        unsafe { ffi::qv_mem_unregister(base as usize as *const std::ffi::c_void) }
    }
    #[cfg(not(qv_runtime))]
    {
        let _ = base;
    }
}

/// Whether kernels can run in this build.
pub(crate) const HAS_RUNTIME: bool = cfg!(qv_runtime);

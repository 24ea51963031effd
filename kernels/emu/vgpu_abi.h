/*
 * vgpu_abi.h — the C ABI between the kernel emulator (kernels/emu, host C++) and the virtual CUDA
 * driver (crates/qadapt-vgpu, Rust). The driver owns device memory, streams, modules and cuBLAS;
 * the emulator owns kernels: it runs a named kernel of kernels/*.cu, compiled as host C++ with
 * -DQADAPT_EMU, over a grid of CTAs whose threads are fibers.
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint32_t x, y, z;
} QvDim3;

/* Counts of what a launch did, decided by the code and not by timing. Added to, never cleared,
 * by qv_launch. Warp-level instructions count once per warp; per-thread ones once per thread. */
typedef struct {
    uint64_t mma;                 /* mma.sync instructions (per warp) */
    uint64_t ldmatrix;            /* ldmatrix instructions (per warp) */
    uint64_t ldmatrix_wavefronts; /* shared-memory wavefronts those ldmatrix needed (>= 1 per 8x8 matrix) */
    uint64_t cp_async;            /* cp.async instructions (per thread) */
    uint64_t cp_async_bytes;      /* bytes requested by them (src-size, not cp-size) */
    uint64_t shfl;                /* warp shuffles (per warp) */
    uint64_t bar_sync;            /* __syncthreads completions (per CTA) */
    uint64_t ctas;                /* CTAs run */
    /* Memory traffic (vgpu_memcheck.inc): every plain load and store of kernel code, seen through
     * the compiler's instrumentation, plus the runtime's own cp.async (a global read of src-size
     * bytes, a shared write of cp-size bytes) and ldmatrix (shared reads) traffic. Accesses are
     * grouped into warp-level requests: lane l's k-th execution of one instruction since the warp
     * last converged (a full-warp collective, a barrier, the scheduler leaving the warp). */
    uint64_t global_ld_bytes;         /* bytes loaded from global memory (per thread, summed) */
    uint64_t global_st_bytes;         /* bytes stored to global memory (atomics included) */
    uint64_t global_ld_requests;      /* warp-level global load instructions */
    uint64_t global_st_requests;      /* warp-level global store instructions */
    uint64_t global_ld_sectors;       /* distinct 32-byte sectors per load request, summed */
    uint64_t global_st_sectors;       /* distinct 32-byte sectors per store request, summed */
    uint64_t shared_ld_bytes;         /* bytes loaded from shared memory (ldmatrix included) */
    uint64_t shared_st_bytes;         /* bytes stored to shared memory (cp.async included) */
    uint64_t shared_requests;         /* warp-level shared-memory instructions */
    uint64_t shared_wavefronts;       /* wavefronts they took, bank conflicts included */
    uint64_t shared_ideal_wavefronts; /* wavefronts without bank conflicts (one per phase) */
    uint64_t local_bytes;             /* bytes of the threads' own stacks (host frames: no GPU meaning) */
    uint64_t param_bytes;             /* bytes read from the kernel's argument struct */
    uint64_t ungrouped_accesses;      /* accesses counted in bytes but not grouped (tables full) */
} QvCounters;

enum {
    QV_OK = 0,
    QV_UNKNOWN_KERNEL = 1,   /* no kernel of that name is registered */
    QV_BAD_ARGS = 2,         /* args_size differs from sizeof(the kernel's argument struct) */
    QV_BARRIER_DEADLOCK = 3, /* a __syncthreads / warp-collective not reached by every thread */
    QV_MEMORY_FAULT = 4,     /* SIGSEGV/SIGBUS inside the kernel, or a global access outside
                                every registered allocation: fault_addr says where */
    QV_PTX_ERROR = 5,        /* an instruction used against its ISA rules: a misaligned address
                                (ldmatrix/cp.async, or a 2-16 byte load/store not aligned to its
                                size), lanes disagreeing on a .sync op, ldmatrix/cp.async outside
                                shared memory, ... */
    QV_TRAP = 6              /* the kernel called __trap() / assert failed */
};

typedef struct {
    int32_t code;          /* one of QV_* */
    uint64_t fault_addr;   /* QV_MEMORY_FAULT: the faulting address */
    QvDim3 cta;            /* the CTA where it happened (all codes but OK/UNKNOWN/BAD_ARGS) */
    QvDim3 thread;         /* the thread, where known */
    char message[512];     /* human-readable, names the kernel; NUL-terminated */
} QvStatus;

/* The kernels compiled into this library (every QADAPT_KERNEL of kernels/*.cu). */
size_t qv_kernel_count(void);
const char* qv_kernel_name(size_t i);
/* sizeof the kernel's argument struct, or 0 if no kernel has that name. */
size_t qv_kernel_args_size(const char* name);

/* Runs `name(*(const Args*)args)` over `grid` CTAs of `block` threads with `dyn_smem` bytes of
 * dynamic shared memory, and returns when every CTA has finished or the launch failed (status->code
 * != QV_OK; what a failed launch wrote to memory is unspecified, as on a GPU). Launch-limit checks
 * (threads per block, shared memory, registers) are the driver's job, before calling this.
 * `counters` may be NULL. Thread-safe: launches from several host threads may run concurrently. */
int32_t qv_launch(const char* name, const void* args, size_t args_size, QvDim3 grid, QvDim3 block,
                  uint32_t dyn_smem, QvCounters* counters, QvStatus* status);

/* The driver's allocation table. While it holds any range, every global access of a kernel
 * (plain loads and stores, atomics, cp.async sources; not the program's own static data) must lie
 * entirely inside one registered range [p, p + n) (n the requested size), else the launch fails with
 * QV_MEMORY_FAULT and fault_addr the first byte outside. Thread-safe; a launch sees the table as it
 * was when each of its CTAs started. */
void qv_mem_register(const void* p, size_t n);
void qv_mem_unregister(const void* p);

/* Host threads used to run CTAs in parallel (default: the number of CPUs). */
void qv_set_workers(uint32_t n);

#ifdef __cplusplus
}
#endif

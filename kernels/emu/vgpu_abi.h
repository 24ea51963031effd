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
} QvCounters;

enum {
    QV_OK = 0,
    QV_UNKNOWN_KERNEL = 1,   /* no kernel of that name is registered */
    QV_BAD_ARGS = 2,         /* args_size differs from sizeof(the kernel's argument struct) */
    QV_BARRIER_DEADLOCK = 3, /* a __syncthreads / warp-collective not reached by every thread */
    QV_MEMORY_FAULT = 4,     /* SIGSEGV/SIGBUS inside the kernel: fault_addr says where */
    QV_PTX_ERROR = 5,        /* an emulated instruction used against its ISA rules (misaligned
                                ldmatrix/cp.async address, lanes disagreeing on a .sync op, ...) */
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

/* Host threads used to run CTAs in parallel (default: the number of CPUs). */
void qv_set_workers(uint32_t n);

#ifdef __cplusplus
}
#endif

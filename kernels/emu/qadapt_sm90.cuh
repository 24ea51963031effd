/*
 * qadapt_sm90.cuh (emulated) — the kernel emulator's replacement for kernels/include/qadapt_sm90.cuh:
 * the same functions with the same signatures in qadapt::sm90, each executing its sm_90a
 * instruction as the PTX ISA specifies it (the semantics are written out in the real header).
 * Found before the real header because the emulated build puts -Ikernels/emu first. The
 * implementation is in vgpu_runtime.cpp ("sm_90a"); what the emulation adds over the ISA text:
 *
 *   mbarrier     The uint64_t holds the emulator's reference to its state (phase, pending
 *                arrivals, count, tx-count); only mbarrier.init writes it. try_wait blocks the
 *                thread (the scheduler runs others) until the phase of that parity completes; a
 *                CTA where nothing can run any more -> QV_BARRIER_DEADLOCK naming the mbarrier
 *                waits (e.g. a phase whose tx-count never reaches 0). An arrive on a barrier not
 *                initialized in this CTA, an arrival beyond the count, init count outside
 *                1..2^20-1, tx-count above 2^20-1 or below 0 -> QV_PTX_ERROR.
 *   TMA          cp.async.bulk.tensor.2d reads the box at issue (through the memory checker: a read
 *                outside every allocation -> QV_MEMORY_FAULT), zero-fills elements outside the
 *                tensor, applies the 128-byte swizzle, fills the destination with 0xff bytes and
 *                keeps the data with the mbarrier. The data lands, and the tx-count drops by the
 *                box's bytes, only once the barrier's phase has all its arrivals and a thread
 *                observes the barrier (waits on it, or arrives again): a read before the wait sees
 *                NaN. Map not encoded by cuTensorMapEncodeTiled, destination misaligned (128, or
 *                1024 with the swizzle) or outside shared memory -> QV_PTX_ERROR.
 *   wgmma        A warpgroup collective: the 128 threads of warps 4g..4g+3 must all arrive at the
 *                same wgmma (same N, descriptor and scale-d), else QV_PTX_ERROR (lanes or warps
 *                disagreeing) or QV_BARRIER_DEADLOCK (a thread exited or waits elsewhere). At issue
 *                the A registers are captured and d is filled with NaN; at the wgmma.wait_group
 *                that retires the group (commit closes a group; wait<N> retires all but the N most
 *                recent committed groups; uncommitted wgmma are never retired) the product is
 *                computed, B read from shared memory THEN (the first thread of the warpgroup to
 *                retire it computes it for all), and written into that thread's d. So reading d
 *                before the wait reads NaN, and overwriting the B stage before the wait corrupts
 *                the result. Products are exact in f32, each D element ((c + p0) + p1) + ... + p15,
 *                k ascending, round to nearest even (as the emulated mma.sync). Counted as N/2
 *                m16n8k16 in the mma counter, B's 32 N bytes as one shared request.
 *   descriptor   wgmma_desc_sw128 keeps the real fields (LBO 1, SBO 1024 >> 4, layout 1 = 128-byte
 *                swizzle) and the address bits 4-17 in bits 0-13; bits 52-61 (reserved in the ISA)
 *                name the 256 KiB window holding the rest of the host address. B[k][n] is read at
 *                start + (n / 8) * SBO + (n % 8) * 128 + 2 k with address bits 4-6 ^= bits 7-9, so
 *                the descriptor of tile + 32 s is the k-slice s, as on hardware.
 *   fences       wgmma_fence, fence_mbar_init, fence_regs: no-ops (the emulator's memory is
 *                sequentially consistent within a CTA; the register rules they serve are enforced
 *                by the NaN fill of d instead). reg_alloc / reg_dealloc (setmaxnreg): no-ops, the
 *                count checked at compile time (24..256, a multiple of 8).
 */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "qadapt.h"
#include "qadapt_mma.cuh"

/* The emulator executes the sm_90a instructions: kernels compile their sm_90a bodies. */
#define QADAPT_SM90A 1

namespace qadapt {
namespace sm90 {

/* ---- mbarrier ---------------------------------------------------------------------------------- */

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) { ::qv::mbar_init(bar, count); }
__device__ __forceinline__ void fence_mbar_init() {}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) { ::qv::mbar_arrive(bar, 0, false); }
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) { ::qv::mbar_arrive(bar, bytes, true); }
/* Returns once the phase of parity `parity` has completed. */
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) { ::qv::mbar_wait(bar, parity); }

/* ---- TMA --------------------------------------------------------------------------------------- */

/* The box of `map` at (c0, c1) into dst, counted on bar's tx-count. */
__device__ __forceinline__ void tma_load_2d(void* dst, const QadaptTensorMap* map, uint64_t* bar, int32_t c0, int32_t c1) {
    ::qv::tma_load_2d(dst, map, bar, c0, c1);
}

/* ---- wgmma ------------------------------------------------------------------------------------- */

__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* tile) { return ::qv::wgmma_desc_sw128(tile); }
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() { ::qv::wgmma_commit(); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    ::qv::wgmma_wait(N);
}
template <int NREG>
__device__ __forceinline__ void fence_regs(float (&d)[NREG]) {}

template <int R>
__device__ __forceinline__ void reg_alloc() {
    static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg takes 24..256, a multiple of 8");
}
template <int R>
__device__ __forceinline__ void reg_dealloc() {
    static_assert(R >= 24 && R <= 256 && R % 8 == 0, "setmaxnreg takes 24..256, a multiple of 8");
}

/* D[64 x N] (+)= A[64 x 16] (registers) * B[16 x N] (descriptor), N = 64, 128 or 256. */
template <int N>
__device__ __forceinline__ void wgmma_bf16_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
    static_assert(N == 64 || N == 128 || N == 256, "wgmma_bf16_rs: N = 64, 128 or 256");
    ::qv::wgmma_bf16(d, a, desc_b, accumulate, N);
}

}  // namespace sm90
}  // namespace qadapt

/*
 * qadapt_mma.cuh (emulated) — the kernel emulator's replacement for kernels/include/qadapt_mma.cuh:
 * the same functions with the same signatures, each executing its PTX instruction as the ISA
 * specifies it (the semantics are written out in the real header). Found before the real header
 * because the emulated build puts -Ikernels/emu first. What the emulation adds over the ISA text:
 *
 *   cp.async     The source is read and the destination filled with 0xff bytes when the
 *                instruction issues; the data lands only when a cp.async.wait_group / wait_all
 *                of the issuing thread retires its group, so a read of the destination before
 *                that sees the poison (NaN for f32/bf16/f16). Misaligned dst or src -> QV_PTX_ERROR.
 *   ldmatrix     All 32 lanes must arrive (a missing lane -> QV_BARRIER_DEADLOCK); the row
 *                addresses the instruction reads must be 16-byte aligned (-> QV_PTX_ERROR).
 *                Counts the shared-memory wavefronts (vgpu_runtime.cpp, count_wavefronts).
 *   mma          All 32 lanes must arrive. Products of two bf16 or two f16 values are exact in f32
 *                (at most 22 significant bits); each D element is accumulated in f32 as
 *                ((c + p0) + p1) + ... + p15 with p_k = A[i][k] * B[k][j], k ascending, every add
 *                rounded to nearest even. The tensor cores add with their own internal precision
 *                and order, so the last bits of a GPU's result can differ.
 */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace qadapt {

/* No shared window on the host: the address itself (only the real header's PTX needs the window). */
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)(uintptr_t)p; }

__device__ __forceinline__ void cp_async16(void* dst, const void* src) { ::qv::cp_async(dst, src, 16, 16, true); }
__device__ __forceinline__ void cp_async16(void* dst, const void* src, uint32_t src_size) {
    ::qv::cp_async(dst, src, 16, src_size, true);
}
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    ::qv::cp_async(dst, src, BYTES, BYTES, false);
}
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src, uint32_t src_size) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    ::qv::cp_async(dst, src, BYTES, src_size, false);
}
__device__ __forceinline__ void cp_async_commit() { ::qv::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "wait_group takes a non-negative constant");
    ::qv::cp_async_wait(N);
}
__device__ __forceinline__ void cp_async_wait_all() { ::qv::cp_async_wait_all(); }

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* p) { ::qv::ldmatrix(r, 1, false, p); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) { ::qv::ldmatrix(r, 2, false, p); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ::qv::ldmatrix(r, 4, false, p); }
__device__ __forceinline__ void ldmatrix_x1_t(uint32_t (&r)[1], const void* p) { ::qv::ldmatrix(r, 1, true, p); }
__device__ __forceinline__ void ldmatrix_x2_t(uint32_t (&r)[2], const void* p) { ::qv::ldmatrix(r, 2, true, p); }
__device__ __forceinline__ void ldmatrix_x4_t(uint32_t (&r)[4], const void* p) { ::qv::ldmatrix(r, 4, true, p); }

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ::qv::mma_16816(d, a, b0, b1, d, ::qv::MmaType::BF16);
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         const float (&c)[4]) {
    ::qv::mma_16816(d, a, b0, b1, c, ::qv::MmaType::BF16);
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ::qv::mma_16816(d, a, b0, b1, d, ::qv::MmaType::F16);
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                        const float (&c)[4]) {
    ::qv::mma_16816(d, a, b0, b1, c, ::qv::MmaType::F16);
}

/* The launch's dynamic shared memory: a per-CTA buffer, 1024-byte aligned, filled with 0xff bytes
 * when the CTA starts. */
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
    return static_cast<T*>(::qv::dynamic_smem());
}
__device__ __forceinline__ uint32_t dynamic_smem_size() { return ::qv::dynamic_smem_size(); }

}  // namespace qadapt

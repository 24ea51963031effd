/*
 * qadapt_mma.cuh — the tensor-core toolkit of qadapt's kernels: asynchronous global -> shared
 * copies (cp.async), warp-wide matrix loads from shared memory (ldmatrix) and the warp-level
 * matrix multiply-accumulate (mma.sync m16n8k16), each a thin inline-PTX wrapper. Needs sm_80 or
 * newer. Kernels include this header instead of writing PTX; the kernel emulator
 * (kernels/emu/qadapt_mma.cuh, found first on the emulated build's include path) replaces exactly
 * this header with functions of the same signatures that execute each instruction as the PTX ISA
 * specifies it.
 *
 * Semantics (PTX ISA, "Data Movement and Conversion Instructions" and "Warp-level Matrix
 * Multiply-Accumulate Instructions"):
 *
 * cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}
 *     Per thread, not collective. Starts copying cp-size bytes (4, 8 or 16; .cg only 16) from global
 *     src to shared dst and returns at once: dst holds undefined data until the copy completes.
 *     With src-size < cp-size only src-size bytes are read and the rest of dst is zero-filled
 *     (src-size 0: dst becomes zeros, nothing is read). dst and src must be aligned to cp-size.
 *     .ca caches in L1 and L2, .cg in L2 only: a hint, not a semantic difference.
 * cp.async.commit_group
 *     Closes the executing thread's current group of cp.async (an empty group is allowed and
 *     trivially complete). Groups are per thread.
 * cp.async.wait_group N
 *     Waits until at most the N most recent committed groups of the executing thread are pending;
 *     every older committed group is complete and its writes are visible to this thread. Copies not
 *     yet committed are not waited for. Other threads see the data only after a barrier.
 * cp.async.wait_all
 *     commit_group followed by wait_group 0.
 *
 * ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16 {r0..}, [p]
 *     Warp-collective: all 32 lanes execute it together. Loads 1, 2 or 4 matrices of 8 x 8 16-bit
 *     elements; every row is 16 contiguous, 16-byte aligned bytes of shared memory whose address
 *     one lane supplies: lanes 0-7 the rows of matrix 0, 8-15 of matrix 1, 16-23 of matrix 2,
 *     24-31 of matrix 3 (x1 reads lanes 0-7 only, x2 lanes 0-15). Register r_i of lane l receives
 *     matrix i's elements (row l/4, columns 2(l%4) and 2(l%4)+1), the lower column in the low
 *     half; with .trans it receives (rows 2(l%4) and 2(l%4)+1, column l/4) instead, i.e. the
 *     fragment of the transposed matrix.
 *
 * mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 {d0..d3}, {a0..a3}, {b0,b1}, {c0..c3}
 *     Warp-collective: D[16x8] = A[16x16] * B[16x8] + C, f32 accumulate. With g = lane / 4 and
 *     t = lane % 4, each 32-bit A/B register holds two 16-bit elements, the lower index in the low
 *     half:
 *       a0: A[g][2t, 2t+1]     a1: A[g+8][2t, 2t+1]     a2: A[g][2t+8, 2t+9]   a3: A[g+8][2t+8, 2t+9]
 *       b0: B[2t, 2t+1][g]     b1: B[2t+8, 2t+9][g]
 *       c0, c1: C[g][2t, 2t+1] c2, c3: C[g+8][2t, 2t+1]  (D likewise)
 *     ("row.col": A is read by rows, B by columns, which is what ldmatrix of a row-major A and of a
 *     [n][k] B produces.)
 */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace qadapt {

/* The 32-bit shared-window address of a generic pointer into shared memory. */
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* ---- cp.async ---------------------------------------------------------------------------------- */

/* cp.async.cg, 16 bytes (L2 only). */
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src));
}
/* cp.async.cg, 16 bytes of which the first src_size (0..16) come from src, the rest zeros. */
__device__ __forceinline__ void cp_async16(void* dst, const void* src, uint32_t src_size) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(src_size));
}
/* cp.async.ca, BYTES = 4, 8 or 16 (L1 and L2). */
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(BYTES));
}
/* cp.async.ca with zero fill: the first src_size (0..BYTES) bytes from src, the rest zeros. */
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src, uint32_t src_size) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(BYTES),
                 "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
/* Waits until at most N of this thread's committed groups are still pending. */
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

/* ---- ldmatrix ---------------------------------------------------------------------------------- */

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x1_t(uint32_t (&r)[1], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x2_t(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_t(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

/* ---- mma.sync m16n8k16, f32 accumulate ----------------------------------------------------------- */

/* d = A * B + d, bf16 inputs. */
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* d = A * B + c, bf16 inputs. */
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
/* d = A * B + d, f16 inputs. */
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* d = A * B + c, f16 inputs. */
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                        const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

/* ---- dynamic shared memory --------------------------------------------------------------------- */

/* The CTA's dynamic shared memory (the launch's sharedMemBytes), 16-byte aligned. Use this rather
 * than declaring `extern __shared__` arrays, which host C++ cannot express (the emulator's version
 * returns the launch's buffer). */
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
    extern __shared__ __align__(16) unsigned char qadapt_dynamic_smem[];
    return reinterpret_cast<T*>(qadapt_dynamic_smem);
}
/* Its size in bytes. */
__device__ __forceinline__ uint32_t dynamic_smem_size() {
    uint32_t n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

}  // namespace qadapt

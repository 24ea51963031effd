/*
 * qadapt_sm90.cuh — the Hopper toolkit of qadapt's sm_90a kernels: mbarriers, TMA tensor loads and
 * warpgroup MMA (wgmma), each a thin inline-PTX wrapper. Compiles to those instructions only for
 * sm_90a (`-gencode arch=compute_90a,code=sm_90a`, where __CUDA_ARCH_FEAT_SM90_ALL is defined);
 * kernels guard their bodies with QADAPT_SM90A. The kernel emulator (kernels/emu/qadapt_sm90.cuh,
 * found first on the emulated build's include path) replaces exactly this header with functions of
 * the same signatures that execute each instruction as the PTX ISA specifies it.
 *
 * Semantics (PTX ISA 8.x, "Parallel Synchronization and Communication Instructions: mbarrier",
 * "Data Movement: cp.async.bulk.tensor", "Asynchronous Warpgroup Level Matrix Instructions"):
 *
 * mbarrier (an 8-byte aligned uint64_t in shared memory)
 *     init(count): phase 0 in progress, pending arrivals = count, pending tx-count = 0.
 *     arrive: pending arrivals -= 1. arrive.expect_tx(bytes): pending tx-count += bytes, then an
 *     arrive. A TMA load that names the barrier decrements its tx-count by the bytes it wrote when
 *     they land. The current phase completes when pending arrivals and tx-count are both 0: its
 *     writes (and the TMA data it counted) become visible to threads that observe the completion,
 *     the phase number increments and arrivals reset to count.
 *     try_wait.parity(P): true once the phase whose parity is P has completed, i.e. while the
 *     current (incomplete) phase's parity differs from P. mbar_wait loops on it.
 *     fence.mbarrier_init: makes the init visible to the async proxy (TMA's complete_tx) and,
 *     with a __syncthreads after it, to the other threads.
 *
 * cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [dst], [map, {c0, c1}], [bar]
 *     Issued by one thread. Copies the box of the tensor map (box[0] x box[1] elements) whose first
 *     element is at coordinates (c0 innermost, c1) from global to shared dst (128-byte aligned;
 *     1024-byte aligned with the 128-byte swizzle), row after row, box[0] * elemsize bytes a row.
 *     Elements outside the tensor (coordinates >= dims, or negative) are written as zeros and the
 *     whole box still counts toward complete_tx. With CU_TENSOR_MAP_SWIZZLE_128B the 16-byte chunk
 *     j of box row r lands at chunk j ^ (r % 8) of that row (rows are then exactly 128 bytes).
 *     The map must be in param, constant or global memory: kernels take it inside their
 *     `const __grid_constant__` argument struct (QadaptTensorMap in qadapt.h, encoded on the host by
 *     cuTensorMapEncodeTiled).
 *
 * wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 d, {a0..a3}, desc_b, scale-d, 1, 1, 0
 *     Warpgroup-collective (the 128 threads of warps 4g..4g+3, all of them): D[64xN] = A[64x16] *
 *     B[16xN] + (scale-d ? D : 0), f32 accumulate. A comes from registers: warp w of the group holds
 *     rows 16w..16w+15 in mma.sync's A-fragment layout (with g = lane / 4, t = lane % 4:
 *     a0 = A[16w+g][2t, 2t+1], a1 = A[16w+g+8][2t, 2t+1], a2 = A[16w+g][2t+8, 2t+9],
 *     a3 = A[16w+g+8][2t+8, 2t+9], the lower column in the low half). B comes from shared memory
 *     through a matrix descriptor, "K-major" (imm-trans-b = 0): element B[k][n] is the k-th bf16 of
 *     row n. D: d[4i + 0, 1] = D[16w+g][8i + 2t, +1], d[4i + 2, 3] = D[16w+g+8][8i + 2t, +1],
 *     i = 0 .. N/8 - 1.
 *     Asynchronous: it only starts. Until a wgmma.wait_group retires its group, the thread must not
 *     touch d or a, and nobody may write the shared memory it reads.
 * wgmma.fence.sync.aligned
 *     Orders the thread's earlier register writes (of d and a) before the next wgmma reads them:
 *     required before the first wgmma of a sequence and after d or a were written otherwise.
 * wgmma.commit_group.sync.aligned / wgmma.wait_group.sync.aligned N
 *     Closes the thread's group of issued wgmma; waits until at most N groups are pending, the
 *     older ones complete (their d written, their operands released).
 *
 * The matrix descriptor of wgmma_desc_sw128 (64 bits): start address >> 4 in bits 0-13, leading
 * byte offset >> 4 in 16-29 (unused for a swizzled K-major operand; 1), stride byte offset >> 4 in
 * 32-45 (1024: eight 128-byte rows), base offset 0 in 49-51, layout in 62-63 (1 = 128-byte
 * swizzle). It describes a K-major tile whose row n holds 64 bf16 of K in 128 bytes, rows n and
 * n+8 1024 bytes apart, the tile 1024-byte aligned, chunks swizzled as TMA writes them; the
 * hardware applies the swizzle to the computed address (bits 4-6 ^= bits 7-9), so the descriptor
 * of the k-slice 16s..16s+15 is the one of the tile's address plus 32 s bytes.
 */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "qadapt.h"
#include "qadapt_mma.cuh"

/* Whether this compilation pass emits sm_90a code (wgmma, setmaxnreg): kernels that use this
 * header compile their body only under it and trap otherwise (never launched: the host picks
 * them on compute capability 9.0 devices only, from the sm_90a-only module). */
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QADAPT_SM90A 1
#else
#define QADAPT_SM90A 0
#endif

namespace qadapt {
namespace sm90 {

#if QADAPT_SM90A

/* ---- mbarrier ---------------------------------------------------------------------------------- */

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
                 "r"(bytes)
                 : "memory");
}
/* Returns once the phase of parity `parity` has completed. */
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
        "r"(parity)
        : "memory");
}

/* ---- TMA --------------------------------------------------------------------------------------- */

/* The box of `map` at (c0, c1) into dst, counted on bar's tx-count. */
__device__ __forceinline__ void tma_load_2d(void* dst, const QadaptTensorMap* map, uint64_t* bar, int32_t c0,
                                            int32_t c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(smem_u32(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(smem_u32(bar))
        : "memory");
}

/* ---- wgmma ------------------------------------------------------------------------------------- */

__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* tile) {
    const uint64_t addr = smem_u32(tile);
    return ((addr & 0x3ffff) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* The accumulator registers stay live across the asynchronous MMA: tell the compiler they may be
 * written until the wait (CUTLASS's warpgroup_fence_operand). */
template <int NREG>
__device__ __forceinline__ void fence_regs(float (&d)[NREG]) {
#pragma unroll
    for (int i = 0; i < NREG; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

/* setmaxnreg: warpgroup-wide register reallocation (producer warps give registers back, consumer
 * warps take them). */
template <int R>
__device__ __forceinline__ void reg_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void reg_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

/* D[64 x N] (+)= A[64 x 16] (registers) * B[16 x N] (descriptor), N = 64, 128 or 256. */
template <int N>
__device__ __forceinline__ void wgmma_bf16_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                              bool accumulate);
template <>
__device__ __forceinline__ void wgmma_bf16_rs<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                  bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"((uint32_t)accumulate));
}
template <>
__device__ __forceinline__ void wgmma_bf16_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                  bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"((uint32_t)accumulate));
}
template <>
__device__ __forceinline__ void wgmma_bf16_rs<256>(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b,
                                                  bool accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"((uint32_t)accumulate));
}

#endif  // QADAPT_SM90A

}  // namespace sm90
}  // namespace qadapt

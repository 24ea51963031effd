/*
 * model_common.cuh — what the model-op kernels share (rmsnorm.cu, swiglu.cu, dropout.cu, rope.cu,
 * embedding.cu, cross_entropy.cu, attention.cu, flash_attention.cu: the ops of a Llama-family
 * transformer, forward and backward; flash_attention.cu runs 128 threads per CTA, see its header). Each kernel mirrors the CPU reference of the same name in crates/qadapt/src/ops/
 * (same math, same argument order); the exact formulas are written next to each argument struct
 * in qadapt.h.
 *
 * Types: activations and their gradients are bf16 in memory; every kernel computes in f32 and
 * rounds once, to nearest even, when it stores bf16. The per-row rstd of RMSNorm, the per-row
 * loss, and the parameter gradients (dw of RMSNorm, dtable of the embedding) are f32. The f32 math
 * is left to the compiler (it may contract a*b+c into an FMA; expf/logf/sqrtf are the accurate
 * library versions, never the fast intrinsics), so results agree with the CPU reference within
 * the tolerances stated in crates/qadapt/tests/ops/model_ops_cuda.rs — except where bit-equality is
 * claimed and the rounding is written out: the mask blend (__fmul_rn, __fadd_rn: the f32
 * reference's two products and one sum), the embedding forward (a copy) and the embedding
 * backward (one __fadd_rn per token, in the CPU's order).
 *
 * Layout: row-major, token-major activations [rows = batch * seq, cols] (a [B, T, H, D] tensor is
 * a [B*T, H*D] matrix), exactly as the CPU references.
 *
 * Tiling: every kernel runs QADAPT_MODEL_THREADS (256) threads per CTA and grid-strides over its
 * work items, so any grid from the plan (crates/qadapt/src/plan.rs) covers any shape; each file
 * says how its kernels split the work.
 * With QADAPT_MODEL_VEC the host guarantees 16-byte alignment and a row length divisible by 8;
 * without it every kernel takes its element-by-element path.
 *
 * Overwrite vs accumulate: outputs are overwritten (y, rstd, h, dgate, dup, the mask blend's out,
 * the rotated x, the embedding's out, loss, dlogits, the attention's out, lse, dq, dk, dv, delta),
 * dx of RMSNorm is overwritten or accumulated as `accumulate` says, and parameter gradients (dw,
 * dtable) are always accumulated, as the CPU references do.
 */
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "qadapt.h"

/* Anonymous: each kernel file gets its own copy, with no linkage between files. */
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = QADAPT_MODEL_THREADS / 32;

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }

/* 8 bf16 in a 16-byte word -> 8 floats (exact). Element 2j is the low half of word j. */
__device__ __forceinline__ void unpack8(const uint4 u, float (&f)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

__device__ __forceinline__ uint4 load8(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
/* __stwb (the default write-back store) keeps the 16-byte store whole; a plain assignment was
 * split into four 32-bit stores by the front end in some kernels. */
__device__ __forceinline__ void store8(bf16* p, const uint4 v) {
    __stwb(reinterpret_cast<uint4*>(p), v);
}

__device__ __forceinline__ uint64_t global_warp() {
    return (uint64_t)blockIdx.x * kWarps + threadIdx.x / 32u;
}
__device__ __forceinline__ uint64_t warp_count() { return (uint64_t)gridDim.x * kWarps; }

}  // namespace

/*
 * nf4_codec.cuh — NF4 code table and the per-element encode/decode shared by every kernel that
 * reads or writes NF4 (kernels/nf4.cu, the fused LoRA matmuls).
 *
 * Encoding (bit-exact with bitsandbytes 0.50's CPU path): a full block is scaled by
 * the f32 reciprocal of its absmax, s = x * (1/absmax), a partial last block by a division, and the
 * code is the number of bounds (level[i] + level[i+1]) / 2 (f32) below s, as torch.bucketize
 * counts: a value exactly on a bound takes the lower code, NaN (compares false) lands on 15.
 *
 * Decoding: code[q] * scale in f32 with one rounding; the caller converts to its output type.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace qadapt {

/* The 16 NF4 levels, index = 4-bit code. These exact f32 values are what bitsandbytes stores in
 * `quant_map`. In constant memory: indexed by compile-time constants they become immediates of the
 * instruction, indexed at run time a uniform constant-bank load. */
static __constant__ float kNf4Levels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

__device__ __forceinline__ float nf4_level(int i) { return kNf4Levels[i]; }

/* NF4 code of an already-scaled value (see the header comment for the rule). */
__device__ __forceinline__ uint32_t nf4_encode_scaled(float s) {
    uint32_t c = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) {
        const float b = __fmul_rn(__fadd_rn(nf4_level(i), nf4_level(i + 1)), 0.5f);
        c += (s <= b) ? 0u : 1u;
    }
    return c;
}

/* The smallest divisor of a block (bitsandbytes 0.50's absmax.clamp(min=1e-38), an f32 subnormal). */
#define QADAPT_NF4_MIN_ABSMAX 1e-38f

/* torch.max of |x|: the canonical NaN if either is NaN, else the larger (cpu.rs absmax_step). */
__device__ __forceinline__ float absmax_step(float m, float v) {
    return (m != m || v != v) ? __int_as_float(0x7fc00000) : fmaxf(m, fabsf(v));
}

/* Value rounded to the precision of T and back: the scaled values of a partial last block of a
 * 16-bit tensor are rounded to T before the nearest-code search, as bitsandbytes' CPU path does
 * (its `A_rem * (1 / absmax[-1])` multiplies by a 0-dim f32 tensor and keeps T). */
template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ float round_to<__half>(float v) {
    return __half2float(__float2half_rn(v));
}

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
    return __float2half_rn(v);
}

/* Scale of NF4 block `b`: plain f32 absmax, or decoded from double quantization as
 * map[code] * nested + offset with two separate roundings (no FMA), as bitsandbytes computes it. */
__device__ __forceinline__ float nf4_block_scale(const float* __restrict__ absmax,
                                                 const uint8_t* __restrict__ absmax_codes,
                                                 const float* __restrict__ nested_absmax,
                                                 const float* __restrict__ dynamic_map,
                                                 float offset, uint64_t b) {
    if (absmax_codes == nullptr) return __ldg(absmax + b);
    const float m = __ldg(dynamic_map + __ldg(absmax_codes + b));
    return __fadd_rn(__fmul_rn(m, __ldg(nested_absmax + b / 256)), offset);
}

}  // namespace qadapt

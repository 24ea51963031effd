/*
 * nf4_codec.cuh — NF4 code table and the per-element encode/decode shared by every kernel that
 * reads or writes NF4 (kernels/nf4.cu, the fused LoRA matmuls).
 *
 * Encoding (bit-exact with bitsandbytes, DESIGN.md §3): the block is scaled by the f32 reciprocal
 * of its absmax, s = x * (1/absmax), and the code is the index of the nearest table entry measured
 * as |s - code[i]| in f32, ties to the lower index. Since f32 subtraction is monotone, the nearest
 * entry is one of the two that bracket s, so we count the entries <= s (15 compares against
 * immediates, no memory) and compare the two distances. NaN compares false everywhere and lands on
 * code 0, like torch.argmin over a NaN row.
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

/* Nearest NF4 code of an already-scaled value (see the header comment for the rule). */
__device__ __forceinline__ uint32_t nf4_encode_scaled(float s) {
    int lo = 0;
#pragma unroll
    for (int i = 1; i < 15; ++i) lo += (s >= nf4_level(i)) ? 1 : 0;
    /* lo in [0, 14]: s lies in [level(lo), level(lo+1)) or beyond the ends. */
    float c_lo = -1.0f, c_hi = -0.6961928009986877f;
#pragma unroll
    for (int i = 1; i < 15; ++i) {
        if (lo == i) {
            c_lo = nf4_level(i);
            c_hi = nf4_level(i + 1);
        }
    }
    const float d_lo = fabsf(__fsub_rn(s, c_lo));
    const float d_hi = fabsf(__fsub_rn(s, c_hi));
    return (uint32_t)(lo + (d_hi < d_lo ? 1 : 0));
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

/*
 * cuda_emu.h — just enough of CUDA to run qadapt's kernels on CPU threads, for checking their
 * logic without a GPU (kernels/emu/README.md). Used instead of the CUDA headers when a kernel file
 * is compiled as host C++ with -DQADAPT_EMU -Ikernels/emu.
 *
 * Model: one CTA at a time; its blockDim.x threads are std::threads; __syncthreads is a barrier
 * over the CTA, warp shuffles and __syncwarp a barrier over the warp (so every lane of a warp must
 * take part, as on the GPU with a full mask); __shared__ variables are function statics, shared by
 * the threads of the running CTA. Rounding intrinsics are the plain IEEE operations (the host
 * compiler must not contract: build with -ffp-contract=off). What this cannot check: timing,
 * memory coalescing, races between CTAs, inline PTX (the tensor-core kernels of lora.cu).
 */
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __constant__

/* 16-bit floats: storage plus round-to-nearest-even conversions. */
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};
inline float __uint_as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __bfloat162float(__nv_bfloat16 v) { return __uint_as_float((uint32_t)v.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
    uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(r >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }
inline float __half2float(__half h) { return (float)(_Float16 &)h; }
inline __half __float2half_rn(float f) {
    _Float16 v = (_Float16)f;
    __half h;
    memcpy(&h, &v, 2);
    return h;
}

struct uint4 {
    uint32_t x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline void __stwb(uint4* p, uint4 v) { *p = v; }
template <typename T> inline T __ldg(const T* p) { return *p; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
using std::fabs;
using std::max;
using std::min;
inline float fabsf(float v) { return std::fabs(v); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }

/* Synchronization, implemented by the runner (cuda_emu_runtime.h). */
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
float __shfl_sync(unsigned mask, float v, int src_lane);
void __syncwarp(unsigned mask = 0xffffffffu);
void __syncthreads();

/*
 * cuda_emu.h — the part of CUDA that qadapt's kernels use, for compiling kernels/<name>.cu as host
 * C++ (-DQADAPT_EMU -Ikernels/emu -Ikernels/include; kernels/emu/README.md). It stands in for the CUDA
 * headers (cuda_bf16.h and cuda_fp16.h here include it) and is the device-side half of the kernel
 * emulator whose runtime is vgpu_runtime.cpp.
 *
 * Execution model. A launch runs its CTAs on a pool of host threads; one CTA runs on one host
 * thread as blockDim.x*y*z fibers (one per CUDA thread, each with its own stack) that switch
 * cooperatively: a fiber runs until it reaches a barrier (__syncthreads), a warp collective
 * (shuffles, __syncwarp, ballot, ldmatrix, mma), a warpgroup collective (wgmma), an mbarrier wait
 * or its end. So:
 *   - threadIdx / blockIdx / blockDim / gridDim are read from a header at the top of the running
 *     fiber's stack (found from the stack pointer: stacks are aligned to their size);
 *   - __shared__ variables are `static thread_local`: a CTA never leaves its host thread and a host
 *     thread runs one CTA at a time, so they are private to the CTA (not poisoned between CTAs:
 *     host C++ gives no handle on them; dynamic shared memory, qadapt::dynamic_smem, is poisoned
 *     with 0xff bytes at every CTA start);
 *   - a barrier or warp collective completes when every thread it names has arrived; one that
 *     cannot complete (threads exited or wait elsewhere) ends the launch with QV_BARRIER_DEADLOCK
 *     instead of hanging;
 *   - arithmetic is host IEEE f32 with the kernel built -ffp-contract=off, so each __fadd_rn,
 *     __fmul_rn, ... is one correctly rounded operation and nothing is fused unless the kernel calls
 *     fmaf. Transcendentals (expf, logf) are the host libm's, not the GPU's approximations.
 * Atomics are real host atomics (CTAs run concurrently on several host threads).
 */
#pragma once
#include <algorithm>
#include <array>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

/* Kernels carry nvcc pragmas (#pragma unroll) and CUDA idioms a host compiler warns about. */
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wstrict-aliasing"

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace qv {

/* Fiber stacks are kStackSize bytes, aligned to kStackSize; this header sits at the top of each. */
constexpr uintptr_t kStackSize = 64 * 1024;

struct Fiber;
struct alignas(64) FiberHdr {
    dim3 thread_idx, block_idx, block_dim, grid_dim;
    Fiber* fiber;
};

/* The running fiber's header. Only meaningful inside a kernel run by the emulator. */
__attribute__((always_inline)) inline FiberHdr* hdr() {
    uintptr_t sp;
#if defined(__x86_64__)
    asm("mov %%rsp, %0" : "=r"(sp));
#else
    sp = (uintptr_t)__builtin_frame_address(0);
#endif
    return reinterpret_cast<FiberHdr*>((sp | (kStackSize - 1)) + 1 - sizeof(FiberHdr));
}

/* ---- runtime entry points used by device code (vgpu_runtime.cpp) --------------------------------- */

void syncthreads();
/* Warp shuffle of up to 8 bytes per lane, PTX shfl.sync semantics: mode 0 idx, 1 up, 2 down, 3 bfly;
 * b the lane operand, c the clamp/segment operand as nvcc encodes width. */
uint64_t shfl(unsigned mask, uint64_t v, int mode, int b, int c, int words);
void syncwarp(unsigned mask);
unsigned ballot(unsigned mask, int pred);
unsigned activemask();
[[noreturn]] void trap(const char* what);
[[noreturn]] void device_assert(const char* expr, const char* file, int line);
void* dynamic_smem();
uint32_t dynamic_smem_size();
/* cp.async: cp_size 4/8/16 bytes, src_size <= cp_size (the rest zero-filled), cg = L2-only form. */
void cp_async(void* dst, const void* src, uint32_t cp_size, uint32_t src_size, bool cg);
void cp_async_commit();
void cp_async_wait(int n);
void cp_async_wait_all();
/* ldmatrix.sync.aligned.m8n8.x{n}{.trans}.shared.b16 */
void ldmatrix(uint32_t* r, int n, bool trans, const void* p);
/* mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d = a * b + c (c may alias d). */
enum class MmaType { BF16 = 0, F16 = 1 };
void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, const float* c, MmaType t);
/* sm_90a (qadapt_sm90.cuh in this directory): mbarrier, TMA, wgmma. */
void mbar_init(uint64_t* bar, uint32_t count);
void mbar_arrive(uint64_t* bar, uint32_t tx, bool expect_tx);
void mbar_wait(uint64_t* bar, uint32_t parity);
void tma_load_2d(void* dst, const void* map, uint64_t* bar, int32_t c0, int32_t c1);
uint64_t wgmma_desc_sw128(const void* tile);
/* wgmma.mma_async.m64nNk16.f32.bf16.bf16 with A from registers: n = 64, 128 or 256. */
void wgmma_bf16(float* d, const uint32_t* a, uint64_t desc, bool accumulate, int n);
void wgmma_commit();
void wgmma_wait(int n);

template <class T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T> inline T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

/* Kernel registry (vgpu_abi.h's qv_kernel_*): one record per QADAPT_KERNEL definition. */
typedef void (*Invoke)(void* fn, const void* args);
template <class A> void invoke(void* fn, const void* args) {
    reinterpret_cast<void (*)(const A)>(fn)(*static_cast<const A*>(args));
}
struct KernelReg {
    const char* name;
    size_t args_size;
    Invoke invoke;
    void* fn;
    KernelReg* next;
    KernelReg(const char* name, size_t args_size, Invoke invoke, void* fn);
};

}  // namespace qv

/* The emulated QADAPT_KERNEL (qadapt.h uses it under QADAPT_EMU): an extern "C" function taking the
 * argument struct by value, registered under its name by a static initializer. The registration
 * refers to the function weakly, so a file that only sees the header's declarations registers
 * nothing that is not linked; QV_KERNEL_ANCHOR (set by vgpu_runtime.cpp) adds a strong reference so
 * that linking the runtime pulls every kernel object out of a static library. */
#ifndef QV_KERNEL_ANCHOR
#define QV_KERNEL_ANCHOR(name, n)
#endif
#define QV_KERNEL(name, Args) QV_KERNEL_(name, Args, __COUNTER__)
#define QV_KERNEL_(name, Args, n) QV_KERNEL__(name, Args, n)
#define QV_KERNEL__(name, Args, n)                                                                      \
    extern "C" void name(const Args args);                                                             \
    static void qv_weak_##name##_##n(const Args) __attribute__((weakref(#name)));                     \
    static const ::qv::KernelReg qv_reg_##name##_##n(#name, sizeof(Args), &::qv::invoke<Args>,         \
                                                     (void*)&qv_weak_##name##_##n);                    \
    QV_KERNEL_ANCHOR(name, n)                                                                          \
    extern "C" void name(const Args args)

#define threadIdx (static_cast<const dim3&>(::qv::hdr()->thread_idx))
#define blockIdx (static_cast<const dim3&>(::qv::hdr()->block_idx))
#define blockDim (static_cast<const dim3&>(::qv::hdr()->block_dim))
#define gridDim (static_cast<const dim3&>(::qv::hdr()->grid_dim))
constexpr int warpSize = 32;

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

/* Device asserts end the launch with QV_TRAP (include <assert.h> before this header, or not at all). */
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : ::qv::device_assert(#e, __FILE__, __LINE__))
#endif
[[noreturn]] inline void __trap() { ::qv::trap("__trap()"); }
[[noreturn]] inline void __brkpt() { ::qv::trap("__brkpt()"); }

/* ---- 16-bit floats: storage plus round-to-nearest-even conversions ----------------------------- */

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

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
inline float __int_as_float(int32_t u) { return __uint_as_float((uint32_t)u); }
inline int32_t __float_as_int(float f) { return (int32_t)__float_as_uint(f); }
inline float __bfloat162float(__nv_bfloat16 v) { return __uint_as_float((uint32_t)v.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
    uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(r >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return {v}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline float __half2float(__half h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}
inline __half __float2half_rn(float f) {
    _Float16 v = (_Float16)f;
    __half h;
    memcpy(&h, &v, 2);
    return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half v) { return v.bits; }
inline __half __ushort_as_half(unsigned short v) { return {v}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }

/* ---- vector types --------------------------------------------------------------------------------- */

struct alignas(8) uint2 {
    uint32_t x, y;
};
struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};
struct alignas(8) int2 {
    int32_t x, y;
};
struct alignas(16) int4 {
    int32_t x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline int2 make_int2(int32_t a, int32_t b) { return {a, b}; }
inline int4 make_int4(int32_t a, int32_t b, int32_t c, int32_t d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

/* ---- loads/stores with cache hints: plain accesses ---------------------------------------------- */

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }

/* ---- arithmetic intrinsics: one IEEE operation each ---------------------------------------------- */

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float v) { return v != v ? 0.0f : std::fmin(std::fmax(v, 0.0f), 1.0f); }
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline unsigned __brev(unsigned v) {
    v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
    v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
    v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(v);
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
using std::max;
using std::min;

/* ---- synchronization and warp collectives (vgpu_runtime.cpp) ------------------------------------ */

inline void __syncthreads() { ::qv::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::qv::syncwarp(mask); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* nvcc's encoding of the width operand: c = ((32 - width) << 8) | clamp. */
template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
    return ::qv::from_bits<T>(::qv::shfl(mask, ::qv::to_bits(v), 0, src_lane, ((32 - width) << 8) | 0x1f,
                                         sizeof(T) > 4 ? 2 : 1));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return ::qv::from_bits<T>(
        ::qv::shfl(mask, ::qv::to_bits(v), 1, (int)delta, (32 - width) << 8, sizeof(T) > 4 ? 2 : 1));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
    return ::qv::from_bits<T>(::qv::shfl(mask, ::qv::to_bits(v), 2, (int)delta, ((32 - width) << 8) | 0x1f,
                                         sizeof(T) > 4 ? 2 : 1));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
    return ::qv::from_bits<T>(::qv::shfl(mask, ::qv::to_bits(v), 3, lane_mask, ((32 - width) << 8) | 0x1f,
                                         sizeof(T) > 4 ? 2 : 1));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::qv::ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return ::qv::ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    return ::qv::ballot(mask, !pred) == 0;
}
inline unsigned __activemask() { return ::qv::activemask(); }

/* ---- atomics: host atomics, relaxed like CUDA's --------------------------------------------------- */

template <class T> inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
template <class F> inline F atomic_add_float(F* p, F v) {
    F old, next;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
        next = old + v;
    } while (!__atomic_compare_exchange(p, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline float atomicAdd(float* p, float v) { return atomic_add_float(p, v); }
inline double atomicAdd(double* p, double v) { return atomic_add_float(p, v); }
template <class T> inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
template <class T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
template <class T> inline T atomicCAS(T* p, T cmp, T v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
template <class T> inline T atomicMax(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class T> inline T atomicMin(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class T> inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
template <class T> inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
template <class T> inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }

/*
 * vgpu_selftest.cpp — checks the kernel emulator (vgpu_runtime.cpp + cuda_emu.h + the emulated
 * qadapt_mma.cuh) through its C ABI (vgpu_abi.h), linked the way crates/qadapt-vgpu links it: every
 * kernels/<name>.cu compiled on its own as C++, plus the runtime, plus this file. Build and run
 * (kernels/emu/README.md):
 *
 *   F="$(sed -n 's/^common: //p' kernels/emu/emu.flags) -Ikernels/emu -Ikernels/include"
 *   MC="$(sed -n 's/^memcheck: //p' kernels/emu/emu.flags)"   # kernel code only, never the runtime
 *   for f in kernels/*.cu; do c++ -x c++ $F $MC -c $f -o /tmp/$(basename $f .cu).o; done
 *   c++ $F -DQV_NO_KERNEL_ANCHORS -c kernels/emu/vgpu_runtime.cpp -o /tmp/vgpu_runtime.o
 *   c++ $F $MC -c kernels/emu/vgpu_selftest.cpp -o /tmp/vgpu_selftest.o
 *   c++ -pthread /tmp/vgpu_selftest.o $(for f in kernels/*.cu; do echo /tmp/$(basename $f .cu).o; done) \
 *       /tmp/vgpu_runtime.o -o /tmp/vgpu_selftest
 *   /tmp/vgpu_selftest            # exit status 0 when every check passes
 *
 * What it checks:
 *   - the registry: every kernel of qadapt.h is registered with its argument size; unknown names
 *     and wrong sizes are refused;
 *   - indices (3-D grids and blocks), shuffles of every mode and width, votes, dynamic shared memory
 *     (poisoned at CTA start), cp.async (ca/cg, zero fill, poison until the wait), ldmatrix x1/x2/x4
 *     with and without .trans against the ISA's fragment formula, its wavefront counts, and mma
 *     m16n8k16 bf16/f16 against a scalar reference in the documented summation order (bit for bit);
 *   - the tensor-core kernels of kernels/lora_{fwd,bwd,rank}.cu (forward, backward, NF4,
 *     split rank products) against a float64 reference, the NF4 kernels bit for bit against the
 *     dense ones on the dequantized weight;
 *   - teeth: planted bugs are caught (a swapped B fragment pair, a missing cp.async.wait_group, a
 *     wait_group one group too loose, a missing __syncthreads in both directions, barriers and warp
 *     collectives some threads never reach, an out-of-bounds store into a guard page, misaligned
 *     ldmatrix/cp.async, __trap, assert, a fiber stack overflow), each reported with its code and
 *     message, and the next launch still works;
 *   - sm_90a (qadapt_sm90.cuh): TMA boxes (zero fill at negative and ragged coordinates, the
 *     128-byte swizzle) byte for byte, a TMA + mbarrier ring feeding wgmma m64nNk16 at N = 64, 128,
 *     256 bit for bit against a scalar reference, and its teeth (a stage read without waiting, d
 *     read before wgmma.wait_group, mbarrier phases that never complete, a warp skipping the
 *     wgmma, tx-count overflow, uninitialized barriers and maps);
 *   - concurrent launches from several host threads;
 *   - the memory checker (vgpu_memcheck.inc): exact counters (global bytes, requests, 32-byte
 *     sectors; shared requests, wavefronts with bank conflicts) on kernels of known traffic,
 *     ldmatrix and cp.async traffic in the same counters, misaligned uint4/uint2 accesses, and
 *     exact bounds against registered buffers (in[-1], a read into the slack, a byte one past the
 *     end); test_lora registers every buffer at its exact size.
 */
#include "qadapt.h"
#include "qadapt_mma.cuh"
#include "qadapt_sm90.cuh"
#include "vgpu_abi.h"
#include "vgpu_tmap.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

using qadapt::cp_async16;
using qadapt::cp_async_ca;
using qadapt::cp_async_commit;
using qadapt::cp_async_wait;
using qadapt::cp_async_wait_all;
typedef __nv_bfloat16 bf16;

/* ---- test kernels ------------------------------------------------------------------------------ */

struct StOut {
    uint64_t out;
    uint64_t in;
    int32_t mode, param, width, flag;
};

/* Every thread writes its indices: threadIdx, blockIdx, blockDim, gridDim. */
QADAPT_KERNEL(st_indices, StOut) {
    const uint64_t b = blockIdx.x + (uint64_t)gridDim.x * (blockIdx.y + (uint64_t)gridDim.y * blockIdx.z);
    const uint64_t t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    uint32_t* o = reinterpret_cast<uint32_t*>(args.out) + (b * blockDim.x * blockDim.y * blockDim.z + t) * 12;
    const dim3 v[4] = {threadIdx, blockIdx, blockDim, gridDim};
    for (int i = 0; i < 4; ++i) {
        o[3 * i] = v[i].x;
        o[3 * i + 1] = v[i].y;
        o[3 * i + 2] = v[i].z;
    }
}

/* out[t] = shuffle of in[t] (mode 0 idx, 1 up, 2 down, 3 xor, 4 ballot/any/all, 5 a double). */
QADAPT_KERNEL(st_shfl, StOut) {
    const unsigned t = threadIdx.x + blockIdx.x * blockDim.x;
    const float v = reinterpret_cast<const float*>(args.in)[t];
    float* o = reinterpret_cast<float*>(args.out);
    const unsigned full = 0xffffffffu;
    switch (args.mode) {
        case 0: o[t] = __shfl_sync(full, v, args.param, args.width); break;
        case 1: o[t] = __shfl_up_sync(full, v, args.param, args.width); break;
        case 2: o[t] = __shfl_down_sync(full, v, args.param, args.width); break;
        case 3: o[t] = __shfl_xor_sync(full, v, args.param, args.width); break;
        case 4: {
            const unsigned b = __ballot_sync(full, v > 0.0f);
            const int any = __any_sync(full, v > 0.9f), all = __all_sync(full, v > -2.0f);
            o[t] = (float)(b & 0xffffu) + 65536.0f * (float)(b >> 16) + 0.25f * any + 0.5f * all;
            break;
        }
        default: {
            const double d = __shfl_xor_sync(full, (double)v * 3.0, args.param);
            o[t] = (float)d;
        }
    }
}

/* ldmatrix of a tile whose element (r, c) holds r * 256 + c: lane l gives the row address of
 * matrix l / 8, row l % 8, at element (8 * (l / 8) + l % 8) * stride (+ a misalignment when flag). */
QADAPT_KERNEL(st_ldmatrix, StOut) {
    __shared__ __align__(128) uint16_t tile[64 * 64];
    for (unsigned i = threadIdx.x; i < 64 * 64; i += blockDim.x) tile[i] = (uint16_t)((i / 64) * 256 + i % 64);
    __syncthreads();
    const unsigned lane = threadIdx.x & 31u;
    const unsigned row = lane;  /* matrix lane / 8, row lane % 8: row `lane` of a [32][stride] layout */
    const uint16_t* p = tile + row * (unsigned)args.param + (args.flag ? 4 : 0);
    uint32_t r[4] = {0, 0, 0, 0};
    const int n = args.mode & 7;
    const bool trans = (args.mode & 8) != 0;
    if (n == 1) {
        uint32_t q[1];
        trans ? qadapt::ldmatrix_x1_t(q, p) : qadapt::ldmatrix_x1(q, p);
        r[0] = q[0];
    } else if (n == 2) {
        uint32_t q[2];
        trans ? qadapt::ldmatrix_x2_t(q, p) : qadapt::ldmatrix_x2(q, p);
        r[0] = q[0], r[1] = q[1];
    } else {
        trans ? qadapt::ldmatrix_x4_t(r, p) : qadapt::ldmatrix_x4(r, p);
    }
    uint32_t* o = reinterpret_cast<uint32_t*>(args.out) + threadIdx.x * 4;
    for (int i = 0; i < 4; ++i) o[i] = r[i];
}

/* One m16n8k16 on one warp, fragments loaded element by element from global A [16][16], B [16][8]
 * (k rows), C [16][8], per the ISA layout; flag 1 swaps b0 and b1 (a planted bug); mode 1 f16;
 * param 1 accumulates into D (c aliased) instead of passing C separately. */
QADAPT_KERNEL(st_mma, StOut) {
    const uint16_t* A = reinterpret_cast<const uint16_t*>(args.in);
    const uint16_t* B = A + 256;
    const float* C = reinterpret_cast<const float*>(A + 384);
    float* D = reinterpret_cast<float*>(args.out);
    const unsigned lane = threadIdx.x & 31u, g = lane >> 2, t = lane & 3u;
    auto pack = [](uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); };
    const uint32_t a[4] = {pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                           pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                           pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                           pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
    uint32_t b0 = pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
    uint32_t b1 = pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
    if (args.flag) {
        const uint32_t s = b0;
        b0 = b1;
        b1 = s;
    }
    const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    float d[4];
    if (args.param) {
        for (int i = 0; i < 4; ++i) d[i] = c[i];
        args.mode ? qadapt::mma_f16(d, a, b0, b1) : qadapt::mma_bf16(d, a, b0, b1);
    } else {
        args.mode ? qadapt::mma_f16(d, a, b0, b1, c) : qadapt::mma_bf16(d, a, b0, b1, c);
    }
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

/* A 3-stage cp.async pipeline over param tiles of 512 floats (128 threads x 16 bytes), each thread
 * summing 4 values that another thread copied. mode 0: correct (wait_group STAGES-2 = 1);
 * mode 1: wait_group 2, one group too many in flight (planted); mode 2: no wait at all (planted). */
QADAPT_KERNEL(st_pipeline, StOut) {
    constexpr int STAGES = 3, TILE = 512;
    __shared__ __align__(16) float buf[STAGES][TILE];
    const float* src = reinterpret_cast<const float*>(args.in);
    const unsigned t = threadIdx.x;
    const int tiles = args.param;
    auto load = [&](int kt) { cp_async16(&buf[kt % STAGES][4 * t], src + (size_t)kt * TILE + 4 * t); };
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) load(s);
        cp_async_commit();
    }
    float acc = 0.0f;
    for (int kt = 0; kt < tiles; ++kt) {
        if (args.mode == 0) cp_async_wait<STAGES - 2>();
        else if (args.mode == 1) cp_async_wait<STAGES - 1>();
        __syncthreads();
        if (kt + STAGES - 1 < tiles) load(kt + STAGES - 1);
        cp_async_commit();
        const unsigned o = (4 * t + 4 * 37) % TILE;
        for (int i = 0; i < 4; ++i) acc += buf[kt % STAGES][o + i];
        __syncthreads();
    }
    cp_async_wait<0>();
    reinterpret_cast<float*>(args.out)[blockIdx.x * blockDim.x + t] = acc;
}

/* cp.async forms: ca of 4 and 8 bytes, cg 16 with src-size 8 (zero fill), ca 16 with src-size 0;
 * flag 1: read the destination before waiting (sees the poison). */
QADAPT_KERNEL(st_cp_forms, StOut) {
    __shared__ __align__(16) uint32_t s[32][16];
    const uint32_t* src = reinterpret_cast<const uint32_t*>(args.in);
    uint32_t* o = reinterpret_cast<uint32_t*>(args.out) + threadIdx.x * 16;
    const unsigned t = threadIdx.x;
    cp_async_ca<4>(&s[t][0], src + 16 * t);
    cp_async_ca<4>(&s[t][1], src + 16 * t + 1);
    cp_async_ca<8>(&s[t][2], src + 16 * t + 2);
    cp_async16(&s[t][4], src + 16 * t + 4, 8);
    cp_async_ca<16>(&s[t][8], src + 16 * t + 8, 0);
    cp_async16(&s[t][12], src + 16 * t + 12);
    if (args.flag) {
        for (int i = 0; i < 16; ++i) o[i] = s[t][i];
        cp_async_wait_all();
        return;
    }
    cp_async_wait_all();
    for (int i = 0; i < 16; ++i) o[i] = s[t][i];
}

/* Races on shared memory that a barrier should order: each of `param` iterations writes
 * s[t] = it * 1000 + t, waits at a barrier (flag bit 0), reads the slot of the thread 32 * mode
 * places away (mode +1: the next warp, -1: the previous one), and waits at a barrier again (flag
 * bit 1). Without the first barrier a read can run before the other warp's store
 * (read-after-write); without the second, the other warp's next store can run before the read
 * (write-after-read). */
QADAPT_KERNEL(st_race, StOut) {
    __shared__ float s[256];
    const unsigned t = threadIdx.x;
    float* o = reinterpret_cast<float*>(args.out) + (size_t)blockIdx.x * args.param * 256;
    for (int it = 0; it < args.param; ++it) {
        s[t] = (float)(it * 1000 + (int)t);
        if (args.flag & 1) __syncthreads();
        o[it * 256 + t] = s[(t + 256 + 32 * args.mode) % 256];
        if (args.flag & 2) __syncthreads();
    }
}

/* Barriers and collectives some threads never reach. */
QADAPT_KERNEL(st_deadlock, StOut) {
    const unsigned t = threadIdx.x, lane = t & 31u;
    float v = (float)t;
    switch (args.mode) {
        case 0: /* threads >= 100 leave before the barrier */
            if (t >= 100) return;
            __syncthreads();
            break;
        case 1: /* lane 5 of warp 1 leaves before a shuffle */
            if (t == 37) return;
            v = __shfl_xor_sync(0xffffffffu, v, 1);
            break;
        case 2: /* half of warp 0 waits at __syncthreads, the other half at a shuffle */
            if (t < 16) __syncthreads();
            else if (t < 32) v = __shfl_xor_sync(0xffffffffu, v, 1);
            else __syncthreads();
            break;
        case 3: /* lanes of one warp at two different collectives */
            if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
            else v = (float)__ballot_sync(0xffffffffu, lane > 20);
            break;
        default: /* a correct kernel */
            __syncthreads();
            v = __shfl_xor_sync(0xffffffffu, v, 1);
            break;
    }
    reinterpret_cast<float*>(args.out)[blockIdx.x * blockDim.x + t] = v;
}

/* Writes out[i] for i <= n (one past the end: a planted off-by-one) over a grid-stride loop. */
QADAPT_KERNEL(st_oob, StOut) {
    float* o = reinterpret_cast<float*>(args.out);
    const uint32_t n = (uint32_t)args.param + (args.flag ? 1 : 0);
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) o[i] = 1.0f;
}

/* Misuse: mode 0 __trap, 1 a failed assert, 2 a misaligned cp.async, 3 cp.async.cg of 8 bytes via the
 * runtime, 4 deep recursion (fiber stack overflow), 5 integer division by zero. */
__attribute__((noinline)) int deep(int n) {
    volatile char buf[4096];
    buf[0] = (char)n;
    if (n == 0) return buf[0];
    return deep(n - 1) + buf[0];
}
QADAPT_KERNEL(st_misuse, StOut) {
    __shared__ __align__(16) float s[64];
    const float* src = reinterpret_cast<const float*>(args.in);
    if (threadIdx.x == 3) {
        switch (args.mode) {
            case 0: __trap();
            case 1: assert(args.param == 12345);
            break;
            case 2: cp_async16(&s[1], src); break;
            case 3: ::qv::cp_async(&s[0], src, 8, 8, true); break;
            case 4: reinterpret_cast<float*>(args.out)[0] = (float)deep(100); break;
            case 5: reinterpret_cast<float*>(args.out)[0] = (float)(args.param / args.width); break;
        }
    }
    __syncthreads();
}

/* Dynamic shared memory: each thread reads its word before writing (the poison), then its
 * neighbour's after a barrier; out[t] = {before, after, size}. */
QADAPT_KERNEL(st_dyn_smem, StOut) {
    uint32_t* s = qadapt::dynamic_smem<uint32_t>();
    const unsigned t = threadIdx.x;
    uint32_t* o = reinterpret_cast<uint32_t*>(args.out) + 3 * (blockIdx.x * blockDim.x + t);
    o[0] = s[t];
    s[t] = 7 * t + blockIdx.x;
    __syncthreads();
    o[1] = s[(t + 1) % blockDim.x];
    o[2] = qadapt::dynamic_smem_size();
}

/* Global accesses of known shape, one warp (vgpu_memcheck.inc): mode 0 out[t] = in[t], 1 a stride
 * of 32 floats, 2 one word for all, 3 a uint4 copy, 4 out[t] = in[t + 1], 5 a uint4 load at in +
 * param bytes, 6 a uint2 store at out + param bytes, 7 out[t] = in[t + param], 8 a byte
 * out[t] = ((uint8_t*)in)[t + param]. */
QADAPT_KERNEL(st_mem_global, StOut) {
    const unsigned t = threadIdx.x;
    const float* in = reinterpret_cast<const float*>(args.in);
    float* out = reinterpret_cast<float*>(args.out);
    switch (args.mode) {
        case 0: out[t] = in[t]; break;
        case 1: out[t] = in[t * 32]; break;
        case 2: out[t] = in[0]; break;
        case 3: reinterpret_cast<uint4*>(args.out)[t] = reinterpret_cast<const uint4*>(args.in)[t]; break;
        case 4: out[t] = in[t + 1]; break;
        case 5: {
            const uint4 v = *reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(args.in) + args.param);
            out[t] = (float)(v.x + v.y + v.z + v.w);
            break;
        }
        case 6: *reinterpret_cast<uint2*>(reinterpret_cast<char*>(args.out) + args.param) = make_uint2(t, 2); break;
        case 7: out[t] = in[(int)t + args.param]; break;
        case 8: out[t] = reinterpret_cast<const uint8_t*>(args.in)[(int)t + args.param]; break;
    }
}

/* Shared accesses of known bank behaviour, one warp; out[t] = what was read. Mode 0 tile[t] then
 * tile[t ^ 1], 1 tile[2t], 2 tile[32t], 3 tile[33t], 4 tile[0] by every lane then read back,
 * 5 float4 tile[t], 6 float4 tile[2t], 7 float2 tile[t], 8 dynamic shared d[4t]. */
QADAPT_KERNEL(st_mem_shared, StOut) {
    __shared__ __align__(16) float tile[32 * 33];
    const unsigned t = threadIdx.x;
    float v = 0;
    switch (args.mode) {
        case 0: tile[t] = (float)t; v = tile[t ^ 1]; break;
        case 1: tile[2 * t] = (float)t; break;
        case 2: tile[32 * t] = (float)t; break;
        case 3: tile[33 * t] = (float)t; break;
        case 4: tile[0] = 1; __syncwarp(); v = tile[0]; break;
        case 5: reinterpret_cast<float4*>(tile)[t] = make_float4(1, 2, 3, 4); break;
        case 6: reinterpret_cast<float4*>(tile)[2 * t] = make_float4(1, 2, 3, 4); break;
        case 7: reinterpret_cast<float2*>(tile)[t] = make_float2(1, 2); break;
        case 8: qadapt::dynamic_smem<float>()[4 * t] = 1; break;
    }
    reinterpret_cast<float*>(args.out)[t] = v;
}


/* ---- sm_90a: mbarrier, TMA, wgmma (the emulated qadapt_sm90.cuh) ------------------------------- */

struct StSm90 {
    QadaptTensorMap b_map;   /* B as [rows n][k] bf16, box 64 (k) x N (n), 128-byte swizzle */
    QadaptTensorMap bad_map; /* never encoded (zeros) */
    uint64_t a;              /* A [64][k] bf16, row-major */
    uint64_t out;            /* D [64][N] f32 */
    uint32_t n, k, mode, pad;
};
constexpr uint32_t kSmStages = 3;
enum {
    SM_OK = 0,
    SM_NO_WAIT = 1,      /* consumers read the stage without waiting on its full barrier */
    SM_COUNT2 = 2,       /* full barriers initialized with count 2, one arrival a phase: never complete */
    SM_TX_SHORT = 3,     /* expect_tx 16 bytes more than the box: tx-count never reaches 0 */
    SM_NO_FINAL_WAIT = 4, /* wgmma_wait<1> in the loop and none before reading d */
    SM_WARP_SKIPS = 5,   /* warp 1 of the consumer warpgroup skips the wgmma */
    SM_TX_OVER = 6,      /* expect_tx 16 bytes less than the box */
    SM_UNINIT = 7,       /* an arrive on a barrier nobody initialized */
    SM_BAD_MAP = 8,      /* a TMA with a map cuTensorMapEncodeTiled did not write */
};

/* One producer thread (warpgroup 0) streams B through kSmStages stages of dynamic shared memory
 * (full / empty mbarrier ring); warpgroup 1 computes D = A B^T with wgmma m64nNk16, four k-slices
 * of 16 per 64-wide stage through descriptors of stage + 32 s, accumulating over every k step. */
template <int N>
__device__ void st_sm90_body(const StSm90& args) {
    __shared__ uint64_t full[kSmStages], empty[kSmStages];
    uint8_t* smem = qadapt::dynamic_smem<uint8_t>();
    const uint32_t tid = threadIdx.x, steps = (args.k + 63) / 64, mode = args.mode;
    constexpr uint32_t STAGE = N * 128;
    if (tid == 0) {
        for (uint32_t s = 0; s < kSmStages; ++s) {
            qadapt::sm90::mbar_init(&full[s], mode == SM_COUNT2 ? 2 : 1);
            qadapt::sm90::mbar_init(&empty[s], 4);
        }
        qadapt::sm90::fence_mbar_init();
    }
    __syncthreads();
    if (tid < 128) {
        qadapt::sm90::reg_dealloc<40>();
        if (tid != 0) return;
        for (uint32_t i = 0; i < steps; ++i) {
            const uint32_t s = i % kSmStages;
            if (i >= kSmStages) qadapt::sm90::mbar_wait(&empty[s], ((i / kSmStages) - 1) & 1u);
            const uint32_t tx = STAGE + (mode == SM_TX_SHORT ? 16 : 0) - (mode == SM_TX_OVER ? 16 : 0);
            qadapt::sm90::mbar_arrive_expect_tx(&full[s], tx);
            qadapt::sm90::tma_load_2d(smem + s * STAGE, mode == SM_BAD_MAP ? &args.bad_map : &args.b_map, &full[s],
                                      (int32_t)(i * 64), 0);
        }
        return;
    }
    qadapt::sm90::reg_alloc<232>();
    const uint32_t w = (tid - 128) / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const bf16* A = reinterpret_cast<const bf16*>(args.a);
    auto pair = [&](uint32_t r, uint32_t k) -> uint32_t {
        const uint32_t lo = k < args.k ? A[(size_t)r * args.k + k].bits : 0;
        const uint32_t hi = k + 1 < args.k ? A[(size_t)r * args.k + k + 1].bits : 0;
        return lo | (hi << 16);
    };
    if (mode == SM_UNINIT && tid == 128) qadapt::sm90::mbar_arrive(reinterpret_cast<uint64_t*>(smem + kSmStages * STAGE));
    float acc[N / 2];
    for (int j = 0; j < N / 2; ++j) acc[j] = 0.0f;
    for (uint32_t i = 0; i < steps; ++i) {
        const uint32_t s = i % kSmStages;
        const uint8_t* stage = smem + s * STAGE;
        uint32_t frag[4][4];
        for (uint32_t q = 0; q < 4; ++q) {
            const uint32_t k = i * 64 + 16 * q + 2 * t, r0 = 16 * w + g;
            frag[q][0] = pair(r0, k), frag[q][1] = pair(r0 + 8, k);
            frag[q][2] = pair(r0, k + 8), frag[q][3] = pair(r0 + 8, k + 8);
        }
        if (mode != SM_NO_WAIT) qadapt::sm90::mbar_wait(&full[s], (i / kSmStages) & 1u);
        qadapt::sm90::wgmma_fence();
        if (!(mode == SM_WARP_SKIPS && w == 1))
            for (uint32_t q = 0; q < 4; ++q)
                qadapt::sm90::wgmma_bf16_rs<N>(acc, frag[q], qadapt::sm90::wgmma_desc_sw128(stage + 32 * q), true);
        qadapt::sm90::wgmma_commit();
        if (mode == SM_NO_FINAL_WAIT) qadapt::sm90::wgmma_wait<1>();
        else qadapt::sm90::wgmma_wait<0>();
        qadapt::sm90::fence_regs(acc);
        __syncwarp();
        if (lane == 0) qadapt::sm90::mbar_arrive(&empty[s]);
    }
    float* out = reinterpret_cast<float*>(args.out);
    for (uint32_t i = 0; i < N / 8; ++i)
        for (uint32_t h = 0; h < 2; ++h) {
            const uint32_t c = 8 * i + 2 * t + h, r0 = 16 * w + g;
            out[(size_t)r0 * N + c] = acc[4 * i + h];
            out[(size_t)(r0 + 8) * N + c] = acc[4 * i + 2 + h];
        }
}

QADAPT_KERNEL(st_sm90, StSm90) {
    switch (args.n) {
        case 64: st_sm90_body<64>(args); break;
        case 128: st_sm90_body<128>(args); break;
        default: st_sm90_body<256>(args); break;
    }
}

/* One TMA box at (c0, c1) into dynamic shared memory, then the raw bytes out (every thread of one
 * warp waits on the barrier, then copies a share). */
struct StTma {
    QadaptTensorMap map;
    uint64_t out;
    int32_t c0, c1;
    uint32_t bytes, pad;
};
QADAPT_KERNEL(st_tma, StTma) {
    __shared__ uint64_t bar;
    uint8_t* smem = qadapt::dynamic_smem<uint8_t>();
    if (threadIdx.x == 0) {
        qadapt::sm90::mbar_init(&bar, 1);
        qadapt::sm90::fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        qadapt::sm90::mbar_arrive_expect_tx(&bar, args.bytes);
        qadapt::sm90::tma_load_2d(smem, &args.map, &bar, args.c0, args.c1);
    }
    qadapt::sm90::mbar_wait(&bar, 0);
    uint8_t* out = reinterpret_cast<uint8_t*>(args.out);
    for (uint32_t i = threadIdx.x; i < args.bytes; i += blockDim.x) out[i] = smem[i];
}

/* ---- harness ----------------------------------------------------------------------------------- */

namespace {

int g_fail = 0, g_checks = 0;
void check(bool ok, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void check(bool ok, const char* fmt, ...) {
    ++g_checks;
    if (ok) return;
    ++g_fail;
    va_list ap;
    va_start(ap, fmt);
    printf("  FAIL: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

uint64_t P(const void* p) { return (uint64_t)(uintptr_t)p; }

template <class A>
QvStatus run(const char* name, const A& a, QvDim3 grid, QvDim3 block, uint32_t dyn = 0, QvCounters* c = nullptr) {
    QvStatus st{};
    qv_launch(name, &a, sizeof a, grid, block, dyn, c, &st);
    return st;
}
QvDim3 D1(uint32_t x) { return QvDim3{x, 1, 1}; }

/* Registers buffers in the emulator's allocation table (as the driver does) for as long as it lives:
 * while the table is not empty, every global access of a kernel must fall inside one. */
struct Registered {
    std::vector<const void*> ps;
    template <class T> void add(const std::vector<T>& v) { add(v.data(), v.size() * sizeof(T)); }
    void add(const void* p, size_t n) {
        qv_mem_register(p, n);
        ps.push_back(p);
    }
    ~Registered() {
        for (const void* p : ps) qv_mem_unregister(p);
    }
};

const char* code_name(int c) {
    static const char* n[] = {"QV_OK", "QV_UNKNOWN_KERNEL", "QV_BAD_ARGS", "QV_BARRIER_DEADLOCK", "QV_MEMORY_FAULT",
                              "QV_PTX_ERROR", "QV_TRAP"};
    return c >= 0 && c <= 6 ? n[c] : "?";
}

/* A launch expected to fail with `code`: prints its message (the report the driver will see). */
void expect(const char* what, const QvStatus& st, int code) {
    check(st.code == code, "%s: expected %s, got %s (%s)", what, code_name(code), code_name(st.code), st.message);
    if (st.code == code) printf("  caught %-44s %s: %s\n", what, code_name(code), st.message);
}

struct Timer {
    const char* what;
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    explicit Timer(const char* w) : what(w) { printf("%s\n", w); }
    ~Timer() {
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        printf("  (%s: %.0f ms)\n", what, ms);
    }
};

std::mt19937 rng(7);
float uni(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
std::vector<bf16> rnd_bf16(size_t n, float s) {
    std::vector<bf16> v(n);
    for (auto& x : v) x = __float2bfloat16_rn(uni(-s, s));
    return v;
}
float F(bf16 v) { return __bfloat162float(v); }

/* ---- semantics ---------------------------------------------------------------------------------- */

void test_registry() {
    Timer tm("registry");
    const size_t n = qv_kernel_count();
    size_t lora = 0, st = 0;
    for (size_t i = 0; i < n; ++i) {
        const std::string k = qv_kernel_name(i);
        lora += k.rfind("lora_", 0) == 0;
        st += k.rfind("st_", 0) == 0;
        if (i) check(std::string(qv_kernel_name(i - 1)) < k, "kernel names sorted and unique at %zu", i);
    }
    printf("  %zu kernels registered (%zu lora_*, %zu selftest)\n", n, lora, st);
    check(lora == 20 && st == 15,
          "20 lora kernels (lora_fwd.cu 8, lora_bwd.cu 3, lora_rank.cu 5, lora_sm90.cu 4) and 15 selftest kernels registered");
    check(qv_kernel_args_size("lora_gemm_dense_bf16") == sizeof(QadaptLoraFwdArgs), "args size of lora_gemm_dense_bf16");
    check(qv_kernel_args_size("adamw_f32") == sizeof(QadaptAdamwArgs), "args size of adamw_f32");
    check(qv_kernel_args_size("attention_fwd_bf16") == sizeof(QadaptAttentionArgs), "args size of attention_fwd_bf16");
    check(qv_kernel_args_size("no_such_kernel") == 0, "unknown kernel has size 0");
    StOut a{};
    QvStatus s{};
    check(qv_launch("no_such_kernel", &a, sizeof a, D1(1), D1(32), 0, nullptr, &s) == QV_UNKNOWN_KERNEL,
          "unknown kernel refused");
    check(qv_launch("st_indices", &a, sizeof a - 4, D1(1), D1(32), 0, nullptr, &s) == QV_BAD_ARGS, "wrong args size refused");
}

void test_indices() {
    Timer tm("indices: 3-D grid (3,2,2) of 3-D blocks (5,4,3)");
    const QvDim3 g{3, 2, 2}, b{5, 4, 3};
    const size_t nb = 12, nt = 60;
    std::vector<uint32_t> out(nb * nt * 12, 0xdeadbeef);
    StOut a{};
    a.out = P(out.data());
    QvCounters c{};
    const QvStatus st = run("st_indices", a, g, b, 0, &c);
    check(st.code == QV_OK, "indices launch: %s", st.message);
    size_t bad = 0;
    for (uint32_t bz = 0; bz < 2; ++bz)
        for (uint32_t by = 0; by < 2; ++by)
            for (uint32_t bx = 0; bx < 3; ++bx)
                for (uint32_t tz = 0; tz < 3; ++tz)
                    for (uint32_t ty = 0; ty < 4; ++ty)
                        for (uint32_t tx = 0; tx < 5; ++tx) {
                            const size_t bl = bx + 3 * (by + 2 * bz), tl = tx + 5 * (ty + 4 * tz);
                            const uint32_t* o = &out[(bl * nt + tl) * 12];
                            const uint32_t want[12] = {tx, ty, tz, bx, by, bz, 5, 4, 3, 3, 2, 2};
                            bad += memcmp(o, want, sizeof want) != 0;
                        }
    check(bad == 0, "indices: %zu threads saw wrong indices", bad);
    check(c.ctas == 12, "ctas counter %llu", (unsigned long long)c.ctas);
}

void test_shuffles() {
    Timer tm("shuffles: idx/up/down/xor at widths 32, 16, 8; ballot/any/all; 8-byte values");
    const unsigned T = 64;
    std::vector<float> in(T), out(T);
    for (unsigned i = 0; i < T; ++i) in[i] = (float)i - 20.5f;
    StOut a{};
    a.in = P(in.data());
    a.out = P(out.data());
    size_t bad = 0;
    for (int mode = 0; mode < 4; ++mode)
        for (int width : {32, 16, 8})
            for (int param : {0, 1, 3, 5, 13, 31}) {
                a.mode = mode, a.width = width, a.param = param;
                const QvStatus st = run("st_shfl", a, D1(1), D1(T));
                check(st.code == QV_OK, "shfl launch: %s", st.message);
                /* The CUDA Programming Guide's description of each intrinsic. */
                for (unsigned t = 0; t < T; ++t) {
                    const int lane = t % 32, base = lane / width * width;
                    int src = lane;
                    if (mode == 0) src = base + param % width;
                    if (mode == 1) src = lane - base >= param ? lane - param : lane;
                    if (mode == 2) src = lane - base + param < width ? lane + param : lane;
                    if (mode == 3) src = ((lane ^ param) / width > lane / width) ? lane : (lane ^ param);
                    bad += out[t] != in[t - lane + src];
                }
            }
    check(bad == 0, "shuffles: %zu wrong values", bad);
    a.mode = 4;
    check(run("st_shfl", a, D1(1), D1(T)).code == QV_OK, "vote launch");
    for (unsigned t = 0; t < T; ++t) {
        uint32_t ballot = 0;
        bool any = false, all = true;
        for (unsigned l = 0; l < 32; ++l) {
            const float v = in[t / 32 * 32 + l];
            ballot |= (v > 0.0f ? 1u : 0u) << l;
            any |= v > 0.9f;
            all &= v > -2.0f;
        }
        const float want = (float)(ballot & 0xffffu) + 65536.0f * (float)(ballot >> 16) + 0.25f * any + 0.5f * all;
        check(out[t] == want, "vote of thread %u: %g vs %g", t, out[t], want);
    }
    a.mode = 5;
    a.param = 6;
    check(run("st_shfl", a, D1(1), D1(T)).code == QV_OK, "double shuffle launch");
    for (unsigned t = 0; t < T; ++t) check(out[t] == (float)((double)in[t ^ 6] * 3.0), "double shuffle at %u", t);
}

void test_ldmatrix() {
    Timer tm("ldmatrix: x1/x2/x4, with and without .trans, row strides 8/16/32/64 elements");
    std::vector<uint32_t> out(64 * 4);
    StOut a{};
    a.out = P(out.data());
    size_t bad = 0;
    for (int stride : {8, 16, 32, 64})
        for (int n : {1, 2, 4})
            for (int trans = 0; trans < 2; ++trans) {
                a.mode = n | (trans ? 8 : 0);
                a.param = stride;
                QvCounters c{};
                const QvStatus st = run("st_ldmatrix", a, D1(1), D1(64), 0, &c);
                check(st.code == QV_OK, "ldmatrix launch: %s", st.message);
                /* Element (r, c) of the [32][stride] view is tile[r * stride + c], which holds
                 * (flat / 64) * 256 + flat % 64. Matrix i is rows 8i..8i+7, columns 0..7. */
                auto elem = [&](int i, int r, int c) {
                    const int flat = (8 * i + r) * stride + c;
                    return (uint32_t)((flat / 64) * 256 + flat % 64);
                };
                for (int lane = 0; lane < 32; ++lane)
                    for (int i = 0; i < n; ++i) {
                        const int r = lane / 4, c = 2 * (lane % 4);
                        const uint32_t lo = trans ? elem(i, c, r) : elem(i, r, c);
                        const uint32_t hi = trans ? elem(i, c + 1, r) : elem(i, r, c + 1);
                        bad += out[lane * 4 + i] != (lo | (hi << 16));
                        bad += out[(lane + 32) * 4 + i] != (lo | (hi << 16)); /* warp 1 the same */
                    }
                /* Row stride 16 bytes: 8 rows in 8 bank groups, 1 wavefront per matrix; 32 bytes: 2
                 * rows per group; 64: 4; 128: 8. Two warps each issue one instruction. */
                const uint64_t per = stride == 8 ? 1 : stride == 16 ? 2 : stride == 32 ? 4 : 8;
                check(c.ldmatrix == 2 && c.ldmatrix_wavefronts == 2 * per * n,
                      "ldmatrix counters at stride %d x%d: %llu instructions, %llu wavefronts (want %llu)", stride, n,
                      (unsigned long long)c.ldmatrix, (unsigned long long)c.ldmatrix_wavefronts,
                      (unsigned long long)(2 * per * n));
            }
    check(bad == 0, "ldmatrix: %zu wrong registers", bad);
    printf("  wavefronts per 8x8 matrix at row strides of 16/32/64/128 bytes: 1/2/4/8 (checked)\n");
}

/* The scalar reference of one mma in the documented order. */
void mma_ref(const float (&A)[16][16], const float (&B)[16][8], const float (&C)[16][8], float (&D)[16][8]) {
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            float acc = C[i][j];
            for (int k = 0; k < 16; ++k) acc = acc + A[i][k] * B[k][j];
            D[i][j] = acc;
        }
}

void test_mma() {
    Timer tm("mma m16n8k16: bf16 and f16, C separate and accumulated; planted bug: b0/b1 swapped");
    for (int type = 0; type < 2; ++type) {
        std::vector<uint16_t> buf(384 + 256);
        float A[16][16], B[16][8], C[16][8], R[16][8];
        for (int i = 0; i < 16; ++i)
            for (int k = 0; k < 16; ++k) {
                const float v = uni(-2, 2);
                uint16_t bits = type ? __half_as_ushort(__float2half_rn(v)) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
                buf[i * 16 + k] = bits;
                A[i][k] = type ? __half2float(__ushort_as_half(bits)) : F(__ushort_as_bfloat16(bits));
            }
        for (int k = 0; k < 16; ++k)
            for (int j = 0; j < 8; ++j) {
                const float v = uni(-2, 2);
                uint16_t bits = type ? __half_as_ushort(__float2half_rn(v)) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
                buf[256 + k * 8 + j] = bits;
                B[k][j] = type ? __half2float(__ushort_as_half(bits)) : F(__ushort_as_bfloat16(bits));
            }
        float* cp = reinterpret_cast<float*>(&buf[384]);
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) cp[i * 8 + j] = C[i][j] = uni(-1, 1);
        mma_ref(A, B, C, R);
        std::vector<float> out(128);
        StOut a{};
        a.in = P(buf.data());
        a.out = P(out.data());
        a.mode = type;
        for (int acc = 0; acc < 2; ++acc) {
            a.param = acc;
            a.flag = 0;
            QvCounters c{};
            const QvStatus st = run("st_mma", a, D1(1), D1(32), 0, &c);
            check(st.code == QV_OK && c.mma == 1, "mma launch: %s", st.message);
            size_t diff = 0;
            double worst = 0;
            for (int i = 0; i < 16; ++i)
                for (int j = 0; j < 8; ++j) {
                    diff += memcmp(&out[i * 8 + j], &R[i][j], 4) != 0;
                    double exact = C[i][j];
                    for (int k = 0; k < 16; ++k) exact += (double)A[i][k] * B[k][j];
                    worst = std::max(worst, std::fabs(out[i * 8 + j] - exact));
                }
            check(diff == 0, "mma %s: %zu elements differ from the scalar reference", type ? "f16" : "bf16", diff);
            check(worst < 1e-4, "mma %s: %g from the exact value", type ? "f16" : "bf16", worst);
        }
        a.flag = 1;
        a.param = 0;
        check(run("st_mma", a, D1(1), D1(32)).code == QV_OK, "mma (planted bug) launch");
        size_t diff = 0;
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) diff += std::fabs(out[i * 8 + j] - R[i][j]) > 1e-3;
        check(diff > 100, "swapped B fragments went unnoticed (%zu of 128 differ)", diff);
        printf("  %s: matches the scalar reference bit for bit; b0/b1 swapped: %zu of 128 outputs wrong (caught)\n",
               type ? "f16" : "bf16", diff);
    }
}

void test_cp_async() {
    Timer tm("cp.async: forms, zero fill, poison before the wait; a 3-stage pipeline with planted bugs");
    std::vector<uint32_t> src(32 * 16), out(32 * 16);
    for (size_t i = 0; i < src.size(); ++i) src[i] = 0x01000000u + (uint32_t)i;
    StOut a{};
    a.in = P(src.data());
    a.out = P(out.data());
    QvCounters c{};
    QvStatus st = run("st_cp_forms", a, D1(1), D1(32), 0, &c);
    check(st.code == QV_OK, "cp forms: %s", st.message);
    size_t bad = 0;
    for (int t = 0; t < 32; ++t)
        for (int i = 0; i < 16; ++i) {
            const uint32_t want = (i >= 6 && i < 12) ? 0u : src[16 * t + i];
            bad += out[16 * t + i] != want;
        }
    check(bad == 0, "cp.async forms: %zu wrong words", bad);
    check(c.cp_async == 32 * 6 && c.cp_async_bytes == 32 * (4 + 4 + 8 + 8 + 0 + 16), "cp.async counters %llu / %llu",
          (unsigned long long)c.cp_async, (unsigned long long)c.cp_async_bytes);
    a.flag = 1;
    check(run("st_cp_forms", a, D1(1), D1(32)).code == QV_OK, "cp forms (early read)");
    bad = 0;
    for (size_t i = 0; i < out.size(); ++i) bad += out[i] != 0xffffffffu;
    check(bad == 0, "a read before the wait sees the poison (%zu words did not)", bad);
    printf("  reads before cp.async.wait_all: %zu of %zu words are the 0xff poison\n", out.size() - bad, out.size());

    const int tiles = 7;
    std::vector<float> in(tiles * 512), res(2 * 128);
    for (auto& v : in) v = uni(-1, 1);
    std::vector<float> want(128, 0.0f);
    for (int t = 0; t < 128; ++t)
        for (int kt = 0; kt < tiles; ++kt)
            for (int i = 0; i < 4; ++i) want[t] += in[kt * 512 + (4 * t + 4 * 37) % 512 + i];
    StOut p{};
    p.in = P(in.data());
    p.out = P(res.data());
    p.param = tiles;
    const char* names[] = {"correct wait_group 1", "wait_group 2 (one group too many)", "no wait_group"};
    for (int mode = 0; mode < 3; ++mode) {
        p.mode = mode;
        check(run("st_pipeline", p, D1(2), D1(128)).code == QV_OK, "pipeline launch");
        size_t wrong = 0, nan = 0;
        for (int t = 0; t < 256; ++t) {
            wrong += res[t] != want[t % 128];
            nan += std::isnan(res[t]);
        }
        if (mode == 0) check(wrong == 0, "pipeline: %zu wrong sums", wrong);
        else check(wrong == 256, "planted pipeline bug (%s) went unnoticed: %zu of 256 sums wrong", names[mode], wrong);
        printf("  pipeline, %-34s: %3zu of 256 sums wrong (%zu NaN)%s\n", names[mode], wrong, nan,
               mode ? " (caught)" : "");
    }
}

void test_race() {
    Timer tm("races a missing __syncthreads leaves open between warps");
    const int iters = 6;
    std::vector<float> out(2 * iters * 256);
    StOut a{};
    a.out = P(out.data());
    a.param = iters;
    const char* what[] = {"", "store; barrier removed; load (read-after-write)", "load; barrier removed; next store (write-after-read)",
                          "both barriers"};
    for (int flag : {3, 2, 1})
        for (int dir : {+1, -1}) {
            a.mode = dir;
            a.flag = flag;
            std::fill(out.begin(), out.end(), -1.0f);
            check(run("st_race", a, D1(2), D1(256)).code == QV_OK, "race launch");
            size_t stale = 0, epochs = 0;
            for (int b = 0; b < 2; ++b)
                for (int it = 0; it < iters; ++it) {
                    size_t here = 0;
                    for (int t = 0; t < 256; ++t)
                        here += out[(b * iters + it) * 256 + t] != (float)(it * 1000 + (t + 256 + 32 * dir) % 256);
                    stale += here;
                    epochs += here != 0;
                }
            if (flag == 3) check(stale == 0, "race kernel with both barriers: %zu wrong", stale);
            else check(stale > 0, "%s, reading the %s warp, went unnoticed", what[flag], dir > 0 ? "next" : "previous");
            printf("  %-52s reading the %s warp: %4zu of %d reads wrong, in %2zu of %d iterations%s\n", what[flag],
                   dir > 0 ? "next    " : "previous", stale, 2 * iters * 256, epochs, 2 * iters, flag == 3 ? "" : " (caught)");
        }
}

void test_deadlocks() {
    Timer tm("barriers and collectives not reached by every thread");
    std::vector<float> out(512);
    StOut a{};
    a.out = P(out.data());
    const char* what[] = {"__syncthreads, threads >= 100 exited", "shuffle, lane 5 of warp 1 exited",
                          "half a warp at a shuffle, the rest at barrier", "lanes at a shuffle and at a ballot"};
    const int code[] = {QV_BARRIER_DEADLOCK, QV_BARRIER_DEADLOCK, QV_BARRIER_DEADLOCK, QV_PTX_ERROR};
    for (int mode = 0; mode < 4; ++mode) {
        a.mode = mode;
        expect(what[mode], run("st_deadlock", a, D1(2), D1(256)), code[mode]);
        a.mode = 9; /* the next launch works */
        const QvStatus ok = run("st_deadlock", a, D1(2), D1(256));
        check(ok.code == QV_OK && out[5] == 4.0f, "launch after a deadlock: %s", ok.message);
    }
}

void test_faults() {
    Timer tm("faults: guard page, misaligned ldmatrix/cp.async, trap, assert, stack overflow, SIGFPE");
    const long page = sysconf(_SC_PAGESIZE);
    uint8_t* m = (uint8_t*)mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(m + page, page, PROT_NONE);
    StOut a{};
    a.out = P(m);
    a.param = (int)(page / 4);
    a.flag = 1;
    const QvStatus st = run("st_oob", a, D1(3), D1(128));
    expect("store one past the end into a guard page", st, QV_MEMORY_FAULT);
    check(st.fault_addr == P(m + page), "fault address %llx, guard page at %llx", (unsigned long long)st.fault_addr,
          (unsigned long long)P(m + page));
    /* Element n is written by the thread whose grid-stride index reaches it first. */
    const uint32_t stride = 3 * 128, first = (uint32_t)(page / 4) % stride;
    check(st.cta.x == first / 128 && st.thread.x == first % 128, "fault reported at CTA %u thread %u (want %u, %u)", st.cta.x,
          st.thread.x, first / 128, first % 128);
    a.flag = 0;
    check(run("st_oob", a, D1(3), D1(128)).code == QV_OK, "in-bounds launch after the fault");
    munmap(m, 2 * page);

    std::vector<uint32_t> out(128);
    StOut l{};
    l.out = P(out.data());
    l.mode = 4;
    l.param = 16;
    l.flag = 1;
    expect("ldmatrix row address 8 bytes off", run("st_ldmatrix", l, D1(1), D1(32)), QV_PTX_ERROR);
    float src[8] __attribute__((aligned(16))) = {};
    StOut x{};
    x.in = P(src);
    x.out = P(out.data());
    const char* what[] = {"__trap()", "assert(false)", "cp.async 16 to a 4-byte aligned address", "cp.async.cg of 8 bytes",
                          "recursion past the 64 KiB fiber stack", "integer division by zero"};
    const int code[] = {QV_TRAP, QV_TRAP, QV_PTX_ERROR, QV_PTX_ERROR, QV_MEMORY_FAULT, QV_TRAP};
    for (int mode = 0; mode < 6; ++mode) {
        x.mode = mode;
        x.param = 7;
        x.width = 0;
        expect(what[mode], run("st_misuse", x, D1(1), D1(64)), code[mode]);
    }
    x.mode = 1;
    x.param = 12345;
    check(run("st_misuse", x, D1(1), D1(64)).code == QV_OK, "a passing assert");
}

void test_dyn_smem() {
    Timer tm("dynamic shared memory: poisoned at CTA start, private per CTA");
    const unsigned T = 96, G = 5;
    std::vector<uint32_t> out(3 * T * G);
    StOut a{};
    a.out = P(out.data());
    check(run("st_dyn_smem", a, D1(G), D1(T), 4 * T + 100).code == QV_OK, "dyn smem launch");
    size_t bad = 0;
    for (unsigned b = 0; b < G; ++b)
        for (unsigned t = 0; t < T; ++t) {
            const uint32_t* o = &out[3 * (b * T + t)];
            bad += o[0] != 0xffffffffu || o[1] != 7 * ((t + 1) % T) + b || o[2] != 4 * T + 100;
        }
    check(bad == 0, "dynamic shared memory: %zu threads wrong", bad);
}

/* ---- the tensor-core kernels of lora_fwd.cu and lora_bwd.cu --------------------------------------- */

struct Lora {
    uint32_t M, N, K, r, na;
    bool vec;
    std::vector<bf16> x, W, A, B, bias, dy;
    std::vector<float> s;
    std::vector<int32_t> idx;
    int adapter(uint32_t m) const { return idx[m] >= 0 && (uint32_t)idx[m] < na ? idx[m] : -1; }
    uint32_t R() const { return r * na; }
    Lora(uint32_t M_, uint32_t N_, uint32_t K_, uint32_t r_, uint32_t na_, bool vec_)
        : M(M_), N(N_), K(K_), r(r_), na(na_), vec(vec_) {
        x = rnd_bf16((size_t)M * K, 1);
        W = rnd_bf16((size_t)N * K, 0.5f);
        A = rnd_bf16((size_t)na * r * K, 0.5f);
        B = rnd_bf16((size_t)na * N * r, 0.5f);
        bias = rnd_bf16(N, 1);
        dy = rnd_bf16((size_t)M * N, 1);
        for (uint32_t i = 0; i < na; ++i) s.push_back(0.5f + i);
        for (uint32_t m = 0; m < M; ++m) idx.push_back((int32_t)(m % (na + 1)) - 1);
    }
};

uint32_t tiles(uint32_t a, uint32_t b) { return ((a + 127) / 128) * ((b + 127) / 128); }

/* One rank product of lora_rank.cu and its reduction, the reduction split into about `splits`
 * ranges (the Rust launcher plans this on a real device; here the test picks awkward splits), the
 * partial sums in a buffer of exactly splits * p * R floats. */
QvStatus rank_run(const char* kernel, QadaptLoraRankArgs ra, uint32_t splits, uint32_t mode, QvCounters* c) {
    const uint32_t R = ra.rank * ra.n_adapters, slices = (ra.t + QADAPT_LORA_RANK_BK - 1) / QADAPT_LORA_RANK_BK;
    ra.r_tile = R <= 16 ? 16 : R <= 32 ? 32 : 64;
    ra.steps = (slices + splits - 1) / splits;
    ra.splits = (slices + ra.steps - 1) / ra.steps;
    ra.mode = mode;
    std::vector<float> partial((size_t)ra.splits * ra.p * R);
    Registered reg;
    reg.add(partial);
    ra.partial = P(partial.data());
    const uint32_t ctas = ra.splits * ((ra.p + QADAPT_LORA_RANK_BM - 1) / QADAPT_LORA_RANK_BM) * ((R + ra.r_tile - 1) / ra.r_tile);
    QvStatus st = run(kernel, ra, D1(ctas), D1(QADAPT_LORA_RANK_THREADS), 0, c);
    if (st.code != QV_OK) return st;
    return run("lora_rank_reduce_bf16", ra, D1(3), D1(QADAPT_LORA_RANK_REDUCE_THREADS), 0, c);
}

/* |got - want| <= 2^-7 |want| + atol, the bf16 output's rounding plus f32 accumulation. */
size_t compare(const char* what, const std::vector<bf16>& got, const std::vector<double>& want, double atol) {
    size_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i)
        if (!(std::fabs(F(got[i]) - want[i]) <= std::ldexp(std::fabs(want[i]), -7) + atol)) {
            if (bad++ < 3) printf("  %s[%zu]: %g vs %g\n", what, i, F(got[i]), want[i]);
        }
    check(bad == 0, "%s: %zu of %zu elements off", what, bad, got.size());
    return bad;
}

void test_lora(uint32_t M, uint32_t N, uint32_t K, uint32_t r, uint32_t na, bool vec) {
    char title[160];
    snprintf(title, sizeof title, "lora_{fwd,bwd,rank}.cu tensor-core kernels, M=%u N=%u K=%u r=%u x %u adapters%s", M, N, K, r, na,
             vec ? ", 16-byte cp.async path" : ", element-load path");
    Timer tm(title);
    Lora L(M, N, K, r, na, vec);
    const uint32_t R = L.R();
    std::vector<bf16> u((size_t)M * R), y((size_t)M * N), g((size_t)M * R), dx((size_t)M * K), yv((size_t)3 * N);
    std::vector<float> ga((size_t)R * K), gb((size_t)L.na * N * L.r);
    for (auto& v : ga) v = uni(-1, 1);
    for (auto& v : gb) v = uni(-1, 1);
    const std::vector<float> ga0 = ga, gb0 = gb;
    /* Every buffer at its exact size: a kernel reading or writing one element past any of them fails. */
    Registered reg;
    reg.add(L.x), reg.add(L.W), reg.add(L.A), reg.add(L.B), reg.add(L.bias), reg.add(L.dy), reg.add(L.s), reg.add(L.idx);
    reg.add(u), reg.add(y), reg.add(g), reg.add(dx), reg.add(yv), reg.add(ga), reg.add(gb);
    QadaptLoraFwdArgs f{};
    f.x = P(L.x.data());
    f.w = P(L.W.data());
    f.lora_a = P(L.A.data());
    f.lora_b = P(L.B.data());
    f.scales = P(L.s.data());
    f.adapter_idx = P(L.idx.data());
    f.bias = P(L.bias.data());
    f.u = P(u.data());
    f.y = P(y.data());
    f.m = M, f.n = N, f.k = K, f.rank = L.r, f.n_adapters = L.na;
    f.flags = vec ? QADAPT_LORA_VEC : 0;
    QvCounters c{};
    const uint32_t vl = vec ? QADAPT_LORA_RANK_VEC_LHS : 0u, vr = vec ? QADAPT_LORA_RANK_VEC_RHS : 0u;
    QadaptLoraRankArgs ra{};
    ra.lhs = P(L.x.data()), ra.rhs = P(L.A.data()), ra.scales = P(L.s.data()), ra.adapter_idx = P(L.idx.data());
    ra.out = P(u.data()), ra.p = M, ra.t = K, ra.rank = L.r, ra.n_adapters = L.na, ra.flags = vl | vr;
    QvStatus st = rank_run("lora_rank_xa_bf16", ra, 3, QADAPT_LORA_RANK_MASKED, &c);
    check(st.code == QV_OK, "lora_rank_xa_bf16: %s", st.message);
    st = run("lora_gemm_dense_bf16", f, D1(tiles(M, N)), D1(256), 0, &c);
    check(st.code == QV_OK, "lora_gemm_dense_bf16: %s", st.message);
    /* float64 references */
    std::vector<double> u_ref((size_t)M * R), y_ref((size_t)M * N);
    for (uint32_t m = 0; m < M; ++m)
        for (uint32_t e = 0; e < R; ++e) {
            const int ad = L.adapter(m);
            double acc = 0;
            if (ad == (int)(e / L.r))
                for (uint32_t k = 0; k < K; ++k) acc += (double)F(L.x[(size_t)m * K + k]) * F(L.A[(size_t)e * K + k]);
            u_ref[(size_t)m * R + e] = ad == (int)(e / L.r) ? L.s[ad] * acc : 0.0;
        }
    compare("u = s x A^T", u, u_ref, 1e-5);
    for (uint32_t m = 0; m < M; ++m)
        for (uint32_t n = 0; n < N; ++n) {
            double acc = F(L.bias[n]);
            for (uint32_t k = 0; k < K; ++k) acc += (double)F(L.x[(size_t)m * K + k]) * F(L.W[(size_t)n * K + k]);
            for (uint32_t e = 0; e < R; ++e)
                acc += (double)F(u[(size_t)m * R + e]) * F(L.B[((size_t)(e / L.r) * N + n) * L.r + e % L.r]);
            y_ref[(size_t)m * N + n] = acc;
        }
    compare("y = x W^T + u Bcat^T + bias", y, y_ref, 1e-4);
    /* The gemv path (lora_gemv_dense_bf16, M <= 4: 16-byte weight and x loads when vec) on the
     * first 3 rows, against the same reference. */
    QadaptLoraFwdArgs v = f;
    v.m = 3;
    v.y = P(yv.data());
    st = run("lora_gemv_dense_bf16", v, D1((N + 7) / 8), D1(256), 0, &c);
    check(st.code == QV_OK, "lora_gemv_dense_bf16: %s", st.message);
    compare("gemv y (3 rows)", yv, std::vector<double>(y_ref.begin(), y_ref.begin() + (size_t)3 * N), 1e-4);

    QadaptLoraBwdArgs b{};
    b.x = P(L.x.data());
    b.dy = P(L.dy.data());
    b.w = P(L.W.data());
    b.lora_a = P(L.A.data());
    b.lora_b = P(L.B.data());
    b.scales = P(L.s.data());
    b.adapter_idx = P(L.idx.data());
    b.u = P(u.data());
    b.g = P(g.data());
    b.dx = P(dx.data());
    b.grad_a = P(ga.data());
    b.grad_b = P(gb.data());
    b.m = M, b.n = N, b.k = K, b.rank = L.r, b.n_adapters = L.na;
    b.flags = vec ? QADAPT_LORA_VEC : 0;
    ra.lhs = P(L.dy.data()), ra.rhs = P(L.B.data()), ra.out = P(g.data()), ra.p = M, ra.t = N;
    ra.flags = (vec ? QADAPT_LORA_RANK_VEC_LHS : 0u) | (vec && L.r % 8 == 0 ? QADAPT_LORA_RANK_VEC_RHS : 0u);
    st = rank_run("lora_rank_dyb_bf16", ra, 3, QADAPT_LORA_RANK_MASKED, &c);
    check(st.code == QV_OK, "lora_rank_dyb_bf16: %s", st.message);
    st = run("lora_gemm_bwd_dx_dense_bf16", b, D1(tiles(M, K)), D1(256), 0, &c);
    check(st.code == QV_OK, "lora_gemm_bwd_dx_dense_bf16: %s", st.message);
    const uint32_t vru = R % 8 == 0 ? QADAPT_LORA_RANK_VEC_RHS : 0u;
    ra.lhs = P(L.x.data()), ra.rhs = P(g.data()), ra.out = P(ga.data()), ra.p = K, ra.t = M, ra.flags = vl | vru;
    st = rank_run("lora_rank_da_bf16", ra, 3, QADAPT_LORA_RANK_GRAD_A, &c);
    check(st.code == QV_OK, "lora_rank_da_bf16: %s", st.message);
    ra.lhs = P(L.dy.data()), ra.rhs = P(u.data()), ra.out = P(gb.data()), ra.p = N, ra.t = M, ra.flags = vl | vru;
    st = rank_run("lora_rank_db_bf16", ra, 3, QADAPT_LORA_RANK_GRAD_B, &c);
    check(st.code == QV_OK, "lora_rank_db_bf16: %s", st.message);
    std::vector<double> g_ref((size_t)M * R), dx_ref((size_t)M * K);
    for (uint32_t m = 0; m < M; ++m)
        for (uint32_t e = 0; e < R; ++e) {
            const int ad = L.adapter(m);
            double acc = 0;
            for (uint32_t n = 0; n < N; ++n)
                acc += (double)F(L.dy[(size_t)m * N + n]) * F(L.B[((size_t)(e / L.r) * N + n) * L.r + e % L.r]);
            g_ref[(size_t)m * R + e] = ad == (int)(e / L.r) ? L.s[ad] * acc : 0.0;
        }
    compare("g = s dy Bcat", g, g_ref, 1e-5);
    for (uint32_t m = 0; m < M; ++m)
        for (uint32_t k = 0; k < K; ++k) {
            double acc = 0;
            for (uint32_t n = 0; n < N; ++n) acc += (double)F(L.dy[(size_t)m * N + n]) * F(L.W[(size_t)n * K + k]);
            for (uint32_t e = 0; e < R; ++e) acc += (double)F(g[(size_t)m * R + e]) * F(L.A[(size_t)e * K + k]);
            dx_ref[(size_t)m * K + k] = acc;
        }
    compare("dx = dy W + g Acat", dx, dx_ref, 1e-4);
    size_t bad_a = 0, bad_b = 0;
    for (uint32_t e = 0; e < R; ++e)
        for (uint32_t k = 0; k < K; ++k) {
            double acc = ga0[(size_t)e * K + k];
            for (uint32_t m = 0; m < M; ++m) acc += (double)F(g[(size_t)m * R + e]) * F(L.x[(size_t)m * K + k]);
            bad_a += !(std::fabs(ga[(size_t)e * K + k] - acc) <= 1e-4 * (1 + std::fabs(acc)));
        }
    for (uint32_t a = 0; a < L.na; ++a)
        for (uint32_t n = 0; n < N; ++n)
            for (uint32_t j = 0; j < L.r; ++j) {
                const size_t o = ((size_t)a * N + n) * L.r + j;
                double acc = gb0[o];
                for (uint32_t m = 0; m < M; ++m) acc += (double)F(L.dy[(size_t)m * N + n]) * F(u[(size_t)m * R + a * L.r + j]);
                bad_b += !(std::fabs(gb[o] - acc) <= 1e-4 * (1 + std::fabs(acc)));
            }
    check(bad_a == 0, "grad_a += g^T x: %zu wrong", bad_a);
    check(bad_b == 0, "grad_b += dy^T u: %zu wrong", bad_b);
    printf("  the forward, backward and rank-product kernels against the float64 reference (failures above); counters: %llu mma, %llu ldmatrix (%.2f wavefronts per matrix), "
           "%llu cp.async (%llu bytes), %llu CTAs, %llu barriers\n",
           (unsigned long long)c.mma, (unsigned long long)c.ldmatrix,
           (double)c.ldmatrix_wavefronts / (4.0 * (double)std::max<uint64_t>(c.ldmatrix, 1)), (unsigned long long)c.cp_async,
           (unsigned long long)c.cp_async_bytes, (unsigned long long)c.ctas, (unsigned long long)c.bar_sync);

    if (K % 32 != 0) return;
    /* NF4: quantize W with the nf4 kernels, dequantize to bf16; the fused NF4 GEMMs must equal the
     * dense GEMMs on the dequantized W bit for bit (same tiles, same mma order). */
    const uint32_t bs = 64, nb = (N * K + bs - 1) / bs;
    std::vector<uint8_t> packed((size_t)N * K / 2);
    std::vector<float> absmax(nb);
    std::vector<bf16> wdq((size_t)N * K);
    reg.add(packed), reg.add(absmax), reg.add(wdq);
    QadaptNf4QuantizeArgs q{P(L.W.data()), P(packed.data()), P(absmax.data()), (uint64_t)N * K, bs, 0};
    check(run("nf4_quantize_bf16", q, D1(3), D1(256)).code == QV_OK, "nf4_quantize_bf16");
    QadaptNf4DequantizeArgs dq{};
    dq.packed = P(packed.data());
    dq.absmax = P(absmax.data());
    dq.n = (uint64_t)N * K;
    dq.blocksize = bs;
    dq.out = P(wdq.data());
    check(run("nf4_dequantize_bf16", dq, D1(3), D1(256)).code == QV_OK, "nf4_dequantize_bf16");
    std::vector<bf16> y_nf4((size_t)M * N), y_deq((size_t)M * N), dx_nf4((size_t)M * K), dx_deq((size_t)M * K);
    reg.add(y_nf4), reg.add(y_deq), reg.add(dx_nf4), reg.add(dx_deq);
    f.w = P(packed.data());
    f.absmax = P(absmax.data());
    f.blocksize = bs;
    f.y = P(y_nf4.data());
    check(run("lora_gemm_nf4_bf16", f, D1(tiles(M, N)), D1(QADAPT_LORA_GEMM_NF4_THREADS)).code == QV_OK, "lora_gemm_nf4_bf16");
    f.w = P(wdq.data());
    f.y = P(y_deq.data());
    check(run("lora_gemm_dense_bf16", f, D1(tiles(M, N)), D1(256)).code == QV_OK, "lora_gemm_dense_bf16 (dequantized W)");
    b.w = P(packed.data());
    b.absmax = P(absmax.data());
    b.blocksize = bs;
    b.dx = P(dx_nf4.data());
    check(run("lora_gemm_bwd_dx_nf4_bf16", b, D1(tiles(M, K)), D1(QADAPT_LORA_GEMM_NF4_THREADS)).code == QV_OK, "lora_gemm_bwd_dx_nf4_bf16");
    b.w = P(wdq.data());
    b.dx = P(dx_deq.data());
    check(run("lora_gemm_bwd_dx_dense_bf16", b, D1(tiles(M, K)), D1(256)).code == QV_OK, "bwd dx (dequantized W)");
    check(memcmp(y_nf4.data(), y_deq.data(), y_nf4.size() * 2) == 0, "lora_gemm_nf4_bf16 == dense on dequantized W");
    check(memcmp(dx_nf4.data(), dx_deq.data(), dx_nf4.size() * 2) == 0, "bwd_dx_nf4 == dense on dequantized W");
    printf("  NF4 forward and dx GEMMs against the dense ones on the dequantized weight, bit for bit\n");
}


/* Counted and checked memory traffic (vgpu_memcheck.inc) on kernels whose exact counts are known. */
void test_memcheck() {
    Timer tm("memory checks and counters: sectors, bank conflicts, misaligned vectors, exact bounds");
    float* in = (float*)aligned_alloc(128, 32 * 32 * 4);
    float* out = (float*)aligned_alloc(128, 32 * 16);
    for (int i = 0; i < 32 * 32; ++i) in[i] = (float)i;
    struct G {
        int mode;
        const char* what;
        uint64_t ld_b, ld_req, ld_sec, st_b, st_req, st_sec;
    };
    const G gl[] = {{0, "out[t] = in[t]", 128, 1, 4, 128, 1, 4},
                    {1, "out[t] = in[32 t] (uncoalesced)", 128, 1, 32, 128, 1, 4},
                    {2, "out[t] = in[0] (one sector for all)", 128, 1, 1, 128, 1, 4},
                    {3, "uint4 copy", 512, 1, 16, 512, 1, 16},
                    {4, "out[t] = in[t + 1] (straddles a sector)", 128, 1, 5, 128, 1, 4}};
    for (const G& g : gl) {
        StOut a{};
        a.in = P(in), a.out = P(out), a.mode = g.mode;
        QvCounters c{};
        const QvStatus st = run("st_mem_global", a, D1(1), D1(32), 0, &c);
        check(st.code == QV_OK, "%s: %s", g.what, st.message);
        check(c.global_ld_bytes == g.ld_b && c.global_ld_requests == g.ld_req && c.global_ld_sectors == g.ld_sec &&
                  c.global_st_bytes == g.st_b && c.global_st_requests == g.st_req && c.global_st_sectors == g.st_sec &&
                  c.shared_requests == 0 && c.ungrouped_accesses == 0,
              "%s: loads %llu B / %llu requests / %llu sectors (want %llu/%llu/%llu), stores %llu B / %llu / %llu (want "
              "%llu/%llu/%llu)",
              g.what, (unsigned long long)c.global_ld_bytes, (unsigned long long)c.global_ld_requests,
              (unsigned long long)c.global_ld_sectors, (unsigned long long)g.ld_b, (unsigned long long)g.ld_req,
              (unsigned long long)g.ld_sec, (unsigned long long)c.global_st_bytes, (unsigned long long)c.global_st_requests,
              (unsigned long long)c.global_st_sectors, (unsigned long long)g.st_b, (unsigned long long)g.st_req,
              (unsigned long long)g.st_sec);
    }
    struct S {
        int mode;
        const char* what;
        uint64_t req, wf, ideal;
    };
    const S sh[] = {{0, "tile[t] = ..; tile[t ^ 1]", 2, 2, 2},       {1, "tile[2t] (2-way conflict)", 1, 2, 1},
                    {2, "tile[32t] (32-way conflict)", 1, 32, 1},    {3, "tile[33t] (padded)", 1, 1, 1},
                    {4, "tile[0] by every lane (broadcast)", 2, 2, 2}, {5, "float4 tile[t] (4 phases)", 1, 4, 4},
                    {6, "float4 tile[2t] (2-way per phase)", 1, 8, 4}, {7, "float2 tile[t] (2 phases)", 1, 2, 2},
                    {8, "dynamic d[4t] (4-way conflict)", 1, 4, 1}};
    for (const S& x : sh) {
        StOut a{};
        a.in = P(in), a.out = P(out), a.mode = x.mode;
        QvCounters c{};
        const QvStatus st = run("st_mem_shared", a, D1(1), D1(32), x.mode == 8 ? 1024 : 0, &c);
        check(st.code == QV_OK, "%s: %s", x.what, st.message);
        check(c.shared_requests == x.req && c.shared_wavefronts == x.wf && c.shared_ideal_wavefronts == x.ideal &&
                  c.global_st_requests == 1 && c.global_st_sectors == 4 && c.global_ld_requests == 0,
              "%s: %llu requests, %llu wavefronts (ideal %llu); want %llu, %llu (%llu); global stores %llu/%llu", x.what,
              (unsigned long long)c.shared_requests, (unsigned long long)c.shared_wavefronts,
              (unsigned long long)c.shared_ideal_wavefronts, (unsigned long long)x.req, (unsigned long long)x.wf,
              (unsigned long long)x.ideal, (unsigned long long)c.global_st_requests, (unsigned long long)c.global_st_sectors);
    }
    {
        /* cp.async and ldmatrix traffic lands in the same counters: st_pipeline's copies, st_ldmatrix's rows. */
        std::vector<uint32_t> o(128);
        StOut l{};
        l.out = P(o.data());
        l.mode = 4;
        l.param = 64; /* rows 128 bytes apart, all in one bank group: 8 wavefronts per matrix */
        QvCounters c{};
        check(run("st_ldmatrix", l, D1(1), D1(32), 0, &c).code == QV_OK, "ldmatrix.x4 for the counters");
        /* the fill: 128 warp-wide stores of 32 consecutive uint16 (1 wavefront each); the x4: 4 x 8 */
        check(c.ldmatrix == 1 && c.ldmatrix_wavefronts == 32 && c.shared_requests == 129 && c.shared_wavefronts == 160 &&
                  c.shared_ideal_wavefronts == 132 && c.shared_ld_bytes == 512 && c.shared_st_bytes == 64 * 64 * 2,
              "ldmatrix.x4 in the shared counters: %llu requests, %llu wavefronts (ideal %llu), %llu B loaded, %llu B stored",
              (unsigned long long)c.shared_requests, (unsigned long long)c.shared_wavefronts,
              (unsigned long long)c.shared_ideal_wavefronts, (unsigned long long)c.shared_ld_bytes,
              (unsigned long long)c.shared_st_bytes);
    }
    {
        /* cp.async: a global read of src-size bytes and a shared write of cp-size bytes per copy. */
        std::vector<float> src(16 * 32), o(16 * 32);
        for (size_t i = 0; i < src.size(); ++i) src[i] = (float)i;
        Registered reg;
        reg.add(src);
        reg.add(o);
        StOut a{};
        a.in = P(src.data());
        a.out = P(o.data());
        a.mode = 0;
        QvCounters c{};
        check(run("st_cp_forms", a, D1(1), D1(32), 0, &c).code == QV_OK, "cp.async forms for the counters");
        check(c.cp_async > 0 && c.global_ld_bytes >= c.cp_async_bytes && c.shared_st_bytes >= 4 * c.cp_async,
              "cp.async in the global/shared counters: %llu copies of %llu B; global loads %llu B, shared stores %llu B",
              (unsigned long long)c.cp_async, (unsigned long long)c.cp_async_bytes, (unsigned long long)c.global_ld_bytes,
              (unsigned long long)c.shared_st_bytes);
    }
    /* Misaligned vector accesses: x86 performs them, a GPU faults. */
    {
        StOut a{};
        a.in = P(in), a.out = P(out), a.mode = 5, a.param = 4;
        const QvStatus st = run("st_mem_global", a, D1(1), D1(32));
        expect("uint4 load 4 bytes off 16-byte alignment", st, QV_PTX_ERROR);
        check(strstr(st.message, "misaligned") != nullptr, "message names the misalignment: %s", st.message);
        a.mode = 6;
        expect("uint2 store 4 bytes off 8-byte alignment", run("st_mem_global", a, D1(1), D1(32)), QV_PTX_ERROR);
        a.param = 16;
        a.mode = 5;
        check(run("st_mem_global", a, D1(1), D1(32)).code == QV_OK, "uint4 load at a 16-byte aligned offset");
    }
    /* Exact bounds against the allocation table: 31 floats, 4 bytes of slack after them. */
    {
        float* small = (float*)aligned_alloc(16, 32 * 4);
        for (int i = 0; i < 32; ++i) small[i] = (float)i;
        Registered reg;
        reg.add(small, 31 * 4);
        reg.add(out, 32 * 16);
        StOut a{};
        a.in = P(small), a.out = P(out), a.mode = 7, a.param = 0;
        QvStatus st = run("st_mem_global", a, D1(1), D1(31));
        check(st.code == QV_OK, "31 threads read in[0] .. in[30]: %s", st.message);
        a.param = -1;
        expect("a 4-byte read of in[-1]", run("st_mem_global", a, D1(1), D1(31)), QV_MEMORY_FAULT);
        a.param = 0;
        st = run("st_mem_global", a, D1(1), D1(32));
        expect("a 4-byte read of in[31], into the slack", st, QV_MEMORY_FAULT);
        check(st.fault_addr == P(small) + 124 && st.thread.x == 31, "fault at %llx thread %u (want %llx, 31)",
              (unsigned long long)st.fault_addr, st.thread.x, (unsigned long long)(P(small) + 124));
        Registered bytes;
        uint8_t* b = (uint8_t*)aligned_alloc(16, 64);
        bytes.add(b, 31);
        a.in = P(b), a.mode = 8, a.param = 0;
        st = run("st_mem_global", a, D1(1), D1(32));
        expect("a 1-byte read one past the end of a 31-byte buffer", st, QV_MEMORY_FAULT);
        check(st.fault_addr == P(b) + 31, "fault at %llx (want %llx)", (unsigned long long)st.fault_addr,
              (unsigned long long)(P(b) + 31));
        check(run("st_mem_global", a, D1(1), D1(31)).code == QV_OK, "bytes 0 .. 30 of the 31-byte buffer");
        free(b);
        free(small);
    }
    free(in);
    free(out);
}

void test_concurrent() {
    Timer tm("4 host threads launching lora_gemm_dense_bf16 at once");
    Lora L(130, 136, 64, 8, 1, true);
    std::vector<std::vector<bf16>> ys(4, std::vector<bf16>((size_t)L.M * L.N));
    std::vector<bf16> u((size_t)L.M * L.R());
    QadaptLoraFwdArgs f{};
    f.x = P(L.x.data());
    f.w = P(L.W.data());
    f.lora_a = P(L.A.data());
    f.lora_b = P(L.B.data());
    f.scales = P(L.s.data());
    f.adapter_idx = P(L.idx.data());
    f.u = P(u.data());
    f.m = L.M, f.n = L.N, f.k = L.K, f.rank = L.r, f.n_adapters = L.na, f.flags = QADAPT_LORA_VEC;
    QadaptLoraRankArgs ra{};
    ra.lhs = P(L.x.data()), ra.rhs = P(L.A.data()), ra.scales = P(L.s.data()), ra.adapter_idx = P(L.idx.data());
    ra.out = P(u.data()), ra.p = L.M, ra.t = L.K, ra.rank = L.r, ra.n_adapters = L.na;
    ra.flags = QADAPT_LORA_RANK_VEC_LHS | QADAPT_LORA_RANK_VEC_RHS;
    {
        Registered reg; /* rank_run registers its partial sums: every buffer of the launch too */
        reg.add(L.x), reg.add(L.A), reg.add(L.s), reg.add(L.idx), reg.add(u);
        check(rank_run("lora_rank_xa_bf16", ra, 2, QADAPT_LORA_RANK_MASKED, nullptr).code == QV_OK, "xa");
    }
    std::vector<std::thread> th;
    std::atomic<int> ok{0};
    for (int i = 0; i < 4; ++i)
        th.emplace_back([&, i] {
            QadaptLoraFwdArgs a = f;
            a.y = P(ys[i].data());
            for (int rep = 0; rep < 3; ++rep) ok += run("lora_gemm_dense_bf16", a, D1(tiles(L.M, L.N)), D1(256)).code == QV_OK;
        });
    for (auto& t : th) t.join();
    check(ok == 12, "concurrent launches: %d of 12 ok", ok.load());
    for (int i = 1; i < 4; ++i) check(memcmp(ys[0].data(), ys[i].data(), ys[0].size() * 2) == 0, "concurrent result %d", i);
}


/* ---- sm_90a ------------------------------------------------------------------------------------- */

void test_tma() {
    Timer tm("TMA: boxes at negative and ragged coordinates (zero fill), no swizzle, 128- and 64-byte swizzle");
    /* uint16 tensor 100 x 37 (row pitch 208 bytes), boxes of 64 x 12 (128-byte rows). */
    const uint32_t W = 100, H = 37, pitch = 208;
    std::vector<uint8_t> g(pitch * H);
    for (size_t i = 0; i < g.size(); ++i) g[i] = (uint8_t)(i * 7 + 3);
    Registered reg;
    reg.add(g);
    std::vector<uint8_t> out(64 * 2 * 12);
    reg.add(out);
    const int32_t coords[4][2] = {{0, 0}, {-5, -3}, {60, 30}, {-64, 0}};
    size_t bad = 0;
    /* Swizzle modes 0 (none), 3 (128B: 128-byte rows, chunk j ^ (r % 8)) and 2 (64B: boxes of
     * 32 x 12, 64-byte rows, chunk j ^ ((r / 2) % 4)). */
    for (uint32_t sw : {0u, 3u, 2u})
        for (auto& c : coords) {
            StTma a{};
            const uint32_t cols = sw == 2 ? 32 : 64, rowb = cols * 2;
            const uint64_t dims[2] = {W, H}, strides[1] = {pitch};
            const uint32_t box[2] = {cols, 12}, es[2] = {1, 1};
            check(qv_tensor_map_encode(&a.map, 1, 2, g.data(), dims, strides, box, es, 0, sw, 0, 0) == 0, "encode");
            std::fill(out.begin(), out.end(), 0xee);
            a.out = P(out.data()), a.c0 = c[0], a.c1 = c[1], a.bytes = rowb * 12;
            QvCounters ctr{};
            const QvStatus st = run("st_tma", a, D1(1), D1(32), 2048, &ctr);
            check(st.code == QV_OK, "st_tma: %s", st.message);
            size_t inb = 0;
            for (uint32_t r = 0; r < 12; ++r)
                for (uint32_t b = 0; b < rowb; ++b) {
                    const int64_t y = c[1] + (int64_t)r, x = c[0] + (int64_t)(b / 2);
                    const bool in = y >= 0 && y < H && x >= 0 && x < W;
                    inb += in;
                    const uint8_t want = in ? g[(size_t)y * pitch + x * 2 + b % 2] : 0;
                    const uint32_t x16 = sw == 3 ? r % 8 : sw == 2 ? (r / 2) % 4 : 0;
                    bad += out[r * rowb + 16 * ((b / 16) ^ x16) + b % 16] != want;
                }
            check(ctr.global_ld_bytes == inb, "TMA global load bytes %llu, want %zu", (unsigned long long)ctr.global_ld_bytes, inb);
        }
    check(bad == 0, "TMA boxes: %zu bytes differ from the box formula", bad);
    /* The driver's rules. */
    StTma a{};
    const uint64_t dims[2] = {W, H}, strides[1] = {pitch}, bad_strides[1] = {200};
    const uint32_t box[2] = {64, 12}, wide[2] = {128, 12}, es[2] = {1, 1};
    check(qv_tensor_map_encode(&a.map, 1, 2, g.data(), dims, bad_strides, box, es, 0, 0, 0, 0) != 0, "stride not a multiple of 16 refused");
    check(qv_tensor_map_encode(&a.map, 1, 2, g.data(), dims, strides, wide, es, 0, 3, 0, 0) != 0, "256-byte rows with the 128B swizzle refused");
    check(qv_tensor_map_encode(&a.map, 1, 2, g.data() + 8, dims, strides, box, es, 0, 0, 0, 0) != 0, "unaligned address refused");
    /* A box reaching past the allocation: the tensor claims more rows than the buffer holds. */
    const uint64_t tall[2] = {W, H + 4};
    check(qv_tensor_map_encode(&a.map, 1, 2, g.data(), tall, strides, box, es, 0, 0, 0, 0) == 0, "encode");
    a.out = P(out.data()), a.c0 = 0, a.c1 = 30, a.bytes = 64 * 2 * 12;
    expect("TMA box reading past its buffer", run("st_tma", a, D1(1), D1(32), 2048), QV_MEMORY_FAULT);
}

void test_sm90() {
    Timer tm("sm_90a: TMA + mbarrier pipeline feeding wgmma m64nNk16 (N = 64, 128, 256), and its teeth");
    const uint32_t Ns[3] = {64, 128, 256}, Ks[3] = {200, 128, 320}, rows[3] = {50, 128, 251};
    for (int v = 0; v < 3; ++v) {
        const uint32_t N = Ns[v], K = Ks[v], R = rows[v]; /* B has R <= N rows: the rest zero-filled */
        std::vector<bf16> A = rnd_bf16((size_t)64 * K, 1.0f), B = rnd_bf16((size_t)R * K, 1.0f);
        std::vector<float> out((size_t)64 * N), want((size_t)64 * N);
        for (uint32_t r = 0; r < 64; ++r)
            for (uint32_t c = 0; c < N; ++c) {
                float s = 0.0f;
                const uint32_t kp = (K + 63) / 64 * 64;
                for (uint32_t k = 0; k < kp; ++k) {
                    const float x = k < K ? F(A[(size_t)r * K + k]) : 0.0f;
                    const float y = k < K && c < R ? F(B[(size_t)c * K + k]) : 0.0f;
                    s = s + x * y;
                }
                want[(size_t)r * N + c] = s;
            }
        Registered reg;
        reg.add(A), reg.add(B), reg.add(out);
        StSm90 a{};
        const uint64_t dims[2] = {K, R}, strides[1] = {(uint64_t)K * 2};
        const uint32_t box[2] = {64, N}, es[2] = {1, 1};
        check(qv_tensor_map_encode(&a.b_map, 9, 2, B.data(), dims, strides, box, es, 0, 3, 0, 0) == 0, "encode B");
        a.a = P(A.data()), a.out = P(out.data()), a.n = N, a.k = K;
        const uint32_t dyn = kSmStages * N * 128 + 64;
        const uint32_t steps = (K + 63) / 64;
        for (uint32_t mode = 0; mode <= SM_BAD_MAP; ++mode) {
            if (v > 0 && mode != SM_OK && mode != SM_NO_WAIT && mode != SM_NO_FINAL_WAIT) continue;
            a.mode = mode;
            std::fill(out.begin(), out.end(), -1.0f);
            QvCounters ctr{};
            const QvStatus st = run("st_sm90", a, D1(2), D1(256), dyn, &ctr);
            size_t diff = 0, nan = 0;
            for (size_t i = 0; i < out.size(); ++i) {
                diff += memcmp(&out[i], &want[i], 4) != 0;
                nan += std::isnan(out[i]);
            }
            char what[96];
            snprintf(what, sizeof what, "N=%u mode %u", N, mode);
            switch (mode) {
                case SM_OK:
                    check(st.code == QV_OK, "%s: %s", what, st.message);
                    check(diff == 0, "wgmma N=%u K=%u: %zu of %zu elements differ from the scalar reference", N, K, diff, out.size());
                    check(ctr.mma == 2ull * steps * 4 * (N / 2), "wgmma N=%u: mma counter %llu", N, (unsigned long long)ctr.mma);
                    check(ctr.global_ld_bytes >= 2ull * R * K * 2, "TMA bytes counted as global loads (%llu)",
                          (unsigned long long)ctr.global_ld_bytes);
                    break;
                case SM_NO_WAIT:
                    check(st.code == QV_OK && nan == out.size(), "N=%u: reading TMA data without waiting went unnoticed (%zu of %zu NaN; %s)",
                          N, nan, out.size(), st.message);
                    break;
                case SM_NO_FINAL_WAIT:
                    check(st.code == QV_OK && nan == out.size(), "N=%u: d read before wgmma.wait_group retired it went unnoticed (%zu NaN)",
                          N, nan);
                    break;
                case SM_COUNT2: expect("mbarrier phase short of arrivals", st, QV_BARRIER_DEADLOCK); break;
                case SM_TX_SHORT: expect("mbarrier tx-count never reaching 0", st, QV_BARRIER_DEADLOCK); break;
                case SM_WARP_SKIPS: expect("a warp of the warpgroup skipping the wgmma", st, QV_BARRIER_DEADLOCK); break;
                case SM_TX_OVER: expect("TMA box larger than expect_tx", st, QV_PTX_ERROR); break;
                case SM_UNINIT: expect("arrive on an uninitialized mbarrier", st, QV_PTX_ERROR); break;
                case SM_BAD_MAP: expect("TMA with a map never encoded", st, QV_PTX_ERROR); break;
            }
            if (mode == SM_TX_SHORT || mode == SM_COUNT2)
                check(strstr(st.message, "mbarrier") != nullptr, "the deadlock names the mbarrier waits: %s", st.message);
        }
        a.mode = SM_OK;
        check(run("st_sm90", a, D1(1), D1(256), dyn).code == QV_OK, "sm90 launch after the planted bugs");
    }
    /* A CTA whose size is not a multiple of 128 cannot form warpgroups. */
    StSm90 a{};
    a.n = 64, a.k = 64, a.mode = SM_OK;
    std::vector<bf16> B = rnd_bf16(64 * 64, 1.0f);
    const uint64_t dims[2] = {64, 64}, strides[1] = {128};
    const uint32_t box[2] = {64, 64}, es[2] = {1, 1};
    qv_tensor_map_encode(&a.b_map, 9, 2, B.data(), dims, strides, box, es, 0, 3, 0, 0);
    std::vector<bf16> A = rnd_bf16(64 * 64, 1.0f);
    std::vector<float> out(64 * 64);
    a.a = P(A.data()), a.out = P(out.data());
    expect("wgmma in a CTA of 224 threads", run("st_sm90", a, D1(1), D1(224), kSmStages * 64 * 128), QV_PTX_ERROR);
}
}  // namespace

int main(int argc, char** argv) {
    const auto t0 = std::chrono::steady_clock::now();
    if (argc > 1) qv_set_workers((uint32_t)atoi(argv[1]));
    test_registry();
    test_indices();
    test_shuffles();
    test_ldmatrix();
    test_mma();
    test_cp_async();
    test_race();
    test_deadlocks();
    test_faults();
    test_dyn_smem();
    test_tma();
    test_sm90();
    test_lora(150, 200, 96, 8, 2, true);
    test_lora(70, 130, 90, 8, 2, false);
    test_lora(300, 264, 256, 8, 2, true);
    /* K / 32 = 4 k-slices: the last one in stage buffer 0, which the LoRA extension reuses; R = 48:
     * two extension slices (both make the barriers around the extension matter). */
    test_lora(130, 136, 128, 16, 3, true);
    /* lora_rank.cu: R = 21 (a 32-wide tile), R = 80 (two 64-wide tiles), odd K and N (element
     * loads), splits of uneven length. */
    test_lora(100, 72, 264, 7, 3, true);
    test_lora(67, 45, 99, 40, 2, false);
    test_concurrent();
    test_memcheck();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("%d checks, %d failed, %.2f s\n", g_checks, g_fail, s);
    return g_fail != 0;
}

/*
 * nf4.cu — NF4 blockwise quantization, double quantization of the block constants, and
 * dequantization, bit-exact with bitsandbytes and with qadapt's CPU reference
 * (crates/qadapt/src/nf4/cpu.rs).
 *
 * Math. A tensor of n elements, flattened, is cut into blocks of `bs` (32..4096,
 * power of two). For block b: absmax[b] = max |x|, and each element is coded as the nearest of the
 * 16 NF4 levels to x * (1/absmax[b]), bounds exactly as bitsandbytes 0.50 (see nf4_codec.cuh). An
 * all-zero block codes to 7 (level 0.0). Element 2j goes to the HIGH nibble of packed[j], 2j+1 to the low one; an odd n
 * pads the last low nibble with code 7.
 *
 * Double quantization replaces absmax[nblocks] (f32) with codes[nblocks] (u8): offset = mean of
 * absmax as torch computes it (bitsandbytes calls absmax.mean(); see nf4_dq_offset), and each run
 * of 256 values v = absmax - offset is coded by the signed 8-bit dynamic map against
 * v / nested_absmax, nested_absmax = max |v| of the run.
 *
 * Layout and tiling:
 *   nf4_quantize_T       one warp per NF4 block (grid-stride over blocks); lanes read the block
 *                        coalesced for the absmax, then each lane codes pairs (2j, 2j+1) and writes
 *                        one byte per pair.
 *   nf4_dq_offset        one warp: lane t sums column t of the 32-wide rows (torch's cascade),
 *                        lane 0 folds the columns and the tail in torch's order.
 *   nf4_dq_encode        one 256-thread CTA per double-quant block; map in shared memory.
 *   nf4_dequantize_T     one thread per 32 elements: a single 16-byte load of packed codes, the
 *                        block scale decoded in place (double quant included), NF4 levels from a
 *                        16-entry shared table (16 distinct words, no bank conflicts), 16-byte
 *                        stores. The tail (n not a multiple of 32) goes element by element.
 * Every output is overwritten, never accumulated.
 */
#include "nf4_codec.cuh"
#include "qadapt.h"

using qadapt::absmax_step;
using qadapt::from_f32;
using qadapt::nf4_encode_scaled;
using qadapt::nf4_level;
using qadapt::to_f32;

namespace {

constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ void quantize_blocks(const QadaptNf4QuantizeArgs& a) {
    const T* __restrict__ in = reinterpret_cast<const T*>(a.input);
    uint8_t* __restrict__ packed = reinterpret_cast<uint8_t*>(a.packed);
    float* __restrict__ absmax = reinterpret_cast<float*>(a.absmax);
    const uint64_t n = a.n;
    const uint64_t bs = a.blocksize;
    const uint64_t nblocks = (n + bs - 1) / bs;
    const unsigned lane = threadIdx.x & 31u;
    const uint64_t warps_per_cta = blockDim.x / 32u;
    const uint64_t warp0 = blockIdx.x * warps_per_cta + threadIdx.x / 32u;
    const uint64_t nwarps = (uint64_t)gridDim.x * warps_per_cta;

    for (uint64_t b = warp0; b < nblocks; b += nwarps) {
        const uint64_t start = b * bs;
        const uint64_t len = (start + bs <= n) ? bs : n - start;
        float m = 0.0f;
        for (uint64_t i = lane; i < len; i += 32) m = absmax_step(m, to_f32<T>(in[start + i]));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = absmax_step(m, __shfl_xor_sync(kFull, m, o));
        /* bitsandbytes 0.50: the divisor is absmax.clamp(min=1e-38) (NaN stays NaN); a full block
         * stores absmax and scales by x * (1/d), a partial last block stores d and divides. */
        const float d = (m < QADAPT_NF4_MIN_ABSMAX) ? QADAPT_NF4_MIN_ABSMAX : m;
        const bool partial = len < bs;
        if (lane == 0) absmax[b] = partial ? d : m;

        const float inv = __fdiv_rn(1.0f, d);
        const uint64_t pairs = (len + 1) / 2;
        for (uint64_t p = lane; p < pairs; p += 32) {
            const uint64_t e = start + 2 * p;
            uint32_t q[2];
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                if (2 * p + k >= len) {
                    q[k] = QADAPT_NF4_CODE_ZERO;
                } else {
                    const float x = to_f32<T>(in[e + k]);
                    q[k] = nf4_encode_scaled(partial ? __fdiv_rn(x, d) : __fmul_rn(x, inv));
                }
            }
            packed[start / 2 + p] = (uint8_t)((q[0] << 4) | q[1]);
        }
    }
}

/* Code of a normalized value q as bitsandbytes 0.50's CPU quantize_blockwise picks it (cpu.rs
 * dq_encode): clamp to [-1, 1], bin i = (u16)(fma((q + 1) * 0.5, 65535, 0.5)) (its x86-64 build
 * fuses that multiply-add), then the number of the 255 sorted midpoints below 2i/65535 - 1. */
__device__ __forceinline__ uint32_t dq_encode(const float* mid, float q) {
    const float c = (q < -1.0f) ? -1.0f : ((1.0f < q) ? 1.0f : q);
    const float h = __fmul_rn(__fadd_rn(c, 1.0f), 0.5f);
    const uint32_t bin = (h != h) ? 0u : ((uint32_t)__fmaf_rn(h, 65535.0f, 0.5f) & 0xffffu);
    const float val = __fsub_rn(__fdiv_rn(__fmul_rn(2.0f, (float)bin), 65535.0f), 1.0f);
    uint32_t lo = 0;
#pragma unroll
    for (uint32_t step = 128; step > 0; step >>= 1) {
        if (lo + step <= 255u && mid[lo + step - 1] < val) lo += step;
    }
    return lo;
}

template <typename T>
__device__ __forceinline__ void store_decoded(T* out, const float (&v)[32]);

template <>
__device__ __forceinline__ void store_decoded<float>(float* out, const float (&v)[32]) {
    float4* o = reinterpret_cast<float4*>(out);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

template <typename H>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const H l = from_f32<H>(lo);
    const H h = from_f32<H>(hi);
    const uint16_t lb = *reinterpret_cast<const uint16_t*>(&l);
    const uint16_t hb = *reinterpret_cast<const uint16_t*>(&h);
    return (uint32_t)lb | ((uint32_t)hb << 16);
}

template <typename H>
__device__ __forceinline__ void store_decoded_16(H* out, const float (&v)[32]) {
    uint4* o = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        o[i] = make_uint4(pack2<H>(v[8 * i], v[8 * i + 1]), pack2<H>(v[8 * i + 2], v[8 * i + 3]),
                          pack2<H>(v[8 * i + 4], v[8 * i + 5]), pack2<H>(v[8 * i + 6], v[8 * i + 7]));
    }
}

template <>
__device__ __forceinline__ void store_decoded<__nv_bfloat16>(__nv_bfloat16* out, const float (&v)[32]) {
    store_decoded_16<__nv_bfloat16>(out, v);
}
template <>
__device__ __forceinline__ void store_decoded<__half>(__half* out, const float (&v)[32]) {
    store_decoded_16<__half>(out, v);
}

template <typename T>
__device__ __forceinline__ void dequantize(const QadaptNf4DequantizeArgs& a) {
    __shared__ float levels[16];
    /* f32 levels times the f32 scale, one rounding to T: bitsandbytes 0.50 decodes in f32. */
    if (threadIdx.x < 16) levels[threadIdx.x] = nf4_level((int)threadIdx.x);
    __syncthreads();

    const uint8_t* __restrict__ packed = reinterpret_cast<const uint8_t*>(a.packed);
    const float* __restrict__ absmax = reinterpret_cast<const float*>(a.absmax);
    const uint8_t* __restrict__ codes = reinterpret_cast<const uint8_t*>(a.absmax_codes);
    const float* __restrict__ nested = reinterpret_cast<const float*>(a.nested_absmax);
    const float* __restrict__ map = reinterpret_cast<const float*>(a.dynamic_map);
    T* __restrict__ out = reinterpret_cast<T*>(a.out);
    const uint64_t n = a.n;
    const uint64_t groups = (n + 31) / 32;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;

    for (uint64_t g = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
        const uint64_t e0 = 32 * g;
        /* blocksize >= 32 and a power of two: the 32 elements share one NF4 block. */
        const float scale = qadapt::nf4_block_scale(absmax, codes, nested, map, a.offset, e0 / a.blocksize);
        if (e0 + 32 <= n) {
            const uint4 w = __ldg(reinterpret_cast<const uint4*>(packed) + g);
            const uint32_t words[4] = {w.x, w.y, w.z, w.w};
            float v[32];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const uint32_t byte = (words[i] >> (8 * j)) & 0xffu;
                    v[8 * i + 2 * j] = __fmul_rn(levels[byte >> 4], scale);
                    v[8 * i + 2 * j + 1] = __fmul_rn(levels[byte & 0xfu], scale);
                }
            }
            store_decoded<T>(out + e0, v);
        } else {
            for (uint64_t e = e0; e < n; ++e) {
                const uint32_t byte = packed[e / 2];
                const uint32_t q = (e & 1) ? (byte & 0xfu) : (byte >> 4);
                out[e] = from_f32<T>(__fmul_rn(levels[q], scale));
            }
        }
    }
}

}  // namespace

QADAPT_KERNEL(nf4_quantize_f32, QadaptNf4QuantizeArgs) { quantize_blocks<float>(args); }
QADAPT_KERNEL(nf4_quantize_bf16, QadaptNf4QuantizeArgs) { quantize_blocks<__nv_bfloat16>(args); }
QADAPT_KERNEL(nf4_quantize_f16, QadaptNf4QuantizeArgs) { quantize_blocks<__half>(args); }

/* torch's multi_row_sum for one column: rows of 32 floats, column t = threadIdx.x, four levels of
 * accumulators; level 0 takes 2^lp rows, then carries into level 1, and level j into j+1 when the
 * row count is a multiple of 2^(j*lp). */
__device__ __forceinline__ float column_cascade_sum(const float* __restrict__ x, uint64_t rows, unsigned t) {
    const unsigned cl = rows <= 2 ? 1u : 64u - (unsigned)__clzll((long long)(rows - 1));
    const unsigned lp = max(4u, cl / 4u);
    const uint64_t step = 1ull << lp;
    const uint64_t mask = step - 1;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    uint64_t i = 0;
    while (i + step <= rows) {
        for (uint64_t s = 0; s < step; ++s, ++i) a0 = __fadd_rn(a0, __ldg(x + 32 * i + t));
        a1 = __fadd_rn(a1, a0);
        a0 = 0.0f;
        if ((i & (mask << lp)) == 0) {
            a2 = __fadd_rn(a2, a1);
            a1 = 0.0f;
            if ((i & (mask << (2 * lp))) == 0) {
                a3 = __fadd_rn(a3, a2);
                a2 = 0.0f;
            }
        }
    }
    for (; i < rows; ++i) a0 = __fadd_rn(a0, __ldg(x + 32 * i + t));
    return __fadd_rn(__fadd_rn(__fadd_rn(a0, a1), a2), a3);
}

QADAPT_KERNEL(nf4_dq_offset, QadaptNf4DoubleQuantArgs) {
    __shared__ float cols[QADAPT_DQ_SUM_COLUMNS];
    const float* __restrict__ x = reinterpret_cast<const float*>(args.absmax);
    const uint64_t n = args.nblocks;
    const unsigned t = threadIdx.x;
    float sum = 0.0f;
    if (n < 8) {
        /* torch's scalar row sum: rows of 4, then the tail into column 0, then the 4 columns. */
        if (t == 0) {
            float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const uint64_t g = n / 4;
            for (uint64_t i = 0; i < g; ++i)
                for (int c = 0; c < 4; ++c) p[c] = __fadd_rn(p[c], x[4 * i + c]);
            for (uint64_t k = 4 * g; k < n; ++k) p[0] = __fadd_rn(p[0], x[k]);
            sum = __fadd_rn(__fadd_rn(__fadd_rn(p[0], p[1]), p[2]), p[3]);
        }
    } else {
        const uint64_t v = n / 8, g = v / 4;
        cols[t] = column_cascade_sum(x, g, t);
        __syncwarp();
        if (t == 0) {
            float p[8];
            for (int l = 0; l < 8; ++l) p[l] = cols[l];
            for (uint64_t j = 4 * g; j < v; ++j)
                for (int l = 0; l < 8; ++l) p[l] = __fadd_rn(p[l], x[8 * j + l]);
            for (int b = 1; b < 4; ++b)
                for (int l = 0; l < 8; ++l) p[l] = __fadd_rn(p[l], cols[8 * b + l]);
            for (uint64_t k = 8 * v; k < n; ++k) sum = __fadd_rn(sum, x[k]);
            for (int l = 0; l < 8; ++l) sum = __fadd_rn(sum, p[l]);
        }
    }
    if (t == 0) *reinterpret_cast<float*>(args.offset) = __fdiv_rn(sum, (float)n);
}

QADAPT_KERNEL(nf4_dq_encode, QadaptNf4DoubleQuantArgs) {
    __shared__ float mid[255];
    __shared__ float warp_max[QADAPT_DQ_BLOCK / 32];
    const float* __restrict__ absmax = reinterpret_cast<const float*>(args.absmax);
    uint8_t* __restrict__ codes = reinterpret_cast<uint8_t*>(args.codes);
    float* __restrict__ nested = reinterpret_cast<float*>(args.nested_absmax);
    {
        const float* map = reinterpret_cast<const float*>(args.dynamic_map);
        if (threadIdx.x < 255) mid[threadIdx.x] = __fmul_rn(0.5f, __fadd_rn(map[threadIdx.x], map[threadIdx.x + 1]));
    }
    const float offset = *reinterpret_cast<const float*>(args.offset);
    __syncthreads();
    const uint64_t nnested = (args.nblocks + QADAPT_DQ_BLOCK - 1) / QADAPT_DQ_BLOCK;
    for (uint64_t b = blockIdx.x; b < nnested; b += gridDim.x) {
        const uint64_t i = b * QADAPT_DQ_BLOCK + threadIdx.x;
        const bool live = i < args.nblocks;
        const float v = live ? __fsub_rn(absmax[i], offset) : 0.0f;
        float m = fabsf(v);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, o));
        if ((threadIdx.x & 31u) == 0) warp_max[threadIdx.x / 32] = m;
        __syncthreads();
        m = warp_max[0];
#pragma unroll
        for (int w = 1; w < QADAPT_DQ_BLOCK / 32; ++w) m = fmaxf(m, warp_max[w]);
        if (threadIdx.x == 0) nested[b] = m;
        if (live) {
            codes[i] = (uint8_t)(m == 0.0f ? QADAPT_DQ_CODE_ZERO : dq_encode(mid, __fmul_rn(v, __fdiv_rn(1.0f, m))));
        }
        __syncthreads();
    }
}

QADAPT_KERNEL(nf4_dequantize_f32, QadaptNf4DequantizeArgs) { dequantize<float>(args); }
QADAPT_KERNEL(nf4_dequantize_bf16, QadaptNf4DequantizeArgs) { dequantize<__nv_bfloat16>(args); }
QADAPT_KERNEL(nf4_dequantize_f16, QadaptNf4DequantizeArgs) { dequantize<__half>(args); }

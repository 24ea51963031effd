/*
 * lora.cu — fused LoRA linear layers over a dense bf16 or an NF4 base weight.
 *
 * Math (forward). x [M, K] bf16 row-major, W [N, K], A_a [r, K], B_a [N, r] for adapter a of a
 * stack of n_adapters, s_a its scale, idx(m) the adapter of row m (-1: base only):
 *     u[m, a*r + j] = bf16( s_a * sum_k x[m,k] A_a[j,k] )   if a == idx(m), else 0
 *     y[m, n]       = bf16( sum_k x[m,k] W[n,k]  +  sum_e u[m,e] Bcat[n,e]  +  bias[n] )
 * with Bcat[n, a*r + j] = B_a[n, j]: the LoRA term is one more GEMM over an extension of K by
 * R = n_adapters * r, summed into the same f32 accumulators as the base product, and y is stored
 * once. Rounding u to bf16 matches a bf16 PEFT forward (lora_A(x) is a bf16 tensor). NF4 weights
 * are used as the bf16 values the NF4 dequantizer produces, W[n,k] = bf16(level * scale) (f32
 * level and product, one rounding: bitsandbytes 0.50), scale decoded in place from plain or
 * double-quant block constants (nf4_block_scale).
 *
 * Layout. NF4 W is the flattened row-major [N, K] tensor cut into blocks of `blocksize`, two
 * codes a byte (element 2j in the high nibble). The fused NF4 kernels need K % 32 == 0 (so a
 * run of 32 codes of one row is 16 aligned bytes inside one NF4 block); the launcher dequantizes
 * first and takes the dense kernels otherwise. Dense kernels handle any K: with QADAPT_LORA_VEC
 * (K % 8 == 0, aligned rows) they use 16-byte loads, else element loads.
 *
 * Math (backward), dy [M, N] the gradient of y:
 *     g[m, a*r + j] = bf16( s_a * sum_n dy[m,n] B_a[n,j] )  if a == idx(m), else 0
 *     dx            = bf16( dy W + g Acat )          Acat = the A stack as [R, K]   OVERWRITTEN
 *     grad_a       += g^T x            (f32 [R, K] = [n_adapters, r, K])          ACCUMULATED
 *     grad_b[a,n,j]+= sum_m dy[m,n] u[m, a*r + j]   (f32 [n_adapters, N, r])       ACCUMULATED
 * so dA = s (dy B)^T x and dB = s dy^T (x A^T) per adapter, over that adapter's rows only (the
 * zeros of g and u mask the others). Gradient accumulation over micro-batches is a sequence of
 * calls on the same grad_a / grad_b.
 *
 * Kernels and tiling (all GEMMs: CTA tile 128 x 128, BK = 32, 256 threads = 8 warps as 2 x 4,
 * warp tile 64 x 32 of mma.sync.m16n8k16 bf16 -> f32, a 1-D grid with one CTA per output tile
 * in grouped order (grouped_tile), operands
 * through a 3-stage cp.async pipeline into XOR-swizzled shared memory, copy plans set up once per
 * thread for the vector layout, edges of any shape filled with zeros):
 *   lora_xa_bf16          gemv path: one CTA per u[m, e] (grid-stride), its 8 warps splitting k,
 *                         16-byte loads of x and A, a fixed-order reduction, zero for foreign
 *                         adapters.
 *   (GEMM path: u, and the backward's g, dA and dB, are the rank-R products of lora_rank.cu:
 *                         R-wide tiles, split along the reduction.)
 *   lora_gemv_*_bf16      M <= 4 rows (lora_gemv_wide_*_bf16: 5..16 rows, more accumulators and
 *                         registers). One warp per output feature n (grid-stride), the row of
 *                         W streamed once with 16-byte loads (8 bf16, 4 loads in flight per lane
 *                         for 1-2 rows; or a run of 32 NF4 codes, 2 in flight, decoded through the
 *                         lane's own 16-entry table of dequantized values), multiplied
 *                         against all M rows of x (from L1/L2), f32 accumulators per row; the LoRA
 *                         term (r values per row) is added by the lanes before the warp reduction,
 *                         bias after, y written once.
 *   lora_gemm_*_bf16      M > 16 rows. x tiles [128][32] and W tiles reach the tensor cores by
 *                         ldmatrix. NF4 W travels as packed codes (2 KiB a stage) plus one scale
 *                         per 32 codes, and each stage is decoded once per CTA, by all threads,
 *                         into a swizzled bf16 tile that the dense path reads (the NF4 section
 *                         below). After the K loop the same accumulators take the R-long
 *                         extension [u | Bcat], then bias, then one bf16 store of y. With few
 *                         output tiles (e.g. 17..256 rows) the launcher splits k: each CTA stores
 *                         its range's f32 sums into `partial`, and lora_split_reduce_bf16 adds
 *                         the ranges in order, the row adapter's r products of u and B, the bias,
 *                         and stores y.
 *   lora_gemm_bwd_dx_*_bf16 dx = dy W then + g Acat in the same accumulators: W tiles
 *                         [32 rows of n][128 columns of k] by ldmatrix.trans; NF4 W decoded once
 *                         per stage into such a tile, as in the forward. One bf16 store of dx.
 *                         With few output tiles n is split like the forward's k, and
 *                         lora_split_reduce_dx_bf16 adds the ranges and g Acat.
 * Outputs u, g, y and dx are overwritten; grad_a and grad_b are accumulated into.
 */
#include "bf16_gather.cuh"
#include "nf4_codec.cuh"
#include "qadapt.h"
#include "qadapt_mma.cuh"

using qadapt::gather8;
using qadapt::nf4_block_scale;
using qadapt::nf4_level;
using qadapt::round_to;
using qadapt::cp_async16;
using qadapt::cp_async_commit;
using qadapt::cp_async_wait;
using qadapt::ldmatrix_x4;
using qadapt::ldmatrix_x4_t;
using qadapt::mma_bf16;

namespace {

constexpr unsigned kFull = 0xffffffffu;
typedef __nv_bfloat16 bf16;

/* ---- small helpers ------------------------------------------------------------------------- */

__device__ __forceinline__ float bf_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float bf_at(const bf16* p, uint64_t i) { return __bfloat162float(p[i]); }

/* Dot product of 8 bf16 pairs packed in two uint4. */
__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
    acc = fmaf(bf_lo(a.x), bf_lo(b.x), acc);
    acc = fmaf(bf_hi(a.x), bf_hi(b.x), acc);
    acc = fmaf(bf_lo(a.y), bf_lo(b.y), acc);
    acc = fmaf(bf_hi(a.y), bf_hi(b.y), acc);
    acc = fmaf(bf_lo(a.z), bf_lo(b.z), acc);
    acc = fmaf(bf_hi(a.z), bf_hi(b.z), acc);
    acc = fmaf(bf_lo(a.w), bf_lo(b.w), acc);
    acc = fmaf(bf_hi(a.w), bf_hi(b.w), acc);
    return acc;
}

/* 8 f32 weights against 8 bf16 activations. */
__device__ __forceinline__ float dot8w(const float (&w)[8], uint4 b, float acc) {
    acc = fmaf(w[0], bf_lo(b.x), acc);
    acc = fmaf(w[1], bf_hi(b.x), acc);
    acc = fmaf(w[2], bf_lo(b.y), acc);
    acc = fmaf(w[3], bf_hi(b.y), acc);
    acc = fmaf(w[4], bf_lo(b.z), acc);
    acc = fmaf(w[5], bf_hi(b.z), acc);
    acc = fmaf(w[6], bf_lo(b.w), acc);
    acc = fmaf(w[7], bf_hi(b.w), acc);
    return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

/* The adapter of row m; indices outside [0, n_adapters) read as -1 (base only), so a bad index
 * can never address outside the stacks. */
template <typename Args>
__device__ __forceinline__ int row_adapter(const Args& a, uint32_t m) {
    const int i = a.adapter_idx ? __ldg(reinterpret_cast<const int32_t*>(a.adapter_idx) + m) : 0;
    return (i >= 0 && (uint32_t)i < a.n_adapters) ? i : -1;
}

/* ---- lora_xa: u = s * (x A^T) per row adapter ------------------------------------------------ */

/* One CTA per u[m, e] (grid-stride over the m * R elements): its QADAPT_LORA_GEMV_WARPS warps
 * split the k dot product (warp w takes the 16-byte chunks w * 32 + lane, + 256, ...: the CTA
 * reads x and A rows in consecutive 512-byte runs), reduce in registers, then thread 0 adds the
 * warp sums in warp order (fixed order: deterministic). With one warp per element the m * R
 * dot products of a decode step ran on a few SMs, each the whole length of k: the serial tail
 * before the gemv. */
__device__ __forceinline__ void xa(const QadaptLoraFwdArgs& a) {
    constexpr int WARPS = QADAPT_LORA_GEMV_WARPS;
    __shared__ float part[WARPS];
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(a.x);
    const bf16* __restrict__ A = reinterpret_cast<const bf16*>(a.lora_a);
    const float* __restrict__ scales = reinterpret_cast<const float*>(a.scales);
    bf16* __restrict__ u = reinterpret_cast<bf16*>(a.u);
    const uint32_t R = a.rank * a.n_adapters;
    const uint64_t total = (uint64_t)a.m * R;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x / 32u;
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    for (uint64_t w = blockIdx.x; w < total; w += gridDim.x) {
        const uint32_t m = (uint32_t)(w / R);
        const uint32_t e = (uint32_t)(w % R);
        const uint32_t ad = e / a.rank;
        /* Uniform over the CTA: every thread skips, or every thread reaches the barriers. */
        if (row_adapter(a, m) != (int)ad) {
            if (threadIdx.x == 0) u[w] = __float2bfloat16_rn(0.0f);
            continue;
        }
        const bf16* xr = x + (uint64_t)m * a.k;
        const bf16* ar = A + (uint64_t)e * a.k; /* A stack row (ad * rank + j) == e */
        float acc = 0.0f;
        if (vec) {
            const uint4* xv = reinterpret_cast<const uint4*>(xr);
            const uint4* av = reinterpret_cast<const uint4*>(ar);
            for (uint32_t c = threadIdx.x; c < a.k / 8; c += 32 * WARPS) acc = dot8(__ldg(xv + c), __ldg(av + c), acc);
        } else {
            for (uint32_t k = threadIdx.x; k < a.k; k += 32 * WARPS) acc = fmaf(bf_at(xr, k), bf_at(ar, k), acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) part[warp] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < WARPS; ++i) sum += part[i];
            u[w] = __float2bfloat16_rn(__fmul_rn(__ldg(scales + ad), sum));
        }
        __syncthreads();
    }
}

/* ---- gemv path (M <= 16) --------------------------------------------------------------------- */

/* The LoRA term of row n for every row m (lanes split the r values), bias, reduction, store.
 * MT is the row count rounded up to a power of two; rows m >= M compute on row M-1 and are
 * dropped at the store. */
template <int MT>
__device__ __forceinline__ void gemv_finish(const QadaptLoraFwdArgs& a, uint32_t n, float (&acc)[MT]) {
    const unsigned lane = threadIdx.x & 31u;
    if (a.rank != 0) {
        const bf16* __restrict__ B = reinterpret_cast<const bf16*>(a.lora_b);
        const bf16* __restrict__ u = reinterpret_cast<const bf16*>(a.u);
        const uint32_t R = a.rank * a.n_adapters;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const uint32_t mm = min((uint32_t)m, a.m - 1);
            const int ad = row_adapter(a, mm);
            if (ad >= 0) {
                const bf16* br = B + ((uint64_t)ad * a.n + n) * a.rank;
                const bf16* ur = u + (uint64_t)mm * R + (uint64_t)ad * a.rank;
                for (uint32_t j = lane; j < a.rank; j += 32) acc[m] = fmaf(bf_at(br, j), bf_at(ur, j), acc[m]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = warp_sum(acc[m]);
    const float b = a.bias ? bf_at(reinterpret_cast<const bf16*>(a.bias), n) : 0.0f;
    bf16* __restrict__ y = reinterpret_cast<bf16*>(a.y);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (lane == (unsigned)m && (uint32_t)m < a.m) y[(uint64_t)m * a.n + n] = __float2bfloat16_rn(acc[m] + b);
    }
}

/* Loads kept in flight per lane by the gemv loops: 4 for one or two rows (bandwidth-bound, the
 * weight stream needs many outstanding requests), 1 for more rows (x traffic dominates and the
 * registers go to the MT accumulators). */
template <int MT>
__device__ constexpr int GEMV_UNROLL() {
    return MT <= 2 ? 4 : 1;
}

/* The NF4 gemv keeps 2 runs (32 bytes a lane) in flight for one or two rows: with 4, ptxas builds
 * the four runs' tables in registers at once (127 instead of 64 registers, half the CTAs per SM);
 * 4 CTAs of 256 lanes with 32 bytes each still cover the H200's bytes in flight per SM. */
template <int MT>
__device__ constexpr int GEMV_NF4_UNROLL() {
    return MT <= 2 ? 2 : 1;
}

template <int MT>
__device__ __forceinline__ void gemv_dense(const QadaptLoraFwdArgs& a) {
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(a.x);
    const bf16* __restrict__ w = reinterpret_cast<const bf16*>(a.w);
    const unsigned lane = threadIdx.x & 31u;
    const uint32_t warps = gridDim.x * (blockDim.x / 32u);
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    for (uint32_t n = blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u; n < a.n; n += warps) {
        float acc[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
        const bf16* wr = w + (uint64_t)n * a.k;
        if (vec) {
            const uint4* wv = reinterpret_cast<const uint4*>(wr);
            const uint32_t chunks = a.k / 8;
            uint32_t c = lane;
            /* Few rows: GEMV_UNROLL independent 16-byte weight loads in flight per lane. */
            for (; c + 32 * (GEMV_UNROLL<MT>() - 1) < chunks; c += 32 * GEMV_UNROLL<MT>()) {
                uint4 wq[GEMV_UNROLL<MT>()];
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL<MT>(); ++u) wq[u] = __ldg(wv + c + 32 * u);
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL<MT>(); ++u) {
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        const uint64_t mm = min((uint32_t)m, a.m - 1);
                        acc[m] = dot8(wq[u], __ldg(reinterpret_cast<const uint4*>(x + mm * a.k) + c + 32 * u), acc[m]);
                    }
                }
            }
            for (; c < chunks; c += 32) {
                const uint4 wq = __ldg(wv + c);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const uint64_t mm = min((uint32_t)m, a.m - 1);
                    acc[m] = dot8(wq, __ldg(reinterpret_cast<const uint4*>(x + mm * a.k) + c), acc[m]);
                }
            }
        } else {
            for (uint32_t k = lane; k < a.k; k += 32) {
                const float wv = bf_at(wr, k);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const uint64_t mm = min((uint32_t)m, a.m - 1);
                    acc[m] = fmaf(wv, bf_at(x, mm * a.k + k), acc[m]);
                }
            }
        }
        gemv_finish<MT>(a, n, acc);
    }
}

/* The gemv's per-lane tables: 16 f32 values per lane, the lane's current run decoded for every
 * code, tab[c * 32 + lane] (the warp's 32 lanes in 32 banks: any mix of codes is one wavefront).
 * 2 KiB per warp. */
constexpr int GEMV_TAB = 16 * 32;

/* One run of 32 NF4 codes (16 bytes q, block scale `scale`) at k = 32c, against the MT x rows.
 * The lane first writes its table of the 16 dequantized values bf16(level * scale) (16 products
 * instead of 32), then each element is one lookup and one FMA per row. */
template <int MT>
__device__ __forceinline__ void nf4_run(const QadaptLoraFwdArgs& a, const bf16* __restrict__ x, float* tab, uint4 q,
                                        float scale, uint32_t c, float (&acc)[MT]) {
#pragma unroll
    for (int v = 0; v < 16; ++v) tab[v * 32] = round_to<bf16>(__fmul_rn(nf4_level(v), scale));
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float wv[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t byte = (words[i] >> (8 * j)) & 0xffu;
            wv[2 * j] = tab[(byte >> 4) * 32];
            wv[2 * j + 1] = tab[(byte & 0xfu) * 32];
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const uint64_t mm = min((uint32_t)m, a.m - 1);
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + mm * a.k) + 4 * (uint64_t)c + i);
            acc[m] = dot8w(wv, xv, acc[m]);
        }
    }
}

/* NF4 gemv: needs K % 32 == 0 (checked by the launcher). Lane c of the warp takes runs of 32
 * codes (16 bytes, one NF4 block since blocksize >= 32) at k = 32c, 32(c+32), ...; `tabs` holds
 * the CTA's per-lane tables (GEMV_TAB floats per warp). Block index by shift (block sizes are
 * powers of two). */
template <int MT>
__device__ __forceinline__ void gemv_nf4(const QadaptLoraFwdArgs& a, float* tabs) {
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(a.x);
    const uint4* __restrict__ packed = reinterpret_cast<const uint4*>(a.w);
    const float* __restrict__ absmax = reinterpret_cast<const float*>(a.absmax);
    const uint8_t* __restrict__ codes = reinterpret_cast<const uint8_t*>(a.absmax_codes);
    const float* __restrict__ nested = reinterpret_cast<const float*>(a.nested_absmax);
    const float* __restrict__ map = reinterpret_cast<const float*>(a.dynamic_map);
    const unsigned lane = threadIdx.x & 31u;
    float* tab = tabs + (threadIdx.x / 32u) * GEMV_TAB + lane;
    const uint32_t shift = __ffs((int)a.blocksize) - 1;
    const uint32_t warps = gridDim.x * (blockDim.x / 32u);
    const uint32_t runs = a.k / 32;
    for (uint32_t n = blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u; n < a.n; n += warps) {
        float acc[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
        const uint64_t run0 = (uint64_t)n * runs;
        uint32_t c = lane;
        /* Few rows: GEMV_UNROLL independent 16-byte code loads (and their scales) in flight. */
        for (; c + 32 * (GEMV_NF4_UNROLL<MT>() - 1) < runs; c += 32 * GEMV_NF4_UNROLL<MT>()) {
            uint4 q[GEMV_NF4_UNROLL<MT>()];
            float scale[GEMV_NF4_UNROLL<MT>()];
#pragma unroll
            for (int u = 0; u < GEMV_NF4_UNROLL<MT>(); ++u) {
                q[u] = __ldg(packed + run0 + c + 32 * u);
                scale[u] = nf4_block_scale(absmax, codes, nested, map, a.offset, ((run0 + c + 32 * u) * 32) >> shift);
            }
#pragma unroll
            for (int u = 0; u < GEMV_NF4_UNROLL<MT>(); ++u) nf4_run<MT>(a, x, tab, q[u], scale[u], c + 32 * u, acc);
        }
        for (; c < runs; c += 32) {
            const uint4 q = __ldg(packed + run0 + c);
            const float scale = nf4_block_scale(absmax, codes, nested, map, a.offset, ((run0 + c) * 32) >> shift);
            nf4_run<MT>(a, x, tab, q, scale, c, acc);
        }
        gemv_finish<MT>(a, n, acc);
    }
}

/* ---- GEMM path (M > 16) ---------------------------------------------------------------------- */

constexpr int BM = QADAPT_LORA_GEMM_BM;
constexpr int BN = QADAPT_LORA_GEMM_BN;
constexpr int BK = QADAPT_LORA_GEMM_BK;
constexpr int STAGES = 3;
constexpr int THREADS = QADAPT_LORA_GEMM_THREADS;
constexpr int WM = 64; /* warp tile */
constexpr int WN = 32;
constexpr int MI = WM / 16;
constexpr int NI = WN / 8;
static_assert((BM / WM) * (BN / WN) * 32 == THREADS, "8 warps tile the CTA");

/* A bf16 tile of `rows` x BK, row-major, 4 chunks of 8 values per row. Chunk c of row r lives at
 * chunk c ^ ((r >> 1) & 3): the 8 rows an ldmatrix phase reads then hit 8 distinct 16-byte bank
 * groups. Returns the element offset. */
__device__ __forceinline__ uint32_t swz(uint32_t row, uint32_t chunk) {
    return row * BK + ((chunk ^ ((row >> 1) & 3u)) * 8u);
}

/* Loads a `ROWS` x BK tile of a row-major bf16 matrix (rows r0.., columns k0.., leading dimension
 * ld, bounds rows x cols) into swizzled shared memory element by element, zeros outside: the path
 * for ragged shapes and the short LoRA extension (the vector layout takes ColCopy). */
template <int ROWS, int NT = THREADS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* __restrict__ g, uint32_t r0, uint32_t rows,
                                          uint32_t k0, uint32_t cols, uint64_t ld) {
    constexpr int CHUNKS = ROWS * BK / 8;
#pragma unroll
    for (int i = 0; i < CHUNKS / NT; ++i) {
        const uint32_t c = threadIdx.x + i * NT;
        const uint32_t row = c / 4, kc = c % 4;
        *reinterpret_cast<uint4*>(tile + swz(row, kc)) = gather8(g, r0 + row, rows, k0 + kc * 8, cols, ld);
    }
}

/* Grouped rasterization of a 1-D grid over tiles_m x tiles_n output tiles: consecutive CTAs walk
 * down GROUP_M row tiles, then move to the next column tile, so the CTAs resident at once share
 * a few x/dy row tiles and a band of W tiles, which stay in L2 (the plain row-major order streams
 * all of W once per row of tiles). Returns the (row tile, column tile) of tile `idx` (default: this
 * CTA's). */
constexpr uint32_t GROUP_M = 8;

__device__ __forceinline__ uint2 grouped_tile(uint32_t tiles_m, uint32_t tiles_n, uint32_t idx = blockIdx.x) {
    const uint32_t per_group = GROUP_M * tiles_n;
    const uint32_t group = idx / per_group, in_group = idx % per_group;
    const uint32_t first_m = group * GROUP_M;
    const uint32_t rows = min(tiles_m - first_m, GROUP_M);
    return make_uint2(first_m + in_group % rows, in_group / rows);
}

/* The 16-byte chunks one thread copies of the ROWS x BK tiles of a row-major bf16 matrix [rows,
 * cols] (leading dimension ld) whose columns advance by BK a step: x and W along k, dy along n.
 * Set up once (the source of each chunk, its offset in the swizzled tile, whether its row is in
 * the matrix); a step then tests one column bound and issues one cp.async per chunk, a chunk
 * outside the matrix zero-filled by the copy itself (src_size 0, from a valid address). Needs the
 * vector layout: cols % 8 == 0 and 16-byte aligned rows, so a chunk is wholly in or out. Each
 * issue() is the next step. */
template <int ROWS, int NT = THREADS>
struct ColCopy {
    static constexpr int N = ROWS * BK / 8 / NT;
    static_assert(N >= 1 && NT % (BK / 8) == 0, "whole chunks per thread, one chunk column");
    const bf16* src[N];
    uint32_t dst[N];
    bool row_ok[N];
    const bf16* safe;
    uint32_t col, cols;
    /* Columns c0.. (a multiple of 8) up to the bound cols_. */
    __device__ __forceinline__ ColCopy(const bf16* g, uint32_t r0, uint32_t rows, uint32_t cols_, uint64_t ld,
                                       uint32_t c0 = 0)
        : safe(g), col(c0 + (threadIdx.x % (BK / 8)) * 8), cols(cols_) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const uint32_t row = (threadIdx.x + i * NT) / (BK / 8);
            row_ok[i] = r0 + row < rows;
            src[i] = row_ok[i] ? g + (uint64_t)(r0 + row) * ld + col : g;
            dst[i] = swz(row, threadIdx.x % (BK / 8));
        }
    }
    __device__ __forceinline__ void issue(bf16* tile) {
        const bool col_ok = col < cols;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const bool ok = row_ok[i] && col_ok;
            cp_async16(tile + dst[i], ok ? src[i] : safe, ok ? 16u : 0u);
            src[i] += BK;
        }
        col += BK;
    }
};

/* The 3-stage cp.async pipeline of a loop of KT steps: issue(slot, step) starts the copies of
 * step `step` into buffer slot `slot` (called in step order), compute(slot) consumes a slot. One
 * barrier a step orders all reuse: the slot a step overwrites was last read one step before.
 * Leaves every copy complete. */
template <class Issue, class Compute>
__device__ __forceinline__ void pipeline(uint32_t KT, Issue&& issue, Compute&& compute) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) issue((uint32_t)s, (uint32_t)s);
        cp_async_commit();
    }
    uint32_t rs = 0, ws = STAGES - 1;
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < KT) issue(ws, kt + STAGES - 1);
        cp_async_commit();
        compute(rs);
        rs = rs + 1 == STAGES ? 0 : rs + 1;
        ws = ws + 1 == STAGES ? 0 : ws + 1;
    }
    cp_async_wait<0>();
}

/* The pipeline over two operands whose copy plans are set up (ColCopy / RowCopy): A tiles into
 * sA[slot], B tiles into sB[slot]. */
template <class CopyA, class CopyB, class TileA, class TileB, class Compute>
__device__ __forceinline__ void pipeline_planned(uint32_t KT, CopyA& ca, CopyB& cb, TileA* sA, TileB* sB,
                                                 Compute&& compute) {
    pipeline(
        KT,
        [&](uint32_t s, uint32_t) {
            ca.issue(sA[s]);
            cb.issue(sB[s]);
        },
        compute);
}

/* The LoRA extension slice e0..e0+BK of Bcat[n, e] = B_{e / r}[n, e % r] (element loads). */
template <int NT = THREADS>
__device__ __forceinline__ void load_bcat_tile(bf16* tile, const QadaptLoraFwdArgs& a, uint32_t n0, uint32_t e0) {
    const bf16* __restrict__ B = reinterpret_cast<const bf16*>(a.lora_b);
    const uint32_t R = a.rank * a.n_adapters;
    for (uint32_t i = threadIdx.x; i < BN * BK; i += NT) {
        const uint32_t row = i / BK, col = i % BK;
        const uint32_t n = n0 + row, e = e0 + col;
        bf16 v = __float2bfloat16_rn(0.0f);
        if (n < a.n && e < R) v = B[((uint64_t)(e / a.rank) * a.n + n) * a.rank + e % a.rank];
        tile[swz(row, col / 8) + col % 8] = v;
    }
}

/* The A fragments (x rows) of one k16 step of the warp tile (MI_ m16 tiles). */
template <int MI_>
__device__ __forceinline__ void load_a_frags(uint32_t (&af)[MI_][4], const bf16* tA, uint32_t wm0, int ks) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int mi = 0; mi < MI_; ++mi) {
        const uint32_t row = wm0 + mi * 16 + (lane & 15u);
        ldmatrix_x4(af[mi], tA + swz(row, ks * 2 + (lane >> 4)));
    }
}

/* One BK slice with a dense bf16 B tile ([n][k] rows, as W is stored), warp tile MI_ x NI_ mma
 * tiles. */
template <int MI_, int NI_>
__device__ __forceinline__ void mma_tile_dense(float (&acc)[MI_][NI_][4], const bf16* tA, const bf16* tB,
                                               uint32_t wm0, uint32_t wn0) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[MI_][4];
        load_a_frags(af, tA, wm0, ks);
        uint32_t bf[NI_][2];
#pragma unroll
        for (int nj = 0; nj < NI_ / 2; ++nj) {
            uint32_t r[4];
            const uint32_t row = wn0 + nj * 16 + (lane & 7u) + ((lane >> 4) << 3);
            ldmatrix_x4(r, tB + swz(row, ks * 2 + ((lane >> 3) & 1u)));
            bf[2 * nj][0] = r[0];
            bf[2 * nj][1] = r[1];
            bf[2 * nj + 1][0] = r[2];
            bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI_; ++mi) {
#pragma unroll
            for (int ni = 0; ni < NI_; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
}

/* The LoRA extension over R = n_adapters * r (element loads, one slice at a time), then bias and
 * the single bf16 store of y. tA and tB are two free BM x BK / BN x BK tiles. */
template <int NT = THREADS, int MI_, int NI_>
__device__ __forceinline__ void gemm_finish(const QadaptLoraFwdArgs& a, float (&acc)[MI_][NI_][4], bf16* tA,
                                            bf16* tB, uint32_t m0, uint32_t n0, uint32_t wm0, uint32_t wn0) {
    const uint32_t R = a.rank * a.n_adapters;
    for (uint32_t e0 = 0; e0 < R; e0 += BK) {
        __syncthreads();
        load_tile<BM, NT>(tA, reinterpret_cast<const bf16*>(a.u), m0, a.m, e0, R, R);
        load_bcat_tile<NT>(tB, a, n0, e0);
        __syncthreads();
        mma_tile_dense(acc, tA, tB, wm0, wn0);
    }
    const unsigned lane = threadIdx.x & 31u;
    const bf16* __restrict__ bias = reinterpret_cast<const bf16*>(a.bias);
    bf16* __restrict__ y = reinterpret_cast<bf16*>(a.y);
#pragma unroll
    for (int ni = 0; ni < NI_; ++ni) {
        const uint32_t col = n0 + wn0 + ni * 8 + (lane & 3u) * 2;
        const float b0 = (bias && col < a.n) ? bf_at(bias, col) : 0.0f;
        const float b1 = (bias && col + 1 < a.n) ? bf_at(bias, col + 1) : 0.0f;
#pragma unroll
        for (int mi = 0; mi < MI_; ++mi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t row = m0 + wm0 + mi * 16 + (lane >> 2) + h * 8;
                if (row >= a.m) continue;
                const uint64_t o = (uint64_t)row * a.n + col;
                if (col + 1 < a.n && (a.n % 2) == 0) {
                    const __nv_bfloat162 v =
                        __floats2bfloat162_rn(acc[mi][ni][2 * h] + b0, acc[mi][ni][2 * h + 1] + b1);
                    *reinterpret_cast<__nv_bfloat162*>(y + o) = v;
                } else {
                    if (col < a.n) y[o] = __float2bfloat16_rn(acc[mi][ni][2 * h] + b0);
                    if (col + 1 < a.n) y[o + 1] = __float2bfloat16_rn(acc[mi][ni][2 * h + 1] + b1);
                }
            }
        }
    }
}

template <int MI_, int NI_>
__device__ __forceinline__ void zero_acc(float (&acc)[MI_][NI_][4]) {
#pragma unroll
    for (int mi = 0; mi < MI_; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI_; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
}

/* The pipelined K loop of a dense tile x W^T over columns kb..ke of k (kb a multiple of BK):
 * rows m0.. of x [M, K] and rows n0.. of W [N, K], BK slices through the 3-stage pipeline
 * (ColCopy under `vec`, element loads otherwise), into the warp's accumulators. Leaves every copy
 * complete. */
__device__ __forceinline__ void mainloop_dense(float (&acc)[MI][NI][4], bf16 (*sA)[BM * BK], bf16 (*sB)[BN * BK],
                                               const bf16* __restrict__ x, const bf16* __restrict__ w, uint32_t M,
                                               uint32_t N, uint32_t K, uint32_t m0, uint32_t n0, uint32_t wm0,
                                               uint32_t wn0, bool vec, uint32_t kb, uint32_t ke) {
    const uint32_t KT = (ke - kb + BK - 1) / BK;
    auto compute = [&](uint32_t s) { mma_tile_dense(acc, sA[s], sB[s], wm0, wn0); };
    if (vec) {
        ColCopy<BM> ca(x, m0, M, ke, K, kb);
        ColCopy<BN> cb(w, n0, N, ke, K, kb);
        pipeline_planned(KT, ca, cb, sA, sB, compute);
    } else {
        pipeline(
            KT,
            [&](uint32_t s, uint32_t step) {
                load_tile<BM>(sA[s], x, m0, M, kb + step * BK, ke, K);
                load_tile<BN>(sB[s], w, n0, N, kb + step * BK, ke, K);
            },
            compute);
    }
}

/* Split k (QadaptLoraFwdArgs.splits > 1): the CTA's output tile and k range. CTA b takes tile
 * b % tiles (grouped order) of split b / tiles, columns kb..ke: split_steps BK slices, the last
 * split what remains. Without a split: this CTA's tile, all of k. */
struct SplitTile {
    uint32_t m0, n0, split, kb, ke;
    bool split_k;
};

/* For an output of rows x cols tiled bm x bn, reduced over `red` in splits ranges of `steps`
 * BK slices (the y GEMM: m x n over k; the dx GEMM: m x k over n). */
template <typename Args>
__device__ __forceinline__ SplitTile split_tile(const Args& a, uint32_t rows, uint32_t cols, uint32_t red,
                                               uint32_t bm, uint32_t bn) {
    const uint32_t tiles_m = (rows + bm - 1) / bm, tiles_n = (cols + bn - 1) / bn;
    SplitTile t;
    t.split_k = a.splits > 1;
    t.split = t.split_k ? blockIdx.x / (tiles_m * tiles_n) : 0;
    const uint2 g = grouped_tile(tiles_m, tiles_n, t.split_k ? blockIdx.x % (tiles_m * tiles_n) : blockIdx.x);
    t.m0 = g.x * bm;
    t.n0 = g.y * bn;
    t.kb = t.split_k ? t.split * a.split_steps * BK : 0;
    t.ke = t.split_k ? min(red, t.kb + a.split_steps * BK) : red;
    return t;
}

/* A split's f32 partial sums of its tile, into partial[split][rows][cols] (plain stores: every
 * element of every split is written by exactly one CTA; rows and columns outside are skipped). */
template <int MI_, int NI_>
__device__ __forceinline__ void store_partial(uint64_t partial, uint32_t rows, uint32_t cols,
                                              const float (&acc)[MI_][NI_][4], const SplitTile& t, uint32_t wm0,
                                              uint32_t wn0) {
    float* __restrict__ out = reinterpret_cast<float*>(partial) + (uint64_t)t.split * rows * cols;
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int mi = 0; mi < MI_; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI_; ++ni) {
            const uint32_t col = t.n0 + wn0 + ni * 8 + (lane & 3u) * 2;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t row = t.m0 + wm0 + mi * 16 + (lane >> 2) + h * 8;
                if (row >= rows) continue;
                const uint64_t o = (uint64_t)row * cols + col;
                if (col + 1 < cols && (cols % 2) == 0) {
                    *reinterpret_cast<float2*>(out + o) = make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
                } else {
                    if (col < cols) out[o] = acc[mi][ni][2 * h];
                    if (col + 1 < cols) out[o + 1] = acc[mi][ni][2 * h + 1];
                }
            }
        }
    }
}

/* One CTA per output tile (and k range, split_tile), in grouped order. */
__device__ __forceinline__ void gemm_dense(const QadaptLoraFwdArgs& a) {
    __shared__ __align__(128) bf16 sA[STAGES][BM * BK];
    __shared__ __align__(128) bf16 sB[STAGES][BN * BK];
    const SplitTile t = split_tile(a, a.m, a.n, a.k, BM, BN);
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BN / WN)) * WM, wn0 = (warp % (BN / WN)) * WN;
    float acc[MI][NI][4];
    zero_acc(acc);
    mainloop_dense(acc, sA, sB, reinterpret_cast<const bf16*>(a.x), reinterpret_cast<const bf16*>(a.w), a.m, a.n,
                   a.k, t.m0, t.n0, wm0, wn0, (a.flags & QADAPT_LORA_VEC) != 0, t.kb, t.ke);
    if (t.split_k) store_partial(a.partial, a.m, a.n, acc, t, wm0, wn0);
    else gemm_finish(a, acc, sA[0], sB[0], t.m0, t.n0, wm0, wn0);
}

/* y[m, n] = bf16( sum over splits s in order of partial[s][m][n] + sum_j u[m, a*r + j] B_a[n, j]
 * (a = idx(m); the other adapters' columns of u are 0) + bias[n] ), one thread per element,
 * grid-stride. */
__device__ __forceinline__ void split_reduce(const QadaptLoraFwdArgs& a) {
    const float* __restrict__ partial = reinterpret_cast<const float*>(a.partial);
    const bf16* __restrict__ u = reinterpret_cast<const bf16*>(a.u);
    const bf16* __restrict__ B = reinterpret_cast<const bf16*>(a.lora_b);
    const bf16* __restrict__ bias = reinterpret_cast<const bf16*>(a.bias);
    bf16* __restrict__ y = reinterpret_cast<bf16*>(a.y);
    const uint64_t total = (uint64_t)a.m * a.n, R = (uint64_t)a.rank * a.n_adapters;
    /* Rows of u and of each B_a start 16-byte aligned when r % 8 == 0 and both bases are. */
    const bool vec = a.rank % 8 == 0 && a.u % 16 == 0 && a.lora_b % 16 == 0;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t m = (uint32_t)(i / a.n), n = (uint32_t)(i % a.n);
        float acc = 0.0f;
        for (uint32_t s = 0; s < a.splits; ++s) acc += __ldg(partial + s * total + i);
        const int ad = a.rank ? row_adapter(a, m) : -1;
        if (ad >= 0) {
            const bf16* ur = u + m * R + (uint64_t)ad * a.rank;
            const bf16* br = B + ((uint64_t)ad * a.n + n) * a.rank;
            if (vec) {
                /* 16-byte loads: a lane reads its output's whole B row, consecutive lanes
                 * consecutive rows (the loads coalesce; element loads strided by r would not). */
                for (uint32_t j = 0; j < a.rank; j += 8)
                    acc = dot8(*reinterpret_cast<const uint4*>(ur + j), __ldg(reinterpret_cast<const uint4*>(br + j)), acc);
            } else {
                for (uint32_t j = 0; j < a.rank; ++j) acc = fmaf(bf_at(ur, j), bf_at(br, j), acc);
            }
        }
        if (bias) acc += bf_at(bias, n);
        y[i] = __float2bfloat16_rn(acc);
    }
}

/* dx[m, kk] = bf16( sum over splits s in order of partial[s][m][kk] + sum_j g[m, a*r + j] A_a[j, kk]
 * (a = idx(m); g is 0 in the other adapters' columns) ), one thread per element, grid-stride:
 * consecutive threads read consecutive kk of each A row. */
__device__ __forceinline__ void split_reduce_dx(const QadaptLoraBwdArgs& a) {
    const float* __restrict__ partial = reinterpret_cast<const float*>(a.partial);
    const bf16* __restrict__ g = reinterpret_cast<const bf16*>(a.g);
    const bf16* __restrict__ A = reinterpret_cast<const bf16*>(a.lora_a);
    bf16* __restrict__ dx = reinterpret_cast<bf16*>(a.dx);
    const uint64_t total = (uint64_t)a.m * a.k, R = (uint64_t)a.rank * a.n_adapters;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t m = (uint32_t)(i / a.k), kk = (uint32_t)(i % a.k);
        float acc = 0.0f;
        for (uint32_t s = 0; s < a.splits; ++s) acc += __ldg(partial + s * total + i);
        const int ad = a.rank ? row_adapter(a, m) : -1;
        if (ad >= 0) {
            const bf16* gr = g + m * R + (uint64_t)ad * a.rank;
            const bf16* ar = A + (uint64_t)ad * a.rank * a.k + kk;
            for (uint32_t j = 0; j < a.rank; ++j) acc = fmaf(bf_at(gr, j), bf_at(ar, (uint64_t)j * a.k), acc);
        }
        dx[i] = __float2bfloat16_rn(acc);
    }
}

/* ---- backward --------------------------------------------------------------------------------- */

/* Tiles whose rows run along the reduction: [BK rows][BQ columns], 16 chunks of 8 per row,
 * chunk c of row r stored at chunk c ^ (r & 7) so the 8 rows of an ldmatrix phase hit 8 distinct
 * 16-byte bank groups. Read with ldmatrix .trans, which hands each thread the (reduction-pair,
 * column) elements of an mma fragment. */
constexpr int BQ = 128;

__device__ __forceinline__ uint32_t swz_t(uint32_t row, uint32_t chunk) {
    return row * BQ + ((chunk ^ (row & 7u)) * 8u);
}

/* Rows r0..r0+BK x columns c0..c0+BQ of a row-major [rows, cols] bf16 matrix (leading dimension
 * ld) into a swizzled [BK][BQ] tile; cp.async for in-bounds chunks under `vec`. */
template <int NT = THREADS>
__device__ __forceinline__ void load_tile_t(bf16* tile, const bf16* __restrict__ g, uint32_t r0, uint32_t rows,
                                            uint32_t c0, uint32_t cols, uint64_t ld, bool vec) {
    constexpr int CHUNKS = BK * BQ / 8;
#pragma unroll
    for (int i = 0; i < CHUNKS / NT; ++i) {
        const uint32_t c = threadIdx.x + i * NT;
        const uint32_t row = c / (BQ / 8), cc = c % (BQ / 8);
        const uint32_t gr = r0 + row, gc = c0 + cc * 8;
        bf16* dst = tile + swz_t(row, cc);
        if (vec && gr < rows && gc + 8 <= cols) {
            cp_async16(dst, g + (uint64_t)gr * ld + gc);
        } else {
            *reinterpret_cast<uint4*>(dst) = gather8(g, gr, rows, gc, cols, ld);
        }
    }
}

/* The chunks one thread copies of the [BK][BQ] tiles (swz_t) of a row-major bf16 matrix [rows,
 * cols] whose rows advance by BK a step (W and Acat along n or e, the reduction): columns
 * c0..c0+BQ fixed, so the column bound is decided once; a step tests one row bound per chunk.
 * Zero-fill and vector layout as ColCopy. Each issue() is the next step. */
template <int NT = THREADS>
struct RowCopy {
    static constexpr int N = BK * BQ / 8 / NT;
    static_assert(N >= 1 && NT % (BQ / 8) == 0, "whole chunks per thread, one chunk column");
    const bf16* src[N];
    uint32_t dst[N];
    uint32_t row[N];
    const bf16* safe;
    uint64_t stride;
    uint32_t rows;
    bool col_ok;
    /* Rows r0.. (step 0) up to the bound rows_. */
    __device__ __forceinline__ RowCopy(const bf16* g, uint32_t c0, uint32_t cols, uint32_t rows_, uint64_t ld,
                                       uint32_t r0 = 0)
        : safe(g), stride((uint64_t)BK * ld), rows(rows_) {
        const uint32_t cc = threadIdx.x % (BQ / 8);
        col_ok = c0 + cc * 8 < cols;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const uint32_t tile_row = (threadIdx.x + i * NT) / (BQ / 8);
            row[i] = r0 + tile_row;
            src[i] = col_ok ? g + (uint64_t)row[i] * ld + c0 + cc * 8 : g;
            dst[i] = swz_t(tile_row, cc);
        }
    }
    __device__ __forceinline__ void issue(bf16* tile) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const bool ok = col_ok && row[i] < rows;
            cp_async16(tile + dst[i], ok ? src[i] : safe, ok ? 16u : 0u);
            src[i] += stride;
            row[i] += BK;
        }
    }
};

/* B fragments of NI n8 tiles from a [BK][BQ] tile (rows = reduction, columns = output columns):
 * per pair of n8 tiles the matrices (red 0-7), (red 8-15) of the first, then of the second. */
template <int NI_>
__device__ __forceinline__ void load_b_frags_t(uint32_t (&bf)[NI_][2], const bf16* t, uint32_t wn0, int ks) {
    const unsigned lane = threadIdx.x & 31u, q = lane >> 3;
#pragma unroll
    for (int nj = 0; nj < NI_ / 2; ++nj) {
        uint32_t r[4];
        const uint32_t row = ks * 16 + (lane & 7u) + ((q & 1u) << 3);
        ldmatrix_x4_t(r, t + swz_t(row, (wn0 + nj * 16) / 8 + (q >> 1)));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
    }
}

template <int MI_, int NI_>
__device__ __forceinline__ void mma_all(float (&acc)[MI_][NI_][4], const uint32_t (&af)[MI_][4],
                                        const uint32_t (&bf)[NI_][2]) {
#pragma unroll
    for (int mi = 0; mi < MI_; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI_; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
}

/* dx-type slice: A operand [BM rows][BK] (dy or g), B operand a [BK][BQ] tile (W or Acat). */
template <int MI_, int NI_>
__device__ __forceinline__ void mma_tile_nt(float (&acc)[MI_][NI_][4], const bf16* tA, const bf16* tB, uint32_t wm0,
                                            uint32_t wn0) {
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[MI_][4];
        uint32_t bf[NI_][2];
        load_a_frags(af, tA, wm0, ks);
        load_b_frags_t(bf, tB, wn0, ks);
        mma_all(acc, af, bf);
    }
}

/* Stores the CTA's accumulators as bf16 into out[rows, cols] (row-major), overwriting. */
template <int MI_, int NI_>
__device__ __forceinline__ void store_bf16(const float (&acc)[MI_][NI_][4], bf16* __restrict__ out, uint32_t rows,
                                           uint32_t cols, uint32_t m0, uint32_t n0, uint32_t wm0, uint32_t wn0) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int mi = 0; mi < MI_; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI_; ++ni) {
            const uint32_t col = n0 + wn0 + ni * 8 + (lane & 3u) * 2;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t row = m0 + wm0 + mi * 16 + (lane >> 2) + h * 8;
                if (row >= rows) continue;
                const uint64_t o = (uint64_t)row * cols + col;
                if (col + 1 < cols && (cols % 2) == 0) {
                    *reinterpret_cast<__nv_bfloat162*>(out + o) =
                        __floats2bfloat162_rn(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
                } else {
                    if (col < cols) out[o] = __float2bfloat16_rn(acc[mi][ni][2 * h]);
                    if (col + 1 < cols) out[o + 1] = __float2bfloat16_rn(acc[mi][ni][2 * h + 1]);
                }
            }
        }
    }
}

/* The LoRA part of dx, g Acat over the R-long extension, then the single store of dx. */
template <int NT = THREADS, int MI_, int NI_>
__device__ __forceinline__ void bwd_dx_finish(const QadaptLoraBwdArgs& a, float (&acc)[MI_][NI_][4], bf16* tA,
                                              bf16* tB, uint32_t m0, uint32_t n0, uint32_t wm0, uint32_t wn0,
                                              bool vec) {
    const uint32_t R = a.rank * a.n_adapters;
    for (uint32_t e0 = 0; e0 < R; e0 += BK) {
        __syncthreads();
        load_tile<BM, NT>(tA, reinterpret_cast<const bf16*>(a.g), m0, a.m, e0, R, R);
        load_tile_t<NT>(tB, reinterpret_cast<const bf16*>(a.lora_a), e0, R, n0, a.k, a.k, vec);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        mma_tile_nt(acc, tA, tB, wm0, wn0);
    }
    store_bf16(acc, reinterpret_cast<bf16*>(a.dx), a.m, a.k, m0, n0, wm0, wn0);
}

/* The pipelined reduction over n (rows nb..ne of W, nb a multiple of BK) of dy [M, N] against
 * W [N, K] read in [BK][BQ] tiles (dx). */
__device__ __forceinline__ void mainloop_dy(float (&acc)[MI][NI][4], bf16 (*sA)[BM * BK], bf16 (*sB)[BK * BQ],
                                            const QadaptLoraBwdArgs& a, uint32_t m0, uint32_t n0, uint32_t wm0,
                                            uint32_t wn0, bool vec, uint32_t nb, uint32_t ne) {
    const bf16* __restrict__ dy = reinterpret_cast<const bf16*>(a.dy);
    const bf16* __restrict__ w = reinterpret_cast<const bf16*>(a.w);
    const uint32_t KT = (ne - nb + BK - 1) / BK;
    auto compute = [&](uint32_t s) { mma_tile_nt(acc, sA[s], sB[s], wm0, wn0); };
    if (vec) {
        ColCopy<BM> ca(dy, m0, a.m, ne, a.n, nb);
        RowCopy<> cb(w, n0, a.k, ne, a.k, nb);
        pipeline_planned(KT, ca, cb, sA, sB, compute);
    } else {
        pipeline(
            KT,
            [&](uint32_t s, uint32_t step) {
                load_tile<BM>(sA[s], dy, m0, a.m, nb + step * BK, ne, a.n);
                load_tile_t(sB[s], w, nb + step * BK, ne, n0, a.k, a.k, false);
            },
            compute);
    }
}

/* dx = dy W (+ g Acat): output tile [BM rows of m][BQ columns of k], reduction over n in BK
 * slices, dy tiles [BM][BK] and W tiles [BK rows of n][BQ columns of k]. 1-D grid in grouped
 * order. */
__device__ __forceinline__ void bwd_dx_dense(const QadaptLoraBwdArgs& a) {
    __shared__ __align__(128) bf16 sA[STAGES][BM * BK];
    __shared__ __align__(128) bf16 sB[STAGES][BK * BQ];
    const SplitTile t = split_tile(a, a.m, a.k, a.n, BM, BQ);
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BQ / WN)) * WM, wn0 = (warp % (BQ / WN)) * WN;
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    float acc[MI][NI][4];
    zero_acc(acc);
    mainloop_dy(acc, sA, sB, a, t.m0, t.n0, wm0, wn0, vec, t.kb, t.ke);
    if (t.split_k) store_partial(a.partial, a.m, a.k, acc, t, wm0, wn0);
    else bwd_dx_finish(a, acc, sA[0], sB[0], t.m0, t.n0, wm0, wn0, vec);
}

/* ---- NF4 GEMMs: the weight decoded once per CTA ------------------------------------------------
 *
 * Both NF4 GEMMs (forward y = x W^T, backward dx = dy W) stream W as packed codes and decode each
 * stage ONCE, by all its threads, into a swizzled bf16 tile that the dense ldmatrix paths then
 * read exactly as they read a dense W tile (mma_tile_dense / mma_tile_nt). No warp decodes what
 * another warp of the CTA decodes.
 *
 * A stage of codes is 2 KiB: 128 "code runs" of 32 codes = 16 aligned bytes inside one NF4 block
 * (K % 32 == 0), each with one scale:
 *   forward  run i = row n0 + i of W, columns k0 .. k0+32           -> decoded tile [BN][BK] (swz)
 *   backward run i = row r0 + i/4 of W, columns c0 + 32 (i%4) ..    -> decoded tile [BK][BQ] (swz_t)
 * Thread i (of 128) copies run i with one cp.async and computes its scale. The decode reads the
 * stage as 512 words of 8 codes: thread t takes words t, t + 128, t + 256 and t + 384 (consecutive
 * lanes, consecutive words: one wavefront), the scale of run word/4 (8 addresses a warp: one wavefront), looks up
 * the 16 f32 levels in shared memory (16 words in 16 banks: never a conflict) and stores 8 bf16
 * values as one 16-byte chunk of the swizzled tile (the chunks of a quarter-warp are 128
 * contiguous bytes: conflict-free). Values are bf16(level * scale) with the f32 product rounded
 * once, as the NF4 dequantizer gives them.
 *
 * Pipeline (STAGES = 3 slots for x/dy tiles and for codes, 2 decoded tiles). The codes travel one
 * stage ahead of the x/dy tiles: cp.async group j holds the x/dy tile of step j and the codes of
 * step j + 1 (group 0 also those of step 0). Iteration kt: wait for group kt, one barrier, issue
 * group kt + 2, decode the codes of step kt + 1 into decoded tile (kt + 1) % 2, run the mma of
 * step kt on decoded tile kt % 2. One barrier per step orders all reuse: the slot a new group
 * overwrites and the decoded tile being written were last read in step kt - 1.
 * Scales are prefetched: the loads of the scales of step kt + 3 are issued with its codes and
 * their value is stored to shared memory only after step kt's mma, so their latency (two
 * dependent loads with double quantization) hides behind the tensor-core work. */

/* 8 codes (a little-endian word: element 2j in the high nibble of byte j) as 8 bf16 values. */
__device__ __forceinline__ uint4 nf4_decode8(uint32_t word, float scale, const float* lv) {
    uint32_t v[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (word >> (8 * b)) & 0xffu;
        const __nv_bfloat162 p = __floats2bfloat162_rn(__fmul_rn(lv[byte >> 4], scale), __fmul_rn(lv[byte & 15u], scale));
        v[b] = *reinterpret_cast<const uint32_t*>(&p);
    }
    return make_uint4(v[0], v[1], v[2], v[3]);
}

/* The argument fields both directions share (QadaptLoraFwdArgs and QadaptLoraBwdArgs). */
struct Nf4W {
    const uint8_t* codes;
    const float* absmax;
    const uint8_t* absmax_codes;
    const float* nested;
    const float* map;
    float offset;
    uint32_t block_shift; /* log2(blocksize): block sizes are powers of two */
    uint32_t n, k;
    template <typename Args>
    __device__ __forceinline__ explicit Nf4W(const Args& a)
        : codes(reinterpret_cast<const uint8_t*>(a.w)),
          absmax(reinterpret_cast<const float*>(a.absmax)),
          absmax_codes(reinterpret_cast<const uint8_t*>(a.absmax_codes)),
          nested(reinterpret_cast<const float*>(a.nested_absmax)),
          map(reinterpret_cast<const float*>(a.dynamic_map)),
          offset(a.offset),
          block_shift(__ffs((int)a.blocksize) - 1),
          n(a.n),
          k(a.k) {}
};

/* The NF4 GEMMs' tiling: 128 threads = 4 warps as 2 x 2, warp tiles 64 x 64 (MI4 x NI8 mma
 * tiles) over the same 128 x 128 CTA tile. Wider warp tiles take 1 ldmatrix wavefront per mma
 * instead of 1.5, which pays for the decode's lookups and stores (section comment); each thread
 * decodes 4 words a step and copies one code run. */
constexpr int NF4_THREADS = QADAPT_LORA_GEMM_NF4_THREADS;
constexpr int NF4_WM = 64, NF4_WN = 64;
constexpr int MI4 = NF4_WM / 16, NI8 = NF4_WN / 8;
static_assert((BM / NF4_WM) * (BN / NF4_WN) * 32 == NF4_THREADS, "4 warps tile the CTA");
static_assert(NF4_THREADS == 128, "one code run (of 128 a stage) per thread");

/* Thread i's code run, one per step in step order: run i of every stage (forward: row tile0 + i
 * of W at columns step * BK; backward: row step * BK + i / 4 at columns tile0 + 32 (i % 4)),
 * its flat element index e advancing by a fixed stride (BK, or BK * K rows down) instead of being
 * recomputed in 64 bits each step. issue() starts the cp.async of its 16 bytes and returns its
 * scale (0, with the zero code 7 stored, for a run outside W). The returned value is the only use
 * of the scale loads, so a caller that stores it late does not wait for them here. */
template <bool BWD>
struct Nf4Runs {
    uint64_t e, stride;
    uint32_t row;  /* backward: this step's row of W (bound-checked each step) */
    bool fixed_ok; /* forward: the row is in W; backward: the columns are */
    /* The last block's scale and the last nested absmax: the forward walks along a row, so a
     * block of 64 codes serves two steps and a nested absmax (256 blocks) a whole row; each is
     * loaded once instead of once a step. */
    uint64_t last_block, last_group;
    float last_scale, last_nested;
    /* tile0: the first W row (forward) or column (backward) of the tile; red0: the first
     * reduction index, a multiple of BK (the column of k, or the row of n, of step 0). */
    __device__ __forceinline__ Nf4Runs(const Nf4W& w, uint32_t tile0, uint32_t red0)
        : last_block(~0ull), last_group(~0ull), last_scale(0.0f), last_nested(0.0f) {
        const uint32_t i = threadIdx.x;
        row = BWD ? red0 + i / 4 : tile0 + i;
        const uint32_t kc = BWD ? tile0 + (i % 4) * 32 : red0;
        fixed_ok = BWD ? kc < w.k : row < w.n;
        e = (uint64_t)row * w.k + kc;
        stride = BWD ? (uint64_t)BK * w.k : (uint64_t)BK;
    }
    /* nf4_block_scale with the two caches (same values, same two roundings). */
    __device__ __forceinline__ float scale_of(const Nf4W& w, uint64_t b) {
        if (b == last_block) return last_scale;
        last_block = b;
        if (w.absmax_codes == nullptr) {
            last_scale = __ldg(w.absmax + b);
        } else {
            if (b / 256 != last_group) {
                last_group = b / 256;
                last_nested = __ldg(w.nested + last_group);
            }
            last_scale = __fadd_rn(__fmul_rn(__ldg(w.map + __ldg(w.absmax_codes + b)), last_nested), w.offset);
        }
        return last_scale;
    }
    __device__ __forceinline__ float issue(uint8_t* tq, const Nf4W& w) {
        const bool ok = fixed_ok && (!BWD || row < w.n);
        uint8_t* dst = tq + threadIdx.x * 16;
        float scale = 0.0f;
        if (ok) {
            cp_async16(dst, w.codes + e / 2);
            scale = scale_of(w, e >> w.block_shift);
        } else {
            *reinterpret_cast<uint4*>(dst) = make_uint4(0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u);
        }
        e += stride;
        row += BWD ? BK : 0;
        return scale;
    }
};

/* Decodes one stage of codes into the bf16 tile the dense path reads (see the section comment). */
template <bool BWD>
__device__ __forceinline__ void nf4_decode_stage(bf16* tw, const uint8_t* tq, const float* ts, const float* lv) {
#pragma unroll
    for (int h = 0; h < 512 / NF4_THREADS; ++h) {
        const uint32_t j = threadIdx.x + h * NF4_THREADS;
        const uint4 v = nf4_decode8(reinterpret_cast<const uint32_t*>(tq)[j], ts[j / 4], lv);
        *reinterpret_cast<uint4*>(tw + (BWD ? swz_t(j / 16, j % 16) : swz(j / 4, j % 4))) = v;
    }
}

/* The shared memory of an NF4 GEMM: 24 KiB of x/dy tiles, 6 KiB of codes, 1.5 KiB of scales,
 * 16 KiB of decoded W, the levels: 48704 bytes, under the 48 KiB of static shared memory. */
struct Nf4Smem {
    bf16 a[STAGES][BM * BK];
    bf16 w[2][BN * BK];
    uint8_t q[STAGES][2048];
    float s[STAGES][128];
    float lv[16];
};
static_assert(BN * BK == BK * BQ && BN * BK == 4096, "both directions decode 4096 values a stage");
static_assert(sizeof(Nf4Smem) <= 48 * 1024, "static shared memory");

/* The K loop of an NF4 GEMM over KT steps: issue_a(slot, step) copies the A operand tile [BM][BK]
 * of a step (x in the forward, dy in the backward; called in step order), against the decoded W.
 * Forward (BWD = false): W rows tile0.., reduction over k from red0; backward: W columns tile0..,
 * reduction over n from red0. Buffer slots rotate instead of taking step % STAGES. */
template <bool BWD, class IssueA>
__device__ __forceinline__ void mainloop_nf4(float (&acc)[MI4][NI8][4], Nf4Smem& sm, const Nf4W& w, uint32_t KT,
                                             IssueA&& issue_a, uint32_t tile0, uint32_t red0, uint32_t wm0,
                                             uint32_t wn0) {
    if (threadIdx.x < 16) sm.lv[threadIdx.x] = nf4_level((int)threadIdx.x);
    Nf4Runs<BWD> runs(w, tile0, red0);
    /* Prologue: group 0 = {A 0, codes 0, codes 1}, group 1 = {A 1, codes 2}; their scales are
     * stored at once. */
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) issue_a((uint32_t)s, (uint32_t)s);
        for (uint32_t step = s == 0 ? 0u : (uint32_t)s + 1; step <= (uint32_t)s + 1; ++step) {
            if (step < KT) sm.s[step][threadIdx.x] = runs.issue(sm.q[step], w);
        }
        cp_async_commit();
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    nf4_decode_stage<BWD>(sm.w[0], sm.q[0], sm.s[0], sm.lv);
    /* Slots: x/dy of step kt in a[sa], codes of step kt + 1 in q[sq], the A slot and the codes
     * slot to be written this step (steps kt + 2 and kt + 3) in a[sa_w] and q[sa] (the codes of
     * step kt, decoded one step before, freed it). */
    uint32_t sa = 0, sq = 1, sa_w = STAGES - 1;
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < KT) issue_a(sa_w, kt + STAGES - 1);
        const bool issued = kt + STAGES < KT;
        float scale = 0.0f;
        if (issued) scale = runs.issue(sm.q[sa], w);
        cp_async_commit();
        if (kt + 1 < KT) nf4_decode_stage<BWD>(sm.w[(kt + 1) & 1], sm.q[sq], sm.s[sq], sm.lv);
        if (BWD) mma_tile_nt(acc, sm.a[sa], sm.w[kt & 1], wm0, wn0);
        else mma_tile_dense(acc, sm.a[sa], sm.w[kt & 1], wm0, wn0);
        if (issued) sm.s[sa][threadIdx.x] = scale;
        sa = sa + 1 == STAGES ? 0 : sa + 1;
        sq = sq + 1 == STAGES ? 0 : sq + 1;
        sa_w = sa_w + 1 == STAGES ? 0 : sa_w + 1;
    }
    cp_async_wait<0>();
}

/* The A operand of an NF4 GEMM, [rows, cols] from `act` at rows m0.., through ColCopy under
 * `vec`, element loads otherwise. */
template <bool BWD>
__device__ __forceinline__ void mainloop_nf4_act(float (&acc)[MI4][NI8][4], Nf4Smem& sm, const Nf4W& w,
                                                 const bf16* __restrict__ act, uint32_t rows, uint32_t cols,
                                                 uint32_t m0, uint32_t tile0, uint32_t wm0, uint32_t wn0, bool vec,
                                                 uint32_t kb, uint32_t ke) {
    const uint32_t KT = (ke - kb + BK - 1) / BK;
    if (vec) {
        ColCopy<BM, NF4_THREADS> ca(act, m0, rows, ke, cols, kb);
        mainloop_nf4<BWD>(acc, sm, w, KT, [&](uint32_t s, uint32_t) { ca.issue(sm.a[s]); }, tile0, kb, wm0, wn0);
    } else {
        mainloop_nf4<BWD>(
            acc, sm, w, KT,
            [&](uint32_t s, uint32_t step) {
                load_tile<BM, NF4_THREADS>(sm.a[s], act, m0, rows, kb + step * BK, ke, cols);
            },
            tile0, kb, wm0, wn0);
    }
}

/* y = x W^T (+ the LoRA extension, bias) with NF4 W; tiles as gemm_dense. */
__device__ __forceinline__ void gemm_nf4(const QadaptLoraFwdArgs& a) {
    __shared__ __align__(128) Nf4Smem sm;
    const SplitTile t = split_tile(a, a.m, a.n, a.k, BM, BN);
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BN / NF4_WN)) * NF4_WM, wn0 = (warp % (BN / NF4_WN)) * NF4_WN;
    float acc[MI4][NI8][4];
    zero_acc(acc);
    mainloop_nf4_act<false>(acc, sm, Nf4W(a), reinterpret_cast<const bf16*>(a.x), a.m, a.k, t.m0, t.n0, wm0, wn0,
                            (a.flags & QADAPT_LORA_VEC) != 0, t.kb, t.ke);
    if (t.split_k) store_partial(a.partial, a.m, a.n, acc, t, wm0, wn0);
    else gemm_finish<NF4_THREADS>(a, acc, sm.a[0], sm.a[1], t.m0, t.n0, wm0, wn0);
}

/* dx = dy W (+ g Acat) with NF4 W; tiles as bwd_dx_dense. */
__device__ __forceinline__ void bwd_dx_nf4(const QadaptLoraBwdArgs& a) {
    __shared__ __align__(128) Nf4Smem sm;
    const SplitTile t = split_tile(a, a.m, a.k, a.n, BM, BQ);
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BQ / NF4_WN)) * NF4_WM, wn0 = (warp % (BQ / NF4_WN)) * NF4_WN;
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    float acc[MI4][NI8][4];
    zero_acc(acc);
    mainloop_nf4_act<true>(acc, sm, Nf4W(a), reinterpret_cast<const bf16*>(a.dy), a.m, a.n, t.m0, t.n0, wm0, wn0,
                           vec, t.kb, t.ke);
    if (t.split_k) store_partial(a.partial, a.m, a.k, acc, t, wm0, wn0);
    else bwd_dx_finish<NF4_THREADS>(a, acc, sm.a[0], sm.a[1], t.m0, t.n0, wm0, wn0, vec);
}

}  // namespace

QADAPT_KERNEL(lora_xa_bf16, QadaptLoraFwdArgs) { xa(args); }

/* Few rows (M <= QADAPT_LORA_GEMV_NARROW_ROWS): few accumulators, few registers, many warps per
 * SM to keep the weight stream busy. */
QADAPT_KERNEL(lora_gemv_dense_bf16, QadaptLoraFwdArgs) {
    if (args.m <= 1) gemv_dense<1>(args);
    else if (args.m <= 2) gemv_dense<2>(args);
    else gemv_dense<4>(args);
}

/* QADAPT_LORA_GEMV_NARROW_ROWS < M <= QADAPT_LORA_GEMV_MAX_ROWS. */
QADAPT_KERNEL(lora_gemv_wide_dense_bf16, QadaptLoraFwdArgs) {
    if (args.m <= 8) gemv_dense<8>(args);
    else gemv_dense<16>(args);
}

/* The per-lane tables of the NF4 gemv: GEMV_TAB floats per warp of the CTA. */
#define QADAPT_GEMV_TABS __shared__ float tabs[QADAPT_LORA_GEMV_WARPS * GEMV_TAB]

QADAPT_KERNEL(lora_gemv_nf4_bf16, QadaptLoraFwdArgs) {
    QADAPT_GEMV_TABS;
    if (args.m <= 1) gemv_nf4<1>(args, tabs);
    else if (args.m <= 2) gemv_nf4<2>(args, tabs);
    else gemv_nf4<4>(args, tabs);
}

QADAPT_KERNEL(lora_gemv_wide_nf4_bf16, QadaptLoraFwdArgs) {
    QADAPT_GEMV_TABS;
    if (args.m <= 8) gemv_nf4<8>(args, tabs);
    else gemv_nf4<16>(args, tabs);
}

/* The y and dx GEMMs: two CTAs an SM (dense: 256 threads, at most 128 registers a thread; NF4:
 * 128 threads, at most 255). */
QADAPT_KERNEL_BOUNDED(lora_gemm_dense_bf16, QadaptLoraFwdArgs, THREADS, 2) { gemm_dense(args); }
QADAPT_KERNEL_BOUNDED(lora_gemm_nf4_bf16, QadaptLoraFwdArgs, NF4_THREADS, 2) { gemm_nf4(args); }
QADAPT_KERNEL(lora_split_reduce_bf16, QadaptLoraFwdArgs) { split_reduce(args); }
QADAPT_KERNEL(lora_split_reduce_dx_bf16, QadaptLoraBwdArgs) { split_reduce_dx(args); }

QADAPT_KERNEL_BOUNDED(lora_gemm_bwd_dx_dense_bf16, QadaptLoraBwdArgs, THREADS, 2) { bwd_dx_dense(args); }
QADAPT_KERNEL_BOUNDED(lora_gemm_bwd_dx_nf4_bf16, QadaptLoraBwdArgs, NF4_THREADS, 2) { bwd_dx_nf4(args); }


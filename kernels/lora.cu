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
 * warp tile 64 x 32 of mma.sync.m16n8k16 bf16 -> f32, a 1-D grid with one CTA per output tile,
 * column tiles fastest, operands through a 3-stage cp.async pipeline into XOR-swizzled shared
 * memory, edges of any shape filled element by element with zeros):
 *   lora_xa_bf16          gemv path: one warp per u[m, e] (grid-stride), 16-byte loads of x and
 *                         A, a warp reduction, zero for foreign adapters.
 *   (GEMM path: u, and the backward's g, dA and dB, are the rank-R products of lora_rank.cu:
 *                         R-wide tiles, split along the reduction.)
 *   lora_gemv_*_bf16      M <= 4 rows (lora_gemv_wide_*_bf16: 5..16 rows, more accumulators and
 *                         registers). One warp per output feature n (grid-stride), the row of
 *                         W streamed once with 16-byte loads (8 bf16, or 32 NF4 codes dequantized
 *                         in registers; 4 loads in flight per lane for 1-2 rows), multiplied
 *                         against all M rows of x (from L1/L2), f32 accumulators per row; the LoRA
 *                         term (r values per row) is added by the lanes before the warp reduction,
 *                         bias after, y written once.
 *   lora_gemm_*_bf16      M > 16 rows. x tiles [128][32] and W tiles reach the tensor cores by
 *                         ldmatrix. NF4 W tiles travel as packed bytes (16 per row per stage) plus
 *                         one f32 scale per row; each thread decodes the bytes of its mma B
 *                         fragment straight from shared memory through a 256-entry (byte -> two
 *                         levels) table. After the K loop the same accumulators take the R-long
 *                         extension [u | Bcat], then bias, then one bf16 store of y.
 *   lora_gemm_bwd_dx_*_bf16 dx = dy W then + g Acat in the same accumulators: W tiles
 *                         [32 rows of n][128 columns of k] by ldmatrix.trans; NF4 W tiles as 64
 *                         bytes a row (80-byte stride: conflict-free) plus a scale per 32 columns,
 *                         decoded per fragment element. One bf16 store of dx.
 * Outputs u, g, y and dx are overwritten; grad_a and grad_b are accumulated into.
 */
#include "nf4_codec.cuh"
#include "qadapt.h"
#include "qadapt_mma.cuh"

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

__device__ __forceinline__ void xa(const QadaptLoraFwdArgs& a) {
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(a.x);
    const bf16* __restrict__ A = reinterpret_cast<const bf16*>(a.lora_a);
    const float* __restrict__ scales = reinterpret_cast<const float*>(a.scales);
    bf16* __restrict__ u = reinterpret_cast<bf16*>(a.u);
    const uint32_t R = a.rank * a.n_adapters;
    const uint64_t total = (uint64_t)a.m * R;
    const unsigned lane = threadIdx.x & 31u;
    const uint64_t warps = (uint64_t)gridDim.x * (blockDim.x / 32u);
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    for (uint64_t w = (uint64_t)blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u; w < total; w += warps) {
        const uint32_t m = (uint32_t)(w / R);
        const uint32_t e = (uint32_t)(w % R);
        const uint32_t ad = e / a.rank;
        if (row_adapter(a, m) != (int)ad) {
            if (lane == 0) u[w] = __float2bfloat16_rn(0.0f);
            continue;
        }
        const bf16* xr = x + (uint64_t)m * a.k;
        const bf16* ar = A + (uint64_t)e * a.k; /* A stack row (ad * rank + j) == e */
        float acc = 0.0f;
        if (vec) {
            const uint4* xv = reinterpret_cast<const uint4*>(xr);
            const uint4* av = reinterpret_cast<const uint4*>(ar);
            for (uint32_t c = lane; c < a.k / 8; c += 32) acc = dot8(__ldg(xv + c), __ldg(av + c), acc);
        } else {
            for (uint32_t k = lane; k < a.k; k += 32) acc = fmaf(bf_at(xr, k), bf_at(ar, k), acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) u[w] = __float2bfloat16_rn(__fmul_rn(__ldg(scales + ad), acc));
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

/* One run of 32 NF4 codes (16 bytes q, block scale `scale`) at k = 32c, against the MT x rows. */
template <int MT>
__device__ __forceinline__ void nf4_run(const QadaptLoraFwdArgs& a, const bf16* __restrict__ x, const float* levels,
                                        uint4 q, float scale, uint32_t c, float (&acc)[MT]) {
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float wv[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t byte = (words[i] >> (8 * j)) & 0xffu;
            wv[2 * j] = round_to<bf16>(__fmul_rn(levels[byte >> 4], scale));
            wv[2 * j + 1] = round_to<bf16>(__fmul_rn(levels[byte & 0xfu], scale));
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
 * codes (16 bytes, one NF4 block since blocksize >= 32) at k = 32c, 32(c+32), ... */
template <int MT>
__device__ __forceinline__ void gemv_nf4(const QadaptLoraFwdArgs& a, const float* levels) {
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(a.x);
    const uint4* __restrict__ packed = reinterpret_cast<const uint4*>(a.w);
    const float* __restrict__ absmax = reinterpret_cast<const float*>(a.absmax);
    const uint8_t* __restrict__ codes = reinterpret_cast<const uint8_t*>(a.absmax_codes);
    const float* __restrict__ nested = reinterpret_cast<const float*>(a.nested_absmax);
    const float* __restrict__ map = reinterpret_cast<const float*>(a.dynamic_map);
    const unsigned lane = threadIdx.x & 31u;
    const uint32_t warps = gridDim.x * (blockDim.x / 32u);
    const uint32_t runs = a.k / 32;
    for (uint32_t n = blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u; n < a.n; n += warps) {
        float acc[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
        const uint64_t run0 = (uint64_t)n * runs;
        uint32_t c = lane;
        /* Few rows: GEMV_UNROLL independent 16-byte code loads (and their scales) in flight. */
        for (; c + 32 * (GEMV_UNROLL<MT>() - 1) < runs; c += 32 * GEMV_UNROLL<MT>()) {
            uint4 q[GEMV_UNROLL<MT>()];
            float scale[GEMV_UNROLL<MT>()];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL<MT>(); ++u) {
                q[u] = __ldg(packed + run0 + c + 32 * u);
                scale[u] = nf4_block_scale(absmax, codes, nested, map, a.offset, ((run0 + c + 32 * u) * 32) / a.blocksize);
            }
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL<MT>(); ++u) nf4_run<MT>(a, x, levels, q[u], scale[u], c + 32 * u, acc);
        }
        for (; c < runs; c += 32) {
            const uint4 q = __ldg(packed + run0 + c);
            const float scale = nf4_block_scale(absmax, codes, nested, map, a.offset, ((run0 + c) * 32) / a.blocksize);
            nf4_run<MT>(a, x, levels, q, scale, c, acc);
        }
        gemv_finish<MT>(a, n, acc);
    }
}

/* ---- GEMM path (M > 16) ---------------------------------------------------------------------- */

constexpr int BM = QADAPT_LORA_GEMM_BM;
constexpr int BN = QADAPT_LORA_GEMM_BN;
constexpr int BK = 32;
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
 * ld, bounds rows x cols) into swizzled shared memory. With `vec` each in-bounds 8-chunk is one
 * cp.async; chunks crossing a bound are filled element by element with zeros outside. */
template <int ROWS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* __restrict__ g, uint32_t r0, uint32_t rows,
                                          uint32_t k0, uint32_t cols, uint64_t ld, bool vec) {
    constexpr int CHUNKS = ROWS * BK / 8;
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const uint32_t c = threadIdx.x + i * THREADS;
        const uint32_t row = c / 4, kc = c % 4;
        const uint32_t gr = r0 + row, gk = k0 + kc * 8;
        bf16* dst = tile + swz(row, kc);
        if (vec && gr < rows && gk + 8 <= cols) {
            cp_async16(dst, g + (uint64_t)gr * ld + gk);
        } else {
            uint32_t v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t k = gk + 2 * e;
                const uint32_t lo = (gr < rows && k < cols) ? __bfloat16_as_ushort(g[(uint64_t)gr * ld + k]) : 0u;
                const uint32_t hi = (gr < rows && k + 1 < cols) ? __bfloat16_as_ushort(g[(uint64_t)gr * ld + k + 1]) : 0u;
                v[e] = lo | (hi << 16);
            }
            *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
        }
    }
}

/* The LoRA extension slice e0..e0+BK of Bcat[n, e] = B_{e / r}[n, e % r] (element loads). */
__device__ __forceinline__ void load_bcat_tile(bf16* tile, const QadaptLoraFwdArgs& a, uint32_t n0, uint32_t e0) {
    const bf16* __restrict__ B = reinterpret_cast<const bf16*>(a.lora_b);
    const uint32_t R = a.rank * a.n_adapters;
    for (uint32_t i = threadIdx.x; i < BN * BK; i += THREADS) {
        const uint32_t row = i / BK, col = i % BK;
        const uint32_t n = n0 + row, e = e0 + col;
        bf16 v = __float2bfloat16_rn(0.0f);
        if (n < a.n && e < R) v = B[((uint64_t)(e / a.rank) * a.n + n) * a.rank + e % a.rank];
        tile[swz(row, col / 8) + col % 8] = v;
    }
}

/* The A fragments (x rows) of one k16 step of the warp tile. */
__device__ __forceinline__ void load_a_frags(uint32_t (&af)[MI][4], const bf16* tA, uint32_t wm0, int ks) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        const uint32_t row = wm0 + mi * 16 + (lane & 15u);
        ldmatrix_x4(af[mi], tA + swz(row, ks * 2 + (lane >> 4)));
    }
}

/* One BK slice with a dense bf16 B tile ([n][k] rows, as W is stored). */
__device__ __forceinline__ void mma_tile_dense(float (&acc)[MI][NI][4], const bf16* tA, const bf16* tB, uint32_t wm0,
                                               uint32_t wn0) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[MI][4];
        load_a_frags(af, tA, wm0, ks);
        uint32_t bf[NI][2];
#pragma unroll
        for (int nj = 0; nj < NI / 2; ++nj) {
            uint32_t r[4];
            const uint32_t row = wn0 + nj * 16 + (lane & 7u) + ((lane >> 4) << 3);
            ldmatrix_x4(r, tB + swz(row, ks * 2 + ((lane >> 3) & 1u)));
            bf[2 * nj][0] = r[0];
            bf[2 * nj][1] = r[1];
            bf[2 * nj + 1][0] = r[2];
            bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
}

/* Two codes of a byte, decoded with the row's scale and packed as the bf16 pair of an mma
 * B register (element k, the high nibble, in the low half). */
__device__ __forceinline__ uint32_t decode_pair(const float2* pairs, uint32_t byte, float scale) {
    const float2 l = pairs[byte];
    const __nv_bfloat162 v = __floats2bfloat162_rn(__fmul_rn(l.x, scale), __fmul_rn(l.y, scale));
    return *reinterpret_cast<const uint32_t*>(&v);
}

/* One BK slice with an NF4 B tile: 16 packed bytes and one scale per W row. Thread (g = lane/4,
 * t = lane%4) needs W[n0 + g][k + 2t, k + 2t + 1] (byte k/2 + t) and the same at k + 8. */
__device__ __forceinline__ void mma_tile_nf4(float (&acc)[MI][NI][4], const bf16* tA, const uint8_t* tq,
                                             const float* tscale, const float2* pairs, uint32_t wm0, uint32_t wn0) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[MI][4];
        load_a_frags(af, tA, wm0, ks);
        uint32_t bf[NI][2];
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
            const uint32_t row = wn0 + ni * 8 + (lane >> 2);
            const float sc = tscale[row];
            const uint8_t* q = tq + row * 16 + ks * 8 + (lane & 3u);
            bf[ni][0] = decode_pair(pairs, q[0], sc);
            bf[ni][1] = decode_pair(pairs, q[4], sc);
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
}

/* The LoRA extension over R = n_adapters * r (element loads, one slice at a time), then bias and
 * the single bf16 store of y. tA and tB are two free BM x BK / BN x BK tiles. */
__device__ __forceinline__ void gemm_finish(const QadaptLoraFwdArgs& a, float (&acc)[MI][NI][4], bf16* tA, bf16* tB,
                                            uint32_t m0, uint32_t n0, uint32_t wm0, uint32_t wn0) {
    const uint32_t R = a.rank * a.n_adapters;
    for (uint32_t e0 = 0; e0 < R; e0 += BK) {
        __syncthreads();
        load_tile<BM>(tA, reinterpret_cast<const bf16*>(a.u), m0, a.m, e0, R, R, false);
        load_bcat_tile(tB, a, n0, e0);
        __syncthreads();
        mma_tile_dense(acc, tA, tB, wm0, wn0);
    }
    const unsigned lane = threadIdx.x & 31u;
    const bf16* __restrict__ bias = reinterpret_cast<const bf16*>(a.bias);
    bf16* __restrict__ y = reinterpret_cast<bf16*>(a.y);
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
        const uint32_t col = n0 + wn0 + ni * 8 + (lane & 3u) * 2;
        const float b0 = (bias && col < a.n) ? bf_at(bias, col) : 0.0f;
        const float b1 = (bias && col + 1 < a.n) ? bf_at(bias, col + 1) : 0.0f;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
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

__device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
}

/* The pipelined K loop of a dense tile x W^T: rows m0.. of x [M, K] and rows n0.. of W [N, K],
 * BK slices through a 3-stage cp.async pipeline (16-byte copies under `vec`, element loads at the
 * edges), into the warp's accumulators. Leaves every copy complete. */
__device__ __forceinline__ void mainloop_dense(float (&acc)[MI][NI][4], bf16 (*sA)[BM * BK], bf16 (*sB)[BN * BK],
                                               const bf16* __restrict__ x, const bf16* __restrict__ w, uint32_t M,
                                               uint32_t N, uint32_t K, uint32_t m0, uint32_t n0, uint32_t wm0,
                                               uint32_t wn0, bool vec) {
    const uint32_t KT = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) {
            load_tile<BM>(sA[s], x, m0, M, s * BK, K, K, vec);
            load_tile<BN>(sB[s], w, n0, N, s * BK, K, K, vec);
        }
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t nk = kt + STAGES - 1;
        if (nk < KT) {
            load_tile<BM>(sA[nk % STAGES], x, m0, M, nk * BK, K, K, vec);
            load_tile<BN>(sB[nk % STAGES], w, n0, N, nk * BK, K, K, vec);
        }
        cp_async_commit();
        mma_tile_dense(acc, sA[kt % STAGES], sB[kt % STAGES], wm0, wn0);
    }
    cp_async_wait<0>();
}

/* CTA tile blockIdx.x = m_tile * ceil(N/BN) + n_tile (a 1-D grid, one CTA per output tile). */
__device__ __forceinline__ void gemm_dense(const QadaptLoraFwdArgs& a) {
    __shared__ __align__(128) bf16 sA[STAGES][BM * BK];
    __shared__ __align__(128) bf16 sB[STAGES][BN * BK];
    const uint32_t tiles_n = (a.n + BN - 1) / BN;
    const uint32_t n0 = (blockIdx.x % tiles_n) * BN, m0 = (blockIdx.x / tiles_n) * BM;
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BN / WN)) * WM, wn0 = (warp % (BN / WN)) * WN;
    float acc[MI][NI][4];
    zero_acc(acc);
    mainloop_dense(acc, sA, sB, reinterpret_cast<const bf16*>(a.x), reinterpret_cast<const bf16*>(a.w), a.m, a.n,
                   a.k, m0, n0, wm0, wn0, (a.flags & QADAPT_LORA_VEC) != 0);
    gemm_finish(a, acc, sA[0], sB[0], m0, n0, wm0, wn0);
}

/* Packed NF4 W rows of one stage: 16 bytes (32 codes) per row by cp.async, and the row's block
 * scale decoded by the same thread. Needs K % 32 == 0 and 16-byte aligned packed codes. */
__device__ __forceinline__ void load_nf4_tile(uint8_t* tq, float* tscale, const QadaptLoraFwdArgs& a, uint32_t n0,
                                              uint32_t k0) {
    if (threadIdx.x < BN) {
        const uint32_t row = threadIdx.x, n = n0 + row;
        if (n < a.n) {
            const uint64_t e = (uint64_t)n * a.k + k0;
            cp_async16(tq + row * 16, reinterpret_cast<const uint8_t*>(a.w) + e / 2);
            tscale[row] = nf4_block_scale(reinterpret_cast<const float*>(a.absmax),
                                          reinterpret_cast<const uint8_t*>(a.absmax_codes),
                                          reinterpret_cast<const float*>(a.nested_absmax),
                                          reinterpret_cast<const float*>(a.dynamic_map), a.offset, e / a.blocksize);
        } else {
            *reinterpret_cast<uint4*>(tq + row * 16) = make_uint4(0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u);
            tscale[row] = 0.0f;
        }
    }
}

__device__ __forceinline__ void gemm_nf4(const QadaptLoraFwdArgs& a) {
    __shared__ __align__(128) bf16 sA[STAGES][BM * BK];
    __shared__ __align__(16) uint8_t sQ[STAGES][BN * 16];
    __shared__ float sScale[STAGES][BN];
    __shared__ float2 sPairs[256];
    /* byte -> (level of the high nibble, level of the low nibble), f32 levels as the NF4
     * dequantizer uses them (bitsandbytes 0.50 decodes in f32). */
    sPairs[threadIdx.x] = make_float2(nf4_level((int)(threadIdx.x >> 4)), nf4_level((int)(threadIdx.x & 15u)));
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(a.x);
    const uint32_t tiles_n = (a.n + BN - 1) / BN;
    const uint32_t n0 = (blockIdx.x % tiles_n) * BN, m0 = (blockIdx.x / tiles_n) * BM;
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BN / WN)) * WM, wn0 = (warp % (BN / WN)) * WN;
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    const uint32_t KT = a.k / BK;
    float acc[MI][NI][4];
    zero_acc(acc);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) {
            load_tile<BM>(sA[s], x, m0, a.m, s * BK, a.k, a.k, vec);
            load_nf4_tile(sQ[s], sScale[s], a, n0, s * BK);
        }
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t nk = kt + STAGES - 1;
        if (nk < KT) {
            load_tile<BM>(sA[nk % STAGES], x, m0, a.m, nk * BK, a.k, a.k, vec);
            load_nf4_tile(sQ[nk % STAGES], sScale[nk % STAGES], a, n0, nk * BK);
        }
        cp_async_commit();
        mma_tile_nf4(acc, sA[kt % STAGES], sQ[kt % STAGES], sScale[kt % STAGES], sPairs, wm0, wn0);
    }
    cp_async_wait<0>();
    gemm_finish(a, acc, sA[0], sA[1], m0, n0, wm0, wn0);
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

/* 8 values of row gr, columns gc.. of a row-major [rows, cols] matrix, zero outside. */
__device__ __forceinline__ uint4 gather8(const bf16* __restrict__ g, uint32_t gr, uint32_t rows, uint32_t gc,
                                         uint32_t cols, uint64_t ld) {
    uint32_t v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const uint32_t c = gc + 2 * e;
        const uint32_t lo = (gr < rows && c < cols) ? __bfloat16_as_ushort(g[(uint64_t)gr * ld + c]) : 0u;
        const uint32_t hi = (gr < rows && c + 1 < cols) ? __bfloat16_as_ushort(g[(uint64_t)gr * ld + c + 1]) : 0u;
        v[e] = lo | (hi << 16);
    }
    return make_uint4(v[0], v[1], v[2], v[3]);
}

/* Rows r0..r0+BK x columns c0..c0+BQ of a row-major [rows, cols] bf16 matrix (leading dimension
 * ld) into a swizzled [BK][BQ] tile; cp.async for in-bounds chunks under `vec`. */
__device__ __forceinline__ void load_tile_t(bf16* tile, const bf16* __restrict__ g, uint32_t r0, uint32_t rows,
                                            uint32_t c0, uint32_t cols, uint64_t ld, bool vec) {
    constexpr int CHUNKS = BK * BQ / 8;
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const uint32_t c = threadIdx.x + i * THREADS;
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

/* B fragments of NI n8 tiles from a [BK][BQ] tile (rows = reduction, columns = output columns):
 * per pair of n8 tiles the matrices (red 0-7), (red 8-15) of the first, then of the second. */
__device__ __forceinline__ void load_b_frags_t(uint32_t (&bf)[NI][2], const bf16* t, uint32_t wn0, int ks) {
    const unsigned lane = threadIdx.x & 31u, q = lane >> 3;
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t r[4];
        const uint32_t row = ks * 16 + (lane & 7u) + ((q & 1u) << 3);
        ldmatrix_x4_t(r, t + swz_t(row, (wn0 + nj * 16) / 8 + (q >> 1)));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
    }
}

__device__ __forceinline__ void mma_all(float (&acc)[MI][NI][4], const uint32_t (&af)[MI][4],
                                        const uint32_t (&bf)[NI][2]) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
}

/* dx-type slice: A operand [BM rows][BK] (dy or g), B operand a [BK][BQ] tile (W or Acat). */
__device__ __forceinline__ void mma_tile_nt(float (&acc)[MI][NI][4], const bf16* tA, const bf16* tB, uint32_t wm0,
                                            uint32_t wn0) {
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[MI][4];
        uint32_t bf[NI][2];
        load_a_frags(af, tA, wm0, ks);
        load_b_frags_t(bf, tB, wn0, ks);
        mma_all(acc, af, bf);
    }
}

/* Stores the CTA's accumulators as bf16 into out[rows, cols] (row-major), overwriting. */
__device__ __forceinline__ void store_bf16(const float (&acc)[MI][NI][4], bf16* __restrict__ out, uint32_t rows,
                                           uint32_t cols, uint32_t m0, uint32_t n0, uint32_t wm0, uint32_t wn0) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
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
__device__ __forceinline__ void bwd_dx_finish(const QadaptLoraBwdArgs& a, float (&acc)[MI][NI][4], bf16* tA,
                                              bf16* tB, uint32_t m0, uint32_t n0, uint32_t wm0, uint32_t wn0,
                                              bool vec) {
    const uint32_t R = a.rank * a.n_adapters;
    for (uint32_t e0 = 0; e0 < R; e0 += BK) {
        __syncthreads();
        load_tile<BM>(tA, reinterpret_cast<const bf16*>(a.g), m0, a.m, e0, R, R, false);
        load_tile_t(tB, reinterpret_cast<const bf16*>(a.lora_a), e0, R, n0, a.k, a.k, vec);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        mma_tile_nt(acc, tA, tB, wm0, wn0);
    }
    store_bf16(acc, reinterpret_cast<bf16*>(a.dx), a.m, a.k, m0, n0, wm0, wn0);
}

/* Bcat as a [BK rows of n][BQ columns of e] tile: Bcat[n, e] = B_{e / r}[n, e % r]. A run of 8
 * columns is contiguous in B when r % 8 == 0 (then one cp.async if B is 16-byte aligned). */
__device__ __forceinline__ void load_bcat_t(bf16* tile, const QadaptLoraBwdArgs& a, uint32_t r0, uint32_t c0) {
    const bf16* __restrict__ B = reinterpret_cast<const bf16*>(a.lora_b);
    const uint32_t R = a.rank * a.n_adapters;
    const bool vec = (a.rank % 8) == 0 && (a.lora_b % 16) == 0;
    constexpr int CHUNKS = BK * BQ / 8;
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const uint32_t c = threadIdx.x + i * THREADS;
        const uint32_t row = c / (BQ / 8), cc = c % (BQ / 8);
        const uint32_t n = r0 + row, e = c0 + cc * 8;
        bf16* dst = tile + swz_t(row, cc);
        if (vec && n < a.n && e + 8 <= R) {
            cp_async16(dst, B + ((uint64_t)(e / a.rank) * a.n + n) * a.rank + e % a.rank);
        } else {
            uint32_t v[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                uint32_t h[2];
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const uint32_t ee = e + 2 * q + t;
                    h[t] = (n < a.n && ee < R)
                               ? __bfloat16_as_ushort(B[((uint64_t)(ee / a.rank) * a.n + n) * a.rank + ee % a.rank])
                               : 0u;
                }
                v[q] = h[0] | (h[1] << 16);
            }
            *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
        }
    }
}

/* The pipelined reduction over n of dy [M, N] against a [N, cols] right operand read in
 * [BK][BQ] tiles: W [N, K] (BCAT = false, for dx) or Bcat [N, R] (BCAT = true, for g). */
template <bool BCAT>
__device__ __forceinline__ void mainloop_dy(float (&acc)[MI][NI][4], bf16 (*sA)[BM * BK], bf16 (*sB)[BK * BQ],
                                            const QadaptLoraBwdArgs& a, uint32_t m0, uint32_t n0, uint32_t wm0,
                                            uint32_t wn0, bool vec) {
    const bf16* __restrict__ dy = reinterpret_cast<const bf16*>(a.dy);
    const bf16* __restrict__ w = reinterpret_cast<const bf16*>(a.w);
    const uint32_t KT = (a.n + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) {
            load_tile<BM>(sA[s], dy, m0, a.m, s * BK, a.n, a.n, vec);
            if (BCAT) load_bcat_t(sB[s], a, s * BK, n0);
            else load_tile_t(sB[s], w, s * BK, a.n, n0, a.k, a.k, vec);
        }
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t nk = kt + STAGES - 1;
        if (nk < KT) {
            load_tile<BM>(sA[nk % STAGES], dy, m0, a.m, nk * BK, a.n, a.n, vec);
            if (BCAT) load_bcat_t(sB[nk % STAGES], a, nk * BK, n0);
            else load_tile_t(sB[nk % STAGES], w, nk * BK, a.n, n0, a.k, a.k, vec);
        }
        cp_async_commit();
        mma_tile_nt(acc, sA[kt % STAGES], sB[kt % STAGES], wm0, wn0);
    }
    cp_async_wait<0>();
}

/* dx = dy W (+ g Acat): output tile [BM rows of m][BQ columns of k], reduction over n in BK
 * slices, dy tiles [BM][BK] and W tiles [BK rows of n][BQ columns of k]. 1-D grid, k tiles
 * fastest. */
__device__ __forceinline__ void bwd_dx_dense(const QadaptLoraBwdArgs& a) {
    __shared__ __align__(128) bf16 sA[STAGES][BM * BK];
    __shared__ __align__(128) bf16 sB[STAGES][BK * BQ];
    const uint32_t tiles_k = (a.k + BQ - 1) / BQ;
    const uint32_t n0 = (blockIdx.x % tiles_k) * BQ, m0 = (blockIdx.x / tiles_k) * BM;
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BQ / WN)) * WM, wn0 = (warp % (BQ / WN)) * WN;
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    float acc[MI][NI][4];
    zero_acc(acc);
    mainloop_dy<false>(acc, sA, sB, a, m0, n0, wm0, wn0, vec);
    bwd_dx_finish(a, acc, sA[0], sB[0], m0, n0, wm0, wn0, vec);
}

/* NF4 W tile for dx: BK rows of n, BQ = 128 columns of k = 64 bytes a row, stored with a row
 * stride of 80 bytes (the 4 rows a fragment read touches land in distinct banks), plus one scale
 * per (row, 32 columns). Thread t < 128 copies 16 bytes (row t/4, part t%4) and decodes their
 * scale. Needs K % 32 == 0 (a 32-column part is one aligned 16-byte run inside one NF4 block). */
constexpr int QROW = 80;

__device__ __forceinline__ void load_nf4_tile_t(uint8_t* tq, float* ts, const QadaptLoraBwdArgs& a, uint32_t r0,
                                                uint32_t c0) {
    if (threadIdx.x < BK * 4) {
        const uint32_t row = threadIdx.x / 4, part = threadIdx.x % 4;
        const uint32_t n = r0 + row, kc = c0 + part * 32;
        uint8_t* dst = tq + row * QROW + part * 16;
        if (n < a.n && kc < a.k) {
            const uint64_t e = (uint64_t)n * a.k + kc;
            cp_async16(dst, reinterpret_cast<const uint8_t*>(a.w) + e / 2);
            ts[row * 4 + part] = nf4_block_scale(reinterpret_cast<const float*>(a.absmax),
                                                 reinterpret_cast<const uint8_t*>(a.absmax_codes),
                                                 reinterpret_cast<const float*>(a.nested_absmax),
                                                 reinterpret_cast<const float*>(a.dynamic_map), a.offset,
                                                 e / a.blocksize);
        } else {
            *reinterpret_cast<uint4*>(dst) = make_uint4(0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u);
            ts[row * 4 + part] = 0.0f;
        }
    }
}

/* B fragments from the NF4 tile: thread (g = lane/4, t = lane%4) needs W[red][col] for
 * red = 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1), col = its n8 tile's column g; each value is
 * bf16(level * scale) as the NF4 dequantizer gives it. */
__device__ __forceinline__ void nf4_b_frags_t(uint32_t (&bf)[NI][2], const uint8_t* tq, const float* ts,
                                              const float* lv, uint32_t wn0, int ks) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
        const uint32_t col = wn0 + ni * 8 + (lane >> 2);
        const uint32_t byte = col >> 1, shift = (col & 1u) ? 0u : 4u, part = col >> 5;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t r0 = ks * 16 + (lane & 3u) * 2 + h * 8;
            const float v0 = __fmul_rn(lv[(tq[r0 * QROW + byte] >> shift) & 15u], ts[r0 * 4 + part]);
            const float v1 = __fmul_rn(lv[(tq[(r0 + 1) * QROW + byte] >> shift) & 15u], ts[(r0 + 1) * 4 + part]);
            const __nv_bfloat162 v = __floats2bfloat162_rn(v0, v1);
            bf[ni][h] = *reinterpret_cast<const uint32_t*>(&v);
        }
    }
}

__device__ __forceinline__ void bwd_dx_nf4(const QadaptLoraBwdArgs& a) {
    __shared__ __align__(128) bf16 sA[STAGES][BM * BK];
    __shared__ __align__(16) uint8_t sQ[STAGES][BK * QROW];
    __shared__ float sS[STAGES][BK * 4];
    __shared__ float sLv[16];
    if (threadIdx.x < 16) sLv[threadIdx.x] = nf4_level((int)threadIdx.x);
    const bf16* __restrict__ dy = reinterpret_cast<const bf16*>(a.dy);
    const uint32_t tiles_k = (a.k + BQ - 1) / BQ;
    const uint32_t n0 = (blockIdx.x % tiles_k) * BQ, m0 = (blockIdx.x / tiles_k) * BM;
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BQ / WN)) * WM, wn0 = (warp % (BQ / WN)) * WN;
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    const uint32_t KT = (a.n + BK - 1) / BK;
    float acc[MI][NI][4];
    zero_acc(acc);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) {
            load_tile<BM>(sA[s], dy, m0, a.m, s * BK, a.n, a.n, vec);
            load_nf4_tile_t(sQ[s], sS[s], a, s * BK, n0);
        }
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t nk = kt + STAGES - 1;
        if (nk < KT) {
            load_tile<BM>(sA[nk % STAGES], dy, m0, a.m, nk * BK, a.n, a.n, vec);
            load_nf4_tile_t(sQ[nk % STAGES], sS[nk % STAGES], a, nk * BK, n0);
        }
        cp_async_commit();
        const uint32_t st = kt % STAGES;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            uint32_t af[MI][4];
            uint32_t bf[NI][2];
            load_a_frags(af, sA[st], wm0, ks);
            nf4_b_frags_t(bf, sQ[st], sS[st], sLv, wn0, ks);
            mma_all(acc, af, bf);
        }
    }
    cp_async_wait<0>();
    bwd_dx_finish(a, acc, sA[0], sA[1], m0, n0, wm0, wn0, vec);
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

/* f32 levels, as the NF4 dequantizer decodes (bitsandbytes 0.50: f32 product, one rounding). */
__device__ __forceinline__ void nf4_levels_to_shared(float* levels) {
    if (threadIdx.x < 16) levels[threadIdx.x] = nf4_level((int)threadIdx.x);
    __syncthreads();
}

QADAPT_KERNEL(lora_gemv_nf4_bf16, QadaptLoraFwdArgs) {
    __shared__ float levels[16];
    nf4_levels_to_shared(levels);
    if (args.m <= 1) gemv_nf4<1>(args, levels);
    else if (args.m <= 2) gemv_nf4<2>(args, levels);
    else gemv_nf4<4>(args, levels);
}

QADAPT_KERNEL(lora_gemv_wide_nf4_bf16, QadaptLoraFwdArgs) {
    __shared__ float levels[16];
    nf4_levels_to_shared(levels);
    if (args.m <= 8) gemv_nf4<8>(args, levels);
    else gemv_nf4<16>(args, levels);
}

QADAPT_KERNEL(lora_gemm_dense_bf16, QadaptLoraFwdArgs) { gemm_dense(args); }
QADAPT_KERNEL(lora_gemm_nf4_bf16, QadaptLoraFwdArgs) { gemm_nf4(args); }

QADAPT_KERNEL(lora_gemm_bwd_dx_dense_bf16, QadaptLoraBwdArgs) { bwd_dx_dense(args); }
QADAPT_KERNEL(lora_gemm_bwd_dx_nf4_bf16, QadaptLoraBwdArgs) { bwd_dx_nf4(args); }

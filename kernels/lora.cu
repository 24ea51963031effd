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
 * are used as the bf16 values the NF4 dequantizer produces, W[n,k] = bf16(bf16(level) * scale),
 * scale decoded in place from plain or double-quant block constants (nf4_block_scale).
 *
 * Layout. NF4 W is the flattened row-major [N, K] tensor cut into blocks of `blocksize`, two
 * codes a byte (element 2j in the high nibble). The fused NF4 kernels need K % 32 == 0 (so a
 * run of 32 codes of one row is 16 aligned bytes inside one NF4 block); the launcher dequantizes
 * first and takes the dense kernels otherwise. Dense kernels handle any K: with QADAPT_LORA_VEC
 * (K % 8 == 0, aligned rows) they use 16-byte loads, else element loads.
 *
 * Kernels and tiling:
 *   lora_xa_bf16          one warp per output u[m, e] (grid-stride): a dot product over K with
 *                         16-byte loads of x and A, a warp reduction; zero for foreign adapters.
 *   lora_gemv_*_bf16      M <= 16 rows. One warp per output feature n (grid-stride), the row of
 *                         W streamed once with 16-byte loads (8 bf16, or 32 NF4 codes dequantized
 *                         in registers), multiplied against all M rows of x (from L1/L2), f32
 *                         accumulators per row; the LoRA term (r values per row) is added by the
 *                         lanes before the warp reduction, bias after, y written once.
 *   lora_gemm_*_bf16      M > 16 rows. CTA tile 128 x 128, BK = 32, 8 warps (2 x 4), warp tile
 *                         64 x 32 of mma.sync.m16n8k16 bf16 -> f32, one CTA per output tile (1-D grid, N tiles fastest). x and dense W tiles go through
 *                         a 3-stage cp.async pipeline into XOR-swizzled shared memory and reach
 *                         the tensor cores by ldmatrix. NF4 W tiles travel as packed bytes (16 per
 *                         row per stage) plus one f32 scale per row; each thread decodes the bytes
 *                         of its mma B fragment straight from shared memory through a 256-entry
 *                         (byte -> two levels) table. After the K loop the same accumulators take
 *                         the R-long extension [u | Bcat], then bias, then one bf16 store.
 * Every output (u, y) is overwritten, never accumulated.
 */
#include "nf4_codec.cuh"
#include "qadapt.h"

using qadapt::nf4_block_scale;
using qadapt::nf4_level;
using qadapt::round_to;

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
__device__ __forceinline__ int row_adapter(const QadaptLoraFwdArgs& a, uint32_t m) {
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

/* W source of the gemv: dense rows, 8 values per 16-byte load. */
struct DenseRows {
    const bf16* w;
    uint64_t k;
};

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
            for (uint32_t c = lane; c < a.k / 8; c += 32) {
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
        for (uint32_t c = lane; c < runs; c += 32) {
            const uint4 q = __ldg(packed + run0 + c);
            const float scale = nf4_block_scale(absmax, codes, nested, map, a.offset, ((run0 + c) * 32) / a.blocksize);
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

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

/* CTA tile blockIdx.x = m_tile * ceil(N/BN) + n_tile (a 1-D grid, one CTA per output tile): x tiles and dense W tiles through a 3-stage
 * cp.async pipeline. */
__device__ __forceinline__ void gemm_dense(const QadaptLoraFwdArgs& a) {
    __shared__ __align__(128) bf16 sA[STAGES][BM * BK];
    __shared__ __align__(128) bf16 sB[STAGES][BN * BK];
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(a.x);
    const bf16* __restrict__ w = reinterpret_cast<const bf16*>(a.w);
    const uint32_t tiles_n = (a.n + BN - 1) / BN;
    const uint32_t n0 = (blockIdx.x % tiles_n) * BN, m0 = (blockIdx.x / tiles_n) * BM;
    const uint32_t warp = threadIdx.x / 32u;
    const uint32_t wm0 = (warp / (BN / WN)) * WM, wn0 = (warp % (BN / WN)) * WN;
    const bool vec = (a.flags & QADAPT_LORA_VEC) != 0;
    const uint32_t KT = (a.k + BK - 1) / BK;
    float acc[MI][NI][4];
    zero_acc(acc);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) {
            load_tile<BM>(sA[s], x, m0, a.m, s * BK, a.k, a.k, vec);
            load_tile<BN>(sB[s], w, n0, a.n, s * BK, a.k, a.k, vec);
        }
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t nk = kt + STAGES - 1;
        if (nk < KT) {
            load_tile<BM>(sA[nk % STAGES], x, m0, a.m, nk * BK, a.k, a.k, vec);
            load_tile<BN>(sB[nk % STAGES], w, n0, a.n, nk * BK, a.k, a.k, vec);
        }
        cp_async_commit();
        mma_tile_dense(acc, sA[kt % STAGES], sB[kt % STAGES], wm0, wn0);
    }
    cp_async_wait<0>();
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
    /* byte -> (level of the high nibble, level of the low nibble), levels rounded to bf16 as the
     * NF4 dequantizer does. */
    sPairs[threadIdx.x] = make_float2(round_to<bf16>(nf4_level((int)(threadIdx.x >> 4))),
                                      round_to<bf16>(nf4_level((int)(threadIdx.x & 15u))));
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

}  // namespace

QADAPT_KERNEL(lora_xa_bf16, QadaptLoraFwdArgs) { xa(args); }

QADAPT_KERNEL(lora_gemv_dense_bf16, QadaptLoraFwdArgs) {
    if (args.m <= 1) gemv_dense<1>(args);
    else if (args.m <= 2) gemv_dense<2>(args);
    else if (args.m <= 4) gemv_dense<4>(args);
    else if (args.m <= 8) gemv_dense<8>(args);
    else gemv_dense<16>(args);
}

QADAPT_KERNEL(lora_gemv_nf4_bf16, QadaptLoraFwdArgs) {
    __shared__ float levels[16];
    /* Levels rounded to bf16 first, as the NF4 dequantizer decodes. */
    if (threadIdx.x < 16) levels[threadIdx.x] = round_to<bf16>(nf4_level((int)threadIdx.x));
    __syncthreads();
    if (args.m <= 1) gemv_nf4<1>(args, levels);
    else if (args.m <= 2) gemv_nf4<2>(args, levels);
    else if (args.m <= 4) gemv_nf4<4>(args, levels);
    else if (args.m <= 8) gemv_nf4<8>(args, levels);
    else gemv_nf4<16>(args, levels);
}

QADAPT_KERNEL(lora_gemm_dense_bf16, QadaptLoraFwdArgs) { gemm_dense(args); }
QADAPT_KERNEL(lora_gemm_nf4_bf16, QadaptLoraFwdArgs) { gemm_nf4(args); }

/*
 * gemm_sm80.cuh — the tensor-core GEMM toolkit of the LoRA kernels (lora_fwd.cu, lora_bwd.cu):
 * mma.sync.m16n8k16 bf16 -> f32 on sm_80 and later, no sm_90a instructions.
 *
 * Tiling (every GEMM of those files): CTA tile 128 x 128, BK = 32, 256 threads = 8 warps as
 * 2 x 4, warp tile 64 x 32 (the NF4 GEMMs: 128 threads, 4 warps of 64 x 64, nf4_tile.cuh), a 1-D
 * grid with one CTA per output tile in grouped order (grouped_tile), operands through a 3-stage
 * cp.async pipeline into XOR-swizzled shared memory, copy plans set up once per thread for the
 * vector layout (ColCopy / RowCopy), edges of any shape filled with zeros.
 * Two tile layouts: [rows][BK] with the reduction along the row (x, W, dy as the A operand; swz,
 * read by ldmatrix) and [BK][BQ] with the reduction down the columns (W and A in dx = dy W + g A;
 * swz_t, read by ldmatrix .trans). Split-k CTAs store f32 partials (split_tile, store_partial)
 * that a reduce kernel adds in a fixed order.
 *
 * Everything here sits in an anonymous namespace: each kernel file that includes it gets its own
 * copy, with no linkage between files.
 */
#pragma once

#include "bf16_gather.cuh"
#include "qadapt.h"
/* Angle brackets: the include path only, never this directory first, so the emulated build (which
 * puts kernels/emu before kernels/include) gets the emulator's qadapt_mma.cuh. */
#include <qadapt_mma.cuh>

namespace {

using qadapt::gather8;
using qadapt::cp_async16;
using qadapt::cp_async_commit;
using qadapt::cp_async_wait;
using qadapt::ldmatrix_x4;
using qadapt::ldmatrix_x4_t;
using qadapt::mma_bf16;

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

template <int MI_, int NI_>
__device__ __forceinline__ void zero_acc(float (&acc)[MI_][NI_][4]) {
#pragma unroll
    for (int mi = 0; mi < MI_; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI_; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
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
                                           uint32_t cols, uint32_t m0, uint32_t n0, uint32_t wm0, uint32_t wn0,
                                           bool add = false) {
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
                /* `add`: the old value joins the f32 sum before the one rounding. */
                if (col + 1 < cols && (cols % 2) == 0) {
                    const float o0 = add ? bf_at(out, o) : 0.0f, o1 = add ? bf_at(out, o + 1) : 0.0f;
                    *reinterpret_cast<__nv_bfloat162*>(out + o) =
                        __floats2bfloat162_rn(acc[mi][ni][2 * h] + o0, acc[mi][ni][2 * h + 1] + o1);
                } else {
                    if (col < cols) out[o] = __float2bfloat16_rn(acc[mi][ni][2 * h] + (add ? bf_at(out, o) : 0.0f));
                    if (col + 1 < cols)
                        out[o + 1] = __float2bfloat16_rn(acc[mi][ni][2 * h + 1] + (add ? bf_at(out, o + 1) : 0.0f));
                }
            }
        }
    }
}

}  // namespace

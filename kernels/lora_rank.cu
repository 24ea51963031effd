/*
 * lora_rank.cu — the rank-R products of the fused LoRA layer (kernels/lora.cu), on tiles sized for
 * LoRA and split along their reduction so that they fill the GPU.
 *
 * Math. With R = n_adapters * rank, Acat = the A stack as [R, K], Bcat[n, e] = B_{e / rank}[n, e %
 * rank], s_a the scale of adapter a and idx(m) the adapter of row m (-1 outside [0, n_adapters)):
 *     xa   u[m, e]        = bf16( s_a * sum_k x[m,k] Acat[e,k] )  if e / rank == idx(m), else 0
 *     dyb  g[m, e]        = bf16( s_a * sum_n dy[m,n] Bcat[n,e] ) if e / rank == idx(m), else 0
 *     da   grad_a[e, k]  += sum_m g[m,e] x[m,k]                   (f32, ACCUMULATED)
 *     db   grad_b[a,n,j] += sum_m dy[m,n] u[m, a*rank + j]        (f32, ACCUMULATED)
 * All four are one shape of product, out[p, e] = sum_t L(p, t) Rr(t, e), with the long output side
 * p (m, m, k, n), the reduction t (k, n, m, m) and the narrow side e of R columns:
 *     xa:  L = x  [p = m][t = k]  (rows along t),   Rr = Acat [e][t]        (rows along t)
 *     dyb: L = dy [p = m][t = n]  (rows along t),   Rr = Bcat [t = n][e]    (rows along e)
 *     da:  L = x  [t = m][p = k]  (rows along p),   Rr = g    [t = m][e]    (rows along e)
 *     db:  L = dy [t = m][p = n]  (rows along p),   Rr = u    [t = m][e]    (rows along e)
 * (da is formed transposed, out[k, e], and stored into grad_a[e, k] by the reduction kernel.)
 *
 * Tiling. A CTA of 128 threads (4 warps) owns an output tile of BM = 64 rows of p by R_TILE columns
 * of e, R_TILE in {16, 32, 64} picked by the launcher from R (R > 64: several column tiles); each
 * warp owns 16 rows and all R_TILE columns, R_TILE / 8 mma.sync.m16n8k16 (bf16 -> f32) per k16
 * step. Operands go through a 3-stage cp.async pipeline of BK = 32 reduction steps into shared
 * tiles of CW = 2, 4 or 8 chunks of 8 bf16 a row, chunk c of row r stored at chunk
 * c ^ ((r / (8 / CW)) % CW): the 8 rows an ldmatrix phase reads at one logical chunk, and the
 * 8 chunks of one 8-thread phase of 16-byte stores, hit 8 distinct 16-byte bank groups. Tiles whose rows
 * run along t ([64][32], [R_TILE][32]) are read by ldmatrix; tiles whose rows run along p or e
 * ([32][64], [32][R_TILE]) by ldmatrix .trans, which hands each thread its fragment of the
 * transposed matrix. Edges of any shape are filled element by element with zeros; 16-byte copies
 * only when the launcher's flags say the rows allow them.
 *
 * Split-K. The reduction is cut into `splits` ranges of `steps` BK slices (the last range may be
 * shorter; none is empty). The 1-D grid is splits x p tiles x e tiles (e tiles fastest, then p
 * tiles); each CTA stores its f32 partial sums, unscaled and unmasked, into its own slice of the
 * scratch partial[splits][p][R] ([splits][R][p] for da) (plain stores, every element written by exactly one CTA). Then
 * lora_rank_reduce_bf16 adds the splits of each output element in split order 0, 1, ... (one thread
 * per element: the result does not depend on scheduling) and finishes it: mask, scale and bf16
 * rounding for u and g (overwritten), or the += into grad_a / grad_b. The summation order differs
 * from a single f32 sum over the whole reduction only by the grouping of f32 additions.
 */
#include "bf16_gather.cuh"
#include "qadapt.h"
#include "qadapt_mma.cuh"

using qadapt::cp_async16;
using qadapt::gather8;
using qadapt::cp_async_commit;
using qadapt::cp_async_wait;
using qadapt::ldmatrix_x4;
using qadapt::ldmatrix_x4_t;
using qadapt::mma_bf16;

namespace {

typedef __nv_bfloat16 bf16;

constexpr int BM = QADAPT_LORA_RANK_BM;
constexpr int BK = QADAPT_LORA_RANK_BK;
constexpr int THREADS = QADAPT_LORA_RANK_THREADS;
constexpr int STAGES = 3;
constexpr int RT_MAX = 64;
static_assert(BM == 16 * (THREADS / 32), "each warp owns 16 rows of p");
static_assert(BK % 16 == 0, "whole k16 steps per slice");

/* Elements of one stage buffer (either orientation holds the same count). */
constexpr int L_ELEMS = BM * BK;
constexpr int R_ELEMS = RT_MAX * BK;

/* Element offset of chunk `chunk` (8 bf16) of row `row` in a tile of COLS columns, swizzled as
 * the header says. */
template <int COLS>
__device__ __forceinline__ uint32_t off(uint32_t row, uint32_t chunk) {
    constexpr uint32_t CW = COLS / 8;
    static_assert(CW == 2 || CW == 4 || CW == 8, "tiles of 16, 32 or 64 columns");
    return row * COLS + ((chunk ^ ((row / (8 / CW)) % CW)) * 8u);
}

/* Which product a kernel forms (see the table in the header comment). */
enum class Op { XA, DYB, DA, DB };

/* The adapter of row m; indices outside [0, n_adapters) read as -1. */
__device__ __forceinline__ int row_adapter(const QadaptLoraRankArgs& a, uint32_t m) {
    const int i = a.adapter_idx ? __ldg(reinterpret_cast<const int32_t*>(a.adapter_idx) + m) : 0;
    return (i >= 0 && (uint32_t)i < a.n_adapters) ? i : -1;
}

/* Rows r0..r0+ROWS x columns c0..c0+COLS of a row-major [rows, cols] bf16 matrix (leading
 * dimension ld) into a swizzled shared tile, zeros outside the matrix. Under `vec`
 * (ld % 8 == 0 and a 16-byte aligned base) every in-bounds run of 8 is one cp.async. */
template <int ROWS, int COLS>
__device__ __forceinline__ void load_rows(bf16* tile, const bf16* __restrict__ g, uint32_t r0, uint32_t rows,
                                          uint32_t c0, uint32_t cols, uint64_t ld, bool vec) {
    constexpr int CPR = COLS / 8;
    for (int c = threadIdx.x; c < ROWS * CPR; c += THREADS) {
        const uint32_t row = c / CPR, ch = c % CPR;
        const uint32_t gr = r0 + row, gc = c0 + ch * 8;
        bf16* dst = tile + off<COLS>(row, ch);
        if (vec && gr < rows && gc + 8 <= cols) {
            cp_async16(dst, g + (uint64_t)gr * ld + gc);
        } else {
            *reinterpret_cast<uint4*>(dst) = gather8(g, gr, rows, gc, cols, ld);
        }
    }
}

/* Bcat rows n0..n0+BK x columns e0..e0+RT into a swizzled [BK][RT] tile, Bcat[n, e] =
 * B[e / rank][n][e % rank] with B [n_adapters, N, rank]. A run of 8 columns starting at a multiple
 * of 8 lies inside one adapter and is contiguous when rank % 8 == 0: one cp.async under `vec`
 * (rank % 8 == 0 and B 16-byte aligned). */
template <int RT>
__device__ __forceinline__ void load_bcat(bf16* tile, const bf16* __restrict__ B, uint32_t n0, uint32_t N,
                                          uint32_t e0, uint32_t R, uint32_t rank, bool vec) {
    constexpr int CPR = RT / 8;
    for (int c = threadIdx.x; c < BK * CPR; c += THREADS) {
        const uint32_t row = c / CPR, ch = c % CPR;
        const uint32_t n = n0 + row, e = e0 + ch * 8;
        bf16* dst = tile + off<RT>(row, ch);
        if (vec && n < N && e + 8 <= R) {
            cp_async16(dst, B + ((uint64_t)(e / rank) * N + n) * rank + e % rank);
        } else {
            uint32_t v[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                uint32_t h[2];
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const uint32_t ee = e + 2 * q + t;
                    h[t] = (n < N && ee < R) ? __bfloat16_as_ushort(B[((uint64_t)(ee / rank) * N + n) * rank + ee % rank])
                                             : 0u;
                }
                v[q] = h[0] | (h[1] << 16);
            }
            *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
        }
    }
}

/* One pipeline stage: the L and Rr tiles of reduction slice t0..t0+BK for output rows p0.. and
 * columns e0... */
template <Op OP, int RT>
__device__ __forceinline__ void load_stage(bf16* sL, bf16* sR, const QadaptLoraRankArgs& a, uint32_t p0,
                                           uint32_t e0, uint32_t t0) {
    const bf16* __restrict__ L = reinterpret_cast<const bf16*>(a.lhs);
    const bf16* __restrict__ Rr = reinterpret_cast<const bf16*>(a.rhs);
    const uint32_t R = a.rank * a.n_adapters;
    const bool vl = (a.flags & QADAPT_LORA_RANK_VEC_LHS) != 0, vr = (a.flags & QADAPT_LORA_RANK_VEC_RHS) != 0;
    if (OP == Op::XA || OP == Op::DYB) {
        load_rows<BM, BK>(sL, L, p0, a.p, t0, a.t, a.t, vl); /* [p][t] */
    } else {
        load_rows<BK, BM>(sL, L, t0, a.t, p0, a.p, a.p, vl); /* [t][p] */
    }
    if (OP == Op::XA) {
        load_rows<RT, BK>(sR, Rr, e0, R, t0, a.t, a.t, vr); /* Acat [e][t] */
    } else if (OP == Op::DYB) {
        load_bcat<RT>(sR, Rr, t0, a.t, e0, R, a.rank, vr); /* Bcat [t = n][e] */
    } else {
        load_rows<BK, RT>(sR, Rr, t0, a.t, e0, R, R, vr); /* g or u [t = m][e] */
    }
}

/* The mma fragments of k16 step ks of one stage, and the warp's R_TILE / 8 products. */
template <Op OP, int RT>
__device__ __forceinline__ void mma_stage(float (&acc)[RT / 8][4], const bf16* sL, const bf16* sR, uint32_t wm0) {
    const unsigned lane = threadIdx.x & 31u, q = lane >> 3;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
        uint32_t af[4];
        if (OP == Op::XA || OP == Op::DYB) {
            /* [p][t] tile: lanes 0-15 rows 0-15 at t 0-7, lanes 16-31 the same rows at t 8-15. */
            ldmatrix_x4(af, sL + off<BK>(wm0 + (lane & 15u), ks * 2 + (lane >> 4)));
        } else {
            /* [t][p] tile, transposed: (t 0-7, p 0-7), (t 0-7, p 8-15), (t 8-15, p 0-7), (t 8-15, p 8-15). */
            ldmatrix_x4_t(af, sL + off<BM>(ks * 16 + (lane & 7u) + ((q >> 1) << 3), wm0 / 8 + (q & 1u)));
        }
        uint32_t bf[RT / 8][2];
#pragma unroll
        for (int nj = 0; nj < RT / 16; ++nj) {
            uint32_t r[4];
            if (OP == Op::XA) {
                /* [e][t] tile: (e 0-7, t 0-7), (e 0-7, t 8-15), (e 8-15, t 0-7), (e 8-15, t 8-15). */
                ldmatrix_x4(r, sR + off<BK>(nj * 16 + (lane & 7u) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1u)));
            } else {
                /* [t][e] tile, transposed: (t 0-7, e 0-7), (t 8-15, e 0-7), (t 0-7, e 8-15), (t 8-15, e 8-15). */
                ldmatrix_x4_t(r, sR + off<RT>(ks * 16 + (lane & 7u) + ((q & 1u) << 3), nj * 2 + (q >> 1)));
            }
            bf[2 * nj][0] = r[0];
            bf[2 * nj][1] = r[1];
            bf[2 * nj + 1][0] = r[2];
            bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int ni = 0; ni < RT / 8; ++ni) mma_bf16(acc[ni], af, bf[ni][0], bf[ni][1]);
    }
}

/* The CTA's split of the reduction through the pipeline, then its f32 partials into
 * partial[split][p][R] (for da: partial[split][R][p], the layout of grad_a). blockIdx.x = (split * p_tiles + p_tile) * e_tiles + e_tile. */
template <Op OP, int RT>
__device__ __forceinline__ void rank_product(const QadaptLoraRankArgs& a, bf16 (*sL)[L_ELEMS], bf16 (*sR)[R_ELEMS]) {
    const uint32_t R = a.rank * a.n_adapters;
    const uint32_t e_tiles = (R + RT - 1) / RT, p_tiles = (a.p + BM - 1) / BM;
    const uint32_t e0 = (blockIdx.x % e_tiles) * RT;
    const uint32_t p0 = ((blockIdx.x / e_tiles) % p_tiles) * BM;
    const uint32_t split = blockIdx.x / (e_tiles * p_tiles);
    const uint32_t total = (a.t + BK - 1) / BK;
    const uint32_t first = split * a.steps;
    const uint32_t KT = first < total ? min(a.steps, total - first) : 0u;
    const uint32_t wm0 = (threadIdx.x / 32u) * 16u;
    float acc[RT / 8][4];
#pragma unroll
    for (int ni = 0; ni < RT / 8; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[ni][e] = 0.0f;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) load_stage<OP, RT>(sL[s], sR[s], a, p0, e0, (first + s) * BK);
        cp_async_commit();
    }
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads(); /* slice kt visible to all; every warp is done with slice kt - 1's buffer */
        const uint32_t nk = kt + STAGES - 1;
        if (nk < KT) load_stage<OP, RT>(sL[nk % STAGES], sR[nk % STAGES], a, p0, e0, (first + nk) * BK);
        cp_async_commit();
        mma_stage<OP, RT>(acc, sL[kt % STAGES], sR[kt % STAGES], wm0);
    }
    cp_async_wait<0>();
    /* c0, c1: row g, columns 2t, 2t+1; c2, c3: row g + 8 (g = lane / 4, t = lane % 4). */
    float* __restrict__ part = reinterpret_cast<float*>(a.partial) + (uint64_t)split * a.p * R;
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int ni = 0; ni < RT / 8; ++ni) {
        const uint32_t col = e0 + ni * 8 + (lane & 3u) * 2;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint32_t row = p0 + wm0 + (lane >> 2) + h * 8;
            if (row >= a.p) continue;
            if (OP == Op::DA) {
                /* [e][p] (transposed): the reduction then reads and adds along k contiguously. */
                if (col < R) part[(uint64_t)col * a.p + row] = acc[ni][2 * h];
                if (col + 1 < R) part[(uint64_t)(col + 1) * a.p + row] = acc[ni][2 * h + 1];
                continue;
            }
            const uint64_t o = (uint64_t)row * R + col;
            if (col + 1 < R && (R % 2) == 0) {
                *reinterpret_cast<float2*>(part + o) = make_float2(acc[ni][2 * h], acc[ni][2 * h + 1]);
            } else {
                if (col < R) part[o] = acc[ni][2 * h];
                if (col + 1 < R) part[o + 1] = acc[ni][2 * h + 1];
            }
        }
    }
}

/* The R_TILE the launcher chose, as a template argument. Shared memory is declared once here,
 * sized for the widest tile. */
template <Op OP>
__device__ __forceinline__ void rank_kernel(const QadaptLoraRankArgs& a) {
    __shared__ __align__(128) bf16 sL[STAGES][L_ELEMS];
    __shared__ __align__(128) bf16 sR[STAGES][R_ELEMS];
    switch (a.r_tile) {
        case 16: rank_product<OP, 16>(a, sL, sR); break;
        case 32: rank_product<OP, 32>(a, sL, sR); break;
        case 64: rank_product<OP, 64>(a, sL, sR); break;
        default: __trap(); /* the launcher only passes 16, 32 or 64 */
    }
}

/* Sums the splits of every output element in split order and finishes it (grid-stride, one thread
 * per element). MASKED: out = u or g [p, R] bf16, overwritten. GRAD_A: out = grad_a [R, p] f32,
 * the partials in the same [R][p] layout. GRAD_B: out = grad_b [n_adapters, p, rank]. */
__device__ __forceinline__ void reduce(const QadaptLoraRankArgs& a) {
    const float* __restrict__ part = reinterpret_cast<const float*>(a.partial);
    const uint32_t R = a.rank * a.n_adapters;
    const uint64_t total = (uint64_t)a.p * R;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (uint64_t)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (uint32_t s = 0; s < a.splits; ++s) sum += part[(uint64_t)s * total + i];
        if (a.mode == QADAPT_LORA_RANK_GRAD_A) { /* i = e * p + k */
            reinterpret_cast<float*>(a.out)[i] += sum;
            continue;
        }
        const uint32_t p = (uint32_t)(i / R), e = (uint32_t)(i % R); /* i = p * R + e */
        if (a.mode == QADAPT_LORA_RANK_MASKED) {
            const int ad = row_adapter(a, p);
            const bool own = ad >= 0 && (uint32_t)ad == e / a.rank;
            const float s = own ? __ldg(reinterpret_cast<const float*>(a.scales) + ad) : 0.0f;
            reinterpret_cast<bf16*>(a.out)[i] = __float2bfloat16_rn(own ? __fmul_rn(s, sum) : 0.0f);
        } else {
            reinterpret_cast<float*>(a.out)[((uint64_t)(e / a.rank) * a.p + p) * a.rank + e % a.rank] += sum;
        }
    }
}

}  // namespace

QADAPT_KERNEL(lora_rank_xa_bf16, QadaptLoraRankArgs) { rank_kernel<Op::XA>(args); }
QADAPT_KERNEL(lora_rank_dyb_bf16, QadaptLoraRankArgs) { rank_kernel<Op::DYB>(args); }
QADAPT_KERNEL(lora_rank_da_bf16, QadaptLoraRankArgs) { rank_kernel<Op::DA>(args); }
QADAPT_KERNEL(lora_rank_db_bf16, QadaptLoraRankArgs) { rank_kernel<Op::DB>(args); }
QADAPT_KERNEL(lora_rank_reduce_bf16, QadaptLoraRankArgs) { reduce(args); }

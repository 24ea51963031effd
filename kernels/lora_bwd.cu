/*
 * lora_bwd.cu — fused LoRA linear layers over a dense bf16 or an NF4 base weight: the backward of
 * lora_fwd.cu (which states the forward and the layouts).
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
 * Kernels (GEMM tiling: gemm_sm80.cuh; NF4: nf4_tile.cuh). g, dA and dB are the rank-R products of
 * lora_rank.cu; here:
 *   lora_gemm_bwd_dx_*_bf16 dx = dy W then + g Acat in the same accumulators: W tiles
 *                         [32 rows of n][128 columns of k] by ldmatrix.trans; NF4 W decoded once
 *                         per stage into such a tile, as in the forward. One bf16 store of dx.
 *                         With few output tiles n is split like the forward's k, and
 *                         lora_split_reduce_dx_bf16 adds the ranges and g Acat.
 * dx is overwritten, or with QADAPT_LORA_ACCUMULATE added into (the old value joins the f32 sum
 * before the one rounding); grad_a and grad_b are accumulated into (by lora_rank.cu).
 */
#include "nf4_tile.cuh"

namespace {

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
        if (a.flags & QADAPT_LORA_ACCUMULATE) acc += bf_at(dx, i);
        dx[i] = __float2bfloat16_rn(acc);
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
    store_bf16(acc, reinterpret_cast<bf16*>(a.dx), a.m, a.k, m0, n0, wm0, wn0,
               (a.flags & QADAPT_LORA_ACCUMULATE) != 0);
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

/* The dx GEMMs: two CTAs an SM (dense: 256 threads, at most 128 registers a thread; NF4: 128
 * threads, at most 255). */
QADAPT_KERNEL_BOUNDED(lora_gemm_bwd_dx_dense_bf16, QadaptLoraBwdArgs, THREADS, 2) { bwd_dx_dense(args); }
QADAPT_KERNEL_BOUNDED(lora_gemm_bwd_dx_nf4_bf16, QadaptLoraBwdArgs, NF4_THREADS, 2) { bwd_dx_nf4(args); }
QADAPT_KERNEL(lora_split_reduce_dx_bf16, QadaptLoraBwdArgs) { split_reduce_dx(args); }

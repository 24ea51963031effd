/*
 * lora_fwd.cu — fused LoRA linear layers over a dense bf16 or an NF4 base weight: the forward.
 *
 * Math (forward). x [M, K] bf16 row-major, W [N, K], A_a [r, K], B_a [N, r] for adapter a of a
 * stack of n_adapters, s_a its scale, idx(m) the adapter of row m (-1: base only):
 *     u[m, a*r + j] = bf16( s_a * sum_k x[m,k] A_a[j,k] )   if a == idx(m), else 0
 *     y[m, n]       = bf16( sum_k x[m,k] W[n,k]  +  sum_e u[m,e] Bcat[n,e]  +  bias[n]  (+ y[m, n]) )
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
 * Kernels (GEMM tiling: gemm_sm80.cuh; the NF4 weight decoded once per CTA: nf4_tile.cuh):
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
 *                         into a swizzled bf16 tile that the dense path reads (nf4_tile.cuh). After the
 *                         K loop the same accumulators take the R-long extension [u | Bcat], then bias, then one bf16 store of y. With few
 *                         output tiles (e.g. 17..256 rows) the launcher splits k: each CTA stores
 *                         its range's f32 sums into `partial`, and lora_split_reduce_bf16 adds
 *                         the ranges in order, the row adapter's r products of u and B, the bias,
 *                         and stores y.
 * Outputs u and y are overwritten; with QADAPT_LORA_ACCUMULATE every store of y first reads the old
 * value and adds it to the f32 sum (a residual add fused into the epilogue: y += x W^T + ...).
 * Each y element is read and written by the one thread that stores it. The backward is
 * lora_bwd.cu.
 */
#include "nf4_tile.cuh"

namespace {

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
    const bool add = (a.flags & QADAPT_LORA_ACCUMULATE) != 0;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (lane == (unsigned)m && (uint32_t)m < a.m) {
            const uint64_t o = (uint64_t)m * a.n + n;
            y[o] = __float2bfloat16_rn(acc[m] + b + (add ? bf_at(y, o) : 0.0f));
        }
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
    const bool add = (a.flags & QADAPT_LORA_ACCUMULATE) != 0;
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
                    const float y0 = add ? bf_at(y, o) : 0.0f;
                    const float y1 = add ? bf_at(y, o + 1) : 0.0f;
                    const __nv_bfloat162 v =
                        __floats2bfloat162_rn(acc[mi][ni][2 * h] + b0 + y0, acc[mi][ni][2 * h + 1] + b1 + y1);
                    *reinterpret_cast<__nv_bfloat162*>(y + o) = v;
                } else {
                    if (col < a.n) y[o] = __float2bfloat16_rn(acc[mi][ni][2 * h] + b0 + (add ? bf_at(y, o) : 0.0f));
                    if (col + 1 < a.n)
                        y[o + 1] = __float2bfloat16_rn(acc[mi][ni][2 * h + 1] + b1 + (add ? bf_at(y, o + 1) : 0.0f));
                }
            }
        }
    }
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
        if (a.flags & QADAPT_LORA_ACCUMULATE) acc += bf_at(y, i);
        y[i] = __float2bfloat16_rn(acc);
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

/* The y GEMMs: two CTAs an SM (dense: 256 threads, at most 128 registers a thread; NF4: 128
 * threads, at most 255). */
QADAPT_KERNEL_BOUNDED(lora_gemm_dense_bf16, QadaptLoraFwdArgs, THREADS, 2) { gemm_dense(args); }
QADAPT_KERNEL_BOUNDED(lora_gemm_nf4_bf16, QadaptLoraFwdArgs, NF4_THREADS, 2) { gemm_nf4(args); }
QADAPT_KERNEL(lora_split_reduce_bf16, QadaptLoraFwdArgs) { split_reduce(args); }

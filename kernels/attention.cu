/*
 * attention.cu — causal grouped-query attention, forward and backward.
 * CPU reference: crates/qadapt/src/ops/attention.rs; the conventions of every model-op kernel:
 * include/model_common.cuh.
 *
 *   attention_{fwd,bwd_dq,bwd_dkv}_bf16     one CTA per 8 query (key) rows of one head, one warp
 *                                           per row, key (query) tiles of 32 in shared memory.
 */
#include "model_common.cuh"

/*
 * Causal GQA, flash-style in f32: the forward keeps a running max and sum per query row and saves
 * lse = max + log(sum) instead of P; the backward recomputes P = exp(S - lse).
 *   attention_fwd_bf16     one CTA per (batch, head, 8 query rows), one warp per row; keys in
 *                          tiles of 32 (K and V of the kv head in shared memory, bf16, rows padded
 *                          by one word so lane j reading row j hits bank j); lane j scores key j,
 *                          then the warp adds p_j v_j with lane e owning output elements e, e+32...
 *   attention_bwd_dq_bf16  the same grid; pass 1 sums delta = sum_j P dP over the key tiles,
 *                          pass 2 adds dS_j k_j into dq (lane e owning elements as above).
 *   attention_bwd_dkv_bf16 one CTA per (batch, kv head, 8 key rows), one warp per key; loops over
 *                          the group's query heads and query tiles of 32 (Q and dO in shared
 *                          memory); lane i handles query i, the warp adds P dO_i into dv and
 *                          dS q_i into dk. Launched after attention_bwd_dq_bf16 (reads delta).
 * Packed rows (seg_start): query i's live keys are s_i <= j <= i; the forward and dq skip the
 * key tiles wholly before s_i (so the first tile a row processes has a live key and its running
 * max is finite), dkv masks queries of other sequences and stops at the first query tile that
 * starts after its keys' sequences.
 * Every output is overwritten. head_dim is even and at most QADAPT_ATTN_MAX_HEAD_DIM.
 */

namespace {

constexpr int kAttnMaxD = QADAPT_ATTN_MAX_HEAD_DIM;
constexpr int kTile = QADAPT_ATTN_TILE;
constexpr int kPerLane = kAttnMaxD / 32;
/* A tile of 32 rows of up to kAttnMaxD bf16, as 32-bit words, each row padded by one word. */
constexpr int kTileWords = kTile * (kAttnMaxD / 2 + 1);
static_assert(QADAPT_ATTN_ROWS == kWarps, "one warp per attention row");

__device__ __forceinline__ float lo_bf(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
    return v;
}

/* Row `row` of head `head` in a [batch * seq, nheads * D] bf16 tensor, as 32-bit words. */
__device__ __forceinline__ const uint32_t* head_row(const bf16* base, uint64_t b, uint32_t row,
                                                    uint32_t seq, uint32_t nheads, uint32_t head,
                                                    uint32_t d) {
    return reinterpret_cast<const uint32_t*>(base + ((b * seq + row) * nheads + head) * d);
}

/* Rows r0 .. r0 + 31 of one head into a padded tile (rows past seq are zero); all threads. */
__device__ __forceinline__ void load_tile(uint32_t* tile, const bf16* base, uint64_t b, uint32_t r0,
                                          uint32_t seq, uint32_t nheads, uint32_t head,
                                          uint32_t d) {
    const uint32_t half = d / 2;
    const uint32_t stride = half + 1;
    for (uint32_t idx = threadIdx.x; idx < kTile * half; idx += blockDim.x) {
        const uint32_t r = idx / half;
        const uint32_t w = idx - r * half;
        const uint32_t row = r0 + r;
        tile[r * stride + w] = row < seq ? head_row(base, b, row, seq, nheads, head, d)[w] : 0u;
    }
}

/* One row of one head into this warp's words (lanes stride the row). */
__device__ __forceinline__ void load_row(uint32_t* dst, const uint32_t* src, uint32_t half,
                                         unsigned lane) {
    for (uint32_t w = lane; w < half; w += 32) dst[w] = src[w];
}

/* a . t over `half` words of bf16 pairs, f32. */
__device__ __forceinline__ float dot_words(const uint32_t* a, const uint32_t* t, uint32_t half) {
    float s = 0.0f;
    for (uint32_t w = 0; w < half; ++w) {
        const uint32_t x = a[w];
        const uint32_t y = t[w];
        s += lo_bf(x) * lo_bf(y);
        s += hi_bf(x) * hi_bf(y);
    }
    return s;
}

/* Element e of tile row r. */
__device__ __forceinline__ float tile_elem(const uint32_t* tile, uint32_t r, uint32_t e,
                                           uint32_t stride) {
    const uint32_t w = tile[r * stride + e / 2];
    return (e & 1u) ? hi_bf(w) : lo_bf(w);
}

/* Stores this lane's elements e = lane + 32 k (k < kPerLane, e < d) of a row as bf16. */
__device__ __forceinline__ void store_row(bf16* dst, const float (&acc)[kPerLane], float mul,
                                          uint32_t d, unsigned lane) {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
        const uint32_t e = lane + 32u * k;
        if (e < d) dst[e] = __float2bfloat16_rn(acc[k] * mul);
    }
}

/* acc[k] += c * tile[r][lane + 32 k] for this lane's elements. */
__device__ __forceinline__ void axpy_row(float (&acc)[kPerLane], float c, const uint32_t* tile,
                                         uint32_t r, uint32_t stride, uint32_t d, unsigned lane) {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
        const uint32_t e = lane + 32u * k;
        if (e < d) acc[k] += c * tile_elem(tile, r, e, stride);
    }
}

}  // namespace

QADAPT_KERNEL(attention_fwd_bf16, QadaptAttentionArgs) {
    __shared__ uint32_t ks[kTileWords];
    __shared__ uint32_t vs[kTileWords];
    __shared__ uint32_t qs[kWarps][kAttnMaxD / 2];
    const bf16* __restrict__ q = reinterpret_cast<const bf16*>(args.q);
    const bf16* __restrict__ k = reinterpret_cast<const bf16*>(args.k);
    const bf16* __restrict__ v = reinterpret_cast<const bf16*>(args.v);
    bf16* __restrict__ out = reinterpret_cast<bf16*>(args.out);
    float* __restrict__ lse = reinterpret_cast<float*>(args.lse);
    const uint32_t* __restrict__ seg = reinterpret_cast<const uint32_t*>(args.seg_start);
    const uint32_t T = args.seq, H = args.heads, D = args.head_dim;
    const uint32_t half = D / 2, stride = half + 1, rep = H / args.kv_heads;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x / 32u;
    const uint32_t nblk = (T + kWarps - 1) / kWarps;
    const uint64_t items = (uint64_t)args.batch * H * nblk;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const uint32_t ib = (uint32_t)(item % nblk);
        const uint64_t bh = item / nblk;
        const uint32_t h = (uint32_t)(bh % H);
        const uint64_t b = bh / H;
        const uint32_t g = h / rep;
        const uint32_t i = ib * kWarps + warp;
        const bool active = i < T;
        const uint32_t i_last = min(ib * kWarps + kWarps - 1, T - 1);
        const uint32_t s_i = (seg != nullptr && active) ? seg[b * T + i] : 0u;
        if (active) load_row(qs[warp], head_row(q, b, i, T, H, h, D), half, lane);
        float m = -INFINITY, l = 0.0f;
        float acc[kPerLane];
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) acc[c] = 0.0f;
        for (uint32_t j0 = 0; j0 <= i_last; j0 += kTile) {
            __syncthreads(); /* the previous tile is consumed; qs is written */
            load_tile(ks, k, b, j0, T, args.kv_heads, g, D);
            load_tile(vs, v, b, j0, T, args.kv_heads, g, D);
            __syncthreads();
            if (active && j0 <= i && j0 + kTile > s_i) {
                const uint32_t j = j0 + lane;
                const bool live = j <= i && j >= s_i;
                float s = -INFINITY;
                if (live) s = dot_words(qs[warp], ks + lane * stride, half) * args.scale;
                /* finite: key max(j0, s_i) <= i is live */
                const float mn = fmaxf(m, warp_max(s));
                const float corr = expf(m - mn); /* 0 on the first tile (m = -inf) */
                const float p = live ? expf(s - mn) : 0.0f;
                l = l * corr + warp_sum(p);
#pragma unroll
                for (int c = 0; c < kPerLane; ++c) acc[c] *= corr;
                const uint32_t nj = min((uint32_t)kTile, i - j0 + 1);
                for (uint32_t jj = 0; jj < nj; ++jj) {
                    axpy_row(acc, __shfl_sync(kFull, p, jj), vs, jj, stride, D, lane);
                }
                m = mn;
            }
        }
        if (active) {
            bf16* o = out + ((b * T + i) * H + h) * D;
            store_row(o, acc, 1.0f / l, D, lane);
            if (lane == 0) lse[(b * H + h) * T + i] = m + logf(l);
        }
    }
}

QADAPT_KERNEL(attention_bwd_dq_bf16, QadaptAttentionArgs) {
    __shared__ uint32_t ks[kTileWords];
    __shared__ uint32_t vs[kTileWords];
    __shared__ uint32_t qs[kWarps][kAttnMaxD / 2];
    __shared__ uint32_t dos[kWarps][kAttnMaxD / 2];
    const bf16* __restrict__ q = reinterpret_cast<const bf16*>(args.q);
    const bf16* __restrict__ k = reinterpret_cast<const bf16*>(args.k);
    const bf16* __restrict__ v = reinterpret_cast<const bf16*>(args.v);
    const float* __restrict__ lse = reinterpret_cast<const float*>(args.lse);
    const bf16* __restrict__ dout = reinterpret_cast<const bf16*>(args.dout);
    bf16* __restrict__ dq = reinterpret_cast<bf16*>(args.dq);
    float* __restrict__ delta = reinterpret_cast<float*>(args.delta);
    const uint32_t* __restrict__ seg = reinterpret_cast<const uint32_t*>(args.seg_start);
    const uint32_t T = args.seq, H = args.heads, D = args.head_dim;
    const uint32_t half = D / 2, stride = half + 1, rep = H / args.kv_heads;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x / 32u;
    const uint32_t nblk = (T + kWarps - 1) / kWarps;
    const uint64_t items = (uint64_t)args.batch * H * nblk;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const uint32_t ib = (uint32_t)(item % nblk);
        const uint64_t bh = item / nblk;
        const uint32_t h = (uint32_t)(bh % H);
        const uint64_t b = bh / H;
        const uint32_t g = h / rep;
        const uint32_t i = ib * kWarps + warp;
        const bool active = i < T;
        const uint32_t i_last = min(ib * kWarps + kWarps - 1, T - 1);
        const uint64_t stat = (b * H + h) * T + i;
        const uint32_t s_i = (seg != nullptr && active) ? seg[b * T + i] : 0u;
        float lse_i = 0.0f;
        if (active) {
            load_row(qs[warp], head_row(q, b, i, T, H, h, D), half, lane);
            load_row(dos[warp], head_row(dout, b, i, T, H, h, D), half, lane);
            lse_i = lse[stat];
        }
        /* Pass 1: delta = sum_j P dP. Pass 2: dq += dS_j k_j. */
        float dsum = 0.0f, delta_i = 0.0f;
        float acc[kPerLane];
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) acc[c] = 0.0f;
        for (int pass = 0; pass < 2; ++pass) {
            for (uint32_t j0 = 0; j0 <= i_last; j0 += kTile) {
                __syncthreads();
                load_tile(ks, k, b, j0, T, args.kv_heads, g, D);
                load_tile(vs, v, b, j0, T, args.kv_heads, g, D);
                __syncthreads();
                if (!active || j0 > i || j0 + kTile <= s_i) continue;
                const uint32_t j = j0 + lane;
                float p = 0.0f, dp = 0.0f;
                if (j <= i && j >= s_i) {
                    const float s = dot_words(qs[warp], ks + lane * stride, half) * args.scale;
                    p = expf(s - lse_i);
                    dp = dot_words(dos[warp], vs + lane * stride, half);
                }
                if (pass == 0) {
                    dsum += p * dp;
                } else {
                    const float ds = p * (dp - delta_i) * args.scale;
                    const uint32_t nj = min((uint32_t)kTile, i - j0 + 1);
                    for (uint32_t jj = 0; jj < nj; ++jj) {
                        axpy_row(acc, __shfl_sync(kFull, ds, jj), ks, jj, stride, D, lane);
                    }
                }
            }
            if (pass == 0) delta_i = warp_sum(dsum);
        }
        if (active) {
            store_row(dq + ((b * T + i) * H + h) * D, acc, 1.0f, D, lane);
            if (lane == 0) delta[stat] = delta_i;
        }
    }
}

QADAPT_KERNEL(attention_bwd_dkv_bf16, QadaptAttentionArgs) {
    __shared__ uint32_t qt[kTileWords];
    __shared__ uint32_t dot[kTileWords];
    __shared__ uint32_t kr[kWarps][kAttnMaxD / 2];
    __shared__ uint32_t vr[kWarps][kAttnMaxD / 2];
    const bf16* __restrict__ q = reinterpret_cast<const bf16*>(args.q);
    const bf16* __restrict__ k = reinterpret_cast<const bf16*>(args.k);
    const bf16* __restrict__ v = reinterpret_cast<const bf16*>(args.v);
    const float* __restrict__ lse = reinterpret_cast<const float*>(args.lse);
    const bf16* __restrict__ dout = reinterpret_cast<const bf16*>(args.dout);
    const float* __restrict__ delta = reinterpret_cast<const float*>(args.delta);
    bf16* __restrict__ dk = reinterpret_cast<bf16*>(args.dk);
    bf16* __restrict__ dv = reinterpret_cast<bf16*>(args.dv);
    const uint32_t* __restrict__ seg = reinterpret_cast<const uint32_t*>(args.seg_start);
    const uint32_t T = args.seq, H = args.heads, KV = args.kv_heads, D = args.head_dim;
    const uint32_t half = D / 2, stride = half + 1, rep = H / KV;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x / 32u;
    const uint32_t nblk = (T + kWarps - 1) / kWarps;
    const uint64_t items = (uint64_t)args.batch * KV * nblk;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const uint32_t jb = (uint32_t)(item % nblk);
        const uint64_t bg = item / nblk;
        const uint32_t g = (uint32_t)(bg % KV);
        const uint64_t b = bg / KV;
        const uint32_t j = jb * kWarps + warp;
        const bool active = j < T;
        if (active) {
            load_row(kr[warp], head_row(k, b, j, T, KV, g, D), half, lane);
            load_row(vr[warp], head_row(v, b, j, T, KV, g, D), half, lane);
        }
        float dka[kPerLane], dva[kPerLane];
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) dka[c] = dva[c] = 0.0f;
        for (uint32_t r = 0; r < rep; ++r) {
            const uint32_t h = g * rep + r;
            for (uint32_t i0 = jb * kWarps; i0 < T; i0 += kTile) {
                /* Packed: queries from i0 on all start their sequences after the CTA's last key
                 * (starts never decrease): none sees these keys. Uniform over the CTA. */
                if (seg != nullptr && seg[b * T + i0] > jb * kWarps + kWarps - 1) break;
                __syncthreads();
                load_tile(qt, q, b, i0, T, H, h, D);
                load_tile(dot, dout, b, i0, T, H, h, D);
                __syncthreads();
                if (!active) continue;
                const uint32_t i = i0 + lane;
                float p = 0.0f, ds = 0.0f;
                /* Query i sees key j when j <= i in i's own sequence (s_i <= j). */
                if (i < T && i >= j && (seg == nullptr || seg[b * T + i] <= j)) {
                    const uint64_t stat = (b * H + h) * T + i;
                    const float s = dot_words(kr[warp], qt + lane * stride, half) * args.scale;
                    p = expf(s - lse[stat]);
                    const float dp = dot_words(vr[warp], dot + lane * stride, half);
                    ds = p * (dp - delta[stat]) * args.scale;
                }
                const uint32_t ni = min((uint32_t)kTile, T - i0);
                for (uint32_t ii = 0; ii < ni; ++ii) {
                    axpy_row(dva, __shfl_sync(kFull, p, ii), dot, ii, stride, D, lane);
                    axpy_row(dka, __shfl_sync(kFull, ds, ii), qt, ii, stride, D, lane);
                }
            }
        }
        if (active) {
            store_row(dk + ((b * T + j) * KV + g) * D, dka, 1.0f, D, lane);
            store_row(dv + ((b * T + j) * KV + g) * D, dva, 1.0f, D, lane);
        }
    }
}

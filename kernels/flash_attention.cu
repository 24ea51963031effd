/*
 * flash_attention.cu — causal grouped-query attention on tensor cores (mma.sync m16n8k16, bf16
 * in, f32 accumulate; sm_80+), FlashAttention-2 style: no [seq, seq] matrix ever reaches memory.
 * CPU reference: crates/qadapt/src/ops/attention.rs (same layout and math; the CPU saves P, these
 * kernels save only lse). Formulas and layout of every argument: QadaptAttentionArgs in qadapt.h.
 *
 * Math, per (batch b, query head h, kv head g = h / (heads / kv_heads)), c = scale = 1/sqrt(D):
 *   S = c Q K^T masked to j <= i,  P = softmax_rows(S),  O = P V,  lse_i = log sum_j exp(S_ij)
 *   D_i = rowsum(dO * O)                       (= sum_j P_ij dP_ij, from the bf16 O)
 *   dP = dO V^T,  dS = P * (dP - D_i),  dQ = c dS K,  dK = c dS^T Q,  dV = P^T dO
 * dK and dV of a kv head sum over the heads / kv_heads query heads of its group.
 *
 * Layout: q, out, dout, dq [batch * seq, heads * D] bf16 (token-major, a head is D contiguous
 * values of a row); k, v, dk, dv [batch * seq, kv_heads * D]; lse, delta [batch, heads, seq] f32.
 * Every bf16 row pointer is 16-byte aligned (the host checks the bases; D % 8 == 0), so tiles move
 * by 16-byte cp.async. D is one of 16, 32, 64, 128 (QADAPT_FLASH_HEAD_DIMS; the kernel body is a
 * template per D, picked by a switch); other head sizes use attention.cu's scalar kernels.
 *
 * Tiling: QADAPT_FLASH_THREADS = 128 threads (4 warps) per CTA; a CTA owns a block of
 * QADAPT_FLASH_BLOCK = 64 rows (queries in the forward and dq, keys in dkv), 16 per warp, the
 * m16 of the mma. Shared tiles are row-major [rows][D + 8] bf16: the 16-byte pad makes the 8 rows
 * an ldmatrix reads fall in 8 different 16-byte bank groups (row pitch 2D + 16 bytes is an odd
 * multiple of 16), so every ldmatrix is conflict-free. Rows past seq are zero-filled by the copy
 * (cp.async with src-size 0), so they contribute finite zeros and are masked where it matters.
 * One copy stage (copy, wait, barrier, compute, barrier): no double buffering yet.
 *
 *   flash_attention_fwd_bf16      CTA per (b, h, 64-query block), longest (last) blocks first.
 *                                 Each warp keeps its 16 Q rows as A fragments in registers, walks
 *                                 the key blocks 0 .. its own (64 keys each, K and V in shared):
 *                                 S = Q K^T (K rows are B's columns: ldmatrix), the online softmax
 *                                 per row (running max m and sum l; a lane holds 2 rows and the 4
 *                                 lanes of a quad share a row: max and sum over the quad by
 *                                 shuffles), O = O * exp(m_old - m_new) + bf16(P) V (V by
 *                                 ldmatrix.trans). At the end out = bf16(O / l), lse = m + log l.
 *   flash_attention_bwd_delta_bf16 warp per (token, head): delta = sum_d dO * O in f32.
 *   flash_attention_bwd_delta_recompute_bf16  the same delta without O, for callers that did not
 *                                 keep it: the dq kernel's recomputation of P and dP (below)
 *                                 summing P * dP per row instead of forming dS (an extra pass
 *                                 over the keys, about the dq kernel's S and dP cost).
 *   flash_attention_bwd_dq_bf16   CTA per (b, h, 64-query block); Q and dO fragments in
 *                                 registers; key blocks of 32 (K, V in shared): S and dP by mma,
 *                                 P = exp(S - lse) recomputed, dS = P (dP - delta), dQ += bf16(dS) K.
 *   flash_attention_bwd_dkv_bf16  CTA per (b, g, 64-key block), a warp owns 16 keys and keeps dK,
 *                                 dV in registers over the group's query heads and the query
 *                                 blocks i0 >= its key block (32 queries, 16 for D = 128 so the
 *                                 tiles fit 48 KiB): S^T = K Q^T and dP^T = V dO^T by mma,
 *                                 P^T, dS^T as above, dV += bf16(P^T) dO, dK += bf16(dS^T) Q.
 *                                 Deterministic: no atomics (dq has its own kernel instead).
 * Launch order of the backward: delta (either kernel), then dq and dkv (both read delta).
 * Every output is overwritten.
 *
 * Rounding: S, dP, O, dQ, dK, dV accumulate in f32 in the tensor cores; P and dS are rounded to
 * bf16 before they enter an mma (as FlashAttention does), so results differ from the f32 CPU
 * reference by a few bf16 ulps of the largest term (crates/qadapt/tests/ops/flash_attention.rs states the bounds).
 *
 * Packed rows (seg_start, qadapt.h): query i's live keys are s_i <= j <= i. Since s is
 * non-decreasing along a row, a query block's smallest start is its first query's: the forward
 * and dq begin at the key block holding it. A row whose live keys all lie in later blocks sees
 * only -inf in the blocks before (its running max stays -inf and its terms are taken as 0); dkv
 * masks the queries of other sequences and stops at the first query block whose first
 * sequence starts after its keys.
 *
 * Not here: padding masks (right padding needs none: padded keys come after every real query),
 * prefix keys/values (crates/qadapt-train/src/prefix_attention.rs keeps
 * its own path), dropout on P, wgmma (sm_90a).
 */
#include "model_common.cuh"
/* Angle brackets: the include path only, so the emulated build gets kernels/emu/qadapt_mma.cuh. */
#include <qadapt_mma.cuh>

namespace {

using qadapt::cp_async16;
using qadapt::cp_async_commit;
using qadapt::cp_async_wait;
using qadapt::ldmatrix_x4;
using qadapt::ldmatrix_x4_t;
using qadapt::mma_bf16;

constexpr int kThreads = QADAPT_FLASH_THREADS;
constexpr int kBlock = QADAPT_FLASH_BLOCK;
constexpr int kPad = 8;        /* bf16 of padding per shared row (16 bytes) */
constexpr int kMaxD = 128;     /* the largest instantiated head size */
constexpr int kDqKeys = 32;    /* keys per shared tile of the dq kernel */
static_assert(kThreads == 128 && kBlock == 64, "4 warps of 16 rows");

/* Queries per shared tile of the dkv kernel: 32, or 16 for D = 128 (the four tiles then take
 * (64 + 64 + 16 + 16) * 136 * 2 = 43520 bytes, under the 48 KiB of static shared memory). */
template <int D>
constexpr int kDkvQueries = D > 64 ? 16 : 32;

/* Shared memory of each kernel, in bf16 (the largest D): fwd K and V tiles (Q staged in K's);
 * dq a 64-row tile for Q plus K and V of 32 rows (dO staged in K's and V's); dkv K, V of 64 rows
 * and Q, dO of kDkvQueries rows. */
constexpr int kFwdSmem = 2 * kBlock * (kMaxD + kPad);
constexpr int kDqSmem = (kBlock + 2 * kDqKeys) * (kMaxD + kPad);
constexpr int kDkvSmem = (2 * kBlock + 2 * kDkvQueries<kMaxD>) * (kMaxD + kPad);

/* Copies rows r0 .. r0 + R - 1 of head `head` of a token-major [batch * seq, nheads * D] bf16
 * tensor into the shared tile (stride D + kPad), rows >= seq as zeros, by 16-byte cp.async over
 * all threads, and commits them as one group. */
template <int D, int R>
__device__ __forceinline__ void load_rows(bf16* tile, const bf16* base, uint64_t b, uint32_t r0,
                                          uint32_t seq, uint32_t nheads, uint32_t head) {
    constexpr int kChunks = D / 8;
    for (int idx = threadIdx.x; idx < R * kChunks; idx += kThreads) {
        const int r = idx / kChunks, c = idx % kChunks;
        const uint32_t row = r0 + (uint32_t)r;
        bf16* dst = tile + r * (D + kPad) + c * 8;
        if (row < seq) {
            cp_async16(dst, base + ((b * seq + row) * nheads + head) * D + c * 8);
        } else {
            cp_async16(dst, base, 0u); /* zero fill, nothing read */
        }
    }
    cp_async_commit();
}

/* The A fragment (16 x 16, rows r0.., columns k0..) of a row-major shared tile. */
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const bf16* tile, int stride, int r0,
                                       int k0, unsigned lane) {
    ldmatrix_x4(a, tile + (r0 + (int)(lane & 15u)) * stride + k0 + (int)(lane >> 4) * 8);
}

/* B fragments of two n8 blocks where B[k][n] = tile[n][k] (tile rows n0 .. n0 + 15, columns
 * k0 .. k0 + 15): b[0], b[1] for columns n0 .. n0 + 7 of B, b[2], b[3] for n0 + 8 .. n0 + 15. */
__device__ __forceinline__ void frag_b_nk(uint32_t (&b)[4], const bf16* tile, int stride, int n0,
                                          int k0, unsigned lane) {
    const int row = n0 + (int)(lane & 7u) + (int)(lane >> 4) * 8;
    ldmatrix_x4(b, tile + row * stride + k0 + (int)((lane >> 3) & 1u) * 8);
}

/* B fragments of two n8 blocks where B[k][n] = tile[k][n] (tile rows k0 .. k0 + 15, columns
 * n0 .. n0 + 15), by ldmatrix.trans; the same register order as frag_b_nk. */
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[4], const bf16* tile, int stride, int k0,
                                          int n0, unsigned lane) {
    const int row = k0 + (int)(lane & 7u) + (int)((lane >> 3) & 1u) * 8;
    ldmatrix_x4_t(b, tile + row * stride + n0 + (int)(lane >> 4) * 8);
}

/* C fragments of n8 blocks 2kk and 2kk + 1 (a 16 x 16 block of a 16-row result) as the bf16 A
 * fragment of the next mma: the accumulator layout of m16n8 is the A layout of m16k16. */
template <int N>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c)[N][4], int kk) {
    a[0] = pack2(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack2(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

/* acc[n8 blocks over D] += A (16 x 16) * tile rows k0 .. k0 + 15 (B[k][n] = tile[k][n]). */
template <int D>
__device__ __forceinline__ void mma_rows_kn(float (&acc)[D / 8][4], const uint32_t (&a)[4],
                                            const bf16* tile, int k0, unsigned lane) {
#pragma unroll
    for (int n2 = 0; n2 < D / 16; ++n2) {
        uint32_t bb[4];
        frag_b_kn(bb, tile, D + kPad, k0, n2 * 16, lane);
        mma_bf16(acc[2 * n2], a, bb[0], bb[1]);
        mma_bf16(acc[2 * n2 + 1], a, bb[2], bb[3]);
    }
}

/* Max (sum) over the 4 lanes of a quad, which share a row of every C fragment. */
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(kFull, v, 1));
    return fmaxf(v, __shfl_xor_sync(kFull, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(kFull, v, 1);
    return v + __shfl_xor_sync(kFull, v, 2);
}

/* Stores this lane's elements of a 16 x D f32 accumulator (rows row[0], row[1], skipped past seq)
 * as bf16 pairs into a token-major tensor: element (r, nd * 8 + 2t, +1) of head `head`. */
template <int D>
__device__ __forceinline__ void store_rows(bf16* base, const float (&acc)[D / 8][4],
                                           const uint32_t (&row)[2], const float (&mul)[2],
                                           uint64_t b, uint32_t seq, uint32_t nheads,
                                           uint32_t head, unsigned t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= seq) continue;
        uint32_t* dst = reinterpret_cast<uint32_t*>(base + ((b * seq + row[r]) * nheads + head) * D);
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
            dst[nd * 4 + t] = pack2(acc[nd][2 * r] * mul[r], acc[nd][2 * r + 1] * mul[r]);
        }
    }
}

template <int D>
__device__ __forceinline__ void fwd(const QadaptAttentionArgs& args, bf16* smem) {
    constexpr int S = D + kPad;
    constexpr int KC = D / 16;     /* k16 chunks of a head */
    constexpr int ND = D / 8;      /* n8 blocks of a head */
    constexpr int NB = kBlock / 8; /* n8 blocks of a key tile */
    bf16* sk = smem;
    bf16* sv = smem + kBlock * S;
    const bf16* q = reinterpret_cast<const bf16*>(args.q);
    const bf16* k = reinterpret_cast<const bf16*>(args.k);
    const bf16* v = reinterpret_cast<const bf16*>(args.v);
    bf16* out = reinterpret_cast<bf16*>(args.out);
    float* lse = reinterpret_cast<float*>(args.lse);
    const uint32_t* seg = reinterpret_cast<const uint32_t*>(args.seg_start);
    const uint32_t T = args.seq, H = args.heads, KV = args.kv_heads, rep = H / KV;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned t = lane & 3u;
    const int wr = (int)warp * 16;
    const uint32_t nq = (T + kBlock - 1) / kBlock;
    const uint64_t items = (uint64_t)args.batch * H * nq;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const uint32_t qb = nq - 1 - (uint32_t)(item % nq); /* longest blocks first */
        const uint64_t bh = item / nq;
        const uint32_t h = (uint32_t)(bh % H);
        const uint64_t b = bh / H;
        const uint32_t g = h / rep;
        const uint32_t q0 = qb * kBlock;
        const uint32_t row[2] = {q0 + wr + (lane >> 2), q0 + wr + (lane >> 2) + 8};
        uint32_t sst[2] = {0u, 0u}; /* each row's sequence start (0: not packed, or past seq) */
        if (seg != nullptr) {
#pragma unroll
            for (int r = 0; r < 2; ++r) sst[r] = row[r] < T ? seg[b * T + row[r]] : 0u;
        }
        const uint32_t kb0 = seg != nullptr ? seg[b * T + q0] / kBlock : 0u;

        __syncthreads(); /* the previous item's tiles are consumed */
        load_rows<D, kBlock>(sk, q, b, q0, T, H, h);
        cp_async_wait<0>();
        __syncthreads();
        uint32_t qa[KC][4];
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) frag_a(qa[kc], sk, S, wr, kc * 16, lane);

        float o[ND][4];
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
        for (uint32_t kb = kb0; kb <= qb; ++kb) {
            const uint32_t k0 = kb * kBlock;
            __syncthreads(); /* Q's fragments (first block) or the previous K, V are read */
            load_rows<D, kBlock>(sk, k, b, k0, T, KV, g);
            load_rows<D, kBlock>(sv, v, b, k0, T, KV, g);
            cp_async_wait<0>();
            __syncthreads();

            float s[NB][4];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
            for (int n2 = 0; n2 < NB / 2; ++n2) {
#pragma unroll
                for (int kc = 0; kc < KC; ++kc) {
                    uint32_t bb[4];
                    frag_b_nk(bb, sk, S, n2 * 16, kc * 16, lane);
                    mma_bf16(s[2 * n2], qa[kc], bb[0], bb[1]);
                    mma_bf16(s[2 * n2 + 1], qa[kc], bb[2], bb[3]);
                }
            }
            /* Scale and mask (key j > query i, or before i's sequence: -inf), then the new row
             * maxima. Unpacked, key k0 <= q0 <= i is live for every row, so the maxima are finite
             * from the first block on; a packed row's stay -inf until its sequence's first block. */
            float mx[2] = {m[0], m[1]};
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const uint32_t j = k0 + nb * 8 + 2 * t + (e & 1);
                    const bool live = j <= row[e >> 1] && j >= sst[e >> 1];
                    const float x = live ? s[nb][e] * args.scale : -INFINITY;
                    s[nb][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
            }
            float corr[2], mref[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = quad_max(mx[r]);
                /* A row with nothing live yet (mx = -inf) subtracts 0: its terms are exp(-inf) = 0
                 * instead of exp(-inf - -inf) = NaN. */
                mref[r] = mx[r] == -INFINITY ? 0.0f : mx[r];
                corr[r] = expf(m[r] - mref[r]); /* 0 on the first live block (m = -inf) */
                m[r] = mx[r];
                l[r] *= corr[r];
            }
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = expf(s[nb][e] - mref[e >> 1]); /* masked: exp(-inf) = 0 */
                    s[nb][e] = p;
                    l[e >> 1] += p; /* this lane's partial sum; the quad adds them at the end */
                }
            }
#pragma unroll
            for (int nd = 0; nd < ND; ++nd) {
                o[nd][0] *= corr[0];
                o[nd][1] *= corr[0];
                o[nd][2] *= corr[1];
                o[nd][3] *= corr[1];
            }
            /* O += bf16(P) V, P's columns (keys) as the reduction. */
#pragma unroll
            for (int kk = 0; kk < kBlock / 16; ++kk) {
                uint32_t pa[4];
                c_to_a(pa, s, kk);
                mma_rows_kn<D>(o, pa, sv, kk * 16, lane);
            }
        }
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] = quad_sum(l[r]);
            inv[r] = 1.0f / l[r];
        }
        store_rows<D>(out, o, row, inv, b, T, H, h, t);
        if (t == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (row[r] < T) lse[(b * H + h) * T + row[r]] = m[r] + logf(l[r]);
            }
        }
    }
}

/* kDeltaOnly: instead of dq, write delta[i] = sum_j P_ij dP_ij (the same recomputation, no dS). */
template <int D, bool kDeltaOnly>
__device__ __forceinline__ void bwd_dq(const QadaptAttentionArgs& args, bf16* smem) {
    constexpr int S = D + kPad;
    constexpr int KC = D / 16;
    constexpr int ND = D / 8;
    constexpr int NB = kDqKeys / 8;
    bf16* sq = smem;               /* 64 rows: Q staging */
    bf16* sk = smem + kBlock * S;  /* 32 rows */
    bf16* sv = sk + kDqKeys * S;   /* 32 rows; with sk, dO staging (64 rows) */
    const bf16* q = reinterpret_cast<const bf16*>(args.q);
    const bf16* k = reinterpret_cast<const bf16*>(args.k);
    const bf16* v = reinterpret_cast<const bf16*>(args.v);
    const bf16* dout = reinterpret_cast<const bf16*>(args.dout);
    const float* lse = reinterpret_cast<const float*>(args.lse);
    float* delta = reinterpret_cast<float*>(args.delta);
    bf16* dq = reinterpret_cast<bf16*>(args.dq);
    const uint32_t* seg = reinterpret_cast<const uint32_t*>(args.seg_start);
    const uint32_t T = args.seq, H = args.heads, KV = args.kv_heads, rep = H / KV;
    const float c = args.scale;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned t = lane & 3u;
    const int wr = (int)warp * 16;
    const uint32_t nq = (T + kBlock - 1) / kBlock;
    const uint64_t items = (uint64_t)args.batch * H * nq;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const uint32_t qb = nq - 1 - (uint32_t)(item % nq);
        const uint64_t bh = item / nq;
        const uint32_t h = (uint32_t)(bh % H);
        const uint64_t b = bh / H;
        const uint32_t g = h / rep;
        const uint32_t q0 = qb * kBlock;
        const uint32_t row[2] = {q0 + wr + (lane >> 2), q0 + wr + (lane >> 2) + 8};
        float lse_r[2], delta_r[2];
        uint32_t sst[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const bool live = row[r] < T;
            lse_r[r] = live ? lse[(b * H + h) * T + row[r]] : 0.0f;
            delta_r[r] = live && !kDeltaOnly ? delta[(b * H + h) * T + row[r]] : 0.0f;
            sst[r] = live && seg != nullptr ? seg[b * T + row[r]] : 0u;
        }
        /* The block's smallest sequence start, rounded down to a key tile. */
        const uint32_t kfirst = seg != nullptr ? seg[b * T + q0] / kDqKeys * kDqKeys : 0u;

        __syncthreads();
        load_rows<D, kBlock>(sq, q, b, q0, T, H, h);
        load_rows<D, kBlock>(sk, dout, b, q0, T, H, h);
        cp_async_wait<0>();
        __syncthreads();
        uint32_t qa[KC][4], da[KC][4];
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
            frag_a(qa[kc], sq, S, wr, kc * 16, lane);
            frag_a(da[kc], sk, S, wr, kc * 16, lane);
        }
        float acc[ND][4];
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
        float dsum[2] = {0.0f, 0.0f};
        const uint32_t last = min(q0 + kBlock - 1, T - 1); /* the block's last live query */
        for (uint32_t k0 = kfirst; k0 <= last; k0 += kDqKeys) {
            __syncthreads(); /* dO's fragments (first tile) or the previous K, V are read */
            load_rows<D, kDqKeys>(sk, k, b, k0, T, KV, g);
            load_rows<D, kDqKeys>(sv, v, b, k0, T, KV, g);
            cp_async_wait<0>();
            __syncthreads();
            float s[NB][4], dp[NB][4];
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
                dp[nb][0] = dp[nb][1] = dp[nb][2] = dp[nb][3] = 0.0f;
            }
#pragma unroll
            for (int n2 = 0; n2 < NB / 2; ++n2) {
#pragma unroll
                for (int kc = 0; kc < KC; ++kc) {
                    uint32_t bb[4];
                    frag_b_nk(bb, sk, S, n2 * 16, kc * 16, lane);
                    mma_bf16(s[2 * n2], qa[kc], bb[0], bb[1]);
                    mma_bf16(s[2 * n2 + 1], qa[kc], bb[2], bb[3]);
                    frag_b_nk(bb, sv, S, n2 * 16, kc * 16, lane);
                    mma_bf16(dp[2 * n2], da[kc], bb[0], bb[1]);
                    mma_bf16(dp[2 * n2 + 1], da[kc], bb[2], bb[3]);
                }
            }
            /* dS = P (dP - delta), P = exp(c S - lse) on live (s_i <= j <= i < seq) entries,
             * else 0. */
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    const uint32_t j = k0 + nb * 8 + 2 * t + (e & 1);
                    const bool live = j <= row[r] && j >= sst[r] && row[r] < T;
                    const float p = live ? expf(s[nb][e] * c - lse_r[r]) : 0.0f;
                    if (kDeltaOnly) {
                        dsum[r] += p * dp[nb][e];
                    } else {
                        s[nb][e] = live ? p * (dp[nb][e] - delta_r[r]) : 0.0f;
                    }
                }
            }
            if (!kDeltaOnly) {
#pragma unroll
                for (int kk = 0; kk < kDqKeys / 16; ++kk) {
                    uint32_t dsa[4];
                    c_to_a(dsa, s, kk);
                    mma_rows_kn<D>(acc, dsa, sk, kk * 16, lane);
                }
            }
        }
        if (kDeltaOnly) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float sum = quad_sum(dsum[r]); /* the quad holds the row's columns */
                if (t == 0 && row[r] < T) delta[(b * H + h) * T + row[r]] = sum;
            }
        } else {
            const float mul[2] = {c, c};
            store_rows<D>(dq, acc, row, mul, b, T, H, h, t);
        }
    }
}

template <int D>
__device__ __forceinline__ void bwd_dkv(const QadaptAttentionArgs& args, bf16* smem,
                                        float* sstat, uint32_t* sseg) {
    constexpr int S = D + kPad;
    constexpr int KC = D / 16;
    constexpr int ND = D / 8;
    constexpr int BQ = kDkvQueries<D>;
    constexpr int NB = BQ / 8;
    bf16* sk = smem;
    bf16* sv = sk + kBlock * S;
    bf16* sq = sv + kBlock * S;
    bf16* sdo = sq + BQ * S;
    float* slse = sstat;
    float* sdelta = sstat + BQ;
    const bf16* q = reinterpret_cast<const bf16*>(args.q);
    const bf16* k = reinterpret_cast<const bf16*>(args.k);
    const bf16* v = reinterpret_cast<const bf16*>(args.v);
    const bf16* dout = reinterpret_cast<const bf16*>(args.dout);
    const float* lse = reinterpret_cast<const float*>(args.lse);
    const float* delta = reinterpret_cast<const float*>(args.delta);
    bf16* dk = reinterpret_cast<bf16*>(args.dk);
    bf16* dv = reinterpret_cast<bf16*>(args.dv);
    const uint32_t* seg = reinterpret_cast<const uint32_t*>(args.seg_start);
    const uint32_t T = args.seq, H = args.heads, KV = args.kv_heads, rep = H / KV;
    const float c = args.scale;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned t = lane & 3u;
    const int wr = (int)warp * 16;
    const uint32_t nk = (T + kBlock - 1) / kBlock;
    const uint64_t items = (uint64_t)args.batch * KV * nk;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const uint32_t kb = (uint32_t)(item % nk); /* block 0 sees the most queries: first */
        const uint64_t bg = item / nk;
        const uint32_t g = (uint32_t)(bg % KV);
        const uint64_t b = bg / KV;
        const uint32_t k0 = kb * kBlock;
        const uint32_t key[2] = {k0 + wr + (lane >> 2), k0 + wr + (lane >> 2) + 8};

        __syncthreads();
        load_rows<D, kBlock>(sk, k, b, k0, T, KV, g);
        load_rows<D, kBlock>(sv, v, b, k0, T, KV, g);
        float dka[ND][4], dva[ND][4];
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
            dka[nd][0] = dka[nd][1] = dka[nd][2] = dka[nd][3] = 0.0f;
            dva[nd][0] = dva[nd][1] = dva[nd][2] = dva[nd][3] = 0.0f;
        }
        for (uint32_t hr = 0; hr < rep; ++hr) {
            const uint32_t h = g * rep + hr;
            const uint64_t stat = (b * H + h) * T;
            /* Queries i >= k0 only (causal); k0 is a multiple of BQ. */
            for (uint32_t i0 = k0; i0 < T; i0 += BQ) {
                /* Packed: once a query block's first sequence starts after the block's last key,
                 * no later query sees these keys (starts never decrease). Uniform over the CTA. */
                if (seg != nullptr && seg[b * T + i0] > k0 + kBlock - 1) break;
                __syncthreads(); /* the previous Q, dO, lse, delta are read */
                load_rows<D, BQ>(sq, q, b, i0, T, H, h);
                load_rows<D, BQ>(sdo, dout, b, i0, T, H, h);
                for (int x = threadIdx.x; x < BQ; x += kThreads) {
                    const uint32_t i = i0 + (uint32_t)x;
                    slse[x] = i < T ? lse[stat + i] : 0.0f;
                    sdelta[x] = i < T ? delta[stat + i] : 0.0f;
                    sseg[x] = i < T && seg != nullptr ? seg[b * T + i] : 0u;
                }
                cp_async_wait<0>(); /* also K and V, on the first pass */
                __syncthreads();
                float st[NB][4], dpt[NB][4];
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
                    st[nb][0] = st[nb][1] = st[nb][2] = st[nb][3] = 0.0f;
                    dpt[nb][0] = dpt[nb][1] = dpt[nb][2] = dpt[nb][3] = 0.0f;
                }
                /* S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x BQ queries. */
#pragma unroll
                for (int kc = 0; kc < KC; ++kc) {
                    uint32_t ka[4], va[4];
                    frag_a(ka, sk, S, wr, kc * 16, lane);
                    frag_a(va, sv, S, wr, kc * 16, lane);
#pragma unroll
                    for (int n2 = 0; n2 < NB / 2; ++n2) {
                        uint32_t bb[4];
                        frag_b_nk(bb, sq, S, n2 * 16, kc * 16, lane);
                        mma_bf16(st[2 * n2], ka, bb[0], bb[1]);
                        mma_bf16(st[2 * n2 + 1], ka, bb[2], bb[3]);
                        frag_b_nk(bb, sdo, S, n2 * 16, kc * 16, lane);
                        mma_bf16(dpt[2 * n2], va, bb[0], bb[1]);
                        mma_bf16(dpt[2 * n2 + 1], va, bb[2], bb[3]);
                    }
                }
                /* P^T = exp(c S^T - lse_i), dS^T = P^T (dP^T - delta_i) on live
                 * s_i <= j <= i < seq. */
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int x = nb * 8 + 2 * (int)t + (e & 1);
                        const uint32_t i = i0 + (uint32_t)x;
                        const bool live = key[e >> 1] <= i && i < T && sseg[x] <= key[e >> 1];
                        const float p = live ? expf(st[nb][e] * c - slse[x]) : 0.0f;
                        st[nb][e] = p;
                        dpt[nb][e] = live ? p * (dpt[nb][e] - sdelta[x]) : 0.0f;
                    }
                }
                /* dV += bf16(P^T) dO, dK += bf16(dS^T) Q: queries are the reduction. */
#pragma unroll
                for (int kk = 0; kk < BQ / 16; ++kk) {
                    uint32_t pa[4], dsa[4];
                    c_to_a(pa, st, kk);
                    c_to_a(dsa, dpt, kk);
                    mma_rows_kn<D>(dva, pa, sdo, kk * 16, lane);
                    mma_rows_kn<D>(dka, dsa, sq, kk * 16, lane);
                }
            }
        }
        /* A key block past every query (k0 >= seq) cannot happen: k0 < seq by the grid. */
        const float one[2] = {1.0f, 1.0f}, cc[2] = {c, c};
        store_rows<D>(dk, dka, key, cc, b, T, KV, g, t);
        store_rows<D>(dv, dva, key, one, b, T, KV, g, t);
    }
}

}  // namespace

QADAPT_KERNEL_BOUNDED(flash_attention_fwd_bf16, QadaptAttentionArgs, QADAPT_FLASH_THREADS, 1) {
    __shared__ __align__(128) bf16 smem[kFwdSmem];
    switch (args.head_dim) {
        case 16: fwd<16>(args, smem); break;
        case 32: fwd<32>(args, smem); break;
        case 64: fwd<64>(args, smem); break;
        case 128: fwd<128>(args, smem); break;
        default: __trap(); /* the host sends only QADAPT_FLASH_HEAD_DIMS */
    }
}

QADAPT_KERNEL(flash_attention_bwd_delta_bf16, QadaptAttentionArgs) {
    const bf16* out = reinterpret_cast<const bf16*>(args.out);
    const bf16* dout = reinterpret_cast<const bf16*>(args.dout);
    float* delta = reinterpret_cast<float*>(args.delta);
    const uint32_t T = args.seq, H = args.heads, half = args.head_dim / 2;
    const unsigned lane = threadIdx.x & 31u;
    const uint64_t warps = (uint64_t)gridDim.x * (blockDim.x / 32u);
    const uint64_t items = (uint64_t)args.batch * T * H; /* (token n = b * T + i, head h) */
    for (uint64_t item = (uint64_t)blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u;
         item < items; item += warps) {
        const uint32_t* o = reinterpret_cast<const uint32_t*>(out + item * args.head_dim);
        const uint32_t* d = reinterpret_cast<const uint32_t*>(dout + item * args.head_dim);
        float s = 0.0f;
        for (uint32_t w = lane; w < half; w += 32) {
            const uint32_t x = o[w], y = d[w];
            s += __uint_as_float(x << 16) * __uint_as_float(y << 16);
            s += __uint_as_float(x & 0xffff0000u) * __uint_as_float(y & 0xffff0000u);
        }
        s = warp_sum(s);
        const uint64_t n = item / H, b = n / T;
        const uint32_t h = (uint32_t)(item % H), i = (uint32_t)(n % T);
        if (lane == 0) delta[(b * H + h) * T + i] = s;
    }
}

QADAPT_KERNEL_BOUNDED(flash_attention_bwd_dq_bf16, QadaptAttentionArgs, QADAPT_FLASH_THREADS, 1) {
    __shared__ __align__(128) bf16 smem[kDqSmem];
    switch (args.head_dim) {
        case 16: bwd_dq<16, false>(args, smem); break;
        case 32: bwd_dq<32, false>(args, smem); break;
        case 64: bwd_dq<64, false>(args, smem); break;
        case 128: bwd_dq<128, false>(args, smem); break;
        default: __trap();
    }
}

QADAPT_KERNEL_BOUNDED(flash_attention_bwd_delta_recompute_bf16, QadaptAttentionArgs,
                      QADAPT_FLASH_THREADS, 1) {
    __shared__ __align__(128) bf16 smem[kDqSmem];
    switch (args.head_dim) {
        case 16: bwd_dq<16, true>(args, smem); break;
        case 32: bwd_dq<32, true>(args, smem); break;
        case 64: bwd_dq<64, true>(args, smem); break;
        case 128: bwd_dq<128, true>(args, smem); break;
        default: __trap();
    }
}

QADAPT_KERNEL_BOUNDED(flash_attention_bwd_dkv_bf16, QadaptAttentionArgs, QADAPT_FLASH_THREADS, 1) {
    __shared__ __align__(128) bf16 smem[kDkvSmem];
    __shared__ float sstat[2 * 32];
    __shared__ uint32_t sseg[32];
    switch (args.head_dim) {
        case 16: bwd_dkv<16>(args, smem, sstat, sseg); break;
        case 32: bwd_dkv<32>(args, smem, sstat, sseg); break;
        case 64: bwd_dkv<64>(args, smem, sstat, sseg); break;
        case 128: bwd_dkv<128>(args, smem, sstat, sseg); break;
        default: __trap();
    }
}

/*
 * kv_cache.cu — the KV cache of incremental decoding: appending new tokens' keys and values, and
 * their attention over the cache. CPU reference: crates/qadapt/src/ops/attention.rs (`cached`);
 * layouts and formulas: QadaptKvCacheArgs in include/qadapt.h; the conventions of every model-op
 * kernel: include/model_common.cuh.
 *
 *   kv_cache_write_bf16     thread per 32-bit word of a (token, kv row): k and v copied to the
 *                           token's (row, pos) slot of kc and vc.
 *   attention_cached_bf16   warp per (token, head): lane e owns output elements e, e + 32, ...;
 *                           for each key j = 0 .. pos in order the warp forms the score (each
 *                           lane's partial dot product, a warp sum), then the online softmax
 *                           (running max m and sum l, the same in every lane) rescales the
 *                           lane's accumulators and adds p_j v_j. Decoding reads each cached key
 *                           and value once per query head: memory-bound, so no tensor cores.
 */
#include "model_common.cuh"

namespace {

constexpr int kPerLane = QADAPT_ATTN_MAX_HEAD_DIM / 32;

}  // namespace

QADAPT_KERNEL(kv_cache_write_bf16, QadaptKvCacheArgs) {
    const uint32_t* __restrict__ k = reinterpret_cast<const uint32_t*>(args.k);
    const uint32_t* __restrict__ v = reinterpret_cast<const uint32_t*>(args.v);
    uint32_t* __restrict__ kc = reinterpret_cast<uint32_t*>(args.kc);
    uint32_t* __restrict__ vc = reinterpret_cast<uint32_t*>(args.vc);
    const uint32_t* __restrict__ row = reinterpret_cast<const uint32_t*>(args.row);
    const uint32_t* __restrict__ pos = reinterpret_cast<const uint32_t*>(args.pos);
    /* head_dim is even: a kv row is kv_heads * head_dim / 2 whole words. */
    const uint64_t words = (uint64_t)args.kv_heads * args.head_dim / 2;
    const uint64_t total = args.tokens * words;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t t = i / words, w = i - t * words;
        const uint64_t slot = ((uint64_t)row[t] * args.cap + pos[t]) * words + w;
        kc[slot] = k[i];
        vc[slot] = v[i];
    }
}

QADAPT_KERNEL(attention_cached_bf16, QadaptKvCacheArgs) {
    const bf16* __restrict__ q = reinterpret_cast<const bf16*>(args.q);
    const bf16* __restrict__ kc = reinterpret_cast<const bf16*>(args.kc);
    const bf16* __restrict__ vc = reinterpret_cast<const bf16*>(args.vc);
    bf16* __restrict__ out = reinterpret_cast<bf16*>(args.out);
    const uint32_t* __restrict__ row = reinterpret_cast<const uint32_t*>(args.row);
    const uint32_t* __restrict__ pos = reinterpret_cast<const uint32_t*>(args.pos);
    const uint32_t H = args.heads, D = args.head_dim, rep = H / args.kv_heads;
    const uint64_t kvd = (uint64_t)args.kv_heads * D;
    const unsigned lane = threadIdx.x & 31u;
    const uint64_t items = args.tokens * H;
    for (uint64_t item = global_warp(); item < items; item += warp_count()) {
        const uint64_t t = item / H;
        const uint32_t h = (uint32_t)(item - t * H);
        const uint32_t g = h / rep;
        const bf16* qh = q + item * D; /* token t, head h: [tokens, heads * D] */
        float qv[kPerLane], acc[kPerLane];
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const uint32_t e = lane + 32u * c;
            qv[c] = e < D ? to_f(qh[e]) : 0.0f;
            acc[c] = 0.0f;
        }
        const bf16* kr = kc + (uint64_t)row[t] * args.cap * kvd + (uint64_t)g * D;
        const bf16* vr = vc + (uint64_t)row[t] * args.cap * kvd + (uint64_t)g * D;
        float m = -INFINITY, l = 0.0f;
        for (uint32_t j = 0; j <= pos[t]; ++j) {
            float part = 0.0f;
#pragma unroll
            for (int c = 0; c < kPerLane; ++c) {
                const uint32_t e = lane + 32u * c;
                if (e < D) part += qv[c] * to_f(kr[(uint64_t)j * kvd + e]);
            }
            const float s = warp_sum(part) * args.scale;
            const float mn = fmaxf(m, s);
            const float corr = expf(m - mn); /* 0 for the first key (m = -inf) */
            const float p = expf(s - mn);
            l = l * corr + p;
#pragma unroll
            for (int c = 0; c < kPerLane; ++c) {
                const uint32_t e = lane + 32u * c;
                acc[c] = acc[c] * corr + (e < D ? p * to_f(vr[(uint64_t)j * kvd + e]) : 0.0f);
            }
            m = mn;
        }
        const float inv = 1.0f / l;
        bf16* oh = out + item * D;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            const uint32_t e = lane + 32u * c;
            if (e < D) oh[e] = __float2bfloat16_rn(acc[c] * inv);
        }
    }
}

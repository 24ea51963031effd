/*
 * cross_entropy.cu — cross-entropy fused with the softmax: the loss and dlogits.
 * CPU reference: crates/qadapt/src/ops/cross_entropy.rs; the conventions of every model-op kernel:
 * include/model_common.cuh.
 *
 *   cross_entropy_bf16                      one CTA per row: an online max/sum-of-exp pass (with,
 *                                           when asked, the test that no logit beats the target's),
 *                                           a CTA reduction in a fixed order, then the dlogits pass.
 */
#include "model_common.cuh"

namespace {

/* Running (max, sum of exp(z - max)) of a softmax: merge another pair into (m, s). A max of -inf
 * (only -inf seen so far) contributes nothing. */
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;
    s = (m == -INFINITY ? 0.0f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
    m = mm;
}

}  // namespace

QADAPT_KERNEL(cross_entropy_bf16, QadaptCrossEntropyArgs) {
    __shared__ float red_m[kWarps];
    __shared__ float red_s[kWarps];
    __shared__ int red_beaten[kWarps];
    const bf16* __restrict__ logits = reinterpret_cast<const bf16*>(args.logits);
    const int32_t* __restrict__ targets = reinterpret_cast<const int32_t*>(args.targets);
    float* __restrict__ loss = reinterpret_cast<float*>(args.loss);
    bf16* __restrict__ dlogits = reinterpret_cast<bf16*>(args.dlogits);
    uint32_t* __restrict__ top = reinterpret_cast<uint32_t*>(args.top);
    const uint32_t v = args.vocab;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x / 32u;
    const bool vec = (args.flags & QADAPT_MODEL_VEC) != 0;
    const float g = args.grad_scale;
    for (uint64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
        const bf16* z = logits + row * v;
        const int32_t t = targets[row];
        float m = -INFINITY, s = 0.0f;
        /* The argmax test: z[c] beats the target's logit zt when greater, or equal at c < t. An
         * ignored row has nothing to beat (its top is 0 regardless). */
        const bool test = top != nullptr && t >= 0;
        const float zt = test ? to_f(z[t]) : 0.0f;
        const uint32_t tu0 = test ? (uint32_t)t : 0u;
        bool beaten = false;
        if (vec) {
            for (uint32_t c = threadIdx.x * 8; c < v; c += QADAPT_MODEL_THREADS * 8) {
                float f[8];
                unpack8(load8(z + c), f);
                float mm = m;
#pragma unroll
                for (int j = 0; j < 8; ++j) mm = fmaxf(mm, f[j]);
                if (test) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) beaten |= f[j] > zt || (f[j] == zt && c + j < tu0);
                }
                if (mm == -INFINITY) continue;
                s = (m == -INFINITY) ? 0.0f : s * expf(m - mm);
#pragma unroll
                for (int j = 0; j < 8; ++j) s += expf(f[j] - mm);
                m = mm;
            }
        } else {
            for (uint32_t c = threadIdx.x; c < v; c += QADAPT_MODEL_THREADS) {
                const float f = to_f(z[c]);
                lse_merge(m, s, f, 1.0f);
                if (test) beaten |= f > zt || (f == zt && c < tu0);
            }
        }
        beaten = __any_sync(kFull, beaten);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(kFull, m, o);
            const float s2 = __shfl_xor_sync(kFull, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            red_m[warp] = m;
            red_s[warp] = s;
            red_beaten[warp] = beaten;
        }
        __syncthreads();
        /* Every thread folds the warps' pairs in the same order: the same lse everywhere. */
        m = red_m[0];
        s = red_s[0];
#pragma unroll
        for (int k = 1; k < kWarps; ++k) lse_merge(m, s, red_m[k], red_s[k]);
        const float lse = m + logf(s);
        if (threadIdx.x == 0) loss[row] = t >= 0 ? lse - to_f(z[t]) : 0.0f;
        if (top != nullptr && threadIdx.x == 0) {
            int any = 0;
#pragma unroll
            for (int k = 0; k < kWarps; ++k) any |= red_beaten[k];
            top[row] = (t >= 0 && !any) ? 1u : 0u;
        }
        if (dlogits != nullptr) {
            bf16* dz = dlogits + row * v;
            const uint32_t tu = t >= 0 ? (uint32_t)t : 0xffffffffu;
            if (vec) {
                for (uint32_t c = threadIdx.x * 8; c < v; c += QADAPT_MODEL_THREADS * 8) {
                    float f[8];
                    unpack8(load8(z + c), f);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        float e = t >= 0 ? expf(f[j] - lse) * g : 0.0f;
                        if (c + j == tu) e -= g;
                        f[j] = e;
                    }
                    store8(dz + c, pack8(f));
                }
            } else {
                for (uint32_t c = threadIdx.x; c < v; c += QADAPT_MODEL_THREADS) {
                    float e = t >= 0 ? expf(to_f(z[c]) - lse) * g : 0.0f;
                    if (c == tu) e -= g;
                    dz[c] = __float2bfloat16_rn(e);
                }
            }
        }
        __syncthreads(); /* red_m / red_s are rewritten by the next row */
    }
}

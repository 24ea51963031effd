/*
 * dropout.cu — the dropout-mask blend (LoRA dropout; (IA)³ and Houlsby masks).
 * CPU reference: crates/qadapt/src/ops/dropout.rs; the conventions of every model-op kernel:
 * include/model_common.cuh.
 *
 *   mask_mix_bf16                           as SwiGLU; each element's mask bit is hashed from its
 *                                           index, nothing is read for it.
 */
#include "model_common.cuh"

namespace {

/* splitmix64's increment (the golden ratio in 64 bits): element j of a dropout mask hashes
 * base + j * kGolden. */
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

/* splitmix64's output function (crates/qadapt/src/ops/dropout.rs `mix`), a bijection of u64: two
 * xor-shift-multiply rounds and a final xor-shift, every product mod 2^64. */
__device__ __forceinline__ uint64_t splitmix64_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Whether the element whose counter is h = base + j * kGolden is kept: the top 53 bits of its
 * hash, a uniform draw u * 2^53 with u in [0, 1), are at least threshold = ceil(prob * 2^53),
 * i.e. u >= prob. */
__device__ __forceinline__ bool mask_kept(uint64_t h, uint64_t threshold) {
    return (splitmix64_mix(h) >> 11) >= threshold;
}

}  // namespace

namespace {

/* fl(fl(ca x) + fl(cb y)) with the coefficients of a kept or dropped element; the b term only
 * when HasB. Rounded as the f32 reference (crates/qadapt/src/ops/dropout.rs `mask_mix`) rounds,
 * with no FMA, so the bf16 store is bit-equal to that reference rounded to bf16. */
template <bool HasB>
__device__ __forceinline__ float mask_blend(const QadaptMaskMixArgs& args, bool kept, float x,
                                            float y) {
    float v = __fmul_rn(kept ? args.a_keep : args.a_drop, x);
    if constexpr (HasB) v = __fadd_rn(v, __fmul_rn(kept ? args.b_keep : args.b_drop, y));
    return v;
}

/* The whole of mask_mix_bf16 for one choice of HasB (b present or not, uniform over the launch).
 * Thread i of the 16-byte path owns elements 8i .. 8i + 7, whose counters are
 * base + 8i * kGolden + j * kGolden, j < 8. */
template <bool HasB>
__device__ __forceinline__ void mask_mix(const QadaptMaskMixArgs& args) {
    const bf16* __restrict__ a = reinterpret_cast<const bf16*>(args.a);
    const bf16* __restrict__ b = reinterpret_cast<const bf16*>(args.b);
    bf16* __restrict__ out = reinterpret_cast<bf16*>(args.out);
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nvec = (args.flags & QADAPT_MODEL_VEC) ? args.n / 8 : 0;
    for (uint64_t i = tid; i < nvec; i += stride) {
        float x[8], y[8] = {};
        unpack8(load8(a + 8 * i), x);
        if constexpr (HasB) unpack8(load8(b + 8 * i), y);
        const uint64_t h0 = args.base + 8 * i * kGolden;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const bool kept = mask_kept(h0 + (uint64_t)j * kGolden, args.threshold);
            x[j] = mask_blend<HasB>(args, kept, x[j], y[j]);
        }
        store8(out + 8 * i, pack8(x));
    }
    for (uint64_t i = nvec * 8 + tid; i < args.n; i += stride) {
        const bool kept = mask_kept(args.base + i * kGolden, args.threshold);
        const float y = HasB ? to_f(b[i]) : 0.0f;
        out[i] = __float2bfloat16_rn(mask_blend<HasB>(args, kept, to_f(a[i]), y));
    }
}

}  // namespace

QADAPT_KERNEL(mask_mix_bf16, QadaptMaskMixArgs) {
    if (args.b != 0) {
        mask_mix<true>(args);
    } else {
        mask_mix<false>(args);
    }
}

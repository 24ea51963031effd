/*
 * swiglu.cu — SwiGLU, h = silu(gate) * up, forward and backward.
 * CPU reference: crates/qadapt/src/ops/swiglu.rs; the conventions of every model-op kernel:
 * include/model_common.cuh.
 *
 *   swiglu_{fwd,bwd}_bf16                   one thread per 8 elements (16-byte loads and stores)
 *                                           when QADAPT_MODEL_VEC, then the tail one by one.
 */
#include "model_common.cuh"

namespace {

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

}  // namespace

QADAPT_KERNEL(swiglu_fwd_bf16, QadaptSwigluArgs) {
    const bf16* __restrict__ gate = reinterpret_cast<const bf16*>(args.gate);
    const bf16* __restrict__ up = reinterpret_cast<const bf16*>(args.up);
    bf16* __restrict__ h = reinterpret_cast<bf16*>(args.h);
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nvec = (args.flags & QADAPT_MODEL_VEC) ? args.n / 8 : 0;
    for (uint64_t i = tid; i < nvec; i += stride) {
        float g[8], u[8];
        unpack8(load8(gate + 8 * i), g);
        unpack8(load8(up + 8 * i), u);
#pragma unroll
        for (int j = 0; j < 8; ++j) g[j] = g[j] * sigmoid(g[j]) * u[j];
        store8(h + 8 * i, pack8(g));
    }
    for (uint64_t i = nvec * 8 + tid; i < args.n; i += stride) {
        const float g = to_f(gate[i]);
        h[i] = __float2bfloat16_rn(g * sigmoid(g) * to_f(up[i]));
    }
}

QADAPT_KERNEL(swiglu_bwd_bf16, QadaptSwigluArgs) {
    const bf16* __restrict__ gate = reinterpret_cast<const bf16*>(args.gate);
    const bf16* __restrict__ up = reinterpret_cast<const bf16*>(args.up);
    const bf16* __restrict__ dh = reinterpret_cast<const bf16*>(args.dh);
    bf16* __restrict__ dgate = reinterpret_cast<bf16*>(args.dgate);
    bf16* __restrict__ dup = reinterpret_cast<bf16*>(args.dup);
    const uint64_t tid = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nvec = (args.flags & QADAPT_MODEL_VEC) ? args.n / 8 : 0;
    for (uint64_t i = tid; i < nvec; i += stride) {
        float g[8], u[8], d[8];
        unpack8(load8(gate + 8 * i), g);
        unpack8(load8(up + 8 * i), u);
        unpack8(load8(dh + 8 * i), d);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float s = sigmoid(g[j]);
            const float du = d[j] * g[j] * s;
            g[j] = d[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
            u[j] = du;
        }
        store8(dgate + 8 * i, pack8(g));
        store8(dup + 8 * i, pack8(u));
    }
    for (uint64_t i = nvec * 8 + tid; i < args.n; i += stride) {
        const float g = to_f(gate[i]);
        const float d = to_f(dh[i]);
        const float s = sigmoid(g);
        dup[i] = __float2bfloat16_rn(d * g * s);
        dgate[i] = __float2bfloat16_rn(d * to_f(up[i]) * s * (1.0f + g * (1.0f - s)));
    }
}

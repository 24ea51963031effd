/*
 * optim.cu — the optimizer step and the gradient norm, for the trainer (CPU
 * reference: crates/qadapt/src/optim.rs).
 *
 * adamw_f32: one thread per parameter (grid-stride), the step of torch.optim.AdamW written out
 * in qadapt.h (QadaptAdamwArgs) with every operation rounded on its own (__fmul_rn, __fadd_rn,
 * __fdiv_rn, __fsqrt_rn), so the result equals the CPU reference (crates/qadapt/src/optim.rs) bit
 * for bit. Loads and stores are plain f32 (the step is memory-bound: 16 bytes read, 12 written per
 * parameter, plus 2 for the bf16 copy). p, m, v are updated in place; param_bf16 is overwritten.
 *
 * sum_squares_f32: 256 threads per CTA, grid-stride f32 accumulation of x*x, then a halving tree in
 * shared memory; partial[blockIdx.x] is overwritten. The host adds the partials in f64, so the
 * global norm is exact to f32 rounding of the partials (the CPU reference sums in f64).
 */
#include <cuda_bf16.h>

#include "qadapt.h"

QADAPT_KERNEL(adamw_f32, QadaptAdamwArgs) {
    float* __restrict__ p = reinterpret_cast<float*>(args.param);
    __nv_bfloat16* __restrict__ p16 = reinterpret_cast<__nv_bfloat16*>(args.param_bf16);
    const float* __restrict__ grad = reinterpret_cast<const float*>(args.grad);
    float* __restrict__ m = reinterpret_cast<float*>(args.m);
    float* __restrict__ v = reinterpret_cast<float*>(args.v);
    const float decay = __fsub_rn(1.0f, __fmul_rn(args.lr, args.weight_decay));
    const float one_minus_b1 = __fsub_rn(1.0f, args.beta1);
    const float one_minus_b2 = __fsub_rn(1.0f, args.beta2);
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < args.n; i += stride) {
        const float g = __fmul_rn(grad[i], args.grad_scale);
        float pi = __fmul_rn(p[i], decay);
        float mi = m[i];
        mi = __fadd_rn(mi, __fmul_rn(one_minus_b1, __fsub_rn(g, mi)));
        const float vi = __fadd_rn(__fmul_rn(v[i], args.beta2), __fmul_rn(__fmul_rn(g, g), one_minus_b2));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), args.bc2_sqrt), args.eps);
        pi = __fsub_rn(pi, __fmul_rn(args.step_size, __fdiv_rn(mi, denom)));
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (p16 != nullptr) p16[i] = __float2bfloat16_rn(pi);
    }
}

QADAPT_KERNEL(sum_squares_f32, QadaptSumSquaresArgs) {
    __shared__ float part[256];
    const float* __restrict__ x = reinterpret_cast<const float*>(args.x);
    float acc = 0.0f;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < args.n; i += stride) {
        acc = __fadd_rn(acc, __fmul_rn(x[i], x[i]));
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) part[threadIdx.x] = __fadd_rn(part[threadIdx.x], part[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0) reinterpret_cast<float*>(args.partial)[blockIdx.x] = part[0];
}

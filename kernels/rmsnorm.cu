/*
 * rmsnorm.cu — RMSNorm, forward and the backward of x and of the weight.
 * CPU reference: crates/qadapt/src/ops/rmsnorm.rs; the conventions of every model-op kernel:
 * include/model_common.cuh.
 *
 *   rmsnorm_fwd_bf16, rmsnorm_bwd_dx_bf16   one warp per row; two passes over the row (the sum,
 *                                           then the output), the second from L1/L2.
 *   rmsnorm_bwd_dw_bf16                     one CTA per (32 columns, chunk of rows): 8 row-slices
 *                                           of 32 lanes sum rows slice, slice+8, ... of the chunk;
 *                                           the 8 sums are added in slice order in shared memory
 *                                           and written to partial[chunk] (deterministic).
 *   rmsnorm_bwd_dw_reduce                   one thread per column: adds the chunks' partials in
 *                                           chunk order into dw.
 */
#include "model_common.cuh"

QADAPT_KERNEL(rmsnorm_fwd_bf16, QadaptRmsNormArgs) {
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(args.x);
    const bf16* __restrict__ w = reinterpret_cast<const bf16*>(args.w);
    bf16* __restrict__ y = reinterpret_cast<bf16*>(args.y);
    float* __restrict__ rstd = reinterpret_cast<float*>(args.rstd);
    const uint32_t d = args.dim;
    const unsigned lane = threadIdx.x & 31u;
    const bool vec = (args.flags & QADAPT_MODEL_VEC) != 0;
    const float inv_d = __fdiv_rn(1.0f, (float)d);
    for (uint64_t row = global_warp(); row < args.rows; row += warp_count()) {
        const bf16* xr = x + row * d;
        bf16* yr = y + row * d;
        float ss = 0.0f;
        if (vec) {
            for (uint32_t c = lane * 8; c < d; c += 256) {
                float f[8];
                unpack8(load8(xr + c), f);
#pragma unroll
                for (int j = 0; j < 8; ++j) ss += f[j] * f[j];
            }
        } else {
            for (uint32_t c = lane; c < d; c += 32) {
                const float v = to_f(xr[c]);
                ss += v * v;
            }
        }
        ss = warp_sum(ss);
        const float r = 1.0f / sqrtf(ss * inv_d + args.eps);
        if (lane == 0) rstd[row] = r;
        if (vec) {
            for (uint32_t c = lane * 8; c < d; c += 256) {
                float f[8], g[8];
                unpack8(load8(xr + c), f);
                unpack8(load8(w + c), g);
#pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = g[j] * (f[j] * r);
                store8(yr + c, pack8(f));
            }
        } else {
            for (uint32_t c = lane; c < d; c += 32) {
                yr[c] = __float2bfloat16_rn(to_f(w[c]) * (to_f(xr[c]) * r));
            }
        }
    }
}

QADAPT_KERNEL(rmsnorm_bwd_dx_bf16, QadaptRmsNormArgs) {
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(args.x);
    const bf16* __restrict__ w = reinterpret_cast<const bf16*>(args.w);
    const float* __restrict__ rstd = reinterpret_cast<const float*>(args.rstd);
    const bf16* __restrict__ dy = reinterpret_cast<const bf16*>(args.dy);
    bf16* __restrict__ dx = reinterpret_cast<bf16*>(args.dx);
    const uint32_t d = args.dim;
    const unsigned lane = threadIdx.x & 31u;
    const bool vec = (args.flags & QADAPT_MODEL_VEC) != 0;
    const bool add = args.accumulate == QADAPT_ACC_ADD;
    const float inv_d = __fdiv_rn(1.0f, (float)d);
    for (uint64_t row = global_warp(); row < args.rows; row += warp_count()) {
        const bf16* xr = x + row * d;
        const bf16* gr = dy + row * d;
        bf16* dxr = dx + row * d;
        const float r = rstd[row];
        float dot = 0.0f;
        if (vec) {
            for (uint32_t c = lane * 8; c < d; c += 256) {
                float xf[8], gf[8], wf[8];
                unpack8(load8(xr + c), xf);
                unpack8(load8(gr + c), gf);
                unpack8(load8(w + c), wf);
#pragma unroll
                for (int j = 0; j < 8; ++j) dot += gf[j] * wf[j] * (xf[j] * r);
            }
        } else {
            for (uint32_t c = lane; c < d; c += 32) {
                dot += to_f(gr[c]) * to_f(w[c]) * (to_f(xr[c]) * r);
            }
        }
        const float mean = warp_sum(dot) * inv_d;
        if (vec) {
            for (uint32_t c = lane * 8; c < d; c += 256) {
                float xf[8], gf[8], wf[8], of[8];
                unpack8(load8(xr + c), xf);
                unpack8(load8(gr + c), gf);
                unpack8(load8(w + c), wf);
                if (add) {
                    unpack8(load8(dxr + c), of);
                } else {
#pragma unroll
                    for (int j = 0; j < 8; ++j) of[j] = 0.0f;
                }
#pragma unroll
                for (int j = 0; j < 8; ++j) of[j] += r * (gf[j] * wf[j] - xf[j] * r * mean);
                store8(dxr + c, pack8(of));
            }
        } else {
            for (uint32_t c = lane; c < d; c += 32) {
                float v = r * (to_f(gr[c]) * to_f(w[c]) - to_f(xr[c]) * r * mean);
                if (add) v += to_f(dxr[c]);
                dxr[c] = __float2bfloat16_rn(v);
            }
        }
    }
}

QADAPT_KERNEL(rmsnorm_bwd_dw_bf16, QadaptRmsNormArgs) {
    __shared__ float part[kWarps][32];
    const bf16* __restrict__ x = reinterpret_cast<const bf16*>(args.x);
    const float* __restrict__ rstd = reinterpret_cast<const float*>(args.rstd);
    const bf16* __restrict__ dy = reinterpret_cast<const bf16*>(args.dy);
    float* __restrict__ partial = reinterpret_cast<float*>(args.partial);
    const uint32_t d = args.dim;
    const unsigned tx = threadIdx.x & 31u;
    const unsigned ty = threadIdx.x / 32u;
    const uint32_t groups = (d + 31) / 32;
    const uint64_t items = (uint64_t)groups * args.chunks;
    for (uint64_t item = blockIdx.x; item < items; item += gridDim.x) {
        const uint32_t grp = (uint32_t)(item % groups);
        const uint64_t chunk = item / groups;
        const uint32_t col = grp * 32 + tx;
        const uint64_t r0 = chunk * args.chunk_rows;
        const uint64_t r1 = min(r0 + args.chunk_rows, args.rows);
        float acc = 0.0f;
        if (col < d) {
            for (uint64_t row = r0 + ty; row < r1; row += kWarps) {
                acc += to_f(dy[row * d + col]) * (to_f(x[row * d + col]) * rstd[row]);
            }
        }
        part[ty][tx] = acc;
        __syncthreads();
        if (ty == 0 && col < d) {
            float s = part[0][tx];
#pragma unroll
            for (int k = 1; k < kWarps; ++k) s += part[k][tx];
            partial[chunk * d + col] = s;
        }
        __syncthreads();
    }
}

QADAPT_KERNEL(rmsnorm_bwd_dw_reduce, QadaptRmsNormArgs) {
    const float* __restrict__ partial = reinterpret_cast<const float*>(args.partial);
    float* __restrict__ dw = reinterpret_cast<float*>(args.dw);
    const uint32_t d = args.dim;
    for (uint64_t col = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; col < d;
         col += (uint64_t)gridDim.x * blockDim.x) {
        float s = partial[col];
        for (uint32_t c = 1; c < args.chunks; ++c) s += partial[(uint64_t)c * d + col];
        dw[col] += s;
    }
}

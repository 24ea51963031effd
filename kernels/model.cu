/*
 * model.cu — the model ops of a Llama-family transformer, forward and backward: RMSNorm, SwiGLU,
 * the dropout-mask blend, RoPE, token embedding, cross-entropy fused with the softmax, and causal
 * grouped-query attention (its own section at the end of the file states its scheme).
 * Each kernel mirrors the CPU reference in crates/qadapt/src/ops/ (same math, same argument
 * order); the exact formulas are written next to each argument struct in qadapt.h.
 *
 * Types: activations and their gradients are bf16 in memory; every kernel computes in f32 and
 * rounds once, to nearest even, when it stores bf16. The per-row rstd of RMSNorm, the per-row
 * loss, and the parameter gradients (dw of RMSNorm, dtable of the embedding) are f32. The f32 math
 * is left to the compiler (it may contract a*b+c into an FMA; expf/logf/sqrtf are the accurate
 * library versions, never the fast intrinsics), so results agree with the CPU reference within
 * the tolerances stated in crates/qadapt/tests/model_ops_cuda.rs — except where bit-equality is
 * claimed and the rounding is written out: the mask blend (__fmul_rn, __fadd_rn: the f32
 * reference's two products and one sum), the embedding forward (a copy) and the embedding
 * backward (one __fadd_rn per token, in the CPU's order).
 *
 * Layout: row-major, token-major activations [rows = batch * seq, cols] (a [B, T, H, D] tensor is
 * a [B*T, H*D] matrix), exactly as the CPU references.
 *
 * Tiling: every kernel runs QADAPT_MODEL_THREADS (256) threads per CTA and grid-strides over its
 * work items, so any grid from the plan (crates/qadapt/src/plan.rs) covers any shape.
 *   rmsnorm_fwd_bf16, rmsnorm_bwd_dx_bf16   one warp per row; two passes over the row (the sum,
 *                                           then the output), the second from L1/L2.
 *   rmsnorm_bwd_dw_bf16                     one CTA per (32 columns, chunk of rows): 8 row-slices
 *                                           of 32 lanes sum rows slice, slice+8, ... of the chunk;
 *                                           the 8 sums are added in slice order in shared memory
 *                                           and written to partial[chunk] (deterministic).
 *   rmsnorm_bwd_dw_reduce                   one thread per column: adds the chunks' partials in
 *                                           chunk order into dw.
 *   swiglu_{fwd,bwd}_bf16                   one thread per 8 elements (16-byte loads and stores)
 *                                           when QADAPT_MODEL_VEC, then the tail one by one.
 *   mask_mix_bf16                           as SwiGLU; each element's mask bit is hashed from its
 *                                           index, nothing is read for it.
 *   rope_bf16                               one warp per (row, head); lane i rotates the pairs
 *                                           (i, i + D/2), i = lane, lane + 32, ...
 *   embedding_fwd_bf16                      one warp per token: a row copy, 16 bytes a lane.
 *   embedding_bwd_bf16                      one warp per distinct id; lanes own columns.
 *   cross_entropy_bf16                      one CTA per row: an online max/sum-of-exp pass, a CTA
 *                                           reduction in a fixed order, then the dlogits pass.
 *   attention_{fwd,bwd_dq,bwd_dkv}_bf16     one CTA per 8 query (key) rows of one head, one warp
 *                                           per row, key (query) tiles of 32 in shared memory.
 * With QADAPT_MODEL_VEC the host guarantees 16-byte alignment and a row length divisible by 8;
 * without it every kernel takes its element-by-element path.
 *
 * Overwrite vs accumulate: outputs are overwritten (y, rstd, h, dgate, dup, the mask blend's out,
 * the rotated x, the embedding's out, loss, dlogits, the attention's out, lse, dq, dk, dv, delta),
 * dx of RMSNorm is overwritten or accumulated as `accumulate` says, and parameter gradients (dw,
 * dtable) are always accumulated, as the CPU references do.
 */
#include <cuda_bf16.h>
#include <stdint.h>

#include "qadapt.h"

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = QADAPT_MODEL_THREADS / 32;

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }

/* 8 bf16 in a 16-byte word -> 8 floats (exact). Element 2j is the low half of word j. */
__device__ __forceinline__ void unpack8(const uint4 u, float (&f)[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

__device__ __forceinline__ uint4 load8(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
/* __stwb (the default write-back store) keeps the 16-byte store whole; a plain assignment was
 * split into four 32-bit stores by the front end in some kernels. */
__device__ __forceinline__ void store8(bf16* p, const uint4 v) {
    __stwb(reinterpret_cast<uint4*>(p), v);
}

__device__ __forceinline__ uint64_t global_warp() {
    return (uint64_t)blockIdx.x * kWarps + threadIdx.x / 32u;
}
__device__ __forceinline__ uint64_t warp_count() { return (uint64_t)gridDim.x * kWarps; }

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

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

/* Running (max, sum of exp(z - max)) of a softmax: merge another pair into (m, s). A max of -inf
 * (only -inf seen so far) contributes nothing. */
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;
    s = (m == -INFINITY ? 0.0f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
    m = mm;
}

}  // namespace

/* ---- RMSNorm -------------------------------------------------------------------------------- */

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

/* ---- SwiGLU --------------------------------------------------------------------------------- */

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

/* ---- Dropout-mask blend --------------------------------------------------------------------- */

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

/* ---- RoPE ----------------------------------------------------------------------------------- */

QADAPT_KERNEL(rope_bf16, QadaptRopeArgs) {
    bf16* __restrict__ x = reinterpret_cast<bf16*>(args.x);
    const float* __restrict__ cosp = reinterpret_cast<const float*>(args.cos);
    const float* __restrict__ sinp = reinterpret_cast<const float*>(args.sin);
    const uint32_t half = args.head_dim / 2;
    const float sign = args.direction == QADAPT_ROPE_BACKWARD ? -1.0f : 1.0f;
    const unsigned lane = threadIdx.x & 31u;
    const uint64_t vectors = args.rows * args.heads;
    for (uint64_t hv = global_warp(); hv < vectors; hv += warp_count()) {
        const uint64_t row = hv / args.heads;
        const uint64_t p = row % args.seq;
        bf16* xh = x + hv * args.head_dim;
        const float* c = cosp + p * half;
        const float* s = sinp + p * half;
        for (uint32_t i = lane; i < half; i += 32) {
            const float ci = c[i];
            const float si = sign * s[i];
            const float x1 = to_f(xh[i]);
            const float x2 = to_f(xh[i + half]);
            xh[i] = __float2bfloat16_rn(x1 * ci - x2 * si);
            xh[i + half] = __float2bfloat16_rn(x2 * ci + x1 * si);
        }
    }
}

/* ---- Embedding ------------------------------------------------------------------------------ */

QADAPT_KERNEL(embedding_fwd_bf16, QadaptEmbeddingArgs) {
    const uint32_t* __restrict__ ids = reinterpret_cast<const uint32_t*>(args.ids);
    const bf16* __restrict__ table = reinterpret_cast<const bf16*>(args.table);
    bf16* __restrict__ out = reinterpret_cast<bf16*>(args.out);
    const uint32_t d = args.dim;
    const unsigned lane = threadIdx.x & 31u;
    const bool vec = (args.flags & QADAPT_MODEL_VEC) != 0;
    for (uint64_t n = global_warp(); n < args.tokens; n += warp_count()) {
        const uint32_t id = ids[n];
        if (id >= args.vocab) continue; /* the host refuses such ids; never read outside */
        const bf16* src = table + (uint64_t)id * d;
        bf16* dst = out + n * d;
        if (vec) {
            for (uint32_t c = lane * 8; c < d; c += 256) store8(dst + c, load8(src + c));
        } else {
            for (uint32_t c = lane; c < d; c += 32) dst[c] = src[c];
        }
    }
}

QADAPT_KERNEL(embedding_bwd_bf16, QadaptEmbeddingArgs) {
    const bf16* __restrict__ dout = reinterpret_cast<const bf16*>(args.dout);
    float* __restrict__ dtable = reinterpret_cast<float*>(args.dtable);
    const uint32_t* __restrict__ uniq = reinterpret_cast<const uint32_t*>(args.uniq);
    const uint32_t* __restrict__ offsets = reinterpret_cast<const uint32_t*>(args.offsets);
    const uint32_t* __restrict__ order = reinterpret_cast<const uint32_t*>(args.order);
    const uint32_t d = args.dim;
    const unsigned lane = threadIdx.x & 31u;
    for (uint64_t u = global_warp(); u < args.n_uniq; u += warp_count()) {
        const uint32_t id = uniq[u];
        if (id >= args.vocab) continue; /* the host builds uniq from checked ids */
        const uint32_t begin = offsets[u];
        const uint32_t end = offsets[u + 1];
        float* dst = dtable + (uint64_t)id * d;
        for (uint32_t c = lane; c < d; c += 32) {
            float acc = dst[c];
            for (uint32_t k = begin; k < end; ++k) {
                acc = __fadd_rn(acc, to_f(dout[(uint64_t)order[k] * d + c]));
            }
            dst[c] = acc;
        }
    }
}

/* ---- Cross-entropy -------------------------------------------------------------------------- */

QADAPT_KERNEL(cross_entropy_bf16, QadaptCrossEntropyArgs) {
    __shared__ float red_m[kWarps];
    __shared__ float red_s[kWarps];
    const bf16* __restrict__ logits = reinterpret_cast<const bf16*>(args.logits);
    const int32_t* __restrict__ targets = reinterpret_cast<const int32_t*>(args.targets);
    float* __restrict__ loss = reinterpret_cast<float*>(args.loss);
    bf16* __restrict__ dlogits = reinterpret_cast<bf16*>(args.dlogits);
    const uint32_t v = args.vocab;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x / 32u;
    const bool vec = (args.flags & QADAPT_MODEL_VEC) != 0;
    const float g = args.grad_scale;
    for (uint64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
        const bf16* z = logits + row * v;
        const int32_t t = targets[row];
        float m = -INFINITY, s = 0.0f;
        if (vec) {
            for (uint32_t c = threadIdx.x * 8; c < v; c += QADAPT_MODEL_THREADS * 8) {
                float f[8];
                unpack8(load8(z + c), f);
                float mm = m;
#pragma unroll
                for (int j = 0; j < 8; ++j) mm = fmaxf(mm, f[j]);
                if (mm == -INFINITY) continue;
                s = (m == -INFINITY) ? 0.0f : s * expf(m - mm);
#pragma unroll
                for (int j = 0; j < 8; ++j) s += expf(f[j] - mm);
                m = mm;
            }
        } else {
            for (uint32_t c = threadIdx.x; c < v; c += QADAPT_MODEL_THREADS) {
                lse_merge(m, s, to_f(z[c]), 1.0f);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(kFull, m, o);
            const float s2 = __shfl_xor_sync(kFull, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            red_m[warp] = m;
            red_s[warp] = s;
        }
        __syncthreads();
        /* Every thread folds the warps' pairs in the same order: the same lse everywhere. */
        m = red_m[0];
        s = red_s[0];
#pragma unroll
        for (int k = 1; k < kWarps; ++k) lse_merge(m, s, red_m[k], red_s[k]);
        const float lse = m + logf(s);
        if (threadIdx.x == 0) loss[row] = t >= 0 ? lse - to_f(z[t]) : 0.0f;
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

/* ---- Attention ------------------------------------------------------------------------------ */
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
            if (active && j0 <= i) {
                const uint32_t j = j0 + lane;
                float s = -INFINITY;
                if (j <= i) s = dot_words(qs[warp], ks + lane * stride, half) * args.scale;
                const float mn = fmaxf(m, warp_max(s)); /* finite: key j0 <= i is live */
                const float corr = expf(m - mn);       /* 0 on the first tile (m = -inf) */
                const float p = j <= i ? expf(s - mn) : 0.0f;
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
                if (!active || j0 > i) continue;
                const uint32_t j = j0 + lane;
                float p = 0.0f, dp = 0.0f;
                if (j <= i) {
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
                __syncthreads();
                load_tile(qt, q, b, i0, T, H, h, D);
                load_tile(dot, dout, b, i0, T, H, h, D);
                __syncthreads();
                if (!active) continue;
                const uint32_t i = i0 + lane;
                float p = 0.0f, ds = 0.0f;
                if (i < T && i >= j) {
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

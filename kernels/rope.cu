/*
 * rope.cu — rotary position embedding, forward and (the transposed rotation) backward.
 * CPU reference: crates/qadapt/src/ops/rope.rs; the conventions of every model-op kernel:
 * include/model_common.cuh.
 *
 *   rope_bf16                               one warp per (row, head); lane i rotates the pairs
 *                                           (i, i + D/2), i = lane, lane + 32, ...
 */
#include "model_common.cuh"

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

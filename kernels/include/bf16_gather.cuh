/*
 * bf16_gather.cuh — the element-by-element fallback of the tile loaders in gemm_sm80.cuh and
 * kernels/lora_rank.cu: 8 consecutive bf16 of one row, zeros outside the matrix, for chunks that
 * cross a bound or rows that 16-byte copies cannot take (an unaligned leading dimension).
 */
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace qadapt {

/* Row gr, columns gc .. gc+8 of a row-major [rows, cols] bf16 matrix with leading dimension ld,
 * as one 16-byte chunk (element gc in the low half of .x); elements outside the matrix are 0. */
__device__ __forceinline__ uint4 gather8(const __nv_bfloat16* __restrict__ g, uint32_t gr, uint32_t rows,
                                         uint32_t gc, uint32_t cols, uint64_t ld) {
    uint32_t v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const uint32_t c = gc + 2 * e;
        const uint32_t lo = (gr < rows && c < cols) ? __bfloat16_as_ushort(g[(uint64_t)gr * ld + c]) : 0u;
        const uint32_t hi = (gr < rows && c + 1 < cols) ? __bfloat16_as_ushort(g[(uint64_t)gr * ld + c + 1]) : 0u;
        v[e] = lo | (hi << 16);
    }
    return make_uint4(v[0], v[1], v[2], v[3]);
}

}  // namespace qadapt

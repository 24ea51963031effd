/*
 * qadapt.h — the C ABI between the CUDA kernels (kernels/*.cu) and Rust.
 *
 * This header is the one place where kernel names and argument layouts are written down:
 *   - nvcc sees every `QADAPT_KERNEL(name, Args)` as the prototype of an `extern "C" __global__`
 *     function taking one argument struct by value; the .cu file defines it with the same macro,
 *     so a name or signature that drifts from this header is a compile error;
 *   - bindgen turns the structs and constants below into `qadapt_kernels::ffi`;
 *   - qadapt-kernels' build.rs reads the `QADAPT_KERNEL` lines to generate the Rust list of kernel
 *     names (`qadapt_kernels::kernels`), so no kernel name is ever typed as a string in Rust.
 *
 * Pointers cross the ABI as 64-bit device addresses (`uint64_t`, a CUdeviceptr), never as host
 * pointers. Element counts are 64-bit. Every struct is plain data (no padding surprises: fields are
 * ordered by size and padded explicitly), because it is copied byte for byte into the kernel's
 * parameter space.
 */
#ifndef QADAPT_H
#define QADAPT_H

#include <stdint.h>

#define QADAPT_ABI_VERSION 1

/* ---- NF4 format constants (DESIGN.md §3) ------------------------------------------------------ */

/* Code of 0.0 in the NF4 table: pads an odd element count and fills all-zero blocks. */
#define QADAPT_NF4_CODE_ZERO 7
/* Supported blockwise quantization block sizes: powers of two in [MIN, MAX]. */
#define QADAPT_NF4_MIN_BLOCK 32
#define QADAPT_NF4_MAX_BLOCK 4096
/* Double quantization: absmax values are coded in blocks of this many by the signed dynamic map. */
#define QADAPT_DQ_BLOCK 256
/* Index of 0.0 in the sorted signed dynamic map (127 negatives come first). */
#define QADAPT_DQ_CODE_ZERO 127
/* The offset is the mean of all absmax exactly as torch's f32 Tensor.mean() computes it on one
 * thread (its cascade sum over 8-lane vectors; crates/qadapt/src/nf4/cpu.rs `torch_sum`): the sum
 * works on rows of 32 columns, which nf4_dq_offset gives to the 32 lanes of one warp. */
#define QADAPT_DQ_SUM_COLUMNS 32

/* Element types of float tensors crossing the ABI. */
typedef enum QadaptDtype {
    QADAPT_DTYPE_F32 = 0,
    QADAPT_DTYPE_BF16 = 1,
    QADAPT_DTYPE_F16 = 2
} QadaptDtype;

/* ---- NF4 argument structs --------------------------------------------------------------------- */

/* Blockwise NF4 quantization of `n` elements of type T (f32, bf16 or f16).
 * Writes packed[ceil(n/2)] (element 2j in the high nibble of byte j) and absmax[ceil(n/blocksize)].
 * Both outputs are overwritten. */
typedef struct QadaptNf4QuantizeArgs {
    uint64_t input;     /* const T*  [n] */
    uint64_t packed;    /* uint8_t*  [ceil(n/2)] */
    uint64_t absmax;    /* float*    [nblocks] */
    uint64_t n;
    uint32_t blocksize; /* power of two in [QADAPT_NF4_MIN_BLOCK, QADAPT_NF4_MAX_BLOCK] */
    uint32_t reserved;
} QadaptNf4QuantizeArgs;

/* Double quantization of the f32 absmax of an NF4 tensor.
 * Stage 1 (nf4_dq_offset, one warp): offset[0] = torch_sum(absmax) / (float)nblocks.
 * Stage 2 (nf4_dq_encode): for each block of QADAPT_DQ_BLOCK values v = absmax - offset (f32),
 *   nested_absmax[b] = max |v|, codes[i] = nearest entry of the signed dynamic map to
 *   v / nested_absmax[b] (f32 division), ties to the lower index; an all-zero block gets
 *   QADAPT_DQ_CODE_ZERO. All outputs are overwritten. */
typedef struct QadaptNf4DoubleQuantArgs {
    uint64_t absmax;        /* const float* [nblocks] */
    uint64_t offset;        /* float*       [1] */
    uint64_t dynamic_map;   /* const float* [256], sorted ascending */
    uint64_t codes;         /* uint8_t*     [nblocks] */
    uint64_t nested_absmax; /* float*       [ceil(nblocks / QADAPT_DQ_BLOCK)] */
    uint64_t nblocks;
} QadaptNf4DoubleQuantArgs;

/* Blockwise NF4 dequantization of `n` elements to T (f32, bf16 or f16), overwriting out[n].
 * Per block b the scale is absmax[b], or, with double quantization (absmax_codes != 0),
 * dynamic_map[absmax_codes[b]] * nested_absmax[b / QADAPT_DQ_BLOCK] + offset (two f32 roundings,
 * no fused multiply-add). The value is T(T(nf4_code[nibble]) * scale): the level is rounded to T
 * first and multiplied in f32, as bitsandbytes decodes. */
typedef struct QadaptNf4DequantizeArgs {
    uint64_t packed;        /* const uint8_t* [ceil(n/2)] */
    uint64_t absmax;        /* const float*   [nblocks], used when absmax_codes == 0 */
    uint64_t absmax_codes;  /* const uint8_t* [nblocks] or 0 */
    uint64_t nested_absmax; /* const float*   [ceil(nblocks / QADAPT_DQ_BLOCK)] */
    uint64_t dynamic_map;   /* const float*   [256] */
    uint64_t out;           /* T*             [n] */
    uint64_t n;
    float offset;           /* double-quant offset (mean of the original absmax) */
    uint32_t blocksize;
} QadaptNf4DequantizeArgs;

/* ---- LoRA argument structs (kernels/lora.cu) --------------------------------------------------- */

/* flags of QadaptLoraFwdArgs / QadaptLoraBwdArgs */
/* Every row pointer the kernel reads with 16-byte loads is 16-byte aligned and the row lengths
 * allow it (K % 8 == 0 for bf16 rows, K % 32 == 0 for NF4 rows): the kernels may use the
 * vectorized path. Without it they take the element-by-element path (any shape). */
#define QADAPT_LORA_VEC 1u
/* Largest row count of the gemv path; larger batches take the tensor-core GEMM path. Up to
 * NARROW_ROWS rows take lora_gemv_*, more take lora_gemv_wide_* (more accumulators, fewer warps). */
#define QADAPT_LORA_GEMV_MAX_ROWS 16
#define QADAPT_LORA_GEMV_NARROW_ROWS 4
/* GEMM tiling (CTA tile BM x BN over a BK slice of K, 256 threads, 3-stage cp.async pipeline). */
#define QADAPT_LORA_GEMM_BM 128
#define QADAPT_LORA_GEMM_BN 128
#define QADAPT_LORA_GEMM_THREADS 256
/* gemv: warps per CTA (one output feature per warp, grid-stride). */
#define QADAPT_LORA_GEMV_WARPS 8

/* Fused LoRA linear forward, y = x W^T + bias + sum_a [idx(m) == a] * s_a * (x A_a^T) B_a^T.
 * Shapes: x [m, k] bf16 row-major, W [n, k] (bf16, or NF4 packed over the flattened row-major W
 * with `blocksize` and plain or double-quant scales), A stack [n_adapters, rank, k] bf16,
 * B stack [n_adapters, n, rank] bf16, scales [n_adapters] f32, adapter_idx [m] i32 (-1 = base
 * only; 0 pointer = every row uses adapter 0), bias [n] bf16 or 0, y [m, n] bf16.
 * u [m, n_adapters * rank] bf16 is the LoRA intermediate: lora_xa / lora_gemm_xa write
 * u[m, a*rank + j] = bf16(s_a * sum_k x[m,k] A_a[j,k]) for a == idx(m) and 0 for the other
 * adapters; the gemv/gemm kernels read it. u and y are overwritten. */
typedef struct QadaptLoraFwdArgs {
    uint64_t x;             /* const bf16* [m, k] */
    uint64_t w;             /* const bf16* [n, k], or const uint8_t* [ceil(n*k/2)] for NF4 */
    uint64_t absmax;        /* NF4: const float* [nblocks], used when absmax_codes == 0 */
    uint64_t absmax_codes;  /* NF4: const uint8_t* [nblocks] or 0 */
    uint64_t nested_absmax; /* NF4: const float* [ceil(nblocks / QADAPT_DQ_BLOCK)] */
    uint64_t dynamic_map;   /* NF4: const float* [256] */
    uint64_t lora_a;        /* const bf16* [n_adapters, rank, k] */
    uint64_t lora_b;        /* const bf16* [n_adapters, n, rank] */
    uint64_t scales;        /* const float* [n_adapters] */
    uint64_t adapter_idx;   /* const int32_t* [m] or 0 */
    uint64_t bias;          /* const bf16* [n] or 0 */
    uint64_t u;             /* bf16* [m, n_adapters * rank] */
    uint64_t y;             /* bf16* [m, n] */
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t rank;          /* 0: no LoRA term */
    uint32_t n_adapters;
    uint32_t blocksize;     /* NF4 block size */
    float offset;           /* NF4 double-quant offset */
    uint32_t flags;         /* QADAPT_LORA_VEC */
} QadaptLoraFwdArgs;

/* Fused LoRA linear backward, for the forward above with upstream gradient dy [m, n]:
 *   g[m, a*r + j]  = bf16(s_a * sum_n dy[m,n] B_a[n,j])  for a == idx(m), else 0   (overwritten)
 *   dx             = dy W + g Acat                  [m, k] bf16, OVERWRITTEN
 *   grad_a[a,j,k] += sum_m g[m, a*r+j] x[m,k]        f32, ACCUMULATED (= s_a (dy B_a)^T x)
 *   grad_b[a,n,j] += sum_m dy[m,n] u[m, a*r+j]       f32, ACCUMULATED (= s_a dy^T (x A_a^T))
 * with Acat = the A stack as [n_adapters * r, k] and u = bf16(s x A^T) as lora_xa_bf16 writes it
 * (the launcher recomputes u with lora_gemm_xa_bf16 first). NF4 W is dequantized inside
 * the dx matmul. Same index rule as the forward: idx outside [0, n_adapters) is -1. */
typedef struct QadaptLoraBwdArgs {
    uint64_t x;             /* const bf16* [m, k] */
    uint64_t dy;            /* const bf16* [m, n] */
    uint64_t w;             /* const bf16* [n, k], or const uint8_t* [ceil(n*k/2)] for NF4 */
    uint64_t absmax;        /* NF4: const float* [nblocks], used when absmax_codes == 0 */
    uint64_t absmax_codes;  /* NF4: const uint8_t* [nblocks] or 0 */
    uint64_t nested_absmax; /* NF4: const float* [ceil(nblocks / QADAPT_DQ_BLOCK)] */
    uint64_t dynamic_map;   /* NF4: const float* [256] */
    uint64_t lora_a;        /* const bf16* [n_adapters, rank, k] */
    uint64_t lora_b;        /* const bf16* [n_adapters, n, rank] */
    uint64_t scales;        /* const float* [n_adapters] */
    uint64_t adapter_idx;   /* const int32_t* [m] or 0 */
    uint64_t u;             /* const bf16* [m, n_adapters * rank] */
    uint64_t g;             /* bf16* [m, n_adapters * rank] */
    uint64_t dx;            /* bf16* [m, k] */
    uint64_t grad_a;        /* float* [n_adapters, rank, k] */
    uint64_t grad_b;        /* float* [n_adapters, n, rank] */
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t rank;          /* 0: no LoRA term */
    uint32_t n_adapters;
    uint32_t blocksize;     /* NF4 block size */
    float offset;           /* NF4 double-quant offset */
    uint32_t flags;         /* QADAPT_LORA_VEC: k % 8 == 0, n % 8 == 0, aligned x, dy, W, A */
} QadaptLoraBwdArgs;

/* ---- Optimizer argument structs (kernels/optim.cu) ------------------------------------------- */

/* One AdamW step over n f32 parameters, in torch.optim.AdamW's order of operations (f32, each step
 * rounded, no fused multiply-add):
 *   p  = p * (1 - lr * weight_decay)
 *   g  = grad * grad_scale                      (grad_scale: clipping by global norm, else 1)
 *   m  = m + (1 - beta1) * (g - m)              (torch's lerp with weight < 0.5)
 *   v  = v * beta2 + (1 - beta2) * g * g
 *   p  = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
 * with step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) computed on the host.
 * p, m, v are updated in place; when param_bf16 != 0 it is overwritten with bf16(p) (the bf16
 * working copy of an f32 master weight). grad is read only. */
typedef struct QadaptAdamwArgs {
    uint64_t param;      /* float*          [n] */
    uint64_t param_bf16; /* __nv_bfloat16*  [n] or 0 */
    uint64_t grad;       /* const float*    [n] */
    uint64_t m;          /* float*          [n] */
    uint64_t v;          /* float*          [n] */
    uint64_t n;
    float lr;
    float weight_decay;
    float beta1;
    float beta2;
    float eps;
    float step_size;
    float bc2_sqrt;
    float grad_scale;
} QadaptAdamwArgs;

/* Sum of squares of n f32 values: partial[b] = the f32 sum over CTA b's grid-stride share (a
 * halving tree inside the CTA); the host adds the partials in f64. Overwrites partial[gridDim.x]. */
typedef struct QadaptSumSquaresArgs {
    uint64_t x;       /* const float* [n] */
    uint64_t partial; /* float*       [gridDim.x] */
    uint64_t n;
} QadaptSumSquaresArgs;

/* ---- Kernels ---------------------------------------------------------------------------------- */

#if defined(__CUDACC__)
#define QADAPT_KERNEL(name, Args) extern "C" __global__ void name(const Args args)
#else
/* Seen by bindgen only as documentation; the Rust side never calls these symbols directly. */
#define QADAPT_KERNEL(name, Args) void name(const Args args)
#endif

/* kernels/nf4.cu */
QADAPT_KERNEL(nf4_quantize_f32, QadaptNf4QuantizeArgs);
QADAPT_KERNEL(nf4_quantize_bf16, QadaptNf4QuantizeArgs);
QADAPT_KERNEL(nf4_quantize_f16, QadaptNf4QuantizeArgs);
QADAPT_KERNEL(nf4_dq_offset, QadaptNf4DoubleQuantArgs);
QADAPT_KERNEL(nf4_dq_encode, QadaptNf4DoubleQuantArgs);
QADAPT_KERNEL(nf4_dequantize_f32, QadaptNf4DequantizeArgs);
QADAPT_KERNEL(nf4_dequantize_bf16, QadaptNf4DequantizeArgs);
QADAPT_KERNEL(nf4_dequantize_f16, QadaptNf4DequantizeArgs);

/* kernels/lora.cu */
QADAPT_KERNEL(lora_xa_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_dense_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_nf4_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_wide_dense_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_wide_nf4_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemm_dense_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemm_nf4_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemm_xa_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemm_bwd_dyb_bf16, QadaptLoraBwdArgs);
QADAPT_KERNEL(lora_gemm_bwd_dx_dense_bf16, QadaptLoraBwdArgs);
QADAPT_KERNEL(lora_gemm_bwd_dx_nf4_bf16, QadaptLoraBwdArgs);
QADAPT_KERNEL(lora_gemm_bwd_da_bf16, QadaptLoraBwdArgs);
QADAPT_KERNEL(lora_gemm_bwd_db_bf16, QadaptLoraBwdArgs);

/* kernels/optim.cu */
QADAPT_KERNEL(adamw_f32, QadaptAdamwArgs);
QADAPT_KERNEL(sum_squares_f32, QadaptSumSquaresArgs);

#endif /* QADAPT_H */

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

/* ---- NF4 format constants (crates/qadapt/src/nf4/) ------------------------------------------- */

/* Code of 0.0 in the NF4 table: pads an odd element count (an all-zero block also codes to it). */
#define QADAPT_NF4_CODE_ZERO 7
/* Supported blockwise quantization block sizes: powers of two in [MIN, MAX]. */
#define QADAPT_NF4_MIN_BLOCK 32
#define QADAPT_NF4_MAX_BLOCK 4096
/* Double quantization: absmax values are coded in blocks of this many by the signed dynamic map. */
#define QADAPT_DQ_BLOCK 256
/* Code of every value of an all-zero double-quant block: bitsandbytes 0.50's CPU quantize_blockwise
 * writes 0 there (0.48 divided 0 by 0 and crashed). */
#define QADAPT_DQ_CODE_ZERO 0
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
 *   nested_absmax[b] = max |v|, and codes[i] = the code bitsandbytes 0.50's CPU quantize_blockwise
 *   gives q = v * (1 / nested_absmax[b]): q rounded to one of 65536 bins over [-1, 1], then the
 *   number of map midpoints below the bin's value (cpu.rs `dq_encode`); an all-zero block gets
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

/* ---- LoRA argument structs (kernels/lora_*.cu) ------------------------------------------------- */

/* flags of QadaptLoraFwdArgs / QadaptLoraBwdArgs */
/* Every row pointer the kernel reads with 16-byte loads is 16-byte aligned and the row lengths
 * allow it (K % 8 == 0 for bf16 rows, K % 32 == 0 for NF4 rows): the kernels may use the
 * vectorized path. Without it they take the element-by-element path (any shape). */
#define QADAPT_LORA_VEC 1u
/* The output (the forward's y, the backward's dx) is added into, not overwritten:
 * y = bf16(y + sum), the old bf16 value added in f32 before the single rounding (a residual add, or
 * the sum of several projections' input gradients, in the epilogue: no temporary, no add kernel). */
#define QADAPT_LORA_ACCUMULATE 2u
/* Largest row count of the gemv path; larger batches take the tensor-core GEMM path. Up to
 * NARROW_ROWS rows take lora_gemv_*, more take lora_gemv_wide_* (more accumulators, fewer warps). */
#define QADAPT_LORA_GEMV_MAX_ROWS 16
#define QADAPT_LORA_GEMV_NARROW_ROWS 4
/* GEMM tiling (CTA tile BM x BN over a BK slice of K, 256 threads, 3-stage cp.async pipeline). */
#define QADAPT_LORA_GEMM_BM 128
#define QADAPT_LORA_GEMM_BN 128
#define QADAPT_LORA_GEMM_BK 32
#define QADAPT_LORA_GEMM_THREADS 256
/* Split k on the GEMM path (few output tiles, e.g. 17..256 rows): grid = splits x tiles CTAs, each
 * storing its f32 partial sums of x W^T over its k range into partial [splits, m, n] (no LoRA term,
 * no bias); lora_split_reduce_bf16 (grid-stride, REDUCE_THREADS) then adds the splits in
 * order, the row's adapter term sum_j u[m, a*r + j] B_a[n, j] and the bias, and stores y. Each
 * range keeps at least MIN_STEPS BK slices. */
#define QADAPT_LORA_SPLIT_MIN_STEPS 4
/* The dx GEMM splits n the same way (QadaptLoraBwdArgs.partial [splits, m, k]); then
 * lora_split_reduce_dx_bf16 adds the splits in order and sum_j g[m, a*r + j] A_a[j, k], and
 * stores dx. */
#define QADAPT_LORA_SPLIT_REDUCE_THREADS 256
/* The NF4 y and dx GEMMs (lora_gemm_nf4_bf16, lora_gemm_bwd_dx_nf4_bf16): same CTA tile, 4 warps of
 * 64 x 64. */
#define QADAPT_LORA_GEMM_NF4_THREADS 128
/* gemv: warps per CTA (one output feature per warp, grid-stride). */
#define QADAPT_LORA_GEMV_WARPS 8

/* Fused LoRA linear forward, y = x W^T + bias + sum_a [idx(m) == a] * s_a * (x A_a^T) B_a^T.
 * Shapes: x [m, k] bf16 row-major, W [n, k] (bf16, or NF4 packed over the flattened row-major W
 * with `blocksize` and plain or double-quant scales), A stack [n_adapters, rank, k] bf16,
 * B stack [n_adapters, n, rank] bf16, scales [n_adapters] f32, adapter_idx [m] i32 (-1 = base
 * only; 0 pointer = every row uses adapter 0), bias [n] bf16 or 0, y [m, n] bf16.
 * u [m, n_adapters * rank] bf16 is the LoRA intermediate: lora_xa / lora_rank_xa write
 * u[m, a*rank + j] = bf16(s_a * sum_k x[m,k] A_a[j,k]) for a == idx(m) and 0 for the other
 * adapters; the gemv/gemm kernels read it. u is overwritten; y too, or with QADAPT_LORA_ACCUMULATE
 * added into (y = bf16(y + ...), one rounding). */
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
    uint64_t partial;       /* float* [splits, m, n] when splits > 1 (the GEMM path's split k) */
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t rank;          /* 0: no LoRA term */
    uint32_t n_adapters;
    uint32_t blocksize;     /* NF4 block size */
    float offset;           /* NF4 double-quant offset */
    uint32_t flags;         /* QADAPT_LORA_VEC | QADAPT_LORA_ACCUMULATE */
    uint32_t splits;        /* GEMM path: k cut into this many ranges (0 or 1: none) */
    uint32_t split_steps;   /* GEMM path: BK slices of k per range (the last may be shorter) */
} QadaptLoraFwdArgs;

/* A TMA tensor map (CUtensorMap of the driver API: 128 opaque bytes, 64-byte aligned), encoded on
 * the host by cuTensorMapEncodeTiled and read by cp.async.bulk.tensor from the kernel's
 * `__grid_constant__` argument struct (kernels/include/qadapt_sm90.cuh). */
typedef struct __attribute__((aligned(64))) QadaptTensorMap {
    uint64_t opaque[16];
} QadaptTensorMap;

/* The sm_90a NF4 y GEMM (kernels/lora_sm90.cu, chosen on compute capability 9.0 devices): y^T = W x^T
 * with W decoded from NF4 in registers as wgmma's A operand and x (then u, for the LoRA term)
 * loaded by TMA as its B operand: CTA tile QADAPT_SM90_BM features x bn tokens (bn = 128 or 256,
 * the kernel's name says which), QADAPT_SM90_BK of k a stage, QADAPT_SM90_STAGES stages in
 * dynamic shared memory, one producer warpgroup and two consumer warpgroups. Computes what
 * lora_gemm_nf4_bf16 computes for splits <= 1, with the LoRA term as extra k steps:
 * y^T = [W | Bcat] [x | u]^T, Bcat [n, n_adapters * rank] the B stack side by side.
 * Needs k % QADAPT_SM90_BK == 0, a power-of-two blocksize >= QADAPT_SM90_BK, n_adapters * rank
 * a multiple of 8 (u's rows 16-byte aligned for TMA) and x, u 16-byte aligned. */
#define QADAPT_SM90_BM 128
#define QADAPT_SM90_BK 64
#define QADAPT_SM90_STAGES 4
#define QADAPT_SM90_THREADS 384
typedef struct QadaptLoraSm90Args {
    QadaptTensorMap x_map;     /* x [m, k] bf16: box 64 (k) x bn (rows), 128-byte swizzle */
    QadaptTensorMap codes_map; /* W's codes as uint8 [n, k / 2]: box 32 x 128, no swizzle */
    QadaptTensorMap u_map;     /* u [m, n_adapters * rank] bf16: box 64 x bn, 128-byte swizzle */
    QadaptLoraFwdArgs fwd;     /* as for lora_gemm_nf4_bf16 (splits and partial unused) */
    uint8_t reserved[104];     /* explicit tail: the struct is 640 bytes, 64-byte aligned */
} QadaptLoraSm90Args;

/* Fused LoRA linear backward, for the forward above with upstream gradient dy [m, n]:
 *   g[m, a*r + j]  = bf16(s_a * sum_n dy[m,n] B_a[n,j])  for a == idx(m), else 0   (overwritten)
 *   dx             = dy W + g Acat                  [m, k] bf16, OVERWRITTEN (added into with
 *                                                    QADAPT_LORA_ACCUMULATE)
 *   grad_a[a,j,k] += sum_m g[m, a*r+j] x[m,k]        f32, ACCUMULATED (= s_a (dy B_a)^T x)
 *   grad_b[a,n,j] += sum_m dy[m,n] u[m, a*r+j]       f32, ACCUMULATED (= s_a dy^T (x A_a^T))
 * with Acat = the A stack as [n_adapters * r, k] and u = bf16(s x A^T) as lora_xa_bf16 writes it
 * (the launcher forms u and g with kernels/lora_rank.cu first). NF4 W is dequantized inside
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
    uint32_t flags;         /* QADAPT_LORA_VEC: k % 8 == 0, n % 8 == 0, aligned x, dy, W, A;
                             * QADAPT_LORA_ACCUMULATE: dx += instead of dx = */
    uint64_t partial;       /* float* [splits, m, k] when splits > 1 (the dx GEMM's split n) */
    uint32_t splits;        /* dx GEMM: n cut into this many ranges (0 or 1: none) */
    uint32_t split_steps;   /* dx GEMM: BK slices of n per range (the last may be shorter) */
} QadaptLoraBwdArgs;

/* The sm_90a NF4 dx GEMM (kernels/lora_sm90.cu): dx^T = [W^T | Acat^T] [dy | g]^T, the tiling of
 * QadaptLoraSm90Args over features of k and steps of n. Computes what lora_gemm_bwd_dx_nf4_bf16
 * computes for splits <= 1. Needs n % QADAPT_SM90_BK == 0, k % QADAPT_SM90_BK == 0, a power-of-two
 * blocksize >= QADAPT_SM90_BK, rank a multiple of 8 and dy, g, dx 16-byte aligned. */
typedef struct QadaptLoraBwdSm90Args {
    QadaptTensorMap dy_map;    /* dy [m, n] bf16: box 64 (n) x bn (rows), 128-byte swizzle */
    QadaptTensorMap codes_map; /* W's codes as uint8 [n, k / 2]: box 64 x 64, no swizzle */
    QadaptTensorMap g_map;     /* g [m, n_adapters * rank] bf16: box 64 x bn, 128-byte swizzle */
    QadaptLoraBwdArgs bwd;     /* as for lora_gemm_bwd_dx_nf4_bf16 (splits and partial unused) */
    uint8_t reserved[16];      /* explicit tail: the struct is 576 bytes, 64-byte aligned */
} QadaptLoraBwdSm90Args;

/* ---- LoRA rank-R products (kernels/lora_rank.cu) ---------------------------------------------- */

/* Output tile rows (of the long side p), reduction slice, threads per CTA of the product kernels;
 * the output tile is BM x r_tile with r_tile 16, 32 or 64. Each split of the reduction keeps at
 * least MIN_STEPS slices of BK (the launcher's rule). The reduction kernel runs REDUCE_THREADS. */
#define QADAPT_LORA_RANK_BM 64
#define QADAPT_LORA_RANK_BK 32
#define QADAPT_LORA_RANK_THREADS 128
#define QADAPT_LORA_RANK_MIN_STEPS 4
#define QADAPT_LORA_RANK_REDUCE_THREADS 256
/* flags of QadaptLoraRankArgs: lhs rows (ld % 8 == 0, 16-byte aligned base) may be copied 16 bytes
 * at a time; likewise rhs (for the B stack: rank % 8 == 0 and an aligned base). */
#define QADAPT_LORA_RANK_VEC_LHS 1u
#define QADAPT_LORA_RANK_VEC_RHS 2u
/* mode of lora_rank_reduce_bf16: what it does with the summed splits. */
#define QADAPT_LORA_RANK_MASKED 0u /* out = bf16 [p, R]: bf16(s_a * sum) in the row's adapter's columns, else 0 */
#define QADAPT_LORA_RANK_GRAD_A 1u /* out = f32 grad_a [R, p] (p = k): += sum */
#define QADAPT_LORA_RANK_GRAD_B 2u /* out = f32 grad_b [n_adapters, p, rank] (p = n): += sum */

/* One rank-R product out[p, e] = sum_t L(p, t) Rr(t, e) (R = n_adapters * rank columns e), split
 * over t (kernels/lora_rank.cu has the table):
 *   lora_rank_xa_bf16   p = m, t = k: lhs x [m, k],  rhs the A stack [R, k]
 *   lora_rank_dyb_bf16  p = m, t = n: lhs dy [m, n], rhs the B stack [n_adapters, n, rank]
 *   lora_rank_da_bf16   p = k, t = m: lhs x [m, k],  rhs g [m, R]
 *   lora_rank_db_bf16   p = n, t = m: lhs dy [m, n], rhs u [m, R]
 * The product kernels write f32 partial sums into partial [splits, p, R] ([splits, R, p] for da,
 * the layout of grad_a; overwritten); grid =
 * splits * ceil(p / BM) * ceil(R / r_tile) CTAs of THREADS, split s covering the BK slices
 * s*steps .. min((s+1)*steps, ceil(t / BK)). lora_rank_reduce_bf16 (grid-stride) sums the splits
 * in order and finishes per `mode`; adapter_idx [p] and scales [n_adapters] are read by MASKED
 * only (same index rule as the forward). */
typedef struct QadaptLoraRankArgs {
    uint64_t lhs;          /* const bf16*: x [m, k] or dy [m, n] */
    uint64_t rhs;          /* const bf16*: A stack, B stack, g [m, R] or u [m, R] */
    uint64_t scales;       /* const float* [n_adapters] (MASKED) */
    uint64_t adapter_idx;  /* const int32_t* [p] or 0 (MASKED) */
    uint64_t partial;      /* float* [splits, p, R] ([splits, R, p] for da) */
    uint64_t out;          /* bf16* u or g [p, R], or float* grad_a / grad_b (see mode) */
    uint32_t p;            /* output rows: m (xa, dyb), k (da), n (db) */
    uint32_t t;            /* reduction length: k (xa), n (dyb), m (da, db) */
    uint32_t rank;
    uint32_t n_adapters;
    uint32_t r_tile;       /* 16, 32 or 64 */
    uint32_t splits;
    uint32_t steps;        /* BK slices per split */
    uint32_t mode;         /* QADAPT_LORA_RANK_MASKED / _GRAD_A / _GRAD_B (reduce kernel) */
    uint32_t flags;        /* QADAPT_LORA_RANK_VEC_LHS | QADAPT_LORA_RANK_VEC_RHS */
    uint32_t unused;       /* 0: keeps the struct free of padding bytes */
} QadaptLoraRankArgs;

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

/* ---- Model-op argument structs (kernels/rmsnorm.cu ... attention.cu) ------------------------- */

/* flags of the model-op structs: every pointer the kernel reads or writes with 16-byte accesses is
 * 16-byte aligned and the row length is a multiple of 8 bf16 (the 16-byte path is allowed).
 * Without it the kernels go element by element (any shape, any 2-byte alignment). */
#define QADAPT_MODEL_VEC 1u
/* Threads per CTA of every model-op kernel (8 warps). */
#define QADAPT_MODEL_THREADS 256
/* `accumulate` of an activation gradient: overwrite it, or add to what is there (bf16(old + new)). */
#define QADAPT_ACC_OVERWRITE 0u
#define QADAPT_ACC_ADD 1u
/* `direction` of QadaptRopeArgs: rotate by +angle (forward) or by -angle (its backward). */
#define QADAPT_ROPE_FORWARD 0u
#define QADAPT_ROPE_BACKWARD 1u

/* RMSNorm over rows of `dim` bf16 values, f32 math (crates/qadapt/src/ops/rmsnorm.rs):
 *   rmsnorm_fwd_bf16:    rstd[n] = 1/sqrt(mean_d x^2 + eps) (f32, overwritten),
 *                        y[n, d] = bf16(w[d] * (x[n, d] * rstd[n])) (overwritten)
 *   rmsnorm_bwd_dx_bf16: dx[n, d] (=|+=) bf16(r (dy w - x r mean_d(dy w x r)))
 *   rmsnorm_bwd_dw_bf16: partial[c, d] = sum_{n in chunk c} dy[n, d] * (x[n, d] * rstd[n])
 *                        (f32, overwritten; chunk c = rows [c * chunk_rows, (c + 1) * chunk_rows))
 *   rmsnorm_bwd_dw_reduce: dw[d] += partial[0, d] + partial[1, d] + ... in chunk order
 *                        (f32, ACCUMULATED; deterministic, no atomics) */
typedef struct QadaptRmsNormArgs {
    uint64_t x;          /* const bf16* [rows, dim] */
    uint64_t w;          /* const bf16* [dim] */
    uint64_t rstd;       /* float* [rows]: written by the forward, read by the backward */
    uint64_t y;          /* bf16* [rows, dim] (forward) */
    uint64_t dy;         /* const bf16* [rows, dim] (backward) */
    uint64_t dx;         /* bf16* [rows, dim] (backward) */
    uint64_t dw;         /* float* [dim] (backward) */
    uint64_t partial;    /* float* [chunks, dim] (backward scratch) */
    uint64_t rows;
    uint32_t dim;
    float eps;
    uint32_t accumulate; /* dx: QADAPT_ACC_OVERWRITE or QADAPT_ACC_ADD */
    uint32_t flags;      /* QADAPT_MODEL_VEC: dim % 8 == 0, x, w, y, dy, dx 16-byte aligned */
    uint32_t chunk_rows; /* dw: rows per chunk (> 0) */
    uint32_t chunks;     /* dw: ceil(rows / chunk_rows) */
} QadaptRmsNormArgs;

/* SwiGLU gate over n bf16 elements, f32 math (crates/qadapt/src/ops/swiglu.rs), all overwritten:
 *   swiglu_fwd_bf16: h = bf16(g sigmoid(g) u)
 *   swiglu_bwd_bf16: du = bf16(dh g sigmoid(g)), dg = bf16(dh u s (1 + g (1 - s))), s = sigmoid(g) */
typedef struct QadaptSwigluArgs {
    uint64_t gate;  /* const bf16* [n] */
    uint64_t up;    /* const bf16* [n] */
    uint64_t h;     /* bf16* [n] (forward) */
    uint64_t dh;    /* const bf16* [n] (backward) */
    uint64_t dgate; /* bf16* [n] (backward) */
    uint64_t dup;   /* bf16* [n] (backward) */
    uint64_t n;
    uint32_t flags; /* QADAPT_MODEL_VEC: every pointer 16-byte aligned (the tail n % 8 goes 1 by 1) */
    uint32_t reserved;
} QadaptSwigluArgs;

/* Masked blend of one or two tensors of n bf16 elements by a counter-based dropout mask
 * (crates/qadapt/src/ops/dropout.rs), out overwritten. Element j is kept iff
 *   (mix(base + j * 0x9E3779B97F4A7C15) >> 11) >= threshold      (u64 arithmetic mod 2^64)
 * with mix splitmix64's output function and threshold = ceil(prob * 2^53) (dropped with
 * probability prob). With c(j) = c_keep where element j is kept, c_drop where it is dropped:
 *   mask_mix_bf16: out[j] = bf16(fl(fl(ca(j) a[j]) + fl(cb(j) b[j])))
 * in f32, each product and the sum rounded to nearest (no FMA), so out is bit-equal to the f32
 * reference rounded to bf16; no b term (out[j] = bf16(ca(j) a[j])) when b == 0. */
typedef struct QadaptMaskMixArgs {
    uint64_t a;         /* const bf16* [n] */
    uint64_t b;         /* const bf16* [n], or 0 (no b term) */
    uint64_t out;       /* bf16* [n] (neither a nor b) */
    uint64_t n;
    uint64_t base;      /* the mask's name: element j hashes base + j * 0x9E3779B97F4A7C15 */
    uint64_t threshold; /* ceil(prob * 2^53): kept iff the 53-bit draw >= threshold */
    float a_keep;
    float a_drop;
    float b_keep;       /* unused when b == 0 */
    float b_drop;       /* unused when b == 0 */
    uint32_t flags;     /* QADAPT_MODEL_VEC: a, b (when present) and out 16-byte aligned (the
                           tail n % 8 goes 1 by 1) */
    uint32_t reserved;
} QadaptMaskMixArgs;

/* RoPE, transformers' rotate_half convention, in place on x [rows, heads * head_dim] bf16 (token
 * n is at position n % seq). With c = cos[p, i], s = +-sin[p, i] (f32 tables [seq, head_dim/2]):
 *   x[i] = bf16(x[i] c - x[i + D/2] s),  x[i + D/2] = bf16(x[i + D/2] c + x[i] s). */
typedef struct QadaptRopeArgs {
    uint64_t x;         /* bf16* [rows, heads * head_dim], read and overwritten */
    uint64_t cos;       /* const float* [seq, head_dim / 2] */
    uint64_t sin;       /* const float* [seq, head_dim / 2] */
    uint64_t rows;
    uint32_t seq;
    uint32_t heads;
    uint32_t head_dim;  /* even */
    uint32_t direction; /* QADAPT_ROPE_FORWARD or QADAPT_ROPE_BACKWARD */
} QadaptRopeArgs;

/* Token embedding (crates/qadapt/src/ops/embedding.rs):
 *   embedding_fwd_bf16: out[n, :] = table[ids[n], :] (bf16 copy, overwritten)
 *   embedding_bwd_bf16: for each distinct id v = uniq[u], dtable[v, :] += dout[n, :] for the
 *     tokens n = order[offsets[u] .. offsets[u+1]] in ascending n, one f32 add at a time
 *     (ACCUMULATED; the same adds in the same order as the CPU reference: bit-exact, no atomics).
 * The host checks every id < vocab and builds uniq/offsets/order (a stable counting sort). */
typedef struct QadaptEmbeddingArgs {
    uint64_t ids;     /* const uint32_t* [tokens] (forward) */
    uint64_t table;   /* const bf16* [vocab, dim] (forward) */
    uint64_t out;     /* bf16* [tokens, dim] (forward) */
    uint64_t dout;    /* const bf16* [tokens, dim] (backward) */
    uint64_t dtable;  /* float* [vocab, dim] (backward) */
    uint64_t uniq;    /* const uint32_t* [n_uniq] (backward) */
    uint64_t offsets; /* const uint32_t* [n_uniq + 1] (backward) */
    uint64_t order;   /* const uint32_t* [tokens] (backward) */
    uint64_t tokens;
    uint32_t vocab;
    uint32_t dim;
    uint32_t n_uniq;
    uint32_t flags;   /* QADAPT_MODEL_VEC: dim % 8 == 0, table and out 16-byte aligned */
} QadaptEmbeddingArgs;

/* Cross-entropy fused with the softmax, one row of `vocab` bf16 logits per CTA
 * (crates/qadapt/src/ops/cross_entropy.rs), f32 math, lse = max + log(sum exp(z - max)):
 *   loss[n]       = lse - z[n, t[n]] for t[n] >= 0, else 0             (f32, overwritten)
 *   dlogits[n, v] = bf16(exp(z - lse) g - [v == t[n]] g), g = grad_scale (= dloss / #targets),
 *                   0 for rows with t[n] < 0 (ignored)                   (overwritten; skipped if 0)
 *   top[n]        = 1 when t[n] >= 0 and z[n, t[n]] is the row's first maximum (no logit is
 *                   greater, none equal at a lower index: the target is the first argmax, what
 *                   greedy decoding picks), else 0                       (u32, overwritten; skipped if 0)
 * The host checks every target < vocab and takes the mean of loss over the rows with a target. */
typedef struct QadaptCrossEntropyArgs {
    uint64_t logits;  /* const bf16* [rows, vocab] */
    uint64_t targets; /* const int32_t* [rows], -1 = ignored */
    uint64_t loss;    /* float* [rows] */
    uint64_t dlogits; /* bf16* [rows, vocab] or 0 (forward only) */
    uint64_t rows;
    uint32_t vocab;
    float grad_scale;
    uint32_t flags;   /* QADAPT_MODEL_VEC: vocab % 8 == 0, logits and dlogits 16-byte aligned */
    uint32_t reserved;
    uint64_t top;     /* uint32_t* [rows] or 0 (no argmax test) */
} QadaptCrossEntropyArgs;

/* Causal grouped-query attention, one (batch, head) at a time, query head h reading kv head
 * h / (heads / kv_heads) (crates/qadapt/src/ops/attention.rs). Layout: q, out, dout, dq
 * [batch * seq, heads * head_dim] bf16; k, v, dk, dv [batch * seq, kv_heads * head_dim] bf16;
 * lse, delta [batch, heads, seq] f32. With S = scale * Q K^T masked to j <= i, P = softmax(S):
 *   attention_fwd_bf16:     out = bf16(P V), lse[i] = log sum_j exp(S[i, j])   (both overwritten;
 *                           lse is what the backward needs instead of the CPU's saved P)
 *   attention_bwd_dq_bf16:  P recomputed as exp(S - lse); dP = dO V^T;
 *                           delta[i] = sum_j P[i, j] dP[i, j]                     (f32, overwritten)
 *                           dq = bf16(scale * sum_j P (dP - delta) k_j)         (overwritten)
 *   attention_bwd_dkv_bf16: dk[j] = bf16(scale * sum_{h in group} sum_{i >= j} P (dP - delta) q_i),
 *                           dv[j] = bf16(sum_{h in group} sum_{i >= j} P[i, j] dO_i) (overwritten;
 *                           runs after attention_bwd_dq_bf16, whose delta it reads) */
#define QADAPT_ATTN_MAX_HEAD_DIM 256
/* Query (or key) rows per CTA: one warp each. */
#define QADAPT_ATTN_ROWS 8
/* Keys (or queries) per shared-memory tile: one lane each. */
#define QADAPT_ATTN_TILE 32
typedef struct QadaptAttentionArgs {
    uint64_t q;     /* const bf16* */
    uint64_t k;     /* const bf16* */
    uint64_t v;     /* const bf16* */
    uint64_t out;   /* bf16* (forward) */
    uint64_t lse;   /* float* [batch, heads, seq]: written by the forward, read by the backward */
    uint64_t dout;  /* const bf16* (backward) */
    uint64_t dq;    /* bf16* (backward) */
    uint64_t dk;    /* bf16* (backward) */
    uint64_t dv;    /* bf16* (backward) */
    uint64_t delta; /* float* [batch, heads, seq] (backward scratch) */
    uint32_t batch;
    uint32_t seq;
    uint32_t heads;
    uint32_t kv_heads;  /* divides heads */
    uint32_t head_dim;  /* even, <= QADAPT_ATTN_MAX_HEAD_DIM */
    float scale;        /* 1 / sqrt(head_dim) */
    /* const uint32_t* [batch * seq] or 0. Packed rows (several sequences one after another):
     * seg_start[b * seq + i] = s_i, where token i's sequence starts in row b; query i sees the
     * keys s_i <= j <= i only (S = -inf elsewhere, P = 0). The host checks s_0 = 0 and
     * s_i in {s_(i-1), i}, so s is non-decreasing along a row and a block's first query has its
     * smallest start. 0: every row is one sequence (s_i = 0). */
    uint64_t seg_start;
} QadaptAttentionArgs;

/* The tensor-core (FlashAttention-2 style) kernels of kernels/flash_attention.cu take the same
 * struct, layout and math, for head_dim 16, 32, 64 or 128 with every bf16 base 16-byte aligned
 * (the host falls back to the scalar kernels above otherwise):
 *   flash_attention_fwd_bf16:       out, lse as attention_fwd_bf16 (overwritten)
 *   flash_attention_bwd_delta_bf16: delta[i] = sum_d dout[i, d] * out[i, d]  (f32, overwritten;
 *                                   reads out, the forward's output, and dout)
 *   flash_attention_bwd_delta_recompute_bf16: delta[i] = sum_j P[i, j] dP[i, j] (f32,
 *                                   overwritten; reads q, k, v, lse, dout: for callers without out)
 *   flash_attention_bwd_dq_bf16:    dq as attention_bwd_dq_bf16 (overwritten; reads delta)
 *   flash_attention_bwd_dkv_bf16:   dk, dv as attention_bwd_dkv_bf16 (overwritten; reads delta)
 * The backward launches delta first, then dq and dkv. */
/* Threads per CTA of the flash kernels (4 warps; the delta kernel takes any multiple of 32). */
#define QADAPT_FLASH_THREADS 128
/* Rows per CTA of the flash kernels: queries (fwd, dq) or keys (dkv), 16 per warp. */
#define QADAPT_FLASH_BLOCK 64

/* A KV cache for incremental decoding (crates/qadapt/src/ops/attention.rs, `cached`): per layer,
 * kc and vc [batch, cap, kv_heads * head_dim] bf16 hold the RoPE'd keys and the values of every
 * position seen so far. One call carries N new tokens of any rows (a ragged block, token-major):
 * token t belongs to row row[t] at absolute position pos[t] (< cap; a row's tokens in order).
 *   kv_cache_write_bf16:    kc[row[t], pos[t]] = k[t], vc[row[t], pos[t]] = v[t]   (copies)
 *   attention_cached_bf16:  out[t, head h] = softmax_j(scale q[t,h] . kc[row[t], j, g]) vc[...],
 *                           j = 0 .. pos[t] (causal: the row's cache up to the token itself,
 *                           written by kv_cache_write_bf16 first), g = h / (heads / kv_heads);
 *                           f32 math, one warp per (token, head), keys in order with an online
 *                           softmax (bf16 out, overwritten). */
typedef struct QadaptKvCacheArgs {
    uint64_t q;        /* const bf16* [tokens, heads * head_dim] (attention) */
    uint64_t k;        /* const bf16* [tokens, kv_heads * head_dim] (write) */
    uint64_t v;        /* const bf16* [tokens, kv_heads * head_dim] (write) */
    uint64_t kc;       /* bf16* [batch, cap, kv_heads * head_dim] */
    uint64_t vc;       /* bf16* [batch, cap, kv_heads * head_dim] */
    uint64_t out;      /* bf16* [tokens, heads * head_dim] (attention) */
    uint64_t row;      /* const uint32_t* [tokens], < batch */
    uint64_t pos;      /* const uint32_t* [tokens], < cap */
    uint64_t tokens;
    uint32_t cap;
    uint32_t heads;
    uint32_t kv_heads; /* divides heads */
    uint32_t head_dim; /* <= QADAPT_ATTN_MAX_HEAD_DIM */
    float scale;       /* 1 / sqrt(head_dim) */
    uint32_t reserved;
} QadaptKvCacheArgs;

/* ---- Kernels ---------------------------------------------------------------------------------- */

/* QADAPT_KERNEL_BOUNDED(name, Args, threads, min_ctas) defines a kernel declared here with
 * __launch_bounds__: launched with at most `threads` threads a CTA, and compiled to fit at least
 * `min_ctas` CTAs per SM (ptxas caps the registers; the static report fails on any spill). */
#if defined(__CUDACC__)
#define QADAPT_KERNEL(name, Args) extern "C" __global__ void name(const Args args)
#define QADAPT_KERNEL_BOUNDED(name, Args, threads, min_ctas) \
    extern "C" __global__ void __launch_bounds__(threads, min_ctas) name(const Args args)
/* An sm_90a kernel whose argument struct holds TMA tensor maps: they must stay in param space
 * (__grid_constant__: the kernel takes their address without a local copy). One CTA per SM. */
#define QADAPT_KERNEL_SM90A(name, Args) \
    extern "C" __global__ void __launch_bounds__(QADAPT_SM90_THREADS, 1) name(const __grid_constant__ Args args)
#elif defined(QADAPT_EMU) && defined(__cplusplus)
/* Host C++ for the kernel emulator (kernels/emu/cuda_emu.h): an extern "C" function that is also
 * registered under its name for the virtual device (kernels/emu/vgpu_abi.h). */
#include "cuda_emu.h"
#define QADAPT_KERNEL(name, Args) QV_KERNEL(name, Args)
#define QADAPT_KERNEL_BOUNDED(name, Args, threads, min_ctas) QV_KERNEL(name, Args)
#define QADAPT_KERNEL_SM90A(name, Args) QV_KERNEL(name, Args)
#else
/* Seen by bindgen only as documentation; the Rust side never calls these symbols directly. */
#define QADAPT_KERNEL(name, Args) void name(const Args args)
#define QADAPT_KERNEL_SM90A(name, Args) void name(const Args args)
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

/* kernels/lora_fwd.cu */
QADAPT_KERNEL(lora_xa_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_dense_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_nf4_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_wide_dense_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemv_wide_nf4_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemm_dense_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_gemm_nf4_bf16, QadaptLoraFwdArgs);
QADAPT_KERNEL(lora_split_reduce_bf16, QadaptLoraFwdArgs);

/* kernels/lora_sm90.cu */
QADAPT_KERNEL_SM90A(lora_gemm_nf4_sm90_bn128_bf16, QadaptLoraSm90Args);
QADAPT_KERNEL_SM90A(lora_gemm_nf4_sm90_bn256_bf16, QadaptLoraSm90Args);
QADAPT_KERNEL_SM90A(lora_gemm_bwd_dx_nf4_sm90_bn128_bf16, QadaptLoraBwdSm90Args);
QADAPT_KERNEL_SM90A(lora_gemm_bwd_dx_nf4_sm90_bn256_bf16, QadaptLoraBwdSm90Args);

/* kernels/lora_bwd.cu */
QADAPT_KERNEL(lora_gemm_bwd_dx_dense_bf16, QadaptLoraBwdArgs);
QADAPT_KERNEL(lora_gemm_bwd_dx_nf4_bf16, QadaptLoraBwdArgs);
QADAPT_KERNEL(lora_split_reduce_dx_bf16, QadaptLoraBwdArgs);

/* kernels/lora_rank.cu */
QADAPT_KERNEL(lora_rank_xa_bf16, QadaptLoraRankArgs);
QADAPT_KERNEL(lora_rank_dyb_bf16, QadaptLoraRankArgs);
QADAPT_KERNEL(lora_rank_da_bf16, QadaptLoraRankArgs);
QADAPT_KERNEL(lora_rank_db_bf16, QadaptLoraRankArgs);
QADAPT_KERNEL(lora_rank_reduce_bf16, QadaptLoraRankArgs);

/* kernels/optim.cu */
QADAPT_KERNEL(adamw_f32, QadaptAdamwArgs);
QADAPT_KERNEL(sum_squares_f32, QadaptSumSquaresArgs);

/* kernels/rmsnorm.cu */
QADAPT_KERNEL(rmsnorm_fwd_bf16, QadaptRmsNormArgs);
QADAPT_KERNEL(rmsnorm_bwd_dx_bf16, QadaptRmsNormArgs);
QADAPT_KERNEL(rmsnorm_bwd_dw_bf16, QadaptRmsNormArgs);
QADAPT_KERNEL(rmsnorm_bwd_dw_reduce, QadaptRmsNormArgs);

/* kernels/swiglu.cu */
QADAPT_KERNEL(swiglu_fwd_bf16, QadaptSwigluArgs);
QADAPT_KERNEL(swiglu_bwd_bf16, QadaptSwigluArgs);

/* kernels/dropout.cu */
QADAPT_KERNEL(mask_mix_bf16, QadaptMaskMixArgs);

/* kernels/rope.cu */
QADAPT_KERNEL(rope_bf16, QadaptRopeArgs);

/* kernels/embedding.cu */
QADAPT_KERNEL(embedding_fwd_bf16, QadaptEmbeddingArgs);
QADAPT_KERNEL(embedding_bwd_bf16, QadaptEmbeddingArgs);

/* kernels/cross_entropy.cu */
QADAPT_KERNEL(cross_entropy_bf16, QadaptCrossEntropyArgs);

/* kernels/attention.cu */
QADAPT_KERNEL(attention_fwd_bf16, QadaptAttentionArgs);
QADAPT_KERNEL(attention_bwd_dq_bf16, QadaptAttentionArgs);
QADAPT_KERNEL(attention_bwd_dkv_bf16, QadaptAttentionArgs);

/* kernels/flash_attention.cu */
QADAPT_KERNEL(flash_attention_fwd_bf16, QadaptAttentionArgs);
QADAPT_KERNEL(flash_attention_bwd_delta_bf16, QadaptAttentionArgs);
QADAPT_KERNEL(flash_attention_bwd_delta_recompute_bf16, QadaptAttentionArgs);
QADAPT_KERNEL(flash_attention_bwd_dq_bf16, QadaptAttentionArgs);
QADAPT_KERNEL(flash_attention_bwd_dkv_bf16, QadaptAttentionArgs);

/* kernels/kv_cache.cu */
QADAPT_KERNEL(kv_cache_write_bf16, QadaptKvCacheArgs);
QADAPT_KERNEL(attention_cached_bf16, QadaptKvCacheArgs);

#endif /* QADAPT_H */

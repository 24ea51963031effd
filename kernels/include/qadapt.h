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
/* The offset (mean of all absmax) is summed in f64 in chunks of this many absmax values: in each
 * chunk, thread t of QADAPT_DQ_SUM_THREADS sums elements t, t+THREADS, ... sequentially, then the
 * per-thread partials are added by a halving tree (p[t] += p[t+s], s = THREADS/2 .. 1). Chunk sums
 * are then added sequentially in chunk order. The CPU reference follows the same order, which is
 * what makes the CPU and CUDA offsets bit-identical. */
#define QADAPT_DQ_SUM_CHUNK 2048
#define QADAPT_DQ_SUM_THREADS 256

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
 * Stage 1 (nf4_dq_partial_sums): partial[c] = f64 sum of chunk c (order: see QADAPT_DQ_SUM_CHUNK).
 * Stage 2 (nf4_dq_offset): offset[0] = (float)(sum of partials, in order) / (float)nblocks.
 * Stage 3 (nf4_dq_encode): for each block of QADAPT_DQ_BLOCK values v = absmax - offset (f32),
 *   nested_absmax[b] = max |v|, codes[i] = nearest entry of the signed dynamic map to
 *   v / nested_absmax[b] (f32 division), ties to the lower index; an all-zero block gets
 *   QADAPT_DQ_CODE_ZERO. All outputs are overwritten. */
typedef struct QadaptNf4DoubleQuantArgs {
    uint64_t absmax;        /* const float* [nblocks] */
    uint64_t partial;       /* double*      [ceil(nblocks / QADAPT_DQ_SUM_CHUNK)] (scratch) */
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
QADAPT_KERNEL(nf4_dq_partial_sums, QadaptNf4DoubleQuantArgs);
QADAPT_KERNEL(nf4_dq_offset, QadaptNf4DoubleQuantArgs);
QADAPT_KERNEL(nf4_dq_encode, QadaptNf4DoubleQuantArgs);
QADAPT_KERNEL(nf4_dequantize_f32, QadaptNf4DequantizeArgs);
QADAPT_KERNEL(nf4_dequantize_bf16, QadaptNf4DequantizeArgs);
QADAPT_KERNEL(nf4_dequantize_f16, QadaptNf4DequantizeArgs);

#endif /* QADAPT_H */

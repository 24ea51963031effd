/*
 * vgpu_tmap.h — the virtual device's encoding of a TMA tensor map (CUtensorMap / QadaptTensorMap:
 * 128 opaque bytes, 64-byte aligned). The ONE definition shared by both sides:
 *   - written by the virtual driver's cuTensorMapEncodeTiled (crates/qadapt-vgpu/src/driver.rs,
 *     `tensor_map` module there mirrors this struct field for field; a test checks the layout),
 *   - read by the emulated cp.async.bulk.tensor (kernels/emu/vgpu_runtime.cpp, tma_load_2d),
 *   - written by the selftest through qv_tensor_map_encode (same validation as the driver).
 * The real driver's encoding is opaque and differs; programs must not look inside.
 *
 * Layout (little-endian, the first 80 of the 128 bytes; the rest zero):
 *   0  magic        QV_TMAP_MAGIC ("QVTMAP01"): a map not encoded by the driver -> QV_PTX_ERROR
 *   8  global_addr  the tensor's base address (16-byte aligned)
 *   16 rank         number of dimensions (the emulated TMA supports 2)
 *   20 elem_size    bytes per element (1, 2, 4 or 8)
 *   24 dtype        CUtensorMapDataType
 *   28 swizzle      CUtensorMapSwizzle: 0 none, 1 32B, 2 64B, 3 128B (the emulated TMA: rows of exactly the span)
 *   32 dims[2]      elements per dimension, innermost first
 *   48 stride1      bytes between consecutive indices of dimension 1 (globalStrides[0])
 *   56 box[2]       box size per dimension, elements
 *   64 oob_fill     CUtensorMapFloatOOBfill: 0 zeros, 1 NaN (all-ones bytes here)
 *   68 interleave   CUtensorMapInterleave (0 only)
 *   72 l2_promotion CUtensorMapL2promotion (recorded, no effect)
 *   76 reserved     0
 */
#pragma once
#include <stdint.h>

#define QV_TMAP_MAGIC 0x31304d4154565140ull /* bytes "@QVTAM01" */

typedef struct {
    uint64_t magic;
    uint64_t global_addr;
    uint32_t rank;
    uint32_t elem_size;
    uint32_t dtype;
    uint32_t swizzle;
    uint64_t dims[2];
    uint64_t stride1;
    uint32_t box[2];
    uint32_t oob_fill;
    uint32_t interleave;
    uint32_t l2_promotion;
    uint32_t reserved;
} QvTensorMap;

#ifdef __cplusplus
static_assert(sizeof(QvTensorMap) == 80, "QvTensorMap layout (mirrored in crates/qadapt-vgpu/src/driver.rs)");
extern "C" {
#endif

/* cuTensorMapEncodeTiled's checks and encoding, for host programs that have no driver (the
 * selftest): returns 0 (CUDA_SUCCESS) and writes the 128 bytes at `out`, or 1
 * (CUDA_ERROR_INVALID_VALUE) and leaves them. Same rules as the driver (driver.rs). */
int32_t qv_tensor_map_encode(void* out, uint32_t dtype, uint32_t rank, const void* global_addr, const uint64_t* dims,
                             const uint64_t* strides, const uint32_t* box, const uint32_t* elem_strides,
                             uint32_t interleave, uint32_t swizzle, uint32_t l2_promotion, uint32_t oob_fill);

#ifdef __cplusplus
}
#endif

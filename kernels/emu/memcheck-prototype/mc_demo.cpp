/* mc_demo.cpp — PROTOTYPE checks of vgpu_memcheck.inc on kernels with known access patterns. */
#include "qadapt.h"
#include "qadapt_mma.cuh"
#include "vgpu_abi.h"
#include <cstdlib>
#include <vector>
extern "C" void qv_mem_register(const void* p, size_t n);
extern "C" void qv_mem_unregister(const void* p);

struct DA { uint64_t out, in; int32_t mode, off; };

QADAPT_KERNEL(mc_global, DA) {
    const unsigned t = threadIdx.x;
    const float* in = reinterpret_cast<const float*>(args.in);
    float* out = reinterpret_cast<float*>(args.out);
    switch (args.mode) {
        case 0: out[t] = in[t]; break;                      /* 4 sectors ld, 4 st */
        case 1: out[t] = in[t * 32]; break;                 /* 32 sectors ld */
        case 2: out[t] = in[0]; break;                      /* 1 sector (broadcast) */
        case 3: reinterpret_cast<uint4*>(args.out)[t] = reinterpret_cast<const uint4*>(args.in)[t]; break; /* 16 + 16 */
        case 4: out[t] = in[t + 1]; break;                  /* unaligned warp: 5 sectors */
        case 5: /* misaligned 16-byte load */
            { const uint4 v = *reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(args.in) + args.off);
              out[t] = (float)(v.x + v.y + v.z + v.w); } break;
        case 6: /* misaligned 8-byte store */
            *reinterpret_cast<uint2*>(reinterpret_cast<char*>(args.out) + args.off) = make_uint2(t, 2); break;
        case 8: /* misaligned 8-byte store, brace-initialized (GCC splits it into two 4-byte stores) */
            *reinterpret_cast<uint2*>(reinterpret_cast<char*>(args.out) + args.off) = uint2{1, 2}; break;
        case 7: out[t] = in[t + args.off]; break;           /* bounds */
    }
}

QADAPT_KERNEL(mc_shared, DA) {
    __shared__ __align__(16) float tile[32 * 33 * 4];
    const unsigned t = threadIdx.x;
    float* out = reinterpret_cast<float*>(args.out);
    float v = 0;
    switch (args.mode) {
        case 0: tile[t] = t; v = tile[t ^ 1]; break;        /* 1 + 1 wavefronts */
        case 1: tile[2 * t] = t; break;                     /* 2-way: 2 */
        case 2: tile[32 * t] = t; break;                    /* 32-way: 32 */
        case 3: tile[33 * t] = t; break;                    /* padded: 1 */
        case 4: tile[0] = 1; __syncwarp(); v = tile[0]; break;  /* broadcast read: 1 (store: same word, 1) */
        case 5: reinterpret_cast<float4*>(tile)[t] = float4{1, 2, 3, 4}; break; /* 4 phases: 4 */
        case 6: reinterpret_cast<float4*>(tile)[2 * t] = float4{1, 2, 3, 4}; break; /* 8 */
        case 7: reinterpret_cast<float2*>(tile)[t] = float2{1, 2}; break; /* 2 */
        case 8: { float* d = qadapt::dynamic_smem<float>(); d[t * 4] = 1; break; } /* dynamic: 4-way */
    }
    out[t] = v;
}

static void show(const char* what, const char* k, int mode, int off, void* out, void* in, uint32_t dyn = 0) {
    DA a{(uint64_t)(uintptr_t)out, (uint64_t)(uintptr_t)in, mode, off};
    QvCounters c{};
    QvStatus s{};
    int rc = qv_launch(k, &a, sizeof a, QvDim3{1, 1, 1}, QvDim3{32, 1, 1}, dyn, &c, &s);
    printf("%-44s rc=%d  gld %llu B/%llu req/%llu sec  gst %llu B/%llu req/%llu sec  sh ld %llu st %llu B %llu req %llu wf (ideal %llu)%s%s\n",
           what, rc, (unsigned long long)c.global_ld_bytes, (unsigned long long)c.global_ld_requests,
           (unsigned long long)c.global_ld_sectors, (unsigned long long)c.global_st_bytes,
           (unsigned long long)c.global_st_requests, (unsigned long long)c.global_st_sectors,
           (unsigned long long)c.shared_ld_bytes, (unsigned long long)c.shared_st_bytes,
           (unsigned long long)c.shared_requests, (unsigned long long)c.shared_wavefronts,
           (unsigned long long)c.shared_ideal_wavefronts, rc ? "\n      " : "", rc ? s.message : "");
}

int main() {
    qv_set_workers(1);
    float* in = (float*)aligned_alloc(128, 32 * 32 * 4 * 4);
    float* out = (float*)aligned_alloc(128, 32 * 16 * 4);
    for (int i = 0; i < 32 * 32 * 4; ++i) in[i] = (float)i;
    show("global: out[t] = in[t]", "mc_global", 0, 0, out, in);
    show("global: out[t] = in[32 t]", "mc_global", 1, 0, out, in);
    show("global: out[t] = in[0]", "mc_global", 2, 0, out, in);
    show("global: uint4 copy", "mc_global", 3, 0, out, in);
    show("global: out[t] = in[t + 1]", "mc_global", 4, 0, out, in);
    show("global: uint4 load at in + 4 bytes", "mc_global", 5, 4, out, in);
    show("global: uint2 store at out + 4 bytes", "mc_global", 6, 4, out, in);
    show("global: uint2{1,2} store at out + 4 bytes", "mc_global", 8, 4, out, in);
    show("shared: tile[t], tile[t^1]", "mc_shared", 0, 0, out, in);
    show("shared: tile[2t]", "mc_shared", 1, 0, out, in);
    show("shared: tile[32t]", "mc_shared", 2, 0, out, in);
    show("shared: tile[33t]", "mc_shared", 3, 0, out, in);
    show("shared: tile[0] store+load (broadcast)", "mc_shared", 4, 0, out, in);
    show("shared: float4 tile[t]", "mc_shared", 5, 0, out, in);
    show("shared: float4 tile[2t]", "mc_shared", 6, 0, out, in);
    show("shared: float2 tile[t]", "mc_shared", 7, 0, out, in);
    show("dyn shared: d[4t]", "mc_shared", 8, 0, out, in, 1024);
    /* bounds: a 32-float input allocation (malloc slack after it), registered */
    float* small = (float*)malloc(31 * 4 + 16);
    for (int i = 0; i < 31; ++i) small[i] = i;
    qv_mem_register(small, 31 * 4);
    qv_mem_register(out, 32 * 16 * 4);
    show("bounds: in[t] of a 31-float allocation", "mc_global", 7, 0, out, small);
    show("bounds: in[t - 1] ... in[30]", "mc_global", 7, -1, out, small);
    qv_mem_unregister(small);
    qv_mem_unregister(out);
    show("bounds: nothing registered -> unchecked", "mc_global", 7, 0, out, small);
    return 0;
}

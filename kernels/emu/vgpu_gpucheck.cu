/*
 * vgpu_gpucheck.cu — checks the emulated warp-level instructions against a real GPU. The same
 * kernels (ldmatrix x1/x2/x4 with and without .trans on random rows, mma m16n8k16 bf16/f16 on
 * random fragments of three value distributions, cp.async with src-size zero fill, shuffles of
 * every mode and width, ballot) are compiled twice:
 *   - by nvcc: run on the GPU, the program writes its inputs and the GPU's outputs to a file;
 *   - as emulated C++: the program reads that file, reruns the kernels through qv_launch and
 *     compares: ldmatrix, cp.async and shuffles must agree bit for bit; for mma it prints how many
 *     results are bit-identical and how far the others are (the tensor cores' internal rounding
 *     is not the emulator's documented f32 order), failing only beyond 1e-6 of the sum of |terms|.
 * About 10 s of GPU time (kernels/emu/README.md has the commands):
 *   nvcc -O2 -std=c++17 -arch=sm_90 -Ikernels/include kernels/emu/vgpu_gpucheck.cu -o gpucheck_gpu
 *   ./gpucheck_gpu gc.bin                         # on the GPU machine
 *   F="-std=c++20 -O2 -ffp-contract=off -DQADAPT_EMU -pthread -Ikernels/emu -Ikernels/include"
 *   c++ -x c++ $F -DQV_NO_KERNEL_ANCHORS kernels/emu/vgpu_gpucheck.cu kernels/emu/vgpu_runtime.cpp -o gpucheck_emu
 *   ./gpucheck_emu gc.bin                         # anywhere
 */
#include "qadapt.h"
#ifdef QADAPT_EMU
#include "qadapt_mma.cuh" /* the emulated one, next to this file */
#else
#include "../include/qadapt_mma.cuh"
#endif
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <cmath>
#include <random>
#include <vector>
#include <string>
#include <map>
#ifdef QADAPT_EMU
#include "vgpu_abi.h"
#else
#include <cuda_runtime.h>
#endif

struct LdmArgs { uint64_t perm, data, out; int32_t variant, pad; };
QADAPT_KERNEL(gc_ldmatrix, LdmArgs) {
    __shared__ __align__(16) uint16_t tile[64 * 8];
    const uint16_t* data = reinterpret_cast<const uint16_t*>(args.data) + blockIdx.x * 512;
    for (unsigned i = threadIdx.x; i < 512; i += 32) tile[i] = data[i];
    __syncthreads();
    const unsigned lane = threadIdx.x;
    const int32_t* perm = reinterpret_cast<const int32_t*>(args.perm) + blockIdx.x * 32;
    const uint16_t* p = tile + perm[lane] * 8;
    uint32_t r[4] = {0, 0, 0, 0};
    uint32_t q1[1], q2[2];
    switch (args.variant) {
        case 0: qadapt::ldmatrix_x1(q1, p); r[0] = q1[0]; break;
        case 1: qadapt::ldmatrix_x1_t(q1, p); r[0] = q1[0]; break;
        case 2: qadapt::ldmatrix_x2(q2, p); r[0] = q2[0]; r[1] = q2[1]; break;
        case 3: qadapt::ldmatrix_x2_t(q2, p); r[0] = q2[0]; r[1] = q2[1]; break;
        case 4: qadapt::ldmatrix_x4(r, p); break;
        default: qadapt::ldmatrix_x4_t(r, p); break;
    }
    uint32_t* o = reinterpret_cast<uint32_t*>(args.out) + (blockIdx.x * 32 + lane) * 4;
    for (int i = 0; i < 4; ++i) o[i] = r[i];
}

struct MmaArgs { uint64_t a, b, c, d; int32_t type, separate; };
QADAPT_KERNEL(gc_mma, MmaArgs) {
    const uint16_t* A = reinterpret_cast<const uint16_t*>(args.a) + blockIdx.x * 256;
    const uint16_t* B = reinterpret_cast<const uint16_t*>(args.b) + blockIdx.x * 128;
    const float* C = reinterpret_cast<const float*>(args.c) + blockIdx.x * 128;
    float* D = reinterpret_cast<float*>(args.d) + blockIdx.x * 128;
    const unsigned lane = threadIdx.x & 31u, g = lane >> 2, t = lane & 3u;
    auto pack = [](uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); };
    const uint32_t a[4] = {pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                           pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                           pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                           pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
    const uint32_t b0 = pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
    const uint32_t b1 = pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
    const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    float d[4] = {c[0], c[1], c[2], c[3]};
    if (args.separate) {
        if (args.type) qadapt::mma_f16(d, a, b0, b1, c); else qadapt::mma_bf16(d, a, b0, b1, c);
    } else {
        if (args.type) qadapt::mma_f16(d, a, b0, b1); else qadapt::mma_bf16(d, a, b0, b1);
    }
    D[g * 8 + 2 * t] = d[0]; D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2]; D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

struct CpArgs { uint64_t src, out; };
QADAPT_KERNEL(gc_cp, CpArgs) {
    __shared__ __align__(16) uint32_t s[32][16];
    const uint32_t* src = reinterpret_cast<const uint32_t*>(args.src) + blockIdx.x * 512;
    const unsigned t = threadIdx.x;
    for (int i = 0; i < 16; ++i) s[t][i] = 0xabababab;
    __syncwarp();
    qadapt::cp_async_ca<4>(&s[t][0], src + 16 * t, t % 5);
    qadapt::cp_async_ca<4>(&s[t][1], src + 16 * t + 1);
    qadapt::cp_async_ca<8>(&s[t][2], src + 16 * t + 2, t % 9);
    qadapt::cp_async16(&s[t][4], src + 16 * t + 4, t % 17);
    qadapt::cp_async_ca<16>(&s[t][8], src + 16 * t + 8, (t * 7) % 17);
    qadapt::cp_async_commit();
    qadapt::cp_async16(&s[t][12], src + 16 * t + 12);
    qadapt::cp_async_wait_all();
    uint32_t* o = reinterpret_cast<uint32_t*>(args.out) + (blockIdx.x * 32 + t) * 16;
    for (int i = 0; i < 16; ++i) o[i] = s[t][i];
}

struct ShflArgs { uint64_t in, out; };
QADAPT_KERNEL(gc_shfl, ShflArgs) {
    const unsigned t = threadIdx.x;
    const float v = reinterpret_cast<const float*>(args.in)[t];
    float* o = reinterpret_cast<float*>(args.out) + t * 64;
    int k = 0;
    const unsigned F = 0xffffffffu;
    for (int w : {32, 16, 8, 4}) {
        for (int p : {0, 1, 3, 5, 13, 31, 37}) {
            o[k++] = __shfl_sync(F, v, p, w);
            o[k++] = __shfl_up_sync(F, v, p, w);
            o[k++] = __shfl_down_sync(F, v, p, w);
            o[k++] = __shfl_xor_sync(F, v, p, w);
        }
    }
    o[k++] = (float)__ballot_sync(F, v > 0.0f);
    while (k < 64) o[k++] = 0.0f;
}

// ---- blob file ----
struct Blobs {
    std::map<std::string, std::vector<char>> m;
    void put(const std::string& k, const void* p, size_t n) { m[k].assign((const char*)p, (const char*)p + n); }
    template <class T> std::vector<T> get(const std::string& k) {
        auto& v = m.at(k); std::vector<T> r(v.size() / sizeof(T)); memcpy(r.data(), v.data(), v.size()); return r; }
    void save(const char* path) { FILE* f = fopen(path, "wb"); for (auto& kv : m) { uint32_t l = kv.first.size(); uint64_t n = kv.second.size();
        fwrite(&l, 4, 1, f); fwrite(kv.first.data(), 1, l, f); fwrite(&n, 8, 1, f); fwrite(kv.second.data(), 1, n, f); } fclose(f); }
    void load(const char* path) { FILE* f = fopen(path, "rb"); uint32_t l; while (fread(&l, 4, 1, f) == 1) { std::string k(l, 0);
        fread(&k[0], 1, l, f); uint64_t n; fread(&n, 8, 1, f); std::vector<char> v(n); fread(v.data(), 1, n, f); m[k] = v; } fclose(f); }
};

constexpr int LDM_BLOCKS = 256, MMA_BLOCKS = 512, CP_BLOCKS = 16;

#ifndef QADAPT_EMU
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)
template <class T> T* dev(const std::vector<T>& h) { T* p; CK(cudaMalloc(&p, h.size() * sizeof(T) + 16)); CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); return p; }
template <class T> std::vector<T> back(const T* p, size_t n) { std::vector<T> h(n); CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost)); return h; }
uint16_t to16(float v, int type, std::mt19937& r) {
    (void)r;
    if (type) { __half h = __float2half_rn(v); uint16_t u; memcpy(&u, &h, 2); return u; }
    __nv_bfloat16 b = __float2bfloat16_rn(v); uint16_t u; memcpy(&u, &b, 2); return u;
}
int main(int argc, char** argv) {
    Blobs B;
    std::mt19937 rng(12345);
    // ldmatrix
    std::vector<uint16_t> ldata(LDM_BLOCKS * 512);
    for (auto& x : ldata) x = (uint16_t)rng();
    std::vector<int32_t> perm(LDM_BLOCKS * 32);
    for (auto& x : perm) x = rng() % 64;
    B.put("ldm.data", ldata.data(), ldata.size() * 2); B.put("ldm.perm", perm.data(), perm.size() * 4);
    uint16_t* d_ld = dev(ldata); int32_t* d_perm = dev(perm); uint32_t* d_lout; CK(cudaMalloc(&d_lout, LDM_BLOCKS * 128 * 4));
    for (int v = 0; v < 6; ++v) {
        LdmArgs a{(uint64_t)d_perm, (uint64_t)d_ld, (uint64_t)d_lout, v, 0};
        gc_ldmatrix<<<LDM_BLOCKS, 32>>>(a); CK(cudaDeviceSynchronize());
        auto o = back(d_lout, LDM_BLOCKS * 128); B.put("ldm.out" + std::to_string(v), o.data(), o.size() * 4);
    }
    // mma
    for (int type = 0; type < 2; ++type) for (int dist = 0; dist < 3; ++dist) {
        std::vector<uint16_t> A(MMA_BLOCKS * 256), Bm(MMA_BLOCKS * 128); std::vector<float> C(MMA_BLOCKS * 128);
        std::normal_distribution<float> nd(0, 1); std::uniform_real_distribution<float> ud(-1, 1);
        auto val = [&](bool f16) -> float {
            if (dist == 0) return ud(rng);
            if (dist == 1) return nd(rng) * std::ldexp(1.0f, (int)(rng() % (f16 ? 12 : 40)) - (f16 ? 6 : 20));
            return (rng() % 4 == 0) ? 0.0f : nd(rng) * std::ldexp(1.0f, (int)(rng() % 8));
        };
        for (auto& x : A) x = to16(val(type), type, rng);
        for (auto& x : Bm) x = to16(val(type), type, rng);
        for (auto& x : C) x = dist == 1 ? nd(rng) * std::ldexp(1.0f, (int)(rng() % 40) - 20) : ud(rng) * 4;
        std::string k = "mma" + std::to_string(type) + std::to_string(dist);
        B.put(k + ".a", A.data(), A.size() * 2); B.put(k + ".b", Bm.data(), Bm.size() * 2); B.put(k + ".c", C.data(), C.size() * 4);
        uint16_t* dA = dev(A); uint16_t* dB = dev(Bm); float* dC = dev(C); float* dD; CK(cudaMalloc(&dD, C.size() * 4));
        for (int sep = 0; sep < 2; ++sep) {
            MmaArgs a{(uint64_t)dA, (uint64_t)dB, (uint64_t)dC, (uint64_t)dD, type, sep};
            gc_mma<<<MMA_BLOCKS, 32>>>(a); CK(cudaDeviceSynchronize());
            auto o = back(dD, C.size()); B.put(k + ".d" + std::to_string(sep), o.data(), o.size() * 4);
        }
    }
    // cp.async
    std::vector<uint32_t> src(CP_BLOCKS * 512); for (auto& x : src) x = rng();
    B.put("cp.src", src.data(), src.size() * 4);
    uint32_t* dsrc = dev(src); uint32_t* dcp; CK(cudaMalloc(&dcp, CP_BLOCKS * 512 * 4));
    { CpArgs a{(uint64_t)dsrc, (uint64_t)dcp}; gc_cp<<<CP_BLOCKS, 32>>>(a); CK(cudaDeviceSynchronize());
      auto o = back(dcp, CP_BLOCKS * 512); B.put("cp.out", o.data(), o.size() * 4); }
    // shuffles
    std::vector<float> sin(32); for (int i = 0; i < 32; ++i) sin[i] = (float)(i * 3 + 1);
    B.put("shfl.in", sin.data(), 128);
    float* dsin = dev(sin); float* dso; CK(cudaMalloc(&dso, 32 * 64 * 4));
    { ShflArgs a{(uint64_t)dsin, (uint64_t)dso}; gc_shfl<<<1, 32>>>(a); CK(cudaDeviceSynchronize());
      auto o = back(dso, 32 * 64); B.put("shfl.out", o.data(), o.size() * 4); }
    B.save(argv[1]);
    printf("gpucheck: wrote %s\n", argv[1]);
    return 0;
}
#else
template <class A> void L(const char* n, const A& a, unsigned g, unsigned b) {
    QvStatus st{}; if (qv_launch(n, &a, sizeof a, QvDim3{g, 1, 1}, QvDim3{b, 1, 1}, 0, nullptr, &st)) { printf("%s\n", st.message); exit(1); } }
int main(int argc, char** argv) {
    Blobs B; B.load(argv[1]); int bad_total = 0;
    auto ld = B.get<uint16_t>("ldm.data"); auto perm = B.get<int32_t>("ldm.perm");
    std::vector<uint32_t> lo(LDM_BLOCKS * 128);
    const char* vn[] = {"x1", "x1.trans", "x2", "x2.trans", "x4", "x4.trans"};
    const int nreg[] = {1, 1, 2, 2, 4, 4};
    for (int v = 0; v < 6; ++v) {
        LdmArgs a{(uint64_t)perm.data(), (uint64_t)ld.data(), (uint64_t)lo.data(), v, 0};
        L("gc_ldmatrix", a, LDM_BLOCKS, 32);
        auto g = B.get<uint32_t>("ldm.out" + std::to_string(v)); size_t bad = 0;
        for (size_t i = 0; i < g.size(); ++i) if ((int)(i % 4) < nreg[v]) bad += g[i] != lo[i];
        printf("ldmatrix.%-9s: %zu of %d registers differ from the GPU\n", vn[v], bad, LDM_BLOCKS * 32 * nreg[v]); bad_total += bad != 0;
    }
    for (int type = 0; type < 2; ++type) for (int dist = 0; dist < 3; ++dist) {
        std::string k = "mma" + std::to_string(type) + std::to_string(dist);
        auto A = B.get<uint16_t>(k + ".a"); auto Bm = B.get<uint16_t>(k + ".b"); auto C = B.get<float>(k + ".c");
        std::vector<float> D(C.size());
        for (int sep = 0; sep < 2; ++sep) {
            MmaArgs a{(uint64_t)A.data(), (uint64_t)Bm.data(), (uint64_t)C.data(), (uint64_t)D.data(), type, sep};
            L("gc_mma", a, MMA_BLOCKS, 32);
            auto G = B.get<float>(k + ".d" + std::to_string(sep));
            size_t exact = 0, n = G.size(); double max_rel = 0, max_ulp = 0; size_t nanmis = 0;
            for (size_t i = 0; i < n; ++i) {
                uint32_t gb, eb; memcpy(&gb, &G[i], 4); memcpy(&eb, &D[i], 4);
                if (gb == eb) { ++exact; continue; }
                if (std::isnan(G[i]) || std::isnan(D[i])) { ++nanmis; continue; }
                double ulp = std::fabs((double)G[i] - D[i]) / std::ldexp(1.0, std::ilogb(std::max(std::fabs(G[i]), 1e-38f)) - 23);
                max_ulp = std::max(max_ulp, ulp);
                // relative to the sum of |terms| (the rounding scale)
                size_t blk = i / 128, e = i % 128; int r = e / 8, c = e % 8; double mag = std::fabs(C[i]);
                auto cv = [&](uint16_t u) { if (type) { __half h; memcpy(&h, &u, 2); return __half2float(h); } __nv_bfloat16 b; memcpy(&b, &u, 2); return __bfloat162float(b); };
                for (int kk = 0; kk < 16; ++kk) mag += std::fabs((double)cv(A[blk * 256 + r * 16 + kk]) * cv(Bm[blk * 128 + kk * 8 + c]));
                max_rel = std::max(max_rel, std::fabs((double)G[i] - D[i]) / mag);
            }
            printf("mma %s dist%d %s: %zu of %zu bit-identical to the GPU, max %.1f ulp apart, max |diff|/sum|terms| = %.2e, NaN mismatches %zu\n",
                   type ? "f16 " : "bf16", dist, sep ? "c separate" : "c = d     ", exact, n, max_ulp, max_rel, nanmis);
            bad_total += max_rel > 1e-6 || nanmis;
        }
    }
    auto src = B.get<uint32_t>("cp.src"); std::vector<uint32_t> co(CP_BLOCKS * 512);
    { CpArgs a{(uint64_t)src.data(), (uint64_t)co.data()}; L("gc_cp", a, CP_BLOCKS, 32); }
    { auto g = B.get<uint32_t>("cp.out"); size_t bad = 0; for (size_t i = 0; i < g.size(); ++i) bad += g[i] != co[i];
      printf("cp.async forms with src-size: %zu of %zu words differ from the GPU\n", bad, g.size()); bad_total += bad != 0; }
    auto sin = B.get<float>("shfl.in"); std::vector<float> so(32 * 64);
    { ShflArgs a{(uint64_t)sin.data(), (uint64_t)so.data()}; L("gc_shfl", a, 1, 32); }
    { auto g = B.get<float>("shfl.out"); size_t bad = 0; for (size_t i = 0; i < g.size(); ++i) bad += memcmp(&g[i], &so[i], 4) != 0;
      printf("shuffles (idx/up/down/xor, widths 32..4, lane operands up to 37), ballot: %zu of %zu values differ\n", bad, g.size()); bad_total += bad != 0; }
    printf("gpucheck: %s\n", bad_total ? "DIFFERENCES" : "all semantics agree (mma within rounding)");
    return bad_total != 0;
}
#endif

/*
 * cuda_emu_runtime.h — the runner half of cuda_emu.h: thread indices, barriers and shuffles, and
 * `emu::launch(kernel, args, grid, block)`, which runs the grid one CTA at a time on blockDim
 * host threads. Include once, in the file that holds main().
 */
#pragma once
#include "cuda_emu.h"

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace emu {
constexpr int kMaxWarps = 32;
inline float lanes[kMaxWarps][32];
inline std::unique_ptr<std::barrier<>> warp_bar[kMaxWarps];
inline std::unique_ptr<std::barrier<>> cta_bar;

inline float shuffle(float v, unsigned src) {
    const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
    lanes[w][l] = v;
    warp_bar[w]->arrive_and_wait();
    const float r = lanes[w][src % 32];
    warp_bar[w]->arrive_and_wait();
    return r;
}

/* Runs kernel(args) over `grid` CTAs of `block` threads (a multiple of 32, at most 1024). */
template <class A>
void launch(void (*kernel)(const A), const A& args, unsigned grid, unsigned block) {
    blockDim.x = block;
    gridDim.x = grid;
    for (unsigned w = 0; w < block / 32; ++w) warp_bar[w] = std::make_unique<std::barrier<>>(32);
    cta_bar = std::make_unique<std::barrier<>>(block);
    for (unsigned b = 0; b < grid; ++b) {
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([=, &args] {
                blockIdx.x = b;
                threadIdx.x = t;
                kernel(args);
            });
        for (auto& t : threads) t.join();
    }
}
}  // namespace emu

float __shfl_xor_sync(unsigned, float v, int lane_mask) { return emu::shuffle(v, (threadIdx.x % 32) ^ lane_mask); }
float __shfl_sync(unsigned, float v, int src_lane) { return emu::shuffle(v, src_lane); }
void __syncwarp(unsigned) { emu::warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
void __syncthreads() { emu::cta_bar->arrive_and_wait(); }

/*
 * cuda_emu_runtime.h — emu::launch for single-file runner programs such as nf4_optim_emu.cpp and
 * model_emu.cpp: include it before the kernel files, in the file that holds main(), and link the
 * kernel emulator's runtime (kernels/emu/vgpu_runtime.cpp, compiled on its own without the
 * instrumentation flags and with -DQV_NO_KERNEL_ANCHORS, since a runner holds only some kernels).
 * emu::launch(kernel, args, grid, block[, dyn_smem]) runs a kernel through the fiber runtime and
 * ends the program with the runtime's message when the launch fails (a barrier deadlock, a memory
 * fault, a PTX rule broken, a trap).
 */
#pragma once
#include "cuda_emu.h"
#include "vgpu_abi.h"

#include <cstdlib>

namespace qv {
int launch_fn(const char* name, Invoke invoke, void* fn, const void* args, size_t args_size, QvDim3 grid, QvDim3 block,
              uint32_t dyn_smem, QvCounters* counters, QvStatus* status);
}

namespace emu {

/* Runs kernel(args) over `grid` CTAs of `block` threads (1-D; at most 1024 threads). */
template <class A>
void launch(void (*kernel)(const A), const A& args, unsigned grid, unsigned block, unsigned dyn_smem = 0) {
    QvStatus st{};
    const int rc = qv::launch_fn(nullptr, &qv::invoke<A>, (void*)kernel, &args, sizeof(A), QvDim3{grid, 1, 1},
                                 QvDim3{block, 1, 1}, dyn_smem, nullptr, &st);
    if (rc != QV_OK) {
        fprintf(stderr, "emu::launch failed (code %d): %s\n", rc, st.message);
        exit(3);
    }
}

}  // namespace emu

#!/bin/sh
# instrumented selftest build (prototype): kernels + selftest with KASAN callbacks, runtime with -DQV_MEMCHECK
set -e
cd /tmp/emuproto
O=${O:--O2}
F="-std=c++20 $O -ffp-contract=off -fno-strict-aliasing -DQADAPT_EMU -pthread -Ikernels/emu -Ikernels/include"
K="-fsanitize=kernel-address --param asan-instrumentation-with-call-threshold=0 --param asan-stack=0 --param asan-globals=0 -fno-sanitize-address-use-after-scope -fno-tree-sra"
mkdir -p obj
for f in nf4 optim model lora; do nice c++ -x c++ $F $K -c kernels/$f.cu -o obj/${f}_mc.o; done
nice c++ $F -DQV_MEMCHECK -c kernels/emu/vgpu_runtime.cpp -o obj/rt_mc.o
nice c++ $F $K -DQV_MEMCHECK -c kernels/emu/vgpu_selftest.cpp -o obj/st_mc.o
c++ -pthread obj/st_mc.o obj/nf4_mc.o obj/optim_mc.o obj/model_mc.o obj/lora_mc.o obj/rt_mc.o -o obj/selftest_mc

#!/bin/sh
# instrumented build with -fsanitize=thread callbacks instead of KASAN (same runtime object)
set -e
cd /tmp/emuproto
O=${O:--O2}
F="-std=c++20 $O -ffp-contract=off -fno-strict-aliasing -DQADAPT_EMU -pthread -Ikernels/emu -Ikernels/include"
T="-fsanitize=thread --param tsan-instrument-func-entry-exit=0 -fno-tree-sra"
for f in nf4 optim model lora; do nice c++ -x c++ $F $T -c kernels/$f.cu -o obj/${f}_ts.o; done
nice c++ $F $T -DQV_MEMCHECK -c kernels/emu/vgpu_selftest.cpp -o obj/st_ts.o
nice c++ $F $T -c demo/mc_demo.cpp -o obj/demo_ts.o
c++ -pthread obj/st_ts.o obj/nf4_ts.o obj/optim_ts.o obj/model_ts.o obj/lora_ts.o obj/rt_mc.o -o obj/selftest_ts
c++ -pthread obj/demo_ts.o obj/nf4_ts.o obj/optim_ts.o obj/model_ts.o obj/lora_ts.o obj/rt_mc.o -o obj/mc_demo_ts

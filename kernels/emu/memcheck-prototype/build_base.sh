#!/bin/sh
# baseline selftest build, -O2 as kernels/emu/README.md, one file at a time
set -e
cd /tmp/emuproto
F="-std=c++20 -O2 -ffp-contract=off -fno-strict-aliasing -DQADAPT_EMU -pthread -Ikernels/emu -Ikernels/include"
mkdir -p obj
for f in nf4 optim model lora; do nice c++ -x c++ $F -c kernels/$f.cu -o obj/$f.o; done
nice c++ $F -c kernels/emu/vgpu_runtime.cpp -o obj/rt.o
nice c++ $F -c kernels/emu/vgpu_selftest.cpp -o obj/st.o
c++ -pthread obj/st.o obj/nf4.o obj/optim.o obj/model.o obj/lora.o obj/rt.o -o obj/selftest_base

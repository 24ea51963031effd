#!/bin/sh
# vgpu_mutants.sh — plants bugs in temporary copies of the LoRA kernels (kernels/lora_fwd.cu,
# lora_bwd.cu and the headers they include) and checks that the emulator's
# selftest (vgpu_selftest.cpp) fails on each: the emulation must have teeth on the real tensor-core
# kernels, not only on its own test kernels. A mutant may name the report that must catch it (the
# memory checker's, for the last two). Flags from kernels/emu/emu.flags: kernel code instrumented
# (memcheck), the runtime not. Needs a C++20 compiler and perl; about 40 s.
#   sh kernels/emu/vgpu_mutants.sh
set -eu
cd "$(dirname "$0")/../.."
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
F="$(sed -n 's/^common: //p' kernels/emu/emu.flags) -Ikernels/emu -Ikernels/include"
MC="$(sed -n 's/^memcheck: //p' kernels/emu/emu.flags)"
CXX=${CXX:-c++}
others=""
for f in kernels/*.cu; do
    case $f in kernels/lora_fwd.cu | kernels/lora_bwd.cu) continue ;; esac
    o="$T/$(basename "$f" .cu).o"
    $CXX -x c++ $F $MC -c "$f" -o "$o"
    others="$others $o"
done
$CXX $F -DQV_NO_KERNEL_ANCHORS -c kernels/emu/vgpu_runtime.cpp -o "$T/rt.o"
$CXX $F $MC -c kernels/emu/vgpu_selftest.cpp -o "$T/st.o"
missed=0
# mutant NAME PERL-SUBSTITUTION [REPORT [FILE]]: FILE (kernels/-relative; default lora_fwd.cu) is
# mutated in a copy of kernels/lora_*.cu and kernels/include/*.cuh; both LoRA files are rebuilt
# from the copy, whose include/ comes before kernels/include (after kernels/emu, whose emulated
# qadapt_mma.cuh must still win: the headers include it with angle brackets).
mutant() {
    src=${4:-lora_fwd.cu}
    rm -rf "$T/k" && mkdir -p "$T/k/include"
    cp kernels/lora_fwd.cu kernels/lora_bwd.cu "$T/k/" && cp kernels/include/*.cuh "$T/k/include/"
    rm "$T/k/include/qadapt_mma.cuh"
    perl -0pe "$2" "kernels/$src" > "$T/k/$src"
    if cmp -s "kernels/$src" "$T/k/$src"; then echo "$1: the pattern no longer matches $src"; missed=1; return; fi
    for f in lora_fwd lora_bwd; do
        $CXX -x c++ $(echo "$F" | sed "s|-Ikernels/include|-I$T/k/include -Ikernels/include|") $MC -c "$T/k/$f.cu" -o "$T/$f.o"
    done
    $CXX -pthread "$T/st.o" $others "$T/lora_fwd.o" "$T/lora_bwd.o" "$T/rt.o" -o "$T/st"
    if "$T/st" > "$T/log" 2>&1; then echo "$1: NOT caught"; missed=1
    elif [ -n "${3:-}" ] && ! grep -q "$3" "$T/log"; then echo "$1: fails, but not as '$3'"; missed=1
    else echo "$1: caught, $(grep -c FAIL "$T/log") checks fail${3:+ ('$3')}"; fi
}
mutant "cp.async.wait_group one group too loose in the main loops" 's/cp_async_wait<STAGES - 2>\(\);/cp_async_wait<STAGES - 1>();/g' "" include/gemm_sm80.cuh
mutant "__syncthreads removed after the wait in the main loops" 's/(cp_async_wait<STAGES - 2>\(\);\n)\s*__syncthreads\(\);\n/$1/g' "" include/gemm_sm80.cuh
mutant "b0/b1 of the ldmatrix B fragments swapped" 's/bf\[2 \* nj\]\[0\] = r\[0\];\n(\s*)bf\[2 \* nj\]\[1\] = r\[1\];/bf[2 * nj][0] = r[1];\n$1bf[2 * nj][1] = r[0];/g' "" include/gemm_sm80.cuh
mutant "__syncthreads removed before the LoRA extension reuses the stage buffers" 's/__syncthreads\(\);\n(\s*load_tile<BM, NT>\(tA, reinterpret_cast<const bf16\*>\(a\.u\))/$1/'
mutant "the NF4 decode overwrites the decoded tile the mma of the step reads" 's/nf4_decode_stage<BWD>\(sm\.w\[\(kt \+ 1\) & 1\]/nf4_decode_stage<BWD>(sm.w[kt & 1]/' "" include/nf4_tile.cuh
mutant "NF4 high and low nibbles swapped in the decode" 's/__fmul_rn\(lv\[byte >> 4\], scale\), __fmul_rn\(lv\[byte & 15u\], scale\)/__fmul_rn(lv[byte & 15u], scale), __fmul_rn(lv[byte >> 4], scale)/' "" include/nf4_tile.cuh
mutant "A fragment rows 8-15 taken from rows 0-7 (lane & 7 for lane & 15)" 's/const uint32_t row = wm0 \+ mi \* 16 \+ \(lane & 15u\);/const uint32_t row = wm0 + mi * 16 + (lane & 7u);/' "" include/gemm_sm80.cuh
mutant "tile loads read one element past the end of a row in the K tail (c <= cols)" 's/const uint32_t lo = \(gr < rows && c < cols\)/const uint32_t lo = (gr < rows && c <= cols)/' "outside every allocation" include/bf16_gather.cuh
mutant "the dense gemv takes 16-byte loads whatever the vec flag (rows not 16-byte aligned when K % 8 != 0)" 's/(const bf16\* wr = w \+ \(uint64_t\)n \* a\.k;\n\s*)if \(vec\) \{/$1if (true) {/' "misaligned address"
exit $missed

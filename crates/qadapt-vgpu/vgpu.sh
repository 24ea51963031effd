#!/usr/bin/env bash
# The virtual H200 (crates/qadapt-vgpu) as a driver folder, and commands run on it.
#
#   vgpu.sh setup        build the library (release, feature `emu`) and lay out
#                        $CARGO_TARGET_DIR/vgpu/ (default target/vgpu/): libqadapt_vgpu.so and the
#                        names cudarc looks for, libcuda.so(.1) and libcublas.so(.13), as symlinks
#                        to it (one file: glibc's dlopen loads it once, so the driver and cuBLAS
#                        share their state). Prints the folder.
#   vgpu.sh run CMD...   setup, then CMD with that folder first on LD_LIBRARY_PATH and
#                        QADAPT_VGPU=1.
#   vgpu.sh test         every `#[ignore = "needs a CUDA device"]` test of the workspace (release)
#                        on the virtual device; checks that as many ran as are listed.
#
# The library is copied out of target/release: a later workspace build without the feature
# replaces target/release/libqadapt_vgpu.so, not the copy.
set -euo pipefail
# The virtual device runs the real build's kernels (fatbins and ptxas report) and the same value
# as `just test` and the GPU bundle keeps cargo from rebuilding everything above qadapt-kernels.
export QADAPT_REQUIRE_CUDA=1
caller=$PWD
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target="$root/$target" ;; esac
dir="$target/vgpu"

setup() {
    cargo build --release -q -p qadapt-vgpu --features emu >&2
    mkdir -p "$dir"
    cp "$target/release/libqadapt_vgpu.so" "$dir/.libqadapt_vgpu.so.new"
    mv -f "$dir/.libqadapt_vgpu.so.new" "$dir/libqadapt_vgpu.so"
    for name in libcuda.so libcuda.so.1 libcublas.so libcublas.so.13; do
        ln -sfn libqadapt_vgpu.so "$dir/$name"
    done
}

env_on() {
    export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export QADAPT_VGPU=1
}

case "${1:-}" in
    setup)
        setup
        echo "$dir"
        ;;
    run)
        shift
        [ $# -gt 0 ] || { echo "usage: vgpu.sh run CMD..." >&2; exit 2; }
        setup
        env_on
        # CMD runs where vgpu.sh was called from (`just vgpu` calls it from the repository root).
        cd "$caller"
        exec "$@"
        ;;
    test)
        shift
        setup
        echo "building the workspace's release test binaries" >&2
        cargo test --workspace --release --tests --no-run "$@"
        env_on
        listed=$(cargo test --workspace --release --tests -q "$@" -- --list --ignored 2>/dev/null | grep -c ': test$' || true)
        log=$(mktemp)
        trap 'rm -f "$log"' EXIT
        set +e
        cargo test --workspace --release --tests --no-fail-fast "$@" -- --ignored 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        set -e
        passed=$(grep -oE 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
        failed=$(grep -oE '[0-9]+ failed;' "$log" | awk '{s += $1} END {print s + 0}')
        ran=$((passed + failed))
        echo
        echo "test-vgpu: $listed GPU tests listed, $ran ran on the virtual device: $passed passed, $failed failed"
        if [ "$ran" -ne "$listed" ]; then
            echo "test-vgpu: $((listed - ran)) listed tests did not run (a test binary crashed?)" >&2
            exit 1
        fi
        [ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
        ;;
    *)
        sed -n '2,16p' "$0" >&2
        exit 2
        ;;
esac

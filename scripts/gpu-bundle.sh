#!/usr/bin/env bash
# Builds gpu-bundle/ on a machine without a GPU: stripped release test and bench
# binaries with the kernels embedded, packed into one bins.tar.xz (each binary carries the same
# fatbins and std, so the solid archive is ~5x smaller than the binaries), the PyTorch side of the
# QLoRA comparison (a script and the bitsandbytes and peft wheels), and run.sh, which on an
# NVIDIA machine with a CUDA 13 driver (no Rust needed) extracts the binaries, runs every ignored
# test, the machine's compute-sanitizer (memcheck on every test binary, racecheck on the LoRA
# kernels), the CUDA benchmarks, LoRA steps and QLoRA at Llama-3-8B and -70B shapes against
# PyTorch + PEFT + bitsandbytes, then prints one summary.
#
#   scripts/gpu-bundle.sh              build the folder
#   scripts/gpu-bundle.sh --rehearse   build it, check its size, and run it here twice: without a
#                                      driver it must stop cleanly with "no CUDA device"; on the
#                                      virtual device (crates/qadapt-vgpu) every step must pass
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bundle
limit_mb=60
stage="$out/stage"
rm -rf "$out"
mkdir -p "$stage/tests" "$stage/benches" "$stage/bin" "$out/tools"
export QADAPT_REQUIRE_CUDA=1

artifacts() { # cargo args... -> "name path" lines of the executables built
    cargo "$@" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (kinds := m["target"]["kind"]):
        print(kinds[0], m["target"]["name"], m["executable"])
'
}

echo "building release test binaries"
cargo test --release --workspace --no-run -q
while read -r _kind name exe; do
    # Only binaries that hold ignored (GPU) tests travel.
    # (Read the whole list first: `grep -q` closing the pipe early would fail under pipefail.)
    ignored=$("$exe" --list --ignored 2>/dev/null || true)
    if grep -q ': test$' <<<"$ignored"; then
        cp "$exe" "$stage/tests/$name"
        strip "$stage/tests/$name"
    fi
done < <(artifacts test --release --workspace --no-run)

# The CLI's GPU tests run the `qadapt` binary: it travels too (run.sh points QADAPT_BIN at it).
cargo build --release -q -p qadapt-cli
cp target/release/qadapt "$stage/bin/qadapt"
strip "$stage/bin/qadapt"

echo "building release bench binaries"
cargo bench --workspace --no-run -q
while read -r kind name exe; do
    # The [[bench]] targets only (libraries also get a bench harness binary).
    [ "$kind" = bench ] || continue
    cp "$exe" "$stage/benches/$name"
    strip "$stage/benches/$name"
done < <(artifacts bench --workspace --no-run)
n_tests=$(ls "$stage/tests" | wc -l)
n_benches=$(ls "$stage/benches" | wc -l)
if [ "$n_tests" -eq 0 ] || [ "$n_benches" -eq 0 ]; then
    echo "gpu-bundle/ has no test or no bench binary" >&2
    exit 1
fi
echo "packing $(du -sm "$stage" | cut -f1) MB of binaries into bins.tar.xz"
tar -C "$stage" -cf - tests benches bin | xz -T0 -9 >"$out/bins.tar.xz"
rm -rf "$stage"

# The PyTorch side of the QLoRA comparison: its script, and the wheels the GPU image lacks
# (bitsandbytes, peft; `just setup` downloads them; run.sh installs them only if the machine's
# Python cannot import them).
cp benches/qlora_step_torch.py "$out/tools/"
cp .cuda/wheels/bitsandbytes-0.50.2-*.whl .cuda/wheels/peft-0.21.2-*.whl "$out/tools/"

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# qadapt GPU bundle. Needs an NVIDIA GPU (sm_80+) and a CUDA 13 driver; no Rust toolchain.
# Runs every ignored (GPU) test, compute-sanitizer memcheck on each test binary and racecheck on
# the LoRA tests, the CUDA benches, and prints one summary. Exit status: 0 all passed, 1 a check
# failed, 2 no CUDA device.
# With QADAPT_VGPU=1 (set by `just vgpu`, the virtual device of crates/qadapt-vgpu first on
# LD_LIBRARY_PATH) it runs the same steps on the virtual H200: the GPU checks of the machine
# (nvidia-smi, cuBLAS lookup, compute-sanitizer) are skipped and the benches run once at tiny
# shapes (QADAPT_BENCH_SMOKE=1): their times mean nothing.
# QADAPT_BUNDLE_PARTS picks what runs (default: all, in this order): tests (every ignored test),
# sanitizer (memcheck, racecheck), benches (the CUDA tables of the benches), steps (one LoRA
# step at small shapes, CPU and CUDA), scale (QLoRA of Llama-3-8B and -70B shapes at seq 2048:
# qadapt, and PyTorch + PEFT + bitsandbytes at the 8B shape where the machine has them), e.g.
# `QADAPT_BUNDLE_PARTS=scale bash run.sh`.
set -uo pipefail
parts=" ${QADAPT_BUNDLE_PARTS:-tests sanitizer benches steps scale} "
want() { [[ "$parts" == *" $1 "* ]]; }
here=$(cd "$(dirname "$0")" && pwd)
export RUST_BACKTRACE=1
# The binaries travel as one bins.tar.xz; unpack them next to a scratch log folder first (xz, or
# Python's lzma where the xz tool is missing).
bins=$(mktemp -d)
trap 'rm -rf "$bins"' EXIT
if ! { xz -dc "$here/bins.tar.xz" 2>/dev/null | tar -C "$bins" -xf - 2>/dev/null; }; then
    rm -rf "$bins" && mkdir -p "$bins"
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
        "$here/bins.tar.xz" "$bins" || { echo "cannot unpack bins.tar.xz"; exit 1; }
fi
echo "unpacked $(ls "$bins/tests" | wc -l) test and $(ls "$bins/benches" | wc -l) bench binaries"
cd "$bins"
export QADAPT_BIN="$bins/bin/qadapt"
vgpu=${QADAPT_VGPU:-0}
if [ "$vgpu" = 1 ]; then
    echo "virtual device (QADAPT_VGPU=1): benches at smoke shapes, times mean nothing; no sanitizer"
    export QADAPT_BENCH_SMOKE=1
elif ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so' && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no CUDA device: no NVIDIA driver (libcuda.so) on this machine"
    exit 2
fi
if [ "$vgpu" != 1 ] && ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; then
    echo "no CUDA device: nvidia-smi sees no GPU"
    exit 2
fi
# cuBLAS (the baselines and dense GEMMs) is loaded at run time; a Python CUDA wheel often has it.
if [ "$vgpu" != 1 ] && ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
    cublas_dir=$(python3 - 2>/dev/null <<'PY'
import glob, os, site, sys
dirs = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for d in dirs:
    for p in sorted(glob.glob(os.path.join(d, "nvidia", "**", "libcublas.so*"), recursive=True)):
        print(os.path.dirname(p))
        sys.exit()
PY
)
    if [ -n "$cublas_dir" ]; then
        export LD_LIBRARY_PATH="$cublas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "cuBLAS from $cublas_dir"
    else
        echo "warning: no libcublas found; cuBLAS baselines and the cuBLAS test will fail"
    fi
fi
# Logs go to $QADAPT_BUNDLE_LOGS when set (so a caller can keep them), else to a scratch folder;
# every result is also printed as soon as it is known, so a run cut short still says how far it got.
logs=${QADAPT_BUNDLE_LOGS:-$(mktemp -d)}
mkdir -p "$logs"
status=0
summary=()
for t in tests/*; do
    want tests || break
    name=$(basename "$t")
    start=$(date +%s)
    if "$t" --ignored --test-threads=1 >"$logs/$name.log" 2>&1; then r=PASS; else r=FAIL; status=1; fi
    line=$(grep -E '^test result' "$logs/$name.log" | tail -n 1)
    summary+=("| test | $name | $r | $(( $(date +%s) - start )) s | ${line:-no result line} |")
    echo "${summary[-1]}"
    [ "$r" = FAIL ] && tail -n 40 "$logs/$name.log"
done
# compute-sanitizer: the machine's own (the H200 image of 2026-12-04 has
# /usr/local/cuda/bin/compute-sanitizer 2025.3.1; the PyPI wheel 13.0.85 that travelled before
# stopped there with "Target application terminated before first instrumented API call", and its
# 14 MB now go to bitsandbytes), else the step is skipped and says so.
# memcheck runs every test binary (device out-of-bounds, misaligned and uninitialized-free
# accesses), racecheck the LoRA kernels (shared-memory hazards of the cp.async pipeline).
# (The virtual device checks memory itself; compute-sanitizer needs NVIDIA's driver.)
if [ "$vgpu" != 1 ] && want sanitizer; then
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
    if [ -z "$cs" ]; then
        summary+=("| memcheck | all | SKIP | | no compute-sanitizer on this machine |")
        echo "${summary[-1]}"
    fi
    for t in tests/*; do
        [ -n "$cs" ] || break
        name=$(basename "$t")
        if timeout 300 "$cs" --tool memcheck --error-exitcode 1 "$t" --ignored --test-threads=1 >"$logs/memcheck-$name.log" 2>&1; then
            r=PASS
        else
            r=FAIL; status=1; tail -n 40 "$logs/memcheck-$name.log"
        fi
        summary+=("| memcheck | $name | $r | | $(grep -E 'ERROR SUMMARY' "$logs/memcheck-$name.log" | tail -n 1) |")
        echo "${summary[-1]}"
    done
    if [ -z "$cs" ]; then
        :
    elif timeout 300 "$cs" --tool racecheck --error-exitcode 1 tests/ops --ignored --test-threads=1 lora:: >"$logs/racecheck-lora.log" 2>&1; then
        r=PASS
    else
        r=FAIL; status=1; tail -n 40 "$logs/racecheck-lora.log"
    fi
    if [ -n "$cs" ]; then
        summary+=("| racecheck | lora | $r | | $(grep -E 'RACECHECK SUMMARY' "$logs/racecheck-lora.log" | tail -n 1) |")
        echo "${summary[-1]}"
    fi
fi
for b in benches/*; do
    want benches || break
    name=$(basename "$b")
    # lora_step is no criterion bench: it is timed below with its own options.
    [ "$name" = lora_step ] && continue
    # "^$" matches no criterion id: only the CUDA tables printed by each bench's main run here.
    timeout 240 "$b" --bench --noplot "^$" >"$logs/bench-$name.log" 2>&1 || { status=1; tail -n 20 "$logs/bench-$name.log"; }
    grep -E '^(\||NF4|LoRA|.*skipped)' "$logs/bench-$name.log" || true
done
# One LoRA training step (forward, backward, AdamW), CPU and CUDA side by side on the bench's
# default shape, dense and NF4 base, then a larger shape on CUDA alone (a CPU step there takes
# too long for the device budget).
steps=()
step_args=("--device cpu --base dense" "--device cuda --base dense" \
    "--device cpu --base nf4" "--device cuda --base nf4" \
    "--device cuda --base nf4 --hidden 2048 --intermediate 5632 --layers 4 --heads 16 --kv-heads 4 --head-dim 128 --vocab 32000 --batch 8 --seq 512 --rank 16 --alpha 32")
want steps || step_args=()
for args in "${step_args[@]}"; do
    # shellcheck disable=SC2086
    if line=$(timeout 240 benches/lora_step $args --warmup 2 --steps 5 2>"$logs/step.err"); then
        steps+=("$line")
        echo "$line"
    else
        status=1; echo "lora_step $args failed:"; tail -n 20 "$logs/step.err"
    fi
done
# QLoRA at real shapes: Llama-3-8B and -70B (random weights made on the device tensor by tensor,
# each projection quantized there), seq 2048, the largest batch the memory plan fits into 90 % of
# the free memory but at most 8 (16k tokens a step already fill the GPU; the table says what
# would fit), layer checkpointing, r 16 on all seven projections; then PyTorch + PEFT +
# bitsandbytes on the 8B shape at qadapt's batch (tools/qlora_step_torch.py, the standard QLoRA
# recipe with gradient checkpointing and sdpa), where the machine's Python has them.
scale=()
scale_shapes=(llama3-8b llama3-70b)
want scale || scale_shapes=()
for shape in "${scale_shapes[@]}"; do
    args="--device cuda --base nf4 --random-shape $shape --seq 2048 --batch auto --max-batch 8 --checkpointing layers --rank 16 --alpha 32 --warmup 1 --steps 2"
    # shellcheck disable=SC2086
    if line=$(timeout 420 benches/lora_step $args 2>"$logs/scale-$shape.err"); then
        scale+=("$line")
        echo "$line"
    else
        status=1; echo "lora_step $args failed:"; tail -n 20 "$logs/scale-$shape.err"
        continue
    fi
    [ "$shape" = llama3-8b ] || continue
    batch=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["batch"])' "$line")
    if [ "$vgpu" != 1 ] && ! python3 -c 'import bitsandbytes, peft' 2>/dev/null; then
        pydeps=$(mktemp -d)
        if python3 -m pip install -q --no-index --no-deps --target "$pydeps" "$here"/tools/*.whl >"$logs/pip.log" 2>&1; then
            export PYTHONPATH="$pydeps${PYTHONPATH:+:$PYTHONPATH}"
            echo "bitsandbytes and peft from the bundle's wheels"
        else
            tail -n 5 "$logs/pip.log"
        fi
    fi
    if [ "$vgpu" = 1 ]; then
        torch_line='{"framework": "pytorch+peft+bitsandbytes", "skipped": "the virtual device has no PyTorch"}'
    elif ! torch_line=$(timeout 600 python3 "$here/tools/qlora_step_torch.py" --shape "$shape" --seq 2048 --batch "$batch" --rank 16 --alpha 32 --warmup 1 --steps 2 2>"$logs/torch-$shape.err"); then
        tail -n 20 "$logs/torch-$shape.err"
        torch_line=${torch_line:-'{"framework": "pytorch+peft+bitsandbytes", "failed": "see torch.err"}'}
    fi
    scale+=("$torch_line")
    echo "$torch_line"
done
echo
echo "== qadapt GPU bundle summary =="
printf '%s\n' "| kind | what | result | time | detail |" "|---|---|---|---|---|" "${summary[@]}"
for f in "$logs"/bench-*.log; do
    [ -e "$f" ] || continue
    echo
    grep -E '^(\||NF4|LoRA|.*skipped)' "$f" || true
done
if [ ${#steps[@]} -gt 0 ]; then
    echo
    if [ "$vgpu" = 1 ]; then
        echo "LoRA training step (benches/lora_step.rs) SMOKE RUN on the virtual device: one step of a tiny model, times mean nothing"
    else
        echo "LoRA training step (benches/lora_step.rs, median of 5 after 2 warm-up steps)"
    fi
    echo "| device | base | hidden x layers | batch x seq | median ms | tokens/s | first loss |"
    echo "|---|---|---|---|---|---|---|"
    for line in "${steps[@]}"; do
        python3 -c 'import json, sys; j = json.loads(sys.argv[1]); print("| {} | {} | {} x {} | {} x {} | {:.2f} | {:.0f} | {:.4f} |".format(j["device"], j["base"], j["hidden"], j["layers"], j["batch"], j["seq"], j["median_ms"], j["tokens_per_s"], j["losses"][0]))' "$line" 2>/dev/null || echo "$line"
    done
fi
if [ ${#scale[@]} -gt 0 ]; then
    echo
    if [ "$vgpu" = 1 ]; then
        echo "QLoRA at scale SMOKE RUN on the virtual device (the smoke shape, not the named one): times mean nothing"
    else
        echo "QLoRA step at real shapes, seq 2048, layer checkpointing, r 16 on all projections (median of 2 after 1 warm-up)"
    fi
    echo "| framework | shape | batch | median ms | tokens/s | peak GB (planned) | first loss |"
    echo "|---|---|---|---|---|---|---|"
    for line in "${scale[@]}"; do
        python3 - "$line" <<'PY' 2>/dev/null || echo "$line"
import json, sys
j = json.loads(sys.argv[1])
if "median_ms" not in j:
    print("| {} | {} | | | | | {} |".format(j.get("framework"), j.get("shape", ""), j.get("skipped") or j.get("failed")))
    sys.exit()
gb = lambda b: ("{:.1f}".format(b / 1e9) if b >= 1e9 else "{:.4f}".format(b / 1e9)) if b else "?"
planned = " ({})".format(gb(j["planned_peak_bytes"])) if j.get("planned_peak_bytes") else ""
oom = " (OOM at {})".format(j["oom_batches"]) if j.get("oom_batches") else ""
oom += " (plan fits {})".format(j["largest_batch"]) if j.get("largest_batch") else ""
print("| {} | {} | {}{} | {:.0f} | {:.0f} | {}{} | {:.4f} |".format(
    j["framework"], j.get("shape") or j.get("model"), j["batch"], oom, j["median_ms"],
    j["tokens_per_s"], gb(j.get("peak_bytes")), planned, j["losses"][0]))
PY
    done
fi
exit $status
RUN
chmod +x "$out/run.sh"

size_mb=$(du -sm "$out" | cut -f1)
echo "gpu-bundle/: ${size_mb} MB ($n_tests test binaries, $n_benches bench binaries, packed)"
if [ "$size_mb" -gt "$limit_mb" ]; then
    echo "gpu-bundle/ is ${size_mb} MB, over the ${limit_mb} MB limit" >&2
    exit 1
fi
if [ "${1:-}" = "--rehearse" ]; then
    # 1. As on a machine without a driver: it must stop cleanly.
    set +e
    output=$(env -u QADAPT_VGPU bash "$out/run.sh" 2>&1)
    code=$?
    set -e
    echo "$output" | tail -n 5
    if ! grep -q "unpacked $n_tests test and $n_benches bench binaries" <<<"$output"; then
        echo "rehearsal failed: run.sh did not unpack every binary" >&2
        exit 1
    fi
    if [ $code -eq 2 ] && grep -q "no CUDA device" <<<"$output"; then
        echo "rehearsal: the bundle stops cleanly without a GPU (exit 2)"
    elif [ $code -eq 0 ]; then
        echo "rehearsal: a GPU is present and every check passed"
    else
        echo "rehearsal failed (exit $code)" >&2
        exit 1
    fi
    # 2. On the virtual H200: every step runs and the summary table is reached.
    set +e
    bash crates/qadapt-vgpu/vgpu.sh run bash "$out/run.sh" 2>&1 | tee "$out/rehearsal-vgpu.log"
    code=${PIPESTATUS[0]}
    set -e
    if [ $code -ne 0 ] || ! grep -q "== qadapt GPU bundle summary ==" "$out/rehearsal-vgpu.log"; then
        echo "rehearsal failed on the virtual device (exit $code): gpu-bundle/rehearsal-vgpu.log" >&2
        exit 1
    fi
    echo "rehearsal: every step of run.sh passed on the virtual device"
fi

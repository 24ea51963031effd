# qadapt tasks. `just` lists them. CI runs `just ci` (.ci/run).

set shell := ["bash", "-euo", "pipefail", "-c"]

cuda_dir := justfile_directory() / ".cuda"
export NVCC := cuda_dir / "nvidia/cu13/bin/nvcc"

# List the recipes.
default:
    @just --list

# --- setup ---------------------------------------------------------------------------------------

# Install what the build needs, idempotently: CUDA 13.0 nvcc + CCCL into .cuda/, cuobjdump/nvdisasm
# for SASS checks, compute-sanitizer (for the GPU bundle), libclang (the bindings' staleness test),
# qemu-user (the test that the binary refuses an older CPU in one line).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    cd "{{justfile_directory()}}"
    if [ ! -x .cuda/nvidia/cu13/bin/nvcc ]; then
        echo "installing nvcc (cuda-toolkit 13.0.3.0, PyPI) into .cuda/"
        python3 -m pip install -q --disable-pip-version-check --target .cuda 'cuda-toolkit[nvcc,cccl]==13.0.3.0'
    fi
    if [ ! -x .cuda/sass/nvidia/cu13/bin/cuobjdump ]; then
        echo "installing cuobjdump + nvdisasm into .cuda/sass/"
        python3 -m pip install -q --disable-pip-version-check --target .cuda/sass 'nvidia-cuda-cuobjdump==13.2.86' 'nvidia-cuda-nvdisasm==13.2.86'
    fi
    if ! ls .cuda/wheels/bitsandbytes-0.50.2-*.whl .cuda/wheels/peft-0.21.2-*.whl >/dev/null 2>&1; then
        echo "downloading bitsandbytes and peft (the GPU bundle's PyTorch side) into .cuda/wheels/"
        python3 -m pip download -q --disable-pip-version-check --no-deps -d .cuda/wheels \
            --only-binary :all: --platform manylinux_2_24_x86_64 --python-version 3.11 \
            'bitsandbytes==0.50.2' 'peft==0.21.2'
    fi
    if ! command -v qemu-x86_64 >/dev/null; then
        echo "installing qemu-user (runs the binary on an emulated older CPU in a test)"
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq qemu-user
    fi
    if ! ldconfig -p | grep -q 'libclang-14\|libclang.so'; then
        echo "installing libclang for bindgen"
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libclang1-14 libclang-common-14-dev
    fi
    "{{NVCC}}" --version | tail -n 2

# --- build and test ------------------------------------------------------------------------------

# Build everything (kernels compiled by nvcc when present).
build: setup
    cargo build --workspace --all-targets

# Run every test that needs no GPU (GPU tests are #[ignore] and run by `just gpu-check`).
test: setup
    QADAPT_REQUIRE_CUDA=1 cargo test --workspace

# Regenerate the committed ABI bindings (crates/qadapt-kernels/src/ffi.rs) from
# kernels/include/qadapt.h with bindgen (needs libclang: `just setup`). `just test` fails while
# they are stale.
bindings: setup
    QADAPT_BLESS_BINDINGS=1 cargo test -q -p qadapt-kernels --test bindings
    git diff --stat -- crates/qadapt-kernels/src/ffi.rs

# `cargo package` the kernels crate with its CUDA sources (crates/qadapt-kernels/kernels links to
# kernels/) and build the packaged copy with nvcc: the crate stands alone outside the workspace.
package-kernels: setup
    QADAPT_REQUIRE_CUDA=1 cargo package -q -p qadapt-kernels --allow-dirty

# Fine-tune the embedded model on the embedded task (QLoRA, CPU, about a minute on two cores);
# extra arguments go to `qadapt train` (e.g. `just train --method prompt`).
train *args="":
    cargo run --release -q -p qadapt-cli -- train {{args}}

# Every PEFT method on the embedded task with the same budget: the table of the README.
compare *args="":
    cargo run --release -q -p qadapt-cli -- compare {{args}}

# Regenerate the embedded default: the corpus and task (assets/make_task.py), then pretrain the
# model on the corpus (about 15 minutes on two cores) into assets/default-model.
make-default:
    python3 crates/qadapt-cli/assets/make_task.py
    rm -rf crates/qadapt-cli/assets/default-model.new
    cargo run --release -q -p qadapt-cli -- pretrain --corpus crates/qadapt-cli/assets/corpus.txt --out crates/qadapt-cli/assets/default-model.new --steps 1500
    rm -rf crates/qadapt-cli/assets/default-model
    mv crates/qadapt-cli/assets/default-model.new crates/qadapt-cli/assets/default-model

# cargo-fuzz on this stable toolchain (through RUSTC_BOOTSTRAP), from a copy of the committed
# corpus (tests/fuzz/corpus, which `just test` replays), a 256 MiB memory budget and a 2 GiB RSS
# limit; a crash lands in tests/fuzz/artifacts/. The loaders: safetensors + quant states, model
# directory, PEFT adapter, training data.
# Fuzz each loader of untrusted files for SECS seconds with libFuzzer.
fuzz secs="60":
    #!/usr/bin/env bash
    set -euo pipefail
    cd "{{justfile_directory()}}"
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
    for t in safetensors_nf4 model_dir adapter jsonl; do
        work=target/fuzz-corpus/$t
        rm -rf "$work" && mkdir -p "$work" && cp tests/fuzz/corpus/$t/* "$work"/
        QADAPT_MEMORY_BUDGET=268435456 RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz -O "$t" "$work" -- \
            -max_total_time={{secs}} -rss_limit_mb=2048 -max_len=131072
    done

# ptxas registers/spills and SASS instruction checks for every kernel, as a table.
kernel-report: setup
    QADAPT_REQUIRE_CUDA=1 cargo test -p qadapt-kernels --test static_report -- --nocapture

# Broken links and private links in public docs fail the build.
# The API documentation of every crate into target/doc, rustdoc's warnings as errors.
doc: setup
    QADAPT_REQUIRE_CUDA=1 RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q

# Formatting, lints, docs, tests with kernels required, kernel report, every GPU test on the
# virtual device, the GPU bundle rehearsed (without a driver, then on the virtual device): what CI
# runs.
ci: setup
    cargo fmt --all -- --check
    QADAPT_REQUIRE_CUDA=1 cargo clippy --workspace --all-targets -- -D warnings
    just doc
    just test
    just kernel-report
    just package-kernels
    just test-vgpu
    bash scripts/gpu-bundle.sh --rehearse

# --- benchmarks ----------------------------------------------------------------------------------

# Criterion benches (CPU; CUDA ones run when a device is present).
bench: setup
    QADAPT_REQUIRE_CUDA=1 cargo bench --bench nf4

# NF4 on the CPU: bitsandbytes' CPU path on the same shapes (needs the golden venv, see tests/data).
bench-bnb python="python3":
    {{python}} benches/nf4_bnb_cpu.py

# A CPU LoRA training step, PyTorch + PEFT vs qadapt on the same model, batch and threads (pins in the script).
bench-torch python="python3" *args="":
    {{python}} benches/lora_step_torch.py {{args}}

# --- GPU -----------------------------------------------------------------------------------------

# Build the GPU bundle folder (no GPU needed): stripped release test and bench binaries + run.sh.
gpu-bundle: setup
    bash scripts/gpu-bundle.sh

# Build the bundle and run it here (needs a local NVIDIA GPU with a CUDA 13 driver).
gpu-check: gpu-bundle
    bash gpu-bundle/run.sh

# Run CMD on the virtual H200 of crates/qadapt-vgpu (no GPU needed): builds it into target/vgpu/
# (libcuda.so, libcublas.so), puts that first on LD_LIBRARY_PATH and sets QADAPT_VGPU=1, e.g.
# `just vgpu cargo test -p qadapt --release -- --ignored`.
[positional-arguments]
vgpu +cmd:
    bash crates/qadapt-vgpu/vgpu.sh run "$@"

# Every GPU test (`#[ignore = "needs a CUDA device"]`) of the workspace on the virtual H200
# (release); fails unless every listed test ran and passed. Extra arguments go to cargo test.
[positional-arguments]
test-vgpu *args="":
    bash crates/qadapt-vgpu/vgpu.sh test "$@"

# The virtual device's counters (mma, ldmatrix wavefronts, cp.async bytes, barriers, CTAs) per
# kernel at the Llama-3-8B projection shapes (benches/kernel_counters.rs; options such as `--m 128`).
kernel-counters *args="":
    bash crates/qadapt-vgpu/vgpu.sh run cargo bench -q --bench kernel_counters -- {{args}}

# --- golden files --------------------------------------------------------------------------------

# Regenerate tests/data fixtures from bitsandbytes (needs torch + bitsandbytes, see tests/data/README.md).
golden python="python3":
    {{python}} tests/data/make_golden.py

# Quantize the fixture weights with qadapt and have bitsandbytes read the result back and compare
# byte for byte with its own quantization (needs torch + bitsandbytes, see tests/data/README.md).
bnb-check python="python3": setup
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release -q -p qadapt-cli
    tmp=$(mktemp -d)
    {{python}} -c "from safetensors.torch import load_file, save_file; t = load_file('tests/data/bnb_linear4bit_dequant.safetensors'); save_file({'fc1.weight': t['fc1.weight.orig'].contiguous(), 'fc2.weight': t['fc2.weight.orig'].contiguous()}, '$tmp/orig.safetensors')"
    for args in "--blocksize 64" "--blocksize 64 --double-quant" "--blocksize 32 --double-quant" "--blocksize 1024"; do
        echo "== qadapt quantize $args"
        target/release/qadapt quantize "$tmp/orig.safetensors" "$tmp/q.safetensors" $args
        {{python}} tests/data/check_bnb_reads.py "$tmp/orig.safetensors" "$tmp/q.safetensors" 2>/dev/null | tail -n 1
        rm "$tmp/q.safetensors"
    done

# Quantize the tiny Llama fixtures (single file and sharded) as model directories with qadapt and
# have transformers load them and compare with its own 4-bit quantization, tensor by tensor and
# logits (needs torch + transformers + bitsandbytes, see tests/data/README.md).
transformers-check python="python3": setup
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release -q -p qadapt-cli
    tmp=$(mktemp -d)
    for model in tiny_llama tiny_llama_llama3; do
        for dq in "" "--double-quant"; do
            echo "== qadapt quantize tests/data/$model $dq"
            target/release/qadapt quantize "tests/data/$model" "$tmp/$model$dq" $dq
            {{python}} tests/data/check_transformers_reads.py "tests/data/$model" "$tmp/$model$dq" 2>/dev/null | tail -n 2
        done
    done


# Train LoRA and QLoRA adapters with `qadapt train` on the embedded model, then have PEFT load
# each over the same base (4-bit through bitsandbytes for QLoRA) and compare its logits and loss
# with `qadapt logits` (needs torch + transformers + peft + bitsandbytes, see tests/data/README.md).
train-check python="python3": setup
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release -q -p qadapt-cli
    tmp=$(mktemp -d)
    model=crates/qadapt-cli/assets/default-model
    {{python}} -c "import torch; from safetensors.torch import save_file; g = torch.Generator().manual_seed(0); save_file({'input_ids': torch.randint(3, 512, (2, 24), generator=g)}, '$tmp/ids.safetensors')"
    # lora, qlora, and lora saved in bf16 (--adapter-dtype bf16).
    for spec in lora qlora lora:bf16; do
        m=${spec%%:*}; dtype=f32; [ "$spec" != "$m" ] && dtype=${spec#*:}
        run="$tmp/$m-$dtype"
        echo "== qadapt train --method $m --steps 40 --adapter-dtype $dtype"
        target/release/qadapt train --method $m --steps 40 --adapter-dtype $dtype --output "$run" --quiet
        nf4=""; [ $m = qlora ] && nf4="--nf4"
        target/release/qadapt logits --model $model --adapter "$run/adapter" $nf4 --tokens "$tmp/ids.safetensors" --out "$run.safetensors"
        {{python}} tests/data/check_peft_reads_train.py $model "$run/adapter" "$tmp/ids.safetensors" "$run.safetensors" $nf4 2>/dev/null | tail -n 1
    done

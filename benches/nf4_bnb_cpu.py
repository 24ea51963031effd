"""bitsandbytes' CPU NF4 path on the shapes of benches/nf4.rs, for the side-by-side ratio in
BENCHMARKS.md. Same machine, same thread count as the Rust bench (rayon uses every core; torch is
given the same number). Needs torch + bitsandbytes (tests/data/README.md shows the venv).

    python benches/nf4_bnb_cpu.py            # prints GB/s per op, same units as criterion
"""
import os
import time

import torch
import bitsandbytes.functional as F

threads = os.cpu_count()
torch.set_num_threads(threads)
rows, cols = 4096, 4096
n = rows * cols
g = torch.Generator().manual_seed(1)
w32 = torch.randn(rows, cols, generator=g) * 0.02
w16 = w32.to(torch.bfloat16)


def best_of(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


print(f"bitsandbytes {__import__('bitsandbytes').__version__}, torch {torch.__version__}, {threads} threads")
print("| op | input | time (ms) | GB/s |")
print("|---|---|---|---|")
for name, w in [("f32", w32), ("bf16", w16)]:
    for dq in (False, True):
        t = best_of(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq))
        op = "quantize_dq" if dq else "quantize"
        print(f"| {op} | {name} | {t * 1e3:.1f} | {n * w.element_size() / t / 1e9:.3f} |")
q, st = F.quantize_4bit(w16, blocksize=64, quant_type="nf4", compress_statistics=True)
for dtype, size in [(torch.bfloat16, 2), (torch.float32, 4)]:
    st.dtype = dtype
    t = best_of(lambda: F.dequantize_4bit(q, st))
    print(f"| dequantize_dq | to {str(dtype)[6:]} | {t * 1e3:.1f} | {n * size / t / 1e9:.3f} |")

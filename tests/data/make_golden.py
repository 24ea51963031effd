#!/usr/bin/env python3
# Golden-file generator for qadapt's NF4 implementation (bit-exact with
# bitsandbytes' CPU path).
#
# Pinned versions (the fixtures in this directory were produced with these):
#   torch==2.15.0
#   bitsandbytes==0.50.2
#   safetensors==0.8.0
#   transformers==5.24.0
#
# Run from the repository root, inside a venv that lives OUTSIDE the repo:
#   python tests/data/make_golden.py
#
# Writes (next to this script):
#   nf4_golden.safetensors           NF4 quantize/dequantize cases (+ double quant)
#   torch_mean_golden.safetensors    torch CPU f32 sum/mean of generated arrays
#   dynamic_map_signed.txt           create_dynamic_map(signed=True), f32 hex bits
#   bnb_linear4bit.safetensors       state_dict of two bnb Linear4bit layers
#   bnb_linear4bit_dequant.safetensors  bnb's dequantized weights + originals
#
# Everything is deterministic (fixed seeds, torch limited to one thread).
# Two environment properties leak into the results and are recorded in the
# metadata (see README.md):
#   * torch's CPU capability: torch.linspace uses FMA in the AVX2/AVX512
#     kernels and not in the DEFAULT one, so create_dynamic_map() (and thus
#     every double-quant result) differs under ATEN_CPU_CAPABILITY=default.
#   * torch's thread count: Tensor.mean() over more than 32768 elements is
#     split across threads. We set one thread.

import json
import os
import sys
import warnings

PINNED = {
    "torch": "2.15.0",
    "bitsandbytes": "0.50.2",
    "safetensors": "0.8.0",
    "transformers": "5.24.0",
}

import numpy as np
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

try:
    import transformers  # noqa: F401

    _tf_version = transformers.__version__
except Exception:  # transformers is not needed to generate, only pinned
    _tf_version = None

HERE = os.path.dirname(os.path.abspath(__file__))


def save_canonical(tensors, path, metadata=None):
    """save_file, then rewrite the header with the __metadata__ keys sorted:
    safetensors serializes metadata from a hash map, so its order (and thus
    the file bytes) would change from run to run."""
    import struct

    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            ordered = {"__metadata__": header.pop("__metadata__")}
            ordered.update(header)
            new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            assert len(new) <= n, "canonical header longer than the original"
            f.seek(8)
            f.write(new + b" " * (n - len(new)))


def check_versions():
    found = {
        "torch": torch.__version__.split("+")[0],
        "bitsandbytes": bnb.__version__,
        "safetensors": safetensors.__version__,
        "transformers": _tf_version,
    }
    for name, want in PINNED.items():
        got = found[name]
        if got != want:
            print(
                f"WARNING: {name} version {got} differs from pinned {want}; "
                "the fixtures may not be reproduced bit-exactly",
                file=sys.stderr,
            )
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        print(
            f"WARNING: torch CPU capability is {cap}; the committed fixtures were made "
            "with AVX2/AVX512 kernels (torch.linspace uses FMA there), so "
            "create_dynamic_map() and all double-quant results may differ",
            file=sys.stderr,
        )
    return found, cap


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# NF4 code (bnb's table); only used to build the tie cases below.
NF4 = F.get_4bit_type("nf4", device="cpu").float()
NF4_MID = ((NF4[:-1] + NF4[1:]) / 2).float()  # f32 midpoints between neighbouring codes


# The thresholds of bnb's CUDA dQuantizeNF4 (csrc/kernels.cu, `x > 0.8614784181118011f`, ...)
# as f32 bit patterns, read from the SASS of libbitsandbytes_cuda130.so (0.50.2, sm_90). nvcc
# rounds each decimal literal straight to f32; going through a Python float (f64) would round
# four of them (indices 0, 8, 12, 14) the other way, onto NF4_MID.
NF4_TREE_BITS = [
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871, 0x3D22FAFF,
    0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9,
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(n, seed, scale=1.0):
    return torch.randn(n, generator=gen(seed), dtype=torch.float32) * scale


def case_ties():
    """Blocks of 64 whose values are absmax * f32 midpoint (exact ties in f32
    for power-of-two absmax, and for pairs 2, 6, 7, 9, 11, 13 the f32 midpoint is
    an exact tie of the f32 distances), plus a partial block of 32."""
    blocks = []
    for am in [1.0, 2.0, 0.5, 0.25, 3.7, 1e-3]:
        am = torch.tensor(am, dtype=torch.float32)
        b = torch.zeros(64)
        b[0] = am
        b[1:16] = am * NF4_MID
        b[16:31] = -am * NF4_MID
        b[31:47] = am * NF4  # the codes themselves
        b[47] = -am
        b[48:63] = am * NF4_MID.flip(0)
        blocks.append(b)
    rem = torch.zeros(32)
    rem[0] = 1.0
    rem[1:16] = NF4_MID
    rem[16:31] = -NF4_MID
    blocks.append(rem)
    return torch.cat(blocks)


def f32_step(x, k):
    """x moved by k f32 units in the last place (x > 0 or x < 0, never crossing 0)."""
    bits = x.view(torch.int32) + k
    return bits.view(torch.float32)


def case_midpoints():
    """Every f32 midpoint between neighbouring NF4 levels (NF4_MID, the bounds
    bnb 0.50's CPU path bucketizes on), the 15 thresholds of bnb's CUDA
    dQuantizeNF4 (4 of them one ulp off NF4_MID), their f32 neighbours at
    +-1 and +-2 ulp, and the levels themselves, with absmax 1.0 so that the
    scaled value is the value itself. A full block of 128 (scaled by the
    reciprocal) and a partial block of 94 (scaled by a division) hold the same
    values."""
    tree = torch.tensor(NF4_TREE_BITS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    vals = [NF4, -torch.zeros(1)]
    for base in (NF4_MID, tree):
        vals += [f32_step(base, k) for k in (-2, -1, 0, 1, 2)]
    v = torch.unique(torch.cat(vals))
    assert v.numel() <= 126, v.numel()
    full = torch.zeros(128)
    full[0] = 1.0
    full[1 : 1 + v.numel()] = v
    rem = torch.cat([torch.ones(1), v])
    return torch.cat([full, rem])


def case_near_mid(n, bs, seed, dtype):
    """Values within +-1% of absmax*midpoint, every block (incl. the partial
    one) has its own absmax: stresses the bf16/f16 rounding of the partial block."""
    g = gen(seed)
    idx = torch.randint(0, 15, (n,), generator=g)
    am = 0.5 + torch.rand(-(-n // bs), generator=g) * 3
    amr = am.repeat_interleave(bs)[:n]
    x = NF4_MID[idx] * amr * (1 + (torch.rand(n, generator=g) - 0.5) * 0.02)
    x[::bs] = am
    x[(n // bs) * bs :: bs] = am[-1]
    return x.to(dtype)


def case_zero_block():
    x = randn(300, 31)
    x[64:128] = 0.0  # all-zero full block
    x[256:] = 0.0  # all-zero partial block (44 elements)
    return x


def case_nested_ties():
    """64 blocks of 64 whose absmax values are 1+t / 1-t pairs (t a multiple of
    2^-23) laid out so that torch's cascade sum is exact: offset == 1.0 and the
    nested absmax == 1.0 (one block has absmax 2, one is all zero), so the
    nested normalized values are exactly +-t. Ten of the t are exact f32 ties
    between two neighbouring entries of the (mutated) dynamic map."""
    code = F.create_dynamic_map(signed=True)
    code[0] = -1.0
    ties = []
    for i in range(255):
        lo, hi = code[i], code[i + 1]
        m = ((lo + hi) / 2).float()
        if m > 0 and torch.abs(m - lo) == torch.abs(m - hi) and float(m) * 2**23 == int(float(m) * 2**23):
            ties.append(float(m))
    fill = [k / 64 + 1 / 2**20 for k in range(1, 64)]
    ts = (ties + fill)[:31]
    a = torch.zeros(64)
    pairs = [(8 * k + l, 8 * (k + 4) + l) for k in range(4) for l in range(8)]
    a[pairs[0][0]], a[pairs[0][1]] = 2.0, 0.0
    for (i, j), t in zip(pairs[1:], ts):
        a[i] = 1.0 + t
        a[j] = 1.0 - t
    g = gen(61)
    x = (torch.rand(64, 64, generator=g) * 1.98 - 0.99) * a.view(64, 1)
    x[:, 0] = a * torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
    return x.reshape(-1)


def case_outlier():
    x = randn(256, 41, 1e-2)
    x[70] = 1e4
    x[200] = -1e4
    return x


def case_negative():
    x = -torch.abs(randn(320, 51))
    x[:64] = -torch.rand(64, generator=gen(52)) - 0.5
    return x


# name -> (tensor builder, blocksize)
CASES = [
    ("f32_bs64_n1000", lambda: randn(1000, 1), 64),
    ("f32_bs64_n1024", lambda: randn(1024, 2), 64),
    ("f32_bs32_n1000", lambda: randn(1000, 3), 32),
    ("f32_bs128_n2000", lambda: randn(2000, 4, 0.02), 128),
    ("f32_bs256_n2560", lambda: randn(2560, 5, 30.0), 256),
    ("f32_bs1024_n3000", lambda: randn(3000, 6), 1024),
    ("f32_bs4096_n4098", lambda: randn(4098, 7), 4096),  # 4096 + partial of 2 (4097 is odd)
    ("f32_bs4096_n8192", lambda: randn(8192, 8), 4096),
    ("f32_2d_33x40_bs64", lambda: randn(33 * 40, 9).reshape(33, 40), 64),
    ("bf16_bs64_n1000", lambda: randn(1000, 10).to(torch.bfloat16), 64),
    ("f16_bs64_n1000", lambda: randn(1000, 11).to(torch.float16), 64),
    ("f16_bs128_n1090", lambda: randn(1090, 12, 0.05).to(torch.float16), 128),
    ("bf16_2d_40x97_bs64", lambda: randn(40 * 97, 13).reshape(40, 97).to(torch.bfloat16), 64),
    ("bf16_near_mid_bs64_n1000", lambda: case_near_mid(1000, 64, 14, torch.bfloat16), 64),
    ("f16_near_mid_bs64_n1000", lambda: case_near_mid(1000, 64, 15, torch.float16), 64),
    ("f32_near_mid_bs64_n1000", lambda: case_near_mid(1000, 64, 16, torch.float32), 64),
    ("f32_zero_block_bs64", case_zero_block, 64),
    ("bf16_zero_block_bs64", lambda: case_zero_block().to(torch.bfloat16), 64),
    ("f32_ties_bs64", case_ties, 64),
    ("f32_midpoints_bs128", case_midpoints, 128),
    ("f32_outlier_bs64", case_outlier, 64),
    ("f32_dq_nested_ties_bs64", case_nested_ties, 64),
    ("f32_negative_bs64", case_negative, 64),
    # 300 blocks -> double quant has one full nested block (256) + partial (44)
    ("f32_dq300_bs64", lambda: randn(300 * 64, 17, 0.02), 64),
    # 1100 blocks of 32 in bf16 -> 4 full nested blocks + partial (76)
    ("bf16_dq1100_bs32", lambda: (randn(1100 * 32, 18) * torch.rand(1100 * 32, generator=gen(19))).to(torch.bfloat16), 32),
    # odd numel: bnb 0.48.2 raises in the nibble packing (see README); recorded, not faked
    ("f32_odd_n999_bs64", lambda: randn(999, 20), 64),
]


def dtype_name(dt):
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]


def dq_would_crash(absmax):
    """bnb's CPU blockwise kernel divides by the nested block's absmax; a nested
    block whose (absmax - offset) values are all zero gives 0/0 = NaN and the
    binary search then segfaults (e.g. a single 4-bit block)."""
    a = absmax - absmax.mean()
    for i in range(0, a.numel(), 256):
        if torch.all(a[i : i + 256] == 0):
            return True
    return False


def make_nf4_golden(versions, cap):
    tensors = {}
    meta = {}
    # Captured before any quantization call (bnb's CPU kernel mutates code[0]
    # of its cached map to -1.0 on the first double quant).
    dyn_before = F.create_dynamic_map(signed=True).clone()
    tensors["dynamic_map_signed"] = dyn_before
    tensors["nf4_code"] = F.get_4bit_type("nf4", device="cpu").float().clone()

    names = []
    skipped = {}
    for name, build, bs in CASES:
        x = build().contiguous()
        n = x.numel()
        info = {"blocksize": bs, "dtype": dtype_name(x.dtype), "shape": list(x.shape)}
        try:
            packed, st = F.quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=False)
        except Exception as e:  # odd numel
            skipped[name] = f"{type(e).__name__}: {e}"
            print(f"skip {name}: bnb raised {type(e).__name__}: {e}")
            continue
        deq = F.dequantize_4bit(packed, st)
        assert deq.dtype == x.dtype
        tensors[f"{name}.input"] = x
        tensors[f"{name}.packed"] = packed.reshape(-1).contiguous()
        tensors[f"{name}.absmax"] = st.absmax.contiguous()
        tensors[f"{name}.dequant"] = deq.reshape(-1).contiguous()

        if dq_would_crash(st.absmax):
            info["double_quant"] = False
            info["note"] = "double quant skipped: bnb CPU segfaults when a nested block is all zero"
        else:
            dq_packed, dst = F.quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=True)
            dq_deq = F.dequantize_4bit(dq_packed, dst)
            assert dst.state2.blocksize == 256
            tensors[f"{name}.dq_packed"] = dq_packed.reshape(-1).contiguous()
            tensors[f"{name}.dq_absmax"] = dst.absmax.contiguous()
            tensors[f"{name}.dq_nested_absmax"] = dst.state2.absmax.contiguous()
            tensors[f"{name}.dq_nested_quant_map"] = dst.state2.code.clone()
            tensors[f"{name}.dq_offset"] = dst.offset.reshape(1).float().clone()
            tensors[f"{name}.dq_dequant"] = dq_deq.reshape(-1).contiguous()
            info["double_quant"] = True
        assert n == x.numel()
        meta[name] = json.dumps(info)
        names.append(name)

    tensors["dynamic_map_after"] = F.name2qmap["dynamic"].clone()
    meta["cases"] = json.dumps(names)
    meta["skipped"] = json.dumps(skipped)
    meta["versions"] = json.dumps(versions)
    meta["cpu_capability"] = cap
    meta["num_threads"] = str(torch.get_num_threads())
    save_canonical(tensors, os.path.join(HERE, "nf4_golden.safetensors"), metadata=meta)

    with open(os.path.join(HERE, "dynamic_map_signed.txt"), "w") as f:
        for v in dyn_before.view(torch.int32).tolist():
            f.write(f"0x{v & 0xFFFFFFFF:08x}\n")
    return names, skipped


def mean_input(length):
    """Deterministic f32 inputs, reproducible without torch:
    u = (i * 2654435761 + 12345) mod 2^32 ; x_i = f32(u >> 8) * 2^-24 * f32(i % 7 + 1)
    (both products in f32; the first one is exact)."""
    i = np.arange(length, dtype=np.uint64)
    u = ((i * np.uint64(2654435761) + np.uint64(12345)) & np.uint64(0xFFFFFFFF)).astype(np.uint64)
    a = (u >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
    return (a * ((i % np.uint64(7)) + np.uint64(1)).astype(np.float32)).astype(np.float32)


MEAN_LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257,
                300, 1000, 1100, 4097, 5000, 8192, 8193, 9000, 20000, 32768, 32769, 70000, 300000]


def make_mean_golden():
    tensors = {}
    for L in MEAN_LENGTHS:
        t = torch.from_numpy(mean_input(L))
        tensors[f"len_{L}.sum"] = t.sum().reshape(1).clone()
        tensors[f"len_{L}.mean"] = t.mean().reshape(1).clone()
    meta = {
        "lengths": json.dumps(MEAN_LENGTHS),
        "input": "x_i = f32(((i*2654435761 + 12345) mod 2^32) >> 8) * 2^-24 * f32(i%7+1), i = 0..len-1, f32 products",
        "num_threads": str(torch.get_num_threads()),
    }
    save_canonical(tensors, os.path.join(HERE, "torch_mean_golden.safetensors"), metadata=meta)


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # fc1: bf16 weights, double quant; fc2: f32 weights, no double quant.
        self.fc1 = bnb.nn.Linear4bit(97, 40, bias=True, compute_dtype=torch.bfloat16,
                                     compress_statistics=True, quant_type="nf4")
        self.fc2 = bnb.nn.Linear4bit(40, 33, bias=True, compute_dtype=torch.bfloat16,
                                     compress_statistics=False, quant_type="nf4")


def make_linear4bit():
    torch.manual_seed(1234)
    orig = {
        "fc1.weight": (torch.randn(40, 97, generator=gen(100)) * 0.05).to(torch.bfloat16),
        "fc1.bias": (torch.randn(40, generator=gen(101)) * 0.01).to(torch.bfloat16),
        "fc2.weight": torch.randn(33, 40, generator=gen(102)) * 0.1,
        "fc2.bias": torch.randn(33, generator=gen(103)) * 0.01,
    }
    m = TinyModel()
    for layer, cs in [("fc1", True), ("fc2", False)]:
        mod = getattr(m, layer)
        mod.weight = bnb.nn.Params4bit(orig[f"{layer}.weight"].clone(), requires_grad=False,
                                       compress_statistics=cs, quant_type="nf4", blocksize=64)
        mod.bias = torch.nn.Parameter(orig[f"{layer}.bias"].clone(), requires_grad=False)
    # Params4bit.to(device) quantizes (on the CPU here).
    m = m.to("cpu")
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, os.path.join(HERE, "bnb_linear4bit.safetensors"))

    deq = {}
    for layer in ["fc1", "fc2"]:
        w = getattr(m, layer).weight
        d = F.dequantize_4bit(w.data, w.quant_state)
        assert d.dtype == orig[f"{layer}.weight"].dtype and d.shape == orig[f"{layer}.weight"].shape
        deq[f"{layer}.weight"] = d.contiguous()
        deq[f"{layer}.weight.orig"] = orig[f"{layer}.weight"].contiguous()
    save_file(deq, os.path.join(HERE, "bnb_linear4bit_dequant.safetensors"))
    return sd


def main():
    versions, cap = check_versions()
    names, skipped = make_nf4_golden(versions, cap)
    make_mean_golden()
    sd = make_linear4bit()
    print(f"nf4_golden: {len(names)} cases, skipped: {list(skipped)}")
    for k, v in sd.items():
        print(f"bnb_linear4bit: {k} {v.dtype} {list(v.shape)}")
    for f in sorted(os.listdir(HERE)):
        print(f"{f}: {os.path.getsize(os.path.join(HERE, f))} bytes")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
# Checks that a bitsandbytes-4bit checkpoint written by qadapt is byte-identical
# to what bitsandbytes itself produces, and that bnb reads it back.
#
# Usage (in a venv with the pinned versions, see README.md):
#   python tests/data/check_bnb_reads.py ORIG.safetensors QUANT.safetensors
#
# QUANT: layout of bnb_linear4bit.safetensors, i.e. for every quantized layer X
#   X.weight (u8 [ceil(n/2), 1]), X.weight.absmax, X.weight.quant_map,
#   [X.weight.nested_absmax, X.weight.nested_quant_map,]
#   X.weight.quant_state.bitsandbytes__nf4 (u8 JSON bytes), and plain tensors.
# ORIG: the unquantized tensors; for layer X the key X.weight.orig is used if
#   present (as in bnb_linear4bit_dequant.safetensors), else X.weight.
#
# For every quantized tensor: rebuild bnb's QuantState with QuantState.from_dict,
# dequantize with bnb, quantize ORIG's tensor with bnb (same blocksize, quant
# type, double quant), and require byte equality of the packed data, absmax,
# nested absmax/map/offset, quant map, JSON fields and the dequantized values.
# Plain tensors present in both files must be byte-identical.
# One line per tensor; exit status 1 on any mismatch.
#
# Pinned: torch==2.15.0 bitsandbytes==0.50.2 safetensors==0.8.0 transformers==5.24.0

import json
import sys
import warnings

import torch

torch.set_num_threads(1)  # torch's mean over >32768 absmax values depends on the thread count
warnings.filterwarnings("ignore", category=FutureWarning)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.utils import unpack_tensor_to_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

QS_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def same_bytes(a, b):
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    a = a.contiguous().reshape(-1).view(torch.uint8)
    b = b.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a, b)


def describe(t):
    return "None" if t is None else f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def mismatch(got, want):
    msg = f"got {describe(got)} want {describe(want)}"
    if got is not None and want is not None and got.dtype == want.dtype and got.numel() == want.numel():
        g = got.contiguous().reshape(-1)
        w = want.contiguous().reshape(-1)
        bad = (g.view(torch.uint8) != w.view(torch.uint8)) if g.element_size() == 1 else (g != w) & ~(g.isnan() & w.isnan())
        if g.element_size() != 1:
            bad = bad | (g.view(torch.uint8).reshape(g.numel(), -1) != w.view(torch.uint8).reshape(w.numel(), -1)).any(-1)
        idx = torch.nonzero(bad).reshape(-1)
        if idx.numel():
            i = int(idx[0])
            msg += f"; {idx.numel()} element(s) differ, first at flat index {i}: got {g[i].item()!r} want {w[i].item()!r}"
    return msg


def main(argv):
    if len(argv) != 3:
        print("usage: check_bnb_reads.py ORIG.safetensors QUANT.safetensors", file=sys.stderr)
        return 2
    if torch.__version__.split("+")[0] != "2.15.0" or bnb.__version__ != "0.50.2":
        print(f"WARNING: torch {torch.__version__} / bitsandbytes {bnb.__version__} differ from the pinned "
              "2.15.0 / 0.50.2", file=sys.stderr)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        print("WARNING: torch CPU capability is not AVX2/AVX512: bnb's dynamic map (double quant) differs",
              file=sys.stderr)
    orig = load_file(argv[1])
    quant = load_file(argv[2])
    failures = 0

    def report(ok, what, detail=""):
        nonlocal failures
        failures += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {what}{(' ' + detail) if detail else ''}")

    qs_keys = sorted(k for k in quant if ".weight.quant_state.bitsandbytes__" in k)
    consumed = set()
    for qs_key in qs_keys:
        prefix = qs_key.split(".quant_state.")[0]  # "X.weight"
        group = {k: v for k, v in quant.items() if k == prefix or k.startswith(prefix + ".")}
        consumed.update(group)
        packed = group[prefix]
        qs_dict = {k[len(prefix) + 1 :]: v for k, v in group.items() if k != prefix}
        extra = set(k.split(".")[0] for k in qs_dict) - set(QS_SUFFIXES) - {"quant_state"}
        if extra:
            report(False, prefix, f"unexpected keys {sorted(extra)}")
            continue
        meta = unpack_tensor_to_dict(qs_dict[qs_key[len(prefix) + 1 :]].clone())
        try:
            state = F.QuantState.from_dict(dict(qs_dict), device=torch.device("cpu"))
        except Exception as e:
            report(False, prefix, f"QuantState.from_dict failed: {type(e).__name__}: {e}")
            continue

        okey = prefix + ".orig" if prefix + ".orig" in orig else prefix
        if okey not in orig:
            report(False, prefix, f"no {prefix}(.orig) in ORIG")
            continue
        w = orig[okey].contiguous()
        consumed.add(okey)
        nested = "nested_absmax" in qs_dict
        ref_packed, ref = F.quantize_4bit(w, blocksize=state.blocksize, quant_type=state.quant_type,
                                          compress_statistics=nested)
        ref_meta = ref.as_dict(packed=False)

        checks = [
            ("packed", packed, ref_packed),
            ("absmax", qs_dict["absmax"], ref.absmax),
            ("quant_map", qs_dict["quant_map"], ref.code),
        ]
        if nested:
            checks += [
                ("nested_absmax", qs_dict["nested_absmax"], ref.state2.absmax),
                ("nested_quant_map", qs_dict["nested_quant_map"], ref.state2.code),
            ]
        for name, got, want in checks:
            ok = same_bytes(got, want)
            report(ok, f"{prefix}.{name}", "" if ok else mismatch(got, want))

        for field in ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                      "nested_offset"):
            want = ref_meta.get(field)
            got = meta.get(field)
            if isinstance(want, tuple):
                want = list(want)
            if field == "nested_offset" and want is not None and got is not None:
                # compare as f32, the way from_dict reads it back
                ok = torch.tensor(float(got)).view(torch.int32) == torch.tensor(float(want)).view(torch.int32)
                ok = bool(ok)
            else:
                ok = got == want
            if got is None and want is None:
                continue
            report(ok, f"{prefix}.quant_state[{field}]", f"{got!r}" if ok else f"got {got!r} want {want!r}")

        try:
            deq = F.dequantize_4bit(packed, state)
            ref_deq = F.dequantize_4bit(ref_packed, ref)
            ok = same_bytes(deq, ref_deq)
            report(ok, f"{prefix} dequantized", describe(deq) if ok else mismatch(deq, ref_deq))
        except Exception as e:
            report(False, f"{prefix} dequantized", f"bnb failed: {type(e).__name__}: {e}")

    for k in sorted(set(quant) - consumed):
        if k in orig:
            ok = same_bytes(quant[k], orig[k])
            report(ok, k, describe(quant[k]) if ok else mismatch(quant[k], orig[k]))
        else:
            print(f"SKIP {k} (not in ORIG)")

    if not qs_keys:
        report(False, "QUANT", "no *.weight.quant_state.bitsandbytes__* key found")
    print(f"{'PASS' if failures == 0 else 'FAILED'}: {failures} mismatch(es)")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

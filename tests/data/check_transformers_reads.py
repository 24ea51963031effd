#!/usr/bin/env python3
"""Checks that a model directory quantized by `qadapt quantize DIR OUT --double-quant` is what
transformers + bitsandbytes make of the same model, and that transformers loads it.

    python tests/data/check_transformers_reads.py ORIG_DIR QUANT_DIR

ORIG_DIR is the unquantized HF model directory, QUANT_DIR qadapt's output. The script quantizes
ORIG_DIR itself with transformers (BitsAndBytesConfig as recorded in QUANT_DIR/config.json, on the
CPU), loads QUANT_DIR with from_pretrained, and compares every tensor of the two state dicts byte
for byte and the logits of both models on a fixed input. Exit status 0 when all match.
Pinned: torch==2.15.0 transformers==5.24.0 bitsandbytes==0.50.2 (see tests/data/README.md).
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

orig, quant = sys.argv[1], sys.argv[2]
qc = json.load(open(f"{quant}/config.json"))["quantization_config"]
config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type=qc["bnb_4bit_quant_type"],
    bnb_4bit_use_double_quant=qc["bnb_4bit_use_double_quant"],
    bnb_4bit_compute_dtype=getattr(torch, qc["bnb_4bit_compute_dtype"]),
)
theirs = AutoModelForCausalLM.from_pretrained(orig, quantization_config=config, device_map="cpu")
ours = AutoModelForCausalLM.from_pretrained(quant, device_map="cpu")
a, b = theirs.state_dict(), ours.state_dict()
bad = 0
if sorted(a) != sorted(b):
    print("key sets differ:", sorted(set(a) ^ set(b)))
    bad += 1
for k in sorted(set(a) & set(b)):
    x, y = a[k], b[k]
    same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    if not same:
        print(f"MISMATCH {k}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        bad += 1
ids = torch.arange(1, 12).reshape(1, 11) % theirs.config.vocab_size
with torch.no_grad():
    la, lb = theirs(ids).logits, ours(ids).logits
print(f"{len(a)} tensors compared; logits max |diff| = {(la.float() - lb.float()).abs().max().item():.3g}")
if not torch.equal(la, lb):
    bad += 1
print("PASS" if bad == 0 else f"FAIL: {bad} mismatch(es)")
sys.exit(1 if bad else 0)

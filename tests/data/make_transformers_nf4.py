#!/usr/bin/env python3
"""Writes tests/data/tiny_llama_nf4/: tests/data/tiny_llama quantized by transformers +
bitsandbytes itself (NF4, double quant, bf16 compute, on the CPU) and saved with
save_pretrained. `crates/qadapt-cli/tests/cli/model_dir.rs` checks that `qadapt quantize` on the same
directory writes the same tensors and the quantization_config transformers needs.

Pinned: torch==2.15.0 transformers==5.24.0 bitsandbytes==0.50.2 safetensors==0.8.0.
Run from the repository root in a venv outside the repo:
    python tests/data/make_transformers_nf4.py
"""
import os

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

here = os.path.dirname(os.path.abspath(__file__))
config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)
model = AutoModelForCausalLM.from_pretrained(
    os.path.join(here, "tiny_llama"), quantization_config=config, device_map="cpu"
)
out = os.path.join(here, "tiny_llama_nf4")
model.save_pretrained(out)
for extra in ("generation_config.json",):
    path = os.path.join(out, extra)
    if os.path.exists(path):
        os.remove(path)
print("wrote", out, sorted(os.listdir(out)))

#!/usr/bin/env python3
# Checks that adapters written by qadapt-train load in PEFT 0.21.2 and give our outputs.
#
#   QADAPT_EXPORT_DIR=/tmp/qx cargo test -p qadapt-train --test peft written_adapters
#   python tests/data/check_peft_reads_ours.py /tmp/qx
#
# For each of lora, ia3, prompt, prefix: PeftModel.from_pretrained(tiny_llama, DIR/<method>),
# eval mode, eager attention, f32, labels = input_ids; compares PEFT's logits and loss with the
# ones qadapt wrote in DIR/<method>_ours.safetensors and prints the max error.

import os
import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
out = sys.argv[1]
bad = 0
for name in ("lora", "ia3", "prompt", "prefix"):
    base = LlamaForCausalLM.from_pretrained(
        os.path.join(HERE, "tiny_llama"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = PeftModel.from_pretrained(base, os.path.join(out, name)).eval()
    ours = load_file(os.path.join(out, name + "_ours.safetensors"))
    with torch.no_grad():
        r = model(input_ids=ours["input_ids"], labels=ours["input_ids"])
    err = (r.logits - ours["logits"]).abs().max().item()
    scale = ours["logits"].abs().max().item()
    lrel = abs(r.loss.item() - ours["loss"].item()) / abs(r.loss.item())
    ok = r.logits.shape == ours["logits"].shape and err <= 3e-5 * scale and lrel <= 1e-5
    bad += not ok
    print(f"{name}: logits {tuple(r.logits.shape)} max err {err:.3e} (max {scale:.3f}), loss rel err {lrel:.3e}", "ok" if ok else "MISMATCH")
sys.exit(1 if bad else 0)

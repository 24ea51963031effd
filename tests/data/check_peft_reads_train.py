#!/usr/bin/env python3
# Checks that an adapter written by `qadapt train` loads in PEFT 0.21.2 over the same base model
# and gives the logits and loss that `qadapt logits` gives for it.
#
#   python tests/data/check_peft_reads_train.py MODEL_DIR ADAPTER_DIR IDS.safetensors OURS.safetensors [--nf4]
#
# OURS is what `qadapt logits --model MODEL_DIR --adapter ADAPTER_DIR --tokens T --out OURS`
# wrote (logits, loss) for the input_ids of IDS. With --nf4 the base is loaded 4-bit by transformers +
# bitsandbytes (NF4, block 64, double quant, f32 compute), the QLoRA setting of `qadapt train
# --method qlora` and `qadapt logits --nf4`. Pinned versions: torch==2.15.0,
# transformers==5.24.0, peft==0.21.2, bitsandbytes==0.50.2 (see tests/data/README.md).

import sys
import warnings

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, LlamaForCausalLM

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
model_dir, adapter_dir, ids_path, ours_path = sys.argv[1:5]
nf4 = "--nf4" in sys.argv[5:]
kw = {}
if nf4:
    kw["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
base = LlamaForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, attn_implementation="eager", **kw
).eval()
model = PeftModel.from_pretrained(base, adapter_dir).eval()
ours = load_file(ours_path)
ids = load_file(ids_path)["input_ids"]
with torch.no_grad():
    r = model(input_ids=ids, labels=ids)
err = (r.logits.float() - ours["logits"]).abs().max().item()
scale = ours["logits"].abs().max().item()
lrel = abs(r.loss.item() - ours["loss"].item()) / abs(r.loss.item())
tol = 2e-4 if nf4 else 3e-5
ok = r.logits.shape == ours["logits"].shape and err <= tol * scale and lrel <= 10 * tol
print(
    f"{'qlora' if nf4 else 'lora'}: logits {tuple(r.logits.shape)} max err {err:.3e} "
    f"(max {scale:.3f}), loss {r.loss.item():.6f} vs {ours['loss'].item():.6f} "
    f"(rel {lrel:.2e})",
    "ok" if ok else "MISMATCH",
)
sys.exit(0 if ok else 1)

#!/usr/bin/env python3
# Golden-file generator for qadapt-train's Llama forward and backward (against transformers).
#
# Pinned versions (the fixtures in this directory were produced with these):
#   torch==2.15.0
#   transformers==5.24.0
#   safetensors==0.8.0
#   peft==0.21.2
#
# Run from the repository root, inside a venv that lives OUTSIDE the repo:
#   python tests/data/make_llama_golden.py
#
# Builds two tiny random Llama models (no download: random weights from fixed seeds) and writes,
# next to this script:
#   tiny_llama/                     HF directory: config.json + model.safetensors (bf16 weights),
#                                   untied lm_head, default RoPE (theta 10000)
#   tiny_llama_golden.safetensors   input_ids [2, 11] (i64), logits [2, 11, V], loss [] (mean
#                                   shifted cross-entropy, labels = input_ids), and
#                                   "grad.<parameter name>" for every parameter plus
#                                   "grad.inputs_embeds" [2, 11, C] (the embedding output), all f32
#   tiny_llama_llama3/              HF directory, llama3 rope scaling, tied embeddings, f16 weights
#                                   sharded (model.safetensors.index.json + shards)
#   tiny_llama_llama3_golden.safetensors   the same keys for that model
#   tiny_llama_lora/                PEFT LoRA adapter on tiny_llama (adapter_config.json +
#                                   adapter_model.safetensors, f32): r 4, alpha 8, rsLoRA, targets
#                                   q/v/o/gate/down_proj, lora_B random (not PEFT's zero init, so
#                                   every gradient is non-zero)
#   tiny_llama_lora_golden.safetensors     input_ids, logits, loss and "grad.<adapter key>" for
#                                   every lora_A / lora_B (keys as in adapter_model.safetensors)
#
# The weights are rounded to bf16 values before anything is computed, so the bf16 file holds
# exactly the weights the golden values were computed with. The init is deliberately large
# (std 0.3 instead of 0.02) and the RMSNorm weights are 1 + 0.2 N(0, 1), so attention is far from
# uniform and every norm weight matters. Attention is "eager" (the reference softmax(QK^T/sqrt(d))
# path); everything runs in f32 on one CPU thread, so reruns give the same numbers.

import json
import os
import warnings

PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "safetensors": "0.8.0", "peft": "0.21.2"}

import peft  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))

for name, mod in (
    ("torch", torch),
    ("transformers", transformers),
    ("safetensors", safetensors),
    ("peft", peft),
):
    have = mod.__version__.split("+")[0]
    if have != PINNED[name]:
        print(f"warning: {name} {have} differs from the pinned {PINNED[name]}")

BASE = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)

CASES = [
    dict(
        name="tiny_llama",
        seed=1234,
        config=dict(BASE, vocab_size=100, tie_word_embeddings=False, rope_theta=10000.0),
        save_dtype=torch.bfloat16,
        max_shard_size=None,
    ),
    dict(
        name="tiny_llama_llama3",
        seed=5678,
        # head_dim 8, theta 10000: wavelengths 6.3, 63, 628, 6283 against the llama3 band
        # [64/4, 64/1] = [16, 64], so one frequency is kept, one smoothed, two divided by factor.
        config=dict(
            BASE,
            num_hidden_layers=1,
            vocab_size=96,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            rope_theta=10000.0,
        ),
        save_dtype=torch.float16,
        max_shard_size="20KB",
    ),
]


def metadata(**extra):
    # One metadata key: safetensors writes the metadata map in hash order, so several keys would
    # make the file bytes differ from run to run.
    info = dict(
        extra,
        torch=torch.__version__,
        transformers=transformers.__version__,
        safetensors=safetensors.__version__,
        peft=peft.__version__,
    )
    return {"generator": json.dumps(info, sort_keys=True)}


def build(case):
    torch.manual_seed(case["seed"])
    config = LlamaConfig(**case["config"])
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
            # Rounded to the saved dtype (bf16, then f16 for an f16 file) so the file is lossless.
            p.copy_(p.bfloat16().float())
            if case["save_dtype"] == torch.float16:
                p.copy_(p.half().float())
    return config, model


def golden(case):
    config, model = build(case)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    input_ids = torch.randint(0, config.vocab_size, (2, 11), generator=g)

    captured = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        captured["embeds"] = output

    h = model.model.embed_tokens.register_forward_hook(hook)
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    h.remove()

    tensors = {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(()).contiguous(),
        "grad.inputs_embeds": captured["embeds"].grad.detach().float().contiguous(),
    }
    for pname, p in model.named_parameters():
        tensors["grad." + pname] = p.grad.detach().float().contiguous()
    save_file(
        tensors,
        os.path.join(HERE, case["name"] + "_golden.safetensors"),
        metadata=metadata(loss=repr(float(out.loss))),
    )

    out_dir = os.path.join(HERE, case["name"])
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    kwargs = dict(safe_serialization=True)
    if case["max_shard_size"] is not None:
        kwargs["max_shard_size"] = case["max_shard_size"]
    model.to(case["save_dtype"]).save_pretrained(out_dir, **kwargs)
    # generation_config.json is not needed by qadapt; keep the fixture minimal.
    gen = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    print(case["name"], "loss", float(out.loss), "files", sorted(os.listdir(out_dir)))


def lora_golden():
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base = LlamaForCausalLM.from_pretrained(
        os.path.join(HERE, "tiny_llama"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    lcfg = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(4321)
    model = get_peft_model(base, lcfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(4322)
    input_ids = torch.randint(0, base.config.vocab_size, (2, 11), generator=g)
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    tensors = {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(()).contiguous(),
    }
    for pname, p in model.named_parameters():
        if p.requires_grad:
            tensors["grad." + pname.replace(".default.", ".")] = p.grad.detach().float().contiguous()
    save_file(
        tensors,
        os.path.join(HERE, "tiny_llama_lora_golden.safetensors"),
        metadata=metadata(loss=repr(float(out.loss))),
    )
    out_dir = os.path.join(HERE, "tiny_llama_lora")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    model.save_pretrained(out_dir)
    # PEFT records the absolute path of the base model; keep the fixture machine-independent.
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "tiny_llama"
    cfg["target_modules"] = sorted(cfg["target_modules"])  # a set inside PEFT
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for f in os.listdir(out_dir):
        if f not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(out_dir, f))
    print("tiny_llama_lora loss", float(out.loss), "files", sorted(os.listdir(out_dir)))


if __name__ == "__main__":
    for case in CASES:
        golden(case)
    lora_golden()

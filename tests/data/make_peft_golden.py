#!/usr/bin/env python3
# Golden-file generator for qadapt-train's (IA)^3, prompt tuning and prefix tuning, against PEFT.
#
# Pinned versions: torch==2.15.0, transformers==5.24.0, safetensors==0.8.0, peft==0.21.2 (the
# same as make_llama_golden.py, whose tiny_llama/ this script reads; run that one first).
#
# Run from the repository root, inside a venv that lives OUTSIDE the repo:
#   python tests/data/make_peft_golden.py
#
# For each method it builds a PEFT model on tiny_llama (eval mode, eager attention, f32, one
# thread), overwrites the adapter's parameters with random values from a fixed seed (so no
# gradient is zero and the adapter visibly changes the output), runs input_ids [2, 7] with
# labels = input_ids, and writes
#   tiny_llama_<method>/                 adapter_config.json + adapter_model.safetensors (PEFT's)
#   tiny_llama_<method>_golden.safetensors
#       input_ids [2, 7] (i64), logits [2, T', V] as PEFT returns them (T' = 7 + 3 virtual tokens
#       for prompt tuning, 7 otherwise), loss [] (PEFT's: for prompt tuning the labels of the
#       virtual positions are -100), and "grad.<key>" for every tensor of adapter_model.safetensors
#
# Methods:
#   ia3      target_modules k_proj, v_proj, o_proj, down_proj; feedforward_modules down_proj
#            (PEFT's Llama default plus o_proj); ia3_l = 1 + 0.3 N(0, 1)
#   prompt   prompt tuning, 3 virtual tokens, RANDOM init, embeddings 0.5 N(0, 1)
#   prefix   prefix tuning, 3 virtual tokens, no projection; prompt_embeddings
#            [3, layers * 2 * kv_heads * head_dim] = 0.5 N(0, 1)
#   prefix_mlp  prefix tuning with prefix_projection (encoder_hidden_size 12): the adapter file
#            holds the projected prefix; the golden also holds "param.<name>" for the MLP's
#            parameters (prompt_encoder.embedding.weight, prompt_encoder.transform.{0,2}.*), and
#            the gradients are those parameters' ("grad.<name>")

import json
import os
import warnings

import peft
import torch
from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))


def base():
    return LlamaForCausalLM.from_pretrained(
        os.path.join(HERE, "tiny_llama"), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def method_config(name):
    if name == "ia3":
        return IA3Config(
            target_modules=["k_proj", "v_proj", "o_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="CAUSAL_LM",
        )
    if name == "prompt":
        return PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    if name == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    if name == "prefix_mlp":
        return PrefixTuningConfig(
            num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=12, task_type="CAUSAL_LM"
        )
    raise ValueError(name)


def make(name, seed):
    torch.manual_seed(seed)
    model = get_peft_model(base(), method_config(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.requires_grad:
                if name == "ia3":
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.copy_(0.5 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, 100, (2, 7), generator=g)
    model.zero_grad()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()

    out_dir = os.path.join(HERE, "tiny_llama_" + name)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    model.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "tiny_llama"
    for k in ("target_modules", "feedforward_modules"):
        if isinstance(cfg.get(k), list):
            cfg[k] = sorted(cfg[k])
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for f in os.listdir(out_dir):
        if f not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(out_dir, f))

    # Gradients under the saved keys: PEFT's state dict maps parameter -> saved key.
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    tensors = {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(()).contiguous(),
    }
    if name == "prefix_mlp":
        # The file holds the projected prefix (PEFT drops the MLP when saving); the golden keeps
        # the MLP's parameters ("param.<name>") and their gradients ("grad.<name>").
        for pname, p in model.named_parameters():
            if p.requires_grad:
                key = pname.replace(".default", "")
                tensors["param." + key] = p.detach().float().contiguous()
                tensors["grad." + key] = p.grad.detach().float().contiguous()
        with torch.no_grad():
            projected = model.get_prompt_embedding_to_save("default")
        assert torch.allclose(projected, saved["prompt_embeddings"])
    elif name in ("prompt", "prefix"):
        (p,) = [p for p in model.parameters() if p.requires_grad]
        assert p.grad.shape == saved["prompt_embeddings"].shape, (p.grad.shape, saved["prompt_embeddings"].shape)
        assert torch.equal(p.detach(), saved["prompt_embeddings"])
        tensors["grad.prompt_embeddings"] = p.grad.detach().float().contiguous()
    else:
        for pname, p in model.named_parameters():
            if p.requires_grad:
                key = pname.replace(".default", "")
                assert key in saved, (key, list(saved))
                assert torch.equal(p.detach(), saved[key])
                tensors["grad." + key] = p.grad.detach().float().contiguous()
        assert len(tensors) - 3 == len(saved)
    info = dict(torch=torch.__version__, peft=peft.__version__, loss=repr(float(out.loss)))
    save_file(
        tensors,
        os.path.join(HERE, "tiny_llama_" + name + "_golden.safetensors"),
        metadata={"generator": json.dumps(info, sort_keys=True)},
    )
    print(name, "loss", float(out.loss), "logits", tuple(out.logits.shape), "saved", {k: tuple(v.shape) for k, v in saved.items()})


if __name__ == "__main__":
    make("ia3", 11)
    make("prompt", 22)
    make("prefix", 33)
    make("prefix_mlp", 44)

"""One LoRA training step on the CPU, PyTorch + PEFT against qadapt, in one run.

Pinned (the versions the numbers in BENCHMARKS.md were measured with):
    torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0

    python benches/lora_step_torch.py                    # default shape, 2 threads
    python benches/lora_step_torch.py --threads 1 --steps 20 --rounds 3
    python benches/lora_step_torch.py --model DIR        # an existing HF Llama directory
    just bench-torch /work/goldvenv/bin/python

What both sides run, on the same saved model directory, the same ids and the same initial adapter:
- a Llama (random by default, fixed seed, f32: hidden 192, MLP 512, 4 layers, 6 heads over 2 kv
  heads of 32, vocab 512, untied, max_position 128), eager attention;
- LoRA r 8, alpha 16, dropout 0 on all seven projections (q, k, v, o, gate, up, down), PEFT's
  initialization, saved with `save_pretrained` and read back by qadapt (`--adapter`);
- a batch of ids [16, 64] (fixed seed), labels = input ids (mean next-token cross-entropy);
- per step: forward, loss, backward (frozen base), AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8,
  weight decay 0.01; torch.optim.AdamW), zero the gradients.

Threads: `torch.set_num_threads(T)`; qadapt gets `RAYON_NUM_THREADS=T` and `MATMUL_NUM_THREADS=T`
(its two pools: rayon for the ops, matrixmultiply's for each GEMM). Each side times `--warmup`
untimed steps then `--steps` timed ones, wall clock per step; `--rounds K` repeats torch then
qadapt K times (the machine is shared: look at the spread) and the table gives the median of the
per-round medians and the fastest single step of all rounds. The losses of every step are
compared; the first step's must agree to 1e-4 or the script fails (same model, same ids: the same
work is measured).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF Llama directory (default: a random model, saved to a temp dir)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_model(args, tmp):
    """The model (f32, eager attention) and the directory qadapt reads it from."""
    if args.model:
        model = LlamaForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, attn_implementation="eager"
        )
        return model, Path(args.model)
    cfg = LlamaConfig(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).float()
    d = tmp / "model"
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def time_torch(model, adapter_dir, ids, args):
    """Fresh PEFT model from the saved initial adapter each round, so every round runs the same
    steps from the same state."""
    pm = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        dt = (time.perf_counter() - t) * 1e3
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
    pm.unload()  # takes the LoRA layers out again: the base model is reused next round
    med = statistics.median(times)
    return {
        "framework": "torch",
        "losses": losses,
        "step_ms": times,
        "median_ms": med,
        "min_ms": min(times),
        "tokens_per_s": ids.numel() / (med / 1e3),
        "trainable_params": sum(p.numel() for p in params),
    }


def qadapt_binary():
    """Builds the bench target and returns its executable (cargo prints it in its JSON)."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", "lora_step", "--no-run", "--message-format=json"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "lora_step":
            if msg.get("executable"):
                return msg["executable"]
    sys.exit("cargo did not report the lora_step executable")


def time_qadapt(exe, model_dir, adapter_dir, ids_file, args):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), MATMUL_NUM_THREADS=str(args.threads))
    cmd = [
        exe,
        "--model", str(model_dir),
        "--adapter", str(adapter_dir),
        "--ids", str(ids_file),
        "--batch", str(args.batch),
        "--seq", str(args.seq),
        "--lr", str(args.lr),
        "--warmup", str(args.warmup),
        "--steps", str(args.steps),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{args.threads} threads; batch {args.batch} x {args.seq}; LoRA r {args.rank} alpha {args.alpha:g} "
        f"on {','.join(TARGETS)}; warmup {args.warmup}, {args.steps} timed steps, {args.rounds} round(s)"
    )
    exe = qadapt_binary()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        model, model_dir = build_model(args, tmp)
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
        ids_file = tmp / "ids.txt"
        ids_file.write_text(" ".join(str(v) for v in ids.flatten().tolist()) + "\n")
        lcfg = LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(args.seed + 2)
        init = get_peft_model(model, lcfg)
        adapter_dir = tmp / "adapter"
        init.save_pretrained(adapter_dir)
        model = init.unload()

        rounds = []
        for _ in range(args.rounds):
            tr = time_torch(model, adapter_dir, ids, args)
            qa = time_qadapt(exe, model_dir, adapter_dir, ids_file, args)
            rounds.append((tr, qa))

    tr0, qa0 = rounds[0]
    if tr0["trainable_params"] != qa0["trainable_params"]:
        sys.exit(f"trainable parameters differ: torch {tr0['trainable_params']}, qadapt {qa0['trainable_params']}")
    diffs = [abs(a - b) for a, b in zip(tr0["losses"], qa0["losses"])]
    print(
        f"losses: first step torch {tr0['losses'][0]:.6f} qadapt {qa0['losses'][0]:.6f} "
        f"(|diff| {diffs[0]:.2e}); max |diff| over {len(diffs)} steps {max(diffs):.2e}"
    )
    if diffs[0] > 1e-4:
        sys.exit("the first-step losses disagree: not the same model or batch")

    for i, (tr, qa) in enumerate(rounds):
        print(
            f"round {i + 1}: torch {tr['median_ms']:.1f} ms (min {tr['min_ms']:.1f}), "
            f"qadapt {qa['median_ms']:.1f} ms (min {qa['min_ms']:.1f}), ratio {tr['median_ms'] / qa['median_ms']:.2f}"
        )
    tok = args.batch * args.seq
    t_ms = statistics.median(tr["median_ms"] for tr, _ in rounds)
    q_ms = statistics.median(qa["median_ms"] for _, qa in rounds)
    t_min = min(tr["min_ms"] for tr, _ in rounds)
    q_min = min(qa["min_ms"] for _, qa in rounds)
    ratios = [tr["median_ms"] / qa["median_ms"] for tr, qa in rounds]
    spread = f" (rounds {min(ratios):.2f}..{max(ratios):.2f})" if len(ratios) > 1 else ""
    print()
    print("| framework | ms/step (median) | ms/step (min) | tokens/s (median) | torch / qadapt (median) | torch / qadapt (min) |")
    print("|---|---|---|---|---|---|")
    print(
        f"| PyTorch {torch.__version__.split('+')[0]} + PEFT {peft.__version__} | {t_ms:.1f} | {t_min:.1f} "
        f"| {tok / t_ms * 1e3:.0f} | 1.00 | 1.00 |"
    )
    print(
        f"| qadapt | {q_ms:.1f} | {q_min:.1f} | {tok / q_ms * 1e3:.0f} | {t_ms / q_ms:.2f}{spread} "
        f"| {t_min / q_min:.2f} |"
    )

if __name__ == "__main__":
    main()

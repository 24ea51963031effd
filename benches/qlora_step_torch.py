"""One QLoRA training step at a real Llama shape with PyTorch + PEFT + bitsandbytes: the other side
of the GPU bundle's comparison with `benches/lora_step.rs --random-shape ... --base nf4` (same
shape, same batch and sequence, same LoRA rank and targets, layer checkpointing on both sides).

Pinned where we install it (the GPU bundle uses what the device image has and prints the versions):
    torch==2.15.0 transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2

    python benches/qlora_step_torch.py --shape llama3-8b --seq 2048 --batch 8
    python benches/qlora_step_torch.py --shape tiny --device cpu --batch 2 --seq 32   # a dry run

The recipe is the standard QLoRA one of transformers' and PEFT's documentation: a bf16 Llama
(random weights, transformers' own init, made directly on the device), every linear layer of the
decoder replaced by bitsandbytes' `Linear4bit` (NF4, block 64, double quantization, bf16 compute),
`prepare_model_for_kbit_training` (gradient checkpointing, non-reentrant), `get_peft_model` with
LoRA on q, k, v, o, gate, up and down (dropout 0), sdpa attention, bitsandbytes'
`PagedAdamW32bit` (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01), labels = input ids.
A step is forward, loss, backward, optimizer step, zero_grad, then a device synchronize.

Prints one JSON object. Peak memory is `torch.cuda.max_memory_allocated` over the timed steps
(reset after the model is built, so it includes the resident model); the paged optimizer's
managed memory is not counted, as in qadapt's `peak_bytes`. When a batch runs out of memory the
script halves it and says so (`oom_batches`). Without torch, transformers, peft or bitsandbytes
it prints `{"skipped": ...}` and exits 0.
"""

import argparse
import json
import statistics
import sys
import time

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, rope theta
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256, 500000.0),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256, 500000.0),
    "tiny": (64, 96, 2, 4, 2, 256, 10000.0),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    try:
        import torch
        import transformers
        import peft
        import bitsandbytes as bnb
    except ImportError as e:
        print(json.dumps({"framework": "pytorch+peft+bitsandbytes", "skipped": f"not installed: {e}"}))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"framework": "pytorch+peft+bitsandbytes", "skipped": "torch sees no CUDA device"}))
        return 0
    dev = torch.device(a.device)
    hidden, inter, layers, heads, kv, vocab, theta = SHAPES[a.shape]
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        vocab_size=vocab,
        rope_theta=theta,
        max_position_embeddings=max(a.seq, 8192),
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        use_cache=False,
    )
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)

    # Every decoder linear to NF4 on the device (bitsandbytes quantizes a Params4bit when it is
    # moved to the device), one at a time, the bf16 weight freed as it goes.
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    lin.in_features,
                    lin.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                w = bnb.nn.Params4bit(
                    lin.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                    blocksize=64,
                )
                q.weight = w.to(dev)
                setattr(parent, name, q)
                del lin, w
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * layers, f"{len(quantized)} 4-bit linears"
    assert all(m.weight.quant_state is not None for m in quantized), "a weight was not quantized"
    model.config.quantization_config = {"load_in_4bit": True}
    model.is_loaded_in_4bit = True
    model = peft.prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lc = peft.LoraConfig(
        r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(model, lc)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    if dev.type == "cuda":
        opt = bnb.optim.PagedAdamW32bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    setup_s = time.perf_counter() - t0
    batch, oom = a.batch, []
    while True:
        g = torch.Generator(device="cpu").manual_seed(7)
        ids = torch.randint(0, vocab, (batch, a.seq), generator=g).to(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        losses, times = [], []
        try:
            for i in range(a.warmup + a.steps):
                t = time.perf_counter()
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                losses.append(out.loss.item())
                if i >= a.warmup:
                    times.append((time.perf_counter() - t) * 1e3)
                del out
            break
        except torch.cuda.OutOfMemoryError:
            oom.append(batch)
            opt.zero_grad(set_to_none=True)
            if batch == 1:
                print(json.dumps({"framework": "pytorch+peft+bitsandbytes", "shape": a.shape,
                                  "failed": "out of memory at batch 1", "oom_batches": oom}))
                return 1
            batch //= 2
    med = statistics.median(times)
    print(json.dumps({
        "framework": "pytorch+peft+bitsandbytes",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bnb.__version__},
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "shape": a.shape,
        "batch": batch,
        "oom_batches": oom,
        "seq": a.seq,
        "rank": a.rank,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "losses": losses,
        "step_ms": times,
        "median_ms": med,
        "tokens_per_s": batch * a.seq / (med / 1e3),
        "peak_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

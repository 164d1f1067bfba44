"""Training-step benchmark: tokens/s and peak memory of one classification fine-tuning step.

    python bench/train.py [--device cuda] [--shapes sst,cfimdb] [--steps 5] [--tiny] [--json]

Random weights in the stories42M shape (no download). Each variant runs in its own subprocess so
that peak memory (CUDA: max_memory_allocated; CPU: the process's max RSS) belongs to that variant
alone; the parent prints the table with ratios against the fp32 full fine-tuning baseline.

Variants: full fine-tuning or LoRA (rank 4 on query/value, head trainable), fp32 readable
attention, fp32 + fused attention (sdpa) + foreach AdamW, and on CUDA bf16 autocast + TF32, with
and without torch.compile of the model (the compiled variant's warm-up step pays the compilation).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import LlamaConfig  # noqa: E402
from llama import Llama  # noqa: E402
from lora import inject_lora, mark_only_lora_trainable  # noqa: E402
from optimizer import AdamW  # noqa: E402

# (batch size, tokens per sequence) of the reference commands: SST --batch_size 80 with sentences of
# up to ~64 tokens; CFIMDB --batch_size 10 with reviews of ~512 tokens.
SHAPES = {"sst": (80, 64), "cfimdb": (10, 512)}
VARIANTS = {  # name: (lora, sdpa + foreach, bf16, torch.compile)
    "full-fp32": (False, False, False, False),
    "full-fast": (False, True, False, False),
    "full-bf16": (False, True, True, False),
    "full-bf16-compile": (False, True, True, True),
    "lora-fp32": (True, False, False, False),
    "lora-fast": (True, True, False, False),
    "lora-bf16": (True, True, True, False),
    "lora-bf16-compile": (True, True, True, True),
}
GPU_ONLY = ("bf16",)  # default variant sets on a CPU leave these out (they run with --variants)


class Classifier(nn.Module):
    def __init__(self, config, num_labels=5):
        super().__init__()
        self.llama = Llama(config)
        self.head = nn.Linear(config.dim, num_labels)

    def forward(self, tokens):
        _, hidden = self.llama(tokens)
        return F.log_softmax(self.head(hidden[:, -1]).float(), dim=-1)


def run_variant(args) -> dict:
    """One variant, in this process: warm-up step, then time args.steps steps."""
    lora, fast, bf16, compile = VARIANTS[args.variant]
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size,
                         max_seq_len=max(s for _, s in SHAPES.values()))
    model = Classifier(config)
    if lora:
        inject_lora(model.llama, rank=4, alpha=1.0)
        mark_only_lora_trainable(model, extra=("head",))
    model.llama.set_sdpa(fast)
    model.to(device).train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bf16
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=1e-5, foreach=fast)
    batch, seqlen = SHAPES[args.shape]
    if args.tiny:
        batch, seqlen = min(batch, 4), min(seqlen, 16)
    tokens = torch.randint(0, config.vocab_size, (batch, seqlen), device=device)
    labels = torch.randint(0, 5, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    saved = []  # what autograd keeps for backward, during the warm-up step only

    forward = torch.compile(model) if compile else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.nll_loss(forward(tokens), labels)
        activations = storage_bytes(saved, exclude=model.parameters()) if saved else 0  # warm-up only
        saved.clear()
        loss.backward()
        optimizer.step()
        return activations

    accounted = None  # compiled graphs choose what to save themselves, out of the hooks' sight
    if compile:
        step()  # warm-up: compilation
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            activations = step()  # warm-up: allocations, kernel selection
        accounted = {"weights": storage_bytes(model.parameters()), "grads": storage_bytes(p.grad for p in params),
                     "adamw_state": storage_bytes(t for state in optimizer.state.values() for t in state.values()
                                                  if torch.is_tensor(t)),
                     "activations": activations}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - started) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.variant, "shape": args.shape, "batch": batch, "seqlen": seqlen,
            "tokens_per_s": batch * seqlen / seconds, "step_s": seconds, "peak_mb": peak / 2**20,
            "trainable": sum(p.numel() for p in params),
            "accounted_mb": accounted and {k: v / 2**20 for k, v in accounted.items()}}


def storage_bytes(tensors, exclude=()) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once), leaving
    out the storages of `exclude` (e.g. saved weights, already counted as weights)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes = {}
    for t in tensors:
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in skip:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(sizes.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="sst,cfimdb")
    parser.add_argument("--variants", default=None, help="comma-separated; default: all that apply to the device")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--tiny", action="store_true", help="tiny model and batches, for smoke tests")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.dim, args.n_layers, args.n_heads, args.vocab_size = 32, 2, 4, 512
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    variants = args.variants.split(",") if args.variants else [
        v for v in VARIANTS if args.device == "cuda" or not any(tag in v for tag in GPU_ONLY)]
    results = []
    for shape in args.shapes.split(","):
        for variant in variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--shape", shape, "--device", args.device,
                   "--steps", str(args.steps), "--dim", str(args.dim), "--n_layers", str(args.n_layers),
                   "--n_heads", str(args.n_heads), "--vocab_size", str(args.vocab_size)] + ["--tiny"] * args.tiny
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                sys.exit(f"variant {variant}/{shape} failed:\n{out.stderr}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device: {args.device}  steps: {args.steps}  (speed and memory relative to full-fp32 of the same shape)")
    print("accounted MB = weights + gradients + AdamW state + tensors saved for backward (distinct storages), "
          "the same on any device")
    print(f"{'shape':8} {'variant':18} {'batch x len':>12} {'tokens/s':>10} {'speed':>6} {'peak MB':>9} {'memory':>7} "
          f"{'accounted MB':>13} {'accounted':>9} {'trainable':>11}")
    for r in results:
        base = next(b for b in results if b["shape"] == r["shape"] and b["variant"] == "full-fp32")
        r["speedup"], r["memory_ratio"] = r["tokens_per_s"] / base["tokens_per_s"], r["peak_mb"] / base["peak_mb"]
        r["accounted_total_mb"] = r["accounted_ratio"] = None
        accounted = "-".rjust(13) + "-".rjust(10)
        if r["accounted_mb"]:
            r["accounted_total_mb"] = sum(r["accounted_mb"].values())
            r["accounted_ratio"] = r["accounted_total_mb"] / sum(base["accounted_mb"].values())
            accounted = f"{r['accounted_total_mb']:>13.0f} {r['accounted_ratio']:>8.2f}x"
        print(f"{r['shape']:8} {r['variant']:18} {r['batch']:>5} x {r['seqlen']:<4} {r['tokens_per_s']:>10.0f} "
              f"{r['speedup']:>5.2f}x {r['peak_mb']:>9.0f} {r['memory_ratio']:>6.2f}x {accounted} {r['trainable']:>11,}")
    if args.json:
        print(json.dumps({"device": args.device, "results": results}))


if __name__ == "__main__":
    main()

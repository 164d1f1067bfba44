#!/usr/bin/env python3
"""Hugging Face folders at a real model's shape: loading, decoding beside transformers, one LoRA step.

    python3 bench/hf.py [--shape 1b|tiny] [--folder DIR] [--device cpu|cuda] [--json]

Writes (once, into --folder) a random model in the Llama-3.2-1B shape (dim 2048, 16 layers, 32 heads,
8 KV heads, hidden 8192, vocab 128256, tied embeddings, llama3 RoPE scaling, theta 5e5) as bf16
safetensors with a config.json, the way transformers saves it, then measures, each phase in its own
subprocess so that peak memory (the process's max RSS on a CPU, max_memory_allocated on CUDA) is the
phase's alone:
  load         load_pretrained(folder): seconds, peak memory, and that peak over the model's weights
  decode       greedy tokens/s, batch 1, ours (KV cache) and transformers' generate on the same weights,
               in one process, alternately; the tokens must be the same
  lora_step    one LoRA training step (rank 16 on q/k/v/o, sequence 256, batch 1, AdamW): s/step, peak
Full fine-tuning of this shape needs weights + gradients + two AdamW moments = 16 bytes a parameter in
fp32 (19.8 GB for 1.24 B parameters) before activations: more than this machine's 24 GiB holds beside
the rest, so it is reported as that computed need. See bench/README.md.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def hf_config(shape: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES[shape], "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}}


def write_folder(folder: Path, shape: str) -> None:
    """Random bf16 weights with HF's names (std 1/sqrt(fan_in): varied greedy tokens), sharded at 2 GB."""
    from safetensors.torch import save_file

    c = hf_config(shape)
    d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head = d // h
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * head, d),
                       p + "self_attn.v_proj.weight": (kv * head, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (c["intermediate_size"], d),
                       p + "mlp.up_proj.weight": (c["intermediate_size"], d),
                       p + "mlp.down_proj.weight": (d, c["intermediate_size"]),
                       p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards, current, size, weight_map = [], {}, 0, {}
    for name, shape_ in shapes.items():
        t = torch.ones(shape_) if len(shape_) == 1 else torch.randn(shape_, generator=generator) / shape_[1] ** 0.5
        current[name] = t.to(torch.bfloat16)
        size += t.numel() * 2
        if size > 2e9:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c, indent=1))


def peak_bytes(device: str) -> int:
    """CUDA: max_memory_allocated. CPU: this process's peak RSS, from /proc/self/status's VmHWM where
    there is one (ru_maxrss would also count what a parent held when it forked this process)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def phase_load(args) -> dict:
    from checkpoint import load_pretrained

    baseline = peak_bytes(args.device)  # the interpreter, torch and the project, before the model
    started = time.perf_counter()
    model = load_pretrained(args.folder).to(args.device)
    seconds = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_bytes(args.device)
    return {"load_s": round(seconds, 2), "parameters": sum(p.numel() for p in model.parameters()),
            "weights_bytes": weights, "baseline_bytes": baseline, "peak_bytes": peak,
            "peak_over_weights": round(peak / weights, 3),
            "peak_minus_baseline_over_weights": round((peak - baseline) / weights, 3)}


def phase_decode(args) -> dict:
    import transformers

    from checkpoint import load_pretrained

    ours = load_pretrained(args.folder).to(args.device).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(args.folder, dtype=torch.float32).to(args.device).eval()
    prompt = torch.randint(3, min(1000, ours.vocab_size), (1, 16), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(args.device)
    n = args.new_tokens
    ours.generate(prompt, 2, temperature=0.0), theirs.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
    times = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        a = ours.generate(prompt, n, temperature=0.0)
        times["ours"].append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            b = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False)
        times["transformers"].append(time.perf_counter() - started)
    best = {k: n / min(v) for k, v in times.items()}
    return {"new_tokens": n, "ours_tok_s": round(best["ours"], 2), "transformers_tok_s": round(best["transformers"], 2),
            "ratio": round(best["ours"] / best["transformers"], 2), "same_tokens": torch.equal(a, b)}


def phase_lora_step(args) -> dict:
    import torch.nn.functional as F

    from checkpoint import load_pretrained
    from lora import inject_lora, mark_only_lora_trainable
    from optimizer import AdamW

    model = load_pretrained(args.folder).to(args.device)
    inject_lora(model, rank=16, alpha=32.0, targets=("compute_query", "compute_key", "compute_value",
                                                      "compute_output"))
    mark_only_lora_trainable(model)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(3, min(1000, model.vocab_size), (1, 256), generator=torch.Generator().manual_seed(2))
    tokens = tokens.to(args.device)
    seconds = []
    for _ in range(args.steps + 1):  # the first is a warm-up
        started = time.perf_counter()
        logits, _ = model(tokens, targets=tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"s_per_step": round(min(seconds[1:]), 2), "trainable_parameters": trainable,
            "peak_bytes": peak_bytes(args.device), "loss": round(loss.item(), 3)}


PHASES = {"load": phase_load, "decode": phase_decode, "lora_step": phase_lora_step}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--folder", default=None, help="where the model folder is written (default: runs/bench_hf_SHAPE)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--phases", default="load,decode,lora_step")
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase in this process
    args = p.parse_args(argv)
    args.folder = Path(args.folder or f"runs/bench_hf_{args.shape}")
    return args


def run_phase(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--shape", args.shape, "--folder", str(args.folder),
           "--device", args.device, "--new_tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0
    if not (args.folder / "config.json").is_file():
        started = time.perf_counter()
        write_folder(args.folder, args.shape)
        print(f"wrote {args.folder} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    results = {"shape": args.shape, "device": args.device, "threads": torch.get_num_threads()}
    for name in args.phases.split(","):
        results[name] = run_phase(args, name)
        print(f"{name}: {results[name]}", file=sys.stderr)
    c = hf_config(args.shape)
    n_params = results.get("load", {}).get("parameters")
    if n_params:
        results["full_finetune_need_bytes"] = 16 * n_params  # fp32 weights, gradients, AdamW m and v
        print(f"full fine-tuning (fp32, AdamW) needs {16 * n_params / 2**30:.1f} GiB before activations "
              f"for {n_params / 1e9:.2f} B parameters ({c['num_hidden_layers']} layers)", file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    return 0 if not any(isinstance(v, dict) and "error" in v for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

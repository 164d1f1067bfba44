#!/usr/bin/env python3
"""Greedy decoding throughput of Mini-Llama: the no-cache reference against the KV cache.

Random weights in the stories42M shape (LlamaConfig() defaults: dim 512, 8 layers, 8 heads,
vocab 32000, float32). Every variant runs in this one process on the same model and prompts,
interleaved repeat by repeat, so that a noisy machine slows them all alike; each variant's
greedy tokens are compared with the reference's. See bench/README.md.

    python3 bench/decode.py                                   # batch 1 and 32, 256 new tokens
    python3 bench/decode.py --batch_sizes 32 --reference-tokens 16
    python3 bench/decode.py --device cuda                     # adds bf16 autocast, compile (and HF)
    python3 bench/decode.py --tiny --json                     # smoke run: a few seconds
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import LlamaConfig  # noqa: E402
from llama import Llama  # noqa: E402

REFERENCE = "no cache (reference)"
TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, prompt_len=8, new_tokens=16, batch_sizes="1,4", repeats=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=None, help="default: n_heads")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--norm_type", default="layernorm", choices=["layernorm", "rmsnorm"],
                   help="LlamaConfig's default is layernorm; HF's Llama needs rmsnorm")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--batch_sizes", default="1,32", help="comma-separated, e.g. 1,32")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best is reported")
    p.add_argument("--reference-tokens", dest="reference_tokens", type=int, default=None,
                   help="time the no-cache reference over only its first N new tokens (it is slow: "
                        "its cost per token grows with the sequence)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip HF transformers even if importable")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add generate(compile=True) variants: fixed-shape decoding compiled by torch.compile, "
                        "replayed as CUDA graphs on a GPU (default: on for cuda, off for cpu, where compiling "
                        "the stories42M shape takes about a minute and decodes slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="defaults for a smoke run (any option still overrides "
                                                           "them): " + str(TINY))
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    if p.parse_known_args(argv)[0].tiny:
        p.set_defaults(**TINY)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    if args.compile is None:
        args.compile = args.device == "cuda"
    return args


def build_model(args) -> Llama:
    """Random weights of std 2 / sqrt(fan_in). At the training init (std 0.02, output tied to the
    embedding) an untrained model only repeats its last prompt token, whatever the attention
    does, and 'same tokens' would check nothing; these weights give varied greedy tokens.
    Speed does not depend on the values."""
    config = LlamaConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                         vocab_size=args.vocab_size, norm_type=args.norm_type,
                         max_seq_len=max(1024, args.prompt_len + args.new_tokens))
    torch.manual_seed(args.seed)
    model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
    return model.to(args.device).eval()


def hf_model(model: Llama):
    """transformers' LlamaForCausalLM with model's weights, or (None, why not)."""
    try:
        import transformers
    except ImportError as e:
        return None, f"HF transformers skipped: not importable ({e})"
    c = model.config
    if c.norm_type != "rmsnorm":
        return None, "HF transformers skipped: its Llama has RMSNorm only; run with --norm_type rmsnorm"
    transformers.logging.set_verbosity_error()
    try:
        return build_hf(transformers, model), None
    except Exception as e:  # another transformers version may name things differently: skip, don't crash
        return None, f"HF transformers {transformers.__version__} skipped: {type(e).__name__}: {e}"


def build_hf(transformers, model: Llama):
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, hidden_act="silu", tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(hf_state_dict(model), strict=True)
    hf.generation_config.eos_token_id = None  # never stop early: time exactly new_tokens
    hf.generation_config.pad_token_id = 0
    hf = hf.to(model.device).eval()
    with torch.inference_mode():  # fail here, not in the middle of the timed runs
        hf.generate(torch.zeros(1, 2, dtype=torch.long, device=model.device), max_new_tokens=2, do_sample=False)
    return hf


def hf_state_dict(model: Llama) -> dict:
    """Our names -> HF's. Our RoPE rotates interleaved pairs (x[2i], x[2i+1]), HF's the halves
    (x[i], x[i + head_dim/2]), so the rows of wq and wk are permuted within each head
    (as transformers' own convert_llama_weights_to_hf.py does)."""
    c = model.config

    def halves(w, n_heads):
        return w.view(n_heads, c.head_dim // 2, 2, c.dim).transpose(1, 2).reshape(n_heads * c.head_dim, c.dim)

    ours = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sd = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "lm_head.weight": ours["output.weight"],
          "model.norm.weight": ours["norm.weight"]}
    for i in range(c.n_layers):
        a, h = f"layers.{i}.", f"model.layers.{i}."
        sd[h + "self_attn.q_proj.weight"] = halves(ours[a + "attention.compute_query.weight"], c.n_heads)
        sd[h + "self_attn.k_proj.weight"] = halves(ours[a + "attention.compute_key.weight"], c.n_kv_heads)
        sd[h + "self_attn.v_proj.weight"] = ours[a + "attention.compute_value.weight"]
        sd[h + "self_attn.o_proj.weight"] = ours[a + "attention.compute_output.weight"]
        sd[h + "mlp.gate_proj.weight"] = ours[a + "feed_forward.w1.weight"]
        sd[h + "mlp.up_proj.weight"] = ours[a + "feed_forward.w3.weight"]
        sd[h + "mlp.down_proj.weight"] = ours[a + "feed_forward.w2.weight"]
        sd[h + "input_layernorm.weight"] = ours[a + "attention_norm.weight"]
        sd[h + "post_attention_layernorm.weight"] = ours[a + "ffn_norm.weight"]
    return sd


def variants(args, model, hf):
    """name -> function(idx, n_new) returning (batch, prompt_len + n_new) greedy tokens."""

    def ours(use_cache, sdpa=False, bf16=False, compile=False):
        def run(idx, n):
            model.set_sdpa(sdpa)
            autocast = torch.autocast(args.device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                return model.generate(idx, n, temperature=0.0, use_cache=use_cache, compile=compile)
        return run

    def transformers_generate(idx, n):
        with torch.inference_mode():
            return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                               do_sample=False)

    found = {REFERENCE: ours(False), "KV cache": ours(True), "KV cache + sdpa": ours(True, sdpa=True)}
    if args.compile:
        found["KV cache + sdpa + compile"] = ours(True, sdpa=True, compile=True)
    if args.device == "cuda":
        found["KV cache + sdpa + bf16 autocast"] = ours(True, sdpa=True, bf16=True)
        if args.compile:
            found["KV cache + sdpa + bf16 autocast + compile"] = ours(True, sdpa=True, bf16=True, compile=True)
    if hf is not None:
        found["HF transformers (KV cache)"] = transformers_generate
    return found


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def compare(tokens, reference, prompt_len):
    """'yes' when the new tokens agree with the reference's (over the shorter of the two)."""
    n = min(tokens.shape[1], reference.shape[1]) - prompt_len
    new, ref = tokens[:, prompt_len : prompt_len + n], reference[:, prompt_len : prompt_len + n]
    if torch.equal(new, ref):
        return "yes"
    first = (new != ref).any(0).nonzero()[0].item()
    return f"no (from token {first} of {n})"


def bench_batch(args, batch, runs):
    generator = torch.Generator().manual_seed(args.seed + batch)
    idx = torch.randint(0, args.vocab_size, (batch, args.prompt_len), generator=generator).to(args.device)
    ref_tokens = min(args.reference_tokens or args.new_tokens, args.new_tokens)
    n_new = {name: ref_tokens if name == REFERENCE else args.new_tokens for name in runs}
    for run in runs.values():  # warm-up: allocator, thread pools, lazy inits
        run(idx, 2)
    times, outputs = {name: [] for name in runs}, {}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every variant alike
        for name, run in runs.items():
            synchronize(args.device)
            start = time.perf_counter()
            outputs[name] = run(idx, n_new[name])
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in runs:
        best, median = min(times[name]), statistics.median(times[name])
        rows.append(dict(batch=batch, variant=name, new_tokens=args.new_tokens, timed_tokens=n_new[name],
                         seconds=best, tok_per_s=batch * n_new[name] / best,
                         tok_per_s_median=batch * n_new[name] / median,
                         same_tokens=compare(outputs[name].cpu(), outputs[REFERENCE].cpu(), args.prompt_len)))
    reference_rate = rows[0]["tok_per_s"]
    for row in rows:
        row["speedup"] = row["tok_per_s"] / reference_rate
    return rows


def print_table(rows, notes, header):
    print(header)
    columns = ["batch", "variant", "tokens timed", "best s", "tok/s", "median tok/s", "speed-up", "same tokens"]
    lines = [[str(r["batch"]), r["variant"], f"{r['timed_tokens']}/{r['new_tokens']}", f"{r['seconds']:.2f}",
              f"{r['tok_per_s']:.1f}", f"{r['tok_per_s_median']:.1f}", f"{r['speedup']:.1f}x", r["same_tokens"]]
             for r in rows]
    print_columns(columns, lines)
    for note in notes:
        print("note:", note)


def print_columns(columns, lines):
    """A plain-text table: each column as wide as its widest cell."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for line in lines:
        print(" | ".join(v.ljust(w) for v, w in zip(line, widths)))


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    hf, why_not = hf_model(model) if args.hf else (None, "HF transformers skipped (--no-hf)")
    notes = [why_not] if why_not else []
    if args.reference_tokens and args.reference_tokens < args.new_tokens:
        notes.append(f"the no-cache reference was timed over its first {args.reference_tokens} of {args.new_tokens} "
                     "new tokens; its cost per token grows with the sequence, so its tok/s is flattered and the "
                     "speed-ups understated; 'same tokens' compares those first tokens")
    if args.device == "cpu" and torch.get_num_threads() > 1 and os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive":
        notes.append(f"{torch.get_num_threads()} threads with OpenMP's default spin-waiting: on a busy machine every small "
                     "op can then wait a scheduler slice for a descheduled thread (10x slower decoding seen on our "
                     "shared 2-core box); compare with --threads 1 or OMP_WAIT_POLICY=PASSIVE")
    runs = variants(args, model, hf)
    rows = [row for batch in args.batch_sizes for row in bench_batch(args, batch, runs)]
    c = model.config
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    header = (f"Mini-Llama greedy decode, random weights: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads "
              f"({c.n_kv_heads} kv), vocab {c.vocab_size}, {c.norm_type}, {model.dtype}; prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens; {args.device} ({device}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; best of {args.repeats}")
    print_table(rows, notes, header)
    result = dict(device=args.device, device_name=device, torch=torch.__version__, threads=torch.get_num_threads(),
                  omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                  config=dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                              vocab_size=c.vocab_size, hidden_dim=c.hidden_dim, norm_type=c.norm_type),
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, results=rows,
                  notes=notes)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

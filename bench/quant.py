#!/usr/bin/env python3
"""Quantized weights (quantize.py): what they cost in memory, what int8 gains in CPU decoding, what they change.

1. Memory: bytes per weight of the quantized linear layers and the whole model in fp32 / bf16 / int8 / NF4 /
   NF4 + double quantization, at the stories42M and Llama-3.2-1B shapes. Computed from each layer's shape
   (the models are built on the meta device: no memory); the formula is checked against the bytes of
   every format's really quantized model at the first shape. Quantized: every linear layer of the blocks;
   the embedding, norms and output projection (tied to the embedding in both shapes) stay in fp32 (fp32
   row) or bf16 (the other rows), as QLoRA keeps them in its compute dtype.
2. Decoding speed at the stories42M shape (random weights, RMSNorm, causal), batch 1, greedy, --threads
   (default 1), every variant in this process, interleaved repeat by repeat: fp32, int8 through fbgemm's
   int8 GEMM (the layers; and every linear layer including the output projection), int8 and NF4 with
   the weights dequantized at every step. With llama_cpp importable, llama.cpp on the same weights as
   GGUF F32 and Q8_0 (checkpoint.save_gguf); otherwise a note says it was skipped. Before them, the kernel
   choice: the output projection on one token in fp32 and through each int8 kernel PyTorch has on the CPU.
3. Fidelity on trained weights (stories260K, an asset): greedy tokens of each format against fp32's, and
   the top-1 agreement with fp32 along fp32's own greedy text.

    python3 bench/quant.py                  # about a minute
    python3 bench/quant.py --tiny --json    # smoke run (tests/test_quantize.py)
"""
import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
from config import LlamaConfig  # noqa: E402
from decode import cpu_name, print_columns  # noqa: E402
from decoding import decode  # noqa: E402
from llama import Llama  # noqa: E402
from quantize import Int8Linear, model_bytes, quantize_model  # noqa: E402

SHAPES = {  # name -> LlamaConfig arguments
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024),
    "Llama-3.2-1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                         max_seq_len=1024),
}
TINY_SHAPE = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=128)
FORMATS = ("fp32", "bf16", "int8", "nf4", "nf4+dq")
QUANTIZE = {"int8": ("int8", {}), "nf4": ("nf4", {"double_quant": False}), "nf4+dq": ("nf4", {"double_quant": True})}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new_tokens", type=int, default=128, help="greedy tokens per timed run (fp32 and fbgemm int8)")
    p.add_argument("--slow_tokens", type=int, default=16,
                   help="greedy tokens per timed run of the variants that dequantize every step")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (and llama.cpp's n_threads)")
    p.add_argument("--tiny", action="store_true", help="a tiny shape and few tokens: a smoke run of a few seconds")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    args = p.parse_args(argv)
    if args.tiny:
        args.new_tokens, args.slow_tokens, args.repeats = 8, 4, 1
    return args


# ----------------------------------------------------------------------------------------------
# 1. memory


def linear_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes of one (out, in) weight in a format (quantize.py's layouts; fp32 / bf16: plain)."""
    n = out_features * in_features
    blocks = math.ceil(n / 64)
    return {"fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * out_features, "nf4": math.ceil(n / 2) + 4 * blocks,
            "nf4+dq": math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4}[fmt]


def memory_rows(name: str, shape: dict, rest_fp32: bool = False) -> list:
    """One row per format: the quantized layers' bytes per weight, their MiB, the rest's and the total."""
    with torch.device("meta"):
        model = Llama(LlamaConfig(**shape))
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "output"]
    n_linear = sum(m.weight.numel() for m in linears)
    n_rest = sum(p.numel() for p in model.parameters()) - n_linear  # tied output counted once
    rows = []
    for fmt in FORMATS:
        quantized = sum(linear_bytes(fmt, m.out_features, m.in_features) for m in linears)
        rest = n_rest * (4 if fmt == "fp32" or rest_fp32 else 2)
        rows.append(dict(shape=name, format=fmt, parameters=n_linear + n_rest, linear_parameters=n_linear,
                         linear_bytes_per_param=quantized / n_linear, linear_mib=quantized / 2**20,
                         rest_mib=rest / 2**20, total_mib=(quantized + rest) / 2**20))
    fp32 = rows[0]["total_mib"]
    for row in rows:
        row["vs_fp32"] = row["total_mib"] / fp32
    return rows


def check_formula(shape: dict) -> str:
    """The formula against the bytes of the model really quantized in each format (the rest kept in fp32)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**shape))
    expected = {row["format"]: round((row["linear_mib"] + row["rest_mib"]) * 2**20)
                for row in memory_rows("check", shape, rest_fp32=True)}
    measured = {"fp32": model_bytes(model)}
    for fmt, (kind, options) in QUANTIZE.items():
        quantized = copy.deepcopy(model)
        quantize_model(quantized, kind, **options)
        measured[fmt] = model_bytes(quantized)
    wrong = {f: (measured[f], expected[f]) for f in measured if measured[f] != expected[f]}
    if wrong:
        raise AssertionError(f"bytes measured vs formula differ: {wrong}")
    return "the formula equals the bytes of the quantized model (fp32, int8, nf4, nf4+dq) at this shape"


# ----------------------------------------------------------------------------------------------
# 2. decoding speed


def kernel_rows(shape: dict, repeats: int) -> list:
    """The output projection (vocab x dim) on one token: fp32 F.linear against the int8 kernels PyTorch has
    on the CPU, fbgemm's dynamic int8 linear (what Int8Linear uses) and aten._weight_int8pack_mm."""
    layer = nn.Linear(shape["dim"], shape["vocab_size"], bias=False)
    int8 = Int8Linear(layer)
    x = torch.randn(1, shape["dim"])
    packed = int8.fbgemm_weight()
    kernels = {"fp32 F.linear": lambda: torch.nn.functional.linear(x, layer.weight)}
    if packed is not None:
        kernels["fbgemm int8 (linear_dynamic)"] = lambda: torch.ops.quantized.linear_dynamic(x, packed, True)
    kernels["aten._weight_int8pack_mm"] = lambda: torch.ops.aten._weight_int8pack_mm(x, int8.weight_int8,
                                                                                    int8.weight_scale)
    best = {name: math.inf for name in kernels}
    with torch.inference_mode():
        for name, kernel in kernels.items():
            kernel()
        for _ in range(repeats):
            for name, kernel in kernels.items():
                started = time.perf_counter()
                for _ in range(10):
                    kernel()
                best[name] = min(best[name], (time.perf_counter() - started) / 10)
    return [dict(kernel=name, ms=best[name] * 1e3, vs_fp32=best["fp32 F.linear"] / best[name]) for name in kernels]


def random_model(shape: dict) -> Llama:
    """Random weights of std 2 / sqrt(fan_in) (as bench/decode.py), RMSNorm and causal: what llama.cpp computes."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**shape, norm_type="rmsnorm", causal=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
    return model


def decode_variants(model: Llama) -> dict:
    """name -> (model, slow: dequantizes every step)."""
    def quantized(kind, **options):
        copy_ = copy.deepcopy(model)
        quantize_model(copy_, kind, **options)
        return copy_

    return {"fp32": (model, False), "int8": (quantized("int8"), False),
            "int8 + output": (quantized("int8", skip=()), False),
            "int8 + output, dequantized": (quantized("int8", skip=(), fbgemm=False), True),
            "nf4+dq, dequantized": (quantized("nf4"), True)}


def timed_decode(model, prompt, n):
    started = time.perf_counter()
    tokens = torch.cat(list(decode(model, prompt, n)), dim=1)
    return time.perf_counter() - started, tokens


def llama_cpp_runs(model, prompt, args, notes, folder) -> dict:
    """name -> run(n) -> (seconds, tokens) for llama.cpp F32 and Q8_0 on the model's weights (GGUF files
    written in folder), or {} with a note."""
    try:
        import llama_cpp
    except ImportError:
        notes.append("llama.cpp rows skipped: llama_cpp does not import (pip install llama-cpp-python builds it)")
        return {}
    from checkpoint import save_gguf
    from codegen.text_tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(str(BENCH.parent / "tokenizer.model"))
    if tokenizer.n_words > model.config.vocab_size:
        notes.append(f"llama.cpp rows skipped: a GGUF needs the tokenizer's {tokenizer.n_words} pieces, the model "
                     f"has {model.config.vocab_size} rows (--tiny)")
        return {}
    low_level, default_params = llama_cpp.llama_cpp, llama_cpp.llama_cpp.llama_model_default_params

    def params_without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params
    low_level.llama_model_default_params = params_without_extra_buffers  # in this process only
    notes.append("llama.cpp's extra buffer types (weights repacked for the CPU's int8 kernels) are off: with them, "
                 "this llama-cpp-python build crashes (segmentation fault) decoding Q8_0 here")
    runs = {}
    for gguf_type in ("f32", "q8_0"):
        path = os.path.join(folder, f"model-{gguf_type}.gguf")
        save_gguf(model, path, tokenizer, gguf_type)

        def run(n, path=path):
            """Loaded anew each time, not timed: two models loaded at once crash llama-cpp-python here."""
            llm = llama_cpp.Llama(model_path=path, n_ctx=model.config.max_seq_len, n_threads=args.threads,
                                  n_batch=args.prompt_len, verbose=False)
            try:
                started, tokens = time.perf_counter(), []
                for token in llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0):
                    tokens.append(token)
                    if len(tokens) == n:
                        break
                return time.perf_counter() - started, torch.tensor([tokens])
            finally:
                llm.close()
        runs[f"llama.cpp {gguf_type.upper()}"] = run
    return runs


def speed_rows(args, shape, notes) -> list:
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as folder:  # llama.cpp's GGUF files
        return timed_rows(args, random_model(shape), notes, folder)


def timed_rows(args, model, notes, folder) -> list:
    """Every variant's best tok/s over the repeats, interleaved."""
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    runs = {name: (lambda n, m=m: timed_decode(m, prompt, n), slow)
            for name, (m, slow) in decode_variants(model).items()}
    runs.update({name: (run, False) for name, run in llama_cpp_runs(model, prompt, args, notes, folder).items()})
    best = {name: math.inf for name in runs}
    tokens = {}
    for name, (run, slow) in runs.items():  # warm-up (and llama.cpp's first load)
        run(2)
    for _ in range(args.repeats):
        for name, (run, slow) in runs.items():
            seconds, tokens[name] = run(args.slow_tokens if slow else args.new_tokens)
            best[name] = min(best[name], seconds / tokens[name].shape[1])
    rows = [dict(variant=name, tokens=tokens[name].shape[1], tok_per_s=1 / best[name],
                 speedup=best["fp32"] / best[name]) for name in runs]
    if "llama.cpp F32" in tokens:
        n = min(args.new_tokens, tokens["llama.cpp F32"].shape[1])
        notes.append("llama.cpp F32 greedy tokens " + ("equal" if torch.equal(tokens["llama.cpp F32"][:, :n],
                     tokens["fp32"][:, :n]) else "differ from") + f" ours (fp32) over {n} tokens")
    return rows


# ----------------------------------------------------------------------------------------------
# 3. fidelity on trained weights


def fidelity_rows(notes, tokens=64) -> list:
    path = BENCH.parent / "reference" / "stories260K.bin"
    if not path.is_file():
        notes.append(f"fidelity rows skipped: {path} not found (bash setup.sh puts it there)")
        return []
    from checkpoint import load_pretrained

    model = load_pretrained(path).eval()
    bos = torch.ones(1, 1, dtype=torch.long)
    reference = timed_decode(model, bos, tokens)[1]
    text = torch.cat([bos, reference], dim=1)
    with torch.inference_mode():  # as in decoding: int8 through fbgemm
        fp32_top = model(text, targets=text)[0].argmax(-1)
    formats = {"int8 + output": ("int8", {"skip": ()}),
               "int8 + output, dequantized": ("int8", {"skip": (), "fbgemm": False}), **QUANTIZE}
    rows = []
    for fmt, (kind, options) in formats.items():
        quantized = copy.deepcopy(model)
        quantize_model(quantized, kind, **options)
        greedy = timed_decode(quantized, bos, tokens)[1]
        differ = (greedy != reference).nonzero()
        with torch.inference_mode():
            top = quantized(text, targets=text)[0].argmax(-1)
        rows.append(dict(format=fmt, same_greedy_tokens=int(differ[0, 1]) if len(differ) else tokens,
                         top1_agreement=(top == fp32_top).float().mean().item()))
    return rows


# ----------------------------------------------------------------------------------------------


def print_report(result):
    print("1. memory (bytes per weight of the quantized linear layers; MiB)")
    print_columns(["shape", "format", "params", "linear B/param", "linear MiB", "rest MiB", "total MiB", "vs fp32"],
                  [[r["shape"], r["format"], f"{r['parameters'] / 1e6:.1f}M", f"{r['linear_bytes_per_param']:.4f}",
                    f"{r['linear_mib']:.1f}", f"{r['rest_mib']:.1f}", f"{r['total_mib']:.1f}", f"{r['vs_fp32']:.3f}"]
                   for r in result["memory"]])
    print(f"\n2. greedy decoding, batch 1, {result['threads']} thread(s), {result['device_name']}")
    print_columns(["kernel: the output projection, 1 token", "ms", "vs fp32"],
                  [[r["kernel"], f"{r['ms']:.3f}", f"{r['vs_fp32']:.2f}x"] for r in result["kernels"]])
    print()
    print_columns(["variant", "tokens timed", "tok/s", "vs fp32"],
                  [[r["variant"], str(r["tokens"]), f"{r['tok_per_s']:.1f}", f"{r['speedup']:.2f}x"]
                   for r in result["decode"]])
    if result["fidelity"]:
        print("\n3. fidelity against fp32 on stories260K (trained weights)")
        print_columns(["format", "same greedy tokens (of 64)", "top-1 agreement"],
                      [[r["format"], str(r["same_greedy_tokens"]), f"{r['top1_agreement']:.3f}"]
                       for r in result["fidelity"]])
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    notes = []
    shapes = {"tiny": TINY_SHAPE} if args.tiny else SHAPES
    first = next(iter(shapes.values()))
    notes.append(check_formula(first))
    memory = [row for name, shape in shapes.items() for row in memory_rows(name, shape)]
    result = dict(device_name=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(), memory=memory,
                  kernels=kernel_rows(first, 3 * args.repeats), decode=speed_rows(args, first, notes),
                  fidelity=fidelity_rows(notes), notes=notes)
    print_report(result)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

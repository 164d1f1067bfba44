#!/usr/bin/env python3
"""Batch-1 greedy decoding: Mini-Llama against llama2.c's run.c, on the same weights.

run.c is not part of this project: build it from llama2.c yourself (`make run`, or `make runomp`
for OpenMP) and pass the binary with --run. This script writes a model in llama2.c's .bin format
(random weights in the stories42M shape with RMSNorm, which is what run.c computes; or use
--checkpoint for a .bin you have) and a tokenizer.bin made from tokenizer.model into a temporary
folder, then times `RUN MODEL -t 0 -n N -z TOKENIZER` and our generate() alternately, repeat by
repeat, and checks that both print the same text. See bench/README.md.

    python3 bench/runc.py --run ~/llama2.c/run --threads 1
    OMP_WAIT_POLICY=PASSIVE python3 bench/runc.py --run ~/llama2.c/runomp --threads 2
    python3 bench/runc.py --run ~/llama2.c/run --checkpoint stories15M.bin --tokenizer-bin ~/llama2.c/tokenizer.bin
"""
import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sentencepiece import SentencePieceProcessor

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
from decode import build_model, cpu_name, print_columns  # noqa: E402
from llama import CheckpointError, load_pretrained, save_llama2c_bin  # noqa: E402

BOS = 1  # run.c starts every sequence with token 1 and stops when it samples it again
TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, new_tokens=16, repeats=1)
RATE = re.compile(rb"achieved tok/s: ([0-9.]+|inf)")  # inf: under 1 ms, its clock's resolution
BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{1,2})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="the run binary built from llama2.c's run.c")
    p.add_argument("--checkpoint", type=Path, help="a llama2.c .bin to use instead of random weights")
    p.add_argument("--tokenizer-bin", dest="tokenizer_bin", type=Path,
                   help="llama2.c tokenizer.bin (default: written from --tokenizer-model)")
    p.add_argument("--tokenizer-model", dest="tokenizer_model", type=Path,
                   default=BENCH.parent / "tokenizer.model", help="SentencePiece model (default: %(default)s)")
    p.add_argument("--dim", type=int, default=512, help="random model: stories42M shape by default")
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each program; the best is reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads and OMP_NUM_THREADS for run.c (default: both programs' own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="defaults for a smoke run: " + str(TINY))
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    if p.parse_known_args(argv)[0].tiny:
        p.set_defaults(**TINY)
    args = p.parse_args(argv)
    if not (args.run.is_file() and os.access(args.run, os.X_OK)):
        p.error(f"--run {args.run}: not an executable file; build run.c first (in llama2.c: make run)")
    if args.checkpoint and not args.tokenizer_bin and not args.tokenizer_model.is_file():
        p.error(f"{args.tokenizer_model} not found: run `bash setup.sh`, or pass --tokenizer-bin")
    # what decode.build_model reads besides the shape
    args.n_kv_heads, args.norm_type, args.prompt_len, args.device = None, "rmsnorm", 1, "cpu"
    return args


def write_tokenizer_bin(tokenizer_model, vocab_size: int, path) -> None:
    """llama2.c's tokenizer.bin: the longest piece's length in bytes (int32), then for every
    token its score (float32), its length (int32) and its UTF-8 bytes. A piece is stored as run.c
    prints it: SentencePiece's word marker '▁' becomes a space, and BOS / EOS become
    '\\n<s>\\n' / '\\n</s>\\n' as llama2.c's own export writes them."""
    sp = SentencePieceProcessor(model_file=str(tokenizer_model))
    if vocab_size > sp.vocab_size():
        raise ValueError(f"{tokenizer_model} has {sp.vocab_size()} pieces, the model {vocab_size}: "
                         "pass the model's own --tokenizer-bin")
    special = {sp.bos_id(): "\n<s>\n", sp.eos_id(): "\n</s>\n"}
    pieces = [special.get(i, sp.id_to_piece(i).replace("\u2581", " ")).encode() for i in range(vocab_size)]
    with open(path, "wb") as f:
        f.write(struct.pack("i", max(map(len, pieces))))
        for i, piece in enumerate(pieces):
            f.write(struct.pack("fi", sp.get_score(i), len(piece)) + piece)


def read_pieces(path, vocab_size: int) -> list:
    """The token strings (bytes) of a tokenizer.bin."""
    data, offset, pieces = Path(path).read_bytes(), 4, []
    for _ in range(vocab_size):
        _, length = struct.unpack_from("fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return pieces


def runc_text(pieces, tokens) -> bytes:
    """What run.c prints for generated `tokens` after BOS: it stops at BOS, drops the leading space
    of the piece that follows BOS, and prints a byte piece <0xXX> only when the byte is printable
    ASCII or whitespace."""
    out, previous = [], BOS
    for token in tokens:
        if token == BOS:
            break
        piece = pieces[token][1:] if previous == BOS and pieces[token][:1] == b" " else pieces[token]
        byte = BYTE_PIECE.match(piece)
        if byte:
            value = int(byte.group(1), 16)
            piece = bytes([value]) if 0x20 <= value < 0x7F or value in b" \t\n\v\f\r" else b""
        out.append(piece)
        previous = token
    return b"".join(out)


def run_runc(args, model_path, tokenizer_path):
    """One run of run.c: (its tok/s, the text it printed)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    cmd = [str(args.run), str(model_path), "-t", "0", "-n", str(args.new_tokens), "-z", str(tokenizer_path)]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=600)
    rate = RATE.search(proc.stderr)
    if proc.returncode != 0 or not rate:
        tail = proc.stderr.decode(errors="replace").strip()[-500:]
        sys.exit(f"{' '.join(cmd)} exited with {proc.returncode} without 'achieved tok/s: ...':\n{tail}")
    text = proc.stdout[:-1] if proc.stdout.endswith(b"\n") else proc.stdout
    return float(rate.group(1)), text


def ours(model, args, sdpa: bool):
    """One run of our generate(): (tok/s, the new tokens)."""
    model.set_sdpa(sdpa)
    idx = torch.tensor([[BOS]])
    start = time.perf_counter()
    out = model.generate(idx, args.new_tokens, temperature=0.0)
    return args.new_tokens / (time.perf_counter() - start), out[0, 1:].tolist()


def same_text(text: bytes, expected: bytes) -> str:
    if text == expected:
        return "yes"
    first = next((i for i, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
    return f"no (from byte {first} of {len(expected)})"


def random_model(args):
    """bench/decode.py's random weights, with an untied output projection whose BOS row is zero:
    BOS's logit is then 0 while the top one is several std above, so run.c, which stops when it
    samples BOS, runs the full --new_tokens. Same sizes and costs as the tied model."""
    model = build_model(args)
    with torch.no_grad():
        model.output.weight = torch.nn.Parameter(model.output.weight.clone())
        model.output.weight[BOS] = 0.0
    return model


def prepare(args, folder: Path):
    """The .bin both programs read, the tokenizer.bin run.c reads, and our model loaded from that .bin."""
    model_path = args.checkpoint or folder / "model.bin"
    if not args.checkpoint:
        save_llama2c_bin(random_model(args), model_path)
    try:
        model = load_pretrained(model_path).eval()
    except (OSError, CheckpointError) as e:
        sys.exit(f"{model_path}: {e}")
    if model.config.max_seq_len < args.new_tokens:
        sys.exit(f"--new_tokens {args.new_tokens} exceeds the model's max_seq_len {model.config.max_seq_len}")
    tokenizer_path = args.tokenizer_bin or folder / "tokenizer.bin"
    if not args.tokenizer_bin:
        write_tokenizer_bin(args.tokenizer_model, model.config.vocab_size, tokenizer_path)
    return model_path, tokenizer_path, model


def bench(args, folder: Path):
    model_path, tokenizer_path, model = prepare(args, folder)
    programs = {"run.c": lambda: run_runc(args, model_path, tokenizer_path),
                "Mini-Llama, KV cache": lambda: ours(model, args, sdpa=False),
                "Mini-Llama, KV cache + sdpa": lambda: ours(model, args, sdpa=True)}
    rates, outputs = {name: [] for name in programs}, {}
    with torch.inference_mode():
        for name, run in programs.items():  # warm-up: page cache, allocator, thread pools
            run()
        for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
            for name, run in programs.items():
                rate, outputs[name] = run()
                rates[name].append(rate)
    pieces = read_pieces(tokenizer_path, model.config.vocab_size)
    texts = {name: out if name == "run.c" else runc_text(pieces, out) for name, out in outputs.items()}
    base = max(rates["run.c"])
    return model, [dict(program=name, tok_per_s=max(r), tok_per_s_median=statistics.median(r),
                        vs_runc=max(r) / base, same_text=same_text(texts[name], texts["run.c"]))
                   for name, r in rates.items()]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="minillama-runc-") as folder:
        model, rows = bench(args, Path(folder))
    c = model.config
    notes = ["run.c times its tokens after the first (its timer starts after one step); ours time all "
             f"{args.new_tokens}, the 1-token prefill included"]
    print(f"Greedy decoding, batch 1, {args.new_tokens} new tokens after BOS: "
          f"{args.checkpoint or 'random weights'} (dim {c.dim}, {c.n_layers} layers, vocab {c.vocab_size}); "
          f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}; best of {args.repeats}")
    columns = ["program", "tok/s", "median tok/s", "vs run.c", "same text as run.c"]
    lines = [[r["program"], f"{r['tok_per_s']:.1f}", f"{r['tok_per_s_median']:.1f}", f"{r['vs_runc']:.2f}x",
              r["same_text"]] for r in rows]
    print_columns(columns, lines)
    for note in notes:
        print("note:", note)
    result = dict(run=str(args.run), checkpoint=str(args.checkpoint) if args.checkpoint else None,
                  device_name=cpu_name(), torch=torch.__version__, threads=torch.get_num_threads(),
                  omp_num_threads=args.threads or os.environ.get("OMP_NUM_THREADS"),
                  config=dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, vocab_size=c.vocab_size),
                  new_tokens=args.new_tokens, repeats=args.repeats, results=rows, notes=notes)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""`python run_llama.py --option codegen`: fine-tune a Mini-Llama on docstring -> code pairs.

    python run_llama.py --option codegen --pretrained-model-path stories42M.pt \\
        --train_data data/codegen/train.jsonl --valid_data data/codegen/valid.jsonl \\
        --mode lora --lora_rank 8 --fim_rate 0.5 --epochs 1 --use_gpu --bf16

Data: JSONL records with "prompt" (def line + docstring) and "code" (the body), as written by
`python -m codegen.data --out DIR`. Without --train_data, DIR/{train,valid}.jsonl under --data_dir
are used, built first (from --build_from, default the running Python's standard library) if missing.

Each example is  BOS + encode(prompt + code) + EOS,  truncated to --max_len tokens, and the
loss is the causal-LM cross-entropy on the code tokens and EOS only: targets are -100 (ignored) on BOS,
the prompt and the padding, and the logits at position t predict token t + 1. With --fim_rate > 0 the
four FIM sentinels are added to the vocabulary and that fraction of the examples (drawn anew each
epoch) becomes  BOS [PRE] prompt + code[:i] [SUF] code[j:] [MID] code[i:j] [END],  with the loss on
the middle and [END] (see codegen/infill.py, which generates infills from such a model).

Batches are length-bucketed (sorted by length inside shuffled chunks) and right-padded; the loss of
one optimizer step is the mean over every code token of its --grad_accum micro-batches. AdamW from
optimizer.py, warm-up then cosine / linear / constant learning rate, gradient clipping.

Outputs in --out_dir: log.csv (step, epoch, lr, train_loss, valid_loss, chrf, tokens_per_s, elapsed),
best.pt (lowest validation loss; stories42M.pt format with LoRA merged, plus a "codegen" dict with the
sentinel ids, so load_pretrained / codegen.common.load_code_model read it), last.pt (everything
--resume needs: unmerged model / adapters, optimizer, step, epoch, RNG states), summary.json and
curves.png (if matplotlib is installed).
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from codegen.common import CodeTokenizer, load_code_model, pick_device
from codegen.fim import FIM_MIDDLE, split_fim
from codegen.infill import add_fim_sentinels, encode_psm
from codegen.metrics import chrf
from config import LlamaConfig
from llama import Llama
from lora import LoRALayer, expected_lora_parameters, inject_lora, mark_only_lora_trainable, merged_state_dict
from optimizer import AdamW
from utils import UsageError, atomic_save, atomic_write_text, seed_everything

try:
    from tqdm import tqdm
except ImportError:  # tqdm is only cosmetic
    tqdm = None

IGNORE = -100  # target of positions that carry no loss (F.cross_entropy's default ignore_index)
LORA_TARGETS = ("compute_query", "compute_key", "compute_value", "compute_output", "w1", "w2", "w3")
SCHEDULES = ("cosine", "linear", "constant")
LOG_FIELDS = ("step", "epoch", "lr", "train_loss", "valid_loss", "chrf", "tokens_per_s", "elapsed")
CHUNK_BATCHES = 32  # length bucketing: batches are cut from sorted chunks of this many batches


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("codegen training (see codegen/train.py)")
    g.add_argument("--train_data", default=None, help="training JSONL (prompt, code); default: DATA_DIR/train.jsonl")
    g.add_argument("--valid_data", default=None,
                   help="validation JSONL; default: valid.jsonl beside --train_data, else 5%% of it held out")
    g.add_argument("--data_dir", default="data/codegen", help="where the default dataset lives / is built")
    g.add_argument("--build_from", default=None,
                   help="directory of .py files to build the dataset from (default: the standard library)")
    g.add_argument("--out_dir", default="runs/codegen")
    g.add_argument("--mode", choices=("full", "lora"), default="full")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_targets", default="compute_query,compute_value",
                   help=f"comma-separated, any of {','.join(LORA_TARGETS)}")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine/linear decay down to lr * this")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_len", type=int, default=256, help="examples are truncated to this many tokens")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    g.add_argument("--warmup_steps", type=int, default=None, help="overrides --warmup_ratio")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="fraction of the steps spent warming up")
    g.add_argument("--fim_rate", type=float, default=0.0,
                   help="fraction of examples turned into fill-in-the-middle (PSM); > 0 adds the sentinels")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only; ignored with a warning on CPU)")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps in all")
    g.add_argument("--eval_every", type=int, default=None, help="evaluate every N steps (default: once per epoch)")
    g.add_argument("--eval_samples", type=int, default=16,
                   help="greedy generations (first N validation prompts) scored with chrF; 0 skips them")
    g.add_argument("--eval_max_new_tokens", type=int, default=128)
    g.add_argument("--valid_limit", type=int, default=None, help="use only the first N validation pairs")
    g.add_argument("--log_every", type=int, default=10, help="write a log.csv row every N steps")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-evaluation lines")


def run(args) -> int:
    try:
        train(args)
    except (FileNotFoundError, ValueError) as e:  # UsageError, CheckpointError, bad JSONL (file:line), ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_args(args) -> None:
    targets = parse_targets(args.lora_targets)
    positive = {"--epochs": args.epochs, "--batch_size": args.batch_size, "--grad_accum": args.grad_accum,
                "--max_len": args.max_len, "--lora_rank": args.lora_rank, "--log_every": args.log_every,
                "--eval_max_new_tokens": args.eval_max_new_tokens}
    for flag in ("--max_steps", "--eval_every", "--valid_limit"):
        value = getattr(args, flag[2:])
        if value is not None:
            positive[flag] = value
    bad = [f"{k}={v} (must be >= 1)" for k, v in positive.items() if v < 1]
    if args.max_len == 1:
        bad.append("--max_len=1 (must be >= 2)")
    if not 0.0 <= args.fim_rate <= 1.0:
        bad.append(f"--fim_rate={args.fim_rate} (must be in [0, 1])")
    if not 0.0 <= args.lora_dropout < 1.0:
        bad.append(f"--lora_dropout={args.lora_dropout} (must be in [0, 1))")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        bad.append(f"--warmup_ratio={args.warmup_ratio} (must be in [0, 1])")
    for flag, value in (("--lr", args.lr), ("--weight_decay", args.weight_decay), ("--eval_samples", args.eval_samples),
                        ("--warmup_steps", args.warmup_steps or 0), ("--grad_clip", args.grad_clip),
                        ("--lora_alpha", args.lora_alpha), ("--min_lr_ratio", args.min_lr_ratio)):
        if value < 0:
            bad.append(f"{flag}={value} (must be >= 0)")
    if bad:
        raise UsageError("invalid arguments: " + "; ".join(bad))
    args.lora_targets_list = targets


def parse_targets(spec) -> list:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise UsageError(f"unknown LoRA target(s) {unknown} in --lora_targets={spec!r}: "
                         f"choose a comma-separated subset of {','.join(LORA_TARGETS)}")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------
# data


def read_pairs(path) -> list:
    """The (prompt, code) records of a JSONL file, with errors naming file:line."""
    from codegen.data import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found; build one with `python -m codegen.data --out DIR` "
                                "(then pass --train_data DIR/train.jsonl --valid_data DIR/valid.jsonl), or omit "
                                "--train_data to build the default dataset from the standard library")
    pairs = []
    for lineno, obj in iter_jsonl(path):
        for key in ("prompt", "code"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a string "
                                 "(each line needs \"prompt\" and \"code\" strings, as codegen.data writes)")
        pairs.append(obj)
    return pairs


def source_file(pair, index) -> str:
    """The split unit of a pair: its file_hash as codegen.data writes it, else sha1 of its path,
    else the pair itself (records from elsewhere may carry neither)."""
    from codegen.data import sha1

    if pair.get("file_hash"):
        return str(pair["file_hash"])
    if pair.get("path"):
        return sha1(str(pair["path"]))
    return f"pair {index}"


def hold_out(pairs, seed, path, frac=0.05):
    """(train, valid, files held out): about frac of the source files, at least one, go to valid.

    Whole files, as codegen.data.split_by_file does, so that no file has pairs on both sides (its
    other functions would leak into the validation loss). Files are sorted, then shuffled by seed."""
    keys = [source_file(p, i) for i, p in enumerate(pairs)]
    files = sorted(set(keys))
    if len(files) < 2:
        raise UsageError(f"{path}: {len(pairs)} pair(s) from {len(files)} source file(s) is too few to hold out "
                         "a validation set without sharing a file with training; pass --valid_data")
    random.Random(seed).shuffle(files)
    held = set(files[: max(1, round(len(files) * frac))])
    valid = [p for p, key in zip(pairs, keys) if key in held]
    train = [p for p, key in zip(pairs, keys) if key not in held]
    return train, valid, len(held)


def load_data(args, say=print):
    """(train_pairs, valid_pairs, {"train": path, "valid": path})."""
    if args.train_data:
        train_path = Path(args.train_data)
        train = read_pairs(train_path)
        if args.valid_data:
            valid_path = Path(args.valid_data)
            valid = read_pairs(valid_path)
        elif (train_path.parent / "valid.jsonl").is_file() and train_path.name != "valid.jsonl":
            valid_path = train_path.parent / "valid.jsonl"
            valid = read_pairs(valid_path)
            say(f"no --valid_data: validating on {valid_path}")
        else:
            train, valid, n_files = hold_out(train, args.seed, train_path)
            valid_path = f"{train_path} (held out {len(valid)})"
            say(f"no --valid_data: holding out {len(valid)} of {train_path}'s pairs ({n_files} source file(s)) "
                "for validation")
    else:
        if args.valid_data:
            raise UsageError("--valid_data needs --train_data too")
        data_dir = Path(args.data_dir)
        train_path, valid_path = data_dir / "train.jsonl", data_dir / "valid.jsonl"
        if args.build_from or not (train_path.is_file() and valid_path.is_file()):
            from codegen.data import build_dataset, length_encoder

            if args.build_from and not Path(args.build_from).is_dir():
                raise FileNotFoundError(f"--build_from {args.build_from}: no such directory of .py files")
            say(f"building the dataset from {args.build_from or 'the standard library'} into {data_dir} ...")
            build_dataset(root=args.build_from, out_dir=data_dir, encode=length_encoder()[0], verbose=not args.quiet)
        train, valid = read_pairs(train_path), read_pairs(valid_path)
    if not train:
        raise UsageError(f"{train_path}: no training pairs")
    if not valid:
        raise UsageError(f"{valid_path}: no validation pairs")
    if args.valid_limit:
        valid = valid[: args.valid_limit]
    return train, valid, {"train": str(train_path), "valid": str(valid_path)}


def make_example(tokenizer, prompt: str, code: str, max_len=None):
    """(tokens, targets) of one pair: tokens = BOS + encode(prompt + code) + EOS, and targets the same
    ids on the code tokens and EOS but IGNORE on BOS and the prompt. Targets are aligned with tokens
    (not shifted): the loss compares the logits at t with targets[t + 1]. Truncated to max_len.

    The pair is encoded as one text so that the code starts with the token generation will see after
    the prompt: encoding the code on its own would prepend SentencePiece's dummy-prefix space, and a
    model trained that way indents its completions one space too far. The prompt part is the longest
    common prefix with the prompt's own encoding."""
    p = tokenizer.encode(prompt, bos=True, eos=False)
    tokens = tokenizer.encode(prompt + code, bos=True, eos=True)
    n = next((i for i, (a, b) in enumerate(zip(p, tokens)) if a != b), min(len(p), len(tokens)))
    targets = [IGNORE] * n + tokens[n:]
    if max_len is not None:
        tokens, targets = tokens[:max_len], targets[:max_len]
    return tokens, targets


def make_fim_example(tokenizer, prompt: str, code: str, rng: random.Random, max_len=None):
    """(tokens, targets) of the PSM form of a random split of the code (the prompt stays in the prefix):
    BOS [PRE] prompt + code[:i] [SUF] code[j:] [MID] code[i:j] [END], loss on the middle and [END].
    None if it would not fit in max_len (the caller then uses the plain example)."""
    prefix, middle, suffix = split_fim(code, rng)
    tokens = encode_psm(tokenizer, prompt + prefix, suffix, middle=middle, bos=True)
    if max_len is not None and len(tokens) > max_len:
        return None
    n_context = tokens.index(tokenizer.sentinels[FIM_MIDDLE]) + 1
    return tokens, [IGNORE] * n_context + tokens[n_context:]


def has_loss(example) -> bool:
    """At least one target after position 0 (the first token is never predicted)."""
    return any(t != IGNORE for t in example[1][1:])


def collate(examples, pad_id: int):
    """Right-padded (tokens, targets) tensors (batch, longest); padding gets pad_id / IGNORE."""
    width = max(len(tokens) for tokens, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (toks, tgts) in enumerate(examples):
        tokens[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        targets[row, : len(tgts)] = torch.tensor(tgts, dtype=torch.long)
    return tokens, targets


def loss_sum(model, tokens, targets):
    """(summed cross-entropy, number of target tokens) with the causal shift: the logits at position t
    are scored against targets[:, t + 1]; IGNORE targets (prompt, padding) count for nothing."""
    logits, _ = model(tokens, targets=targets)
    shifted = targets[:, 1:]
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, int((shifted != IGNORE).sum())


def make_batches(lengths, batch_size: int, rng: random.Random, chunk_batches: int = CHUNK_BATCHES):
    """Lists of example indices: shuffle, sort by length inside chunks of chunk_batches * batch_size
    (so a batch holds similar lengths and little padding), cut into batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """The epoch's own generator (batch order, FIM choices), so that --resume rebuilds the same epoch."""
    return random.Random(seed * 1_000_003 + epoch)


def epoch_examples(plain, pairs, tokenizer, fim_rate: float, max_len: int, rng: random.Random):
    """The examples of one epoch: each pair's plain example, or with probability fim_rate its FIM form."""
    if fim_rate <= 0:
        return list(plain)
    out = []
    for example, pair in zip(plain, pairs):
        if rng.random() < fim_rate:
            fim = make_fim_example(tokenizer, pair["prompt"], pair["code"], rng, max_len)
            if fim is not None and has_loss(fim):
                example = fim
        out.append(example)
    return out


# ----------------------------------------------------------------------------------------------
# schedule


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up lr * (step + 1) / warmup_steps,
    reaching lr at step warmup_steps - 1; then constant, or a linear / cosine decay from lr at
    step warmup_steps to lr * min_lr_ratio at step total_steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = lr * min_lr_ratio
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(args, total_steps: int) -> int:
    if args.warmup_steps is not None:
        return args.warmup_steps
    return int(round(args.warmup_ratio * total_steps))


# ----------------------------------------------------------------------------------------------
# model set-up, checkpoints


def _zero_rows_below(start: int):
    def hook(grad):
        grad = grad.clone()
        grad[:start] = 0
        return grad
    return hook


def setup_trainable(model, settings: dict, n_words: int):
    """Freeze / inject LoRA as settings["mode"] says. Returns [(param, first trainable row)] of the
    matrices only partly trained: in LoRA mode with FIM, the sentinel rows of the embedding (and of the
    output matrix if untied) are trained too, because they start identical (the mean row), while a
    gradient hook keeps every original row frozen."""
    partial = []
    if settings["mode"] == "lora":
        inject_lora(model, settings["lora_rank"], settings["lora_alpha"], settings["lora_dropout"],
                    settings["lora_targets"])
        mark_only_lora_trainable(model)
        if settings["fim"] and model.vocab_size > n_words:
            weights = [model.tok_embeddings.weight]
            if model.output.weight is not model.tok_embeddings.weight:
                weights.append(model.output.weight)
            for w in weights:
                w.requires_grad_(True)
                w.register_hook(_zero_rows_below(n_words))
                partial.append((w, n_words))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return partial


def trainable_parameters(model, partial) -> int:
    """Parameters the optimizer may change (tied weights once; frozen rows of partial matrices not)."""
    frozen_rows = {id(w): start * w.shape[1] for w, start in partial}
    return sum(p.numel() - frozen_rows.get(id(p), 0) for p in model.parameters() if p.requires_grad)


def make_optimizer(model, partial, args, device):
    """AdamW; weight decay on matrices only (not on norm gains, nor on partly frozen matrices, whose
    frozen rows must not decay)."""
    partial_ids = {id(w) for w, _ in partial}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in partial_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                 foreach=device.type == "cuda")


def best_checkpoint(model, meta: dict) -> dict:
    return {"model_args": dataclasses.asdict(model.config), "model": merged_state_dict(model), "codegen": meta}


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_settings(args) -> dict:
    return {"mode": args.mode, "lora_rank": args.lora_rank, "lora_alpha": float(args.lora_alpha),
            "lora_dropout": float(args.lora_dropout), "lora_targets": list(args.lora_targets_list),
            "fim": args.fim_rate > 0}


def fresh_model(args, device, say):
    model, tokenizer = load_code_model(args.pretrained_model_path, "cpu", args.tokenizer)
    if model.config.max_seq_len < args.max_len:
        raise UsageError(f"{args.pretrained_model_path}: the model's max_seq_len={model.config.max_seq_len} is "
                         f"smaller than --max_len={args.max_len}; pass --max_len {model.config.max_seq_len} or less")
    if model.vocab_size < tokenizer.n_words:
        raise UsageError(f"{args.pretrained_model_path}: vocabulary of {model.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer.n_words} pieces: use the matching --tokenizer")
    if args.fim_rate > 0 and not tokenizer.sentinels:
        sentinels = add_fim_sentinels(model, tokenizer)
        say(f"added FIM sentinels {sentinels}: vocabulary {model.vocab_size}")
    return model.to(device), tokenizer


def resumed_model(ckpt, args, device, say):
    config = LlamaConfig.from_model_args(ckpt["model_args"], causal=True)  # next-token training: see load_code_model
    model = Llama(config)
    if not ckpt["tied"]:
        model.output.weight = nn.Parameter(torch.empty_like(model.output.weight))
    tokenizer = CodeTokenizer(args.tokenizer, ckpt["codegen"]["sentinels"])
    if config.max_seq_len < args.max_len:
        raise UsageError(f"last.pt: the model's max_seq_len={config.max_seq_len} is smaller than "
                         f"--max_len={args.max_len}; pass --max_len {config.max_seq_len} or less")
    return model.to(device), tokenizer


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def generate_code(model, tokenizer, prompts, max_new_tokens: int = 128, batch_size: int = 8, autocast=None):
    """Greedy completions (the text after each prompt, up to EOS / a sentinel / max_new_tokens)."""
    autocast = autocast or contextlib.nullcontext
    # at most half of the context, as codegen.generate does: a long budget must not cut the prompts to BOS
    max_new_tokens = min(max_new_tokens, max(1, model.config.max_seq_len // 2))
    room = model.config.max_seq_len - max_new_tokens
    stops = {tokenizer.eos_id, *getattr(tokenizer, "sentinels", {}).values()}
    out = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        encoded = []
        for prompt in prompts[start : start + batch_size]:
            ids = tokenizer.encode(prompt, bos=True, eos=False)
            encoded.append(ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1 :])
        width = max(map(len, encoded))
        idx = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.bool)
        for row, ids in enumerate(encoded):
            idx[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = True
        with autocast():
            result = model.generate(idx.to(model.device), max_new_tokens, temperature=0.0,
                                    eos_id=tokenizer.eos_id, prompt_mask=mask.to(model.device))
        for row in result[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(tokenizer.decode([t for t in row[:cut] if t < tokenizer.n_words]))
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate(model, tokenizer, valid_examples, valid_pairs, args, autocast):
    """(validation loss: mean over every code token, chrF of greedy generations or None, generations)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(valid_examples)), key=lambda i: len(valid_examples[i][0]))
    for start in range(0, len(order), args.batch_size):
        tokens, targets = collate([valid_examples[i] for i in order[start : start + args.batch_size]],
                                  tokenizer.pad_id)
        with autocast():
            s, n = loss_sum(model, tokens.to(model.device), targets.to(model.device))
        total, count = total + s.item(), count + n
    valid_loss = total / max(count, 1)
    score, hyps = None, []
    if args.eval_samples > 0:
        pairs = valid_pairs[: args.eval_samples]
        hyps = generate_code(model, tokenizer, [p["prompt"] for p in pairs], args.eval_max_new_tokens,
                             max(args.batch_size, 1), autocast)
        score = chrf(hyps, [p["code"] for p in pairs])
    model.train(was_training)
    return valid_loss, score, hyps


# ----------------------------------------------------------------------------------------------
# logging


class CsvLog:
    """log.csv, one row per logged step; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step=None):
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(
                {k: _fmt(row.get(k)) for k in LOG_FIELDS})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.8g}"
    return value


def read_log(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(log_path: Path, png_path: Path):
    """loss (train, valid) and chrF vs step; returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_log(log_path)

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "valid_loss"):
        ax1.plot(*series(key), label=key, marker="." if key == "valid_loss" else None)
    ax1.set_xlabel("step"), ax1.set_ylabel("loss (nats / code token)"), ax1.legend()
    ax2.plot(*series("chrf"), marker="o")
    ax2.set_xlabel("step"), ax2.set_ylabel("chrF (greedy, validation)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def peak_memory(device) -> tuple:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "resource.getrusage ru_maxrss (process)"


# ----------------------------------------------------------------------------------------------
# training


def train(args) -> dict:
    """The whole run; returns the summary dict (also written to OUT_DIR/summary.json)."""
    check_args(args)
    quiet = getattr(args, "quiet", False)
    say = (lambda msg: None) if quiet else (lambda msg: (tqdm.write(msg) if tqdm else print(msg)))
    try:
        device = pick_device(args.use_gpu)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    out_dir = Path(args.out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    log_path, summary_path = out_dir / "log.csv", out_dir / "summary.json"
    if args.resume and not last_path.is_file():
        raise FileNotFoundError(f"{last_path}: nothing to resume from (drop --resume to start a new run, "
                                "or pass the --out_dir of the run to continue)")
    out_dir.mkdir(parents=True, exist_ok=True)
    use_bf16 = False
    if args.bf16:
        if device.type != "cuda":
            print("warning: --bf16 ignored: bf16 autocast is only used on CUDA (add --use_gpu); training in float32",
                  file=sys.stderr)
        elif not torch.cuda.is_bf16_supported():
            print("warning: --bf16 ignored: this GPU does not support bfloat16; training in float32", file=sys.stderr)
        else:
            use_bf16 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    seed_everything(args.seed)
    ckpt = None
    if args.resume:
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        settings = ckpt["settings"]
        wanted = model_settings(args)
        changed = [f"{k}: {wanted[k]} -> {settings[k]}" for k in settings if wanted.get(k) != settings[k]]
        if changed:
            say(f"resuming with the model settings of {last_path} ({'; '.join(changed)})")
        model, tokenizer = resumed_model(ckpt, args, device, say)
    else:
        settings = model_settings(args)
        model, tokenizer = fresh_model(args, device, say)
    # data (after the tokenizer: the FIM examples need the sentinel ids)
    train_pairs, valid_pairs, data_paths = load_data(args, say)
    plain = [make_example(tokenizer, p["prompt"], p["code"], args.max_len) for p in train_pairs]
    keep = [i for i, ex in enumerate(plain) if has_loss(ex)]
    dropped = len(plain) - len(keep)
    if dropped:
        say(f"dropped {dropped} training pair(s) whose prompt fills all --max_len={args.max_len} tokens")
    if not keep:
        raise UsageError(f"{data_paths['train']}: no training pair has a code token within --max_len={args.max_len}")
    train_pairs, plain = [train_pairs[i] for i in keep], [plain[i] for i in keep]
    valid_examples = [make_example(tokenizer, p["prompt"], p["code"], args.max_len) for p in valid_pairs]
    valid_keep = [i for i, ex in enumerate(valid_examples) if has_loss(ex)] or list(range(len(valid_examples)))
    valid_examples = [valid_examples[i] for i in valid_keep]
    fim_rate = args.fim_rate if settings["fim"] else 0.0

    partial = setup_trainable(model, settings, tokenizer.n_words)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
    model.train()
    optimizer = make_optimizer(model, partial, args, device)
    n_trainable = trainable_parameters(model, partial)
    n_total = sum(p.numel() for p in model.parameters()) - sum(
        m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALayer))
    lora_expected = (expected_lora_parameters(model.config, settings["lora_rank"], settings["lora_targets"])
                     if settings["mode"] == "lora" else None)

    n_batches = math.ceil(len(plain) / args.batch_size)
    steps_per_epoch = math.ceil(n_batches / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup = warmup_steps_for(args, total_steps)

    step, epoch, groups_done = 0, 0, 0
    best_loss, best_step, best_chrf = math.inf, None, None
    elapsed_before, epoch_times, last_eval_step = 0.0, {}, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, groups_done = ckpt["step"], ckpt["epoch"], ckpt["groups_done"]
        best_loss = ckpt["best_valid_loss"] if ckpt["best_valid_loss"] is not None else math.inf
        best_step, best_chrf = ckpt["best_step"], ckpt["best_chrf"]
        elapsed_before, last_eval_step = ckpt["elapsed"], ckpt["last_eval_step"]
        epoch_times = {int(k): v for k, v in ckpt["epoch_times"].items()}
        set_rng_state(ckpt["rng"])
        say(f"resumed from {last_path} at step {step} (epoch {epoch}, {groups_done} step(s) into it)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log = CsvLog(log_path, resume_step=step if ckpt is not None else None)

    meta_base = {"sentinels": dict(tokenizer.sentinels), "mode": settings["mode"],
                 "trainable_parameters": n_trainable, "base_checkpoint": str(args.pretrained_model_path)
                 if ckpt is None else ckpt["codegen"]["base_checkpoint"], "fim_rate": float(fim_rate),
                 "max_len": args.max_len,
                 "lora": {k: settings[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
                 if settings["mode"] == "lora" else None}

    say(f"{settings['mode']} fine-tuning: {n_trainable:,} trainable of {n_total:,} parameters"
        + (f" (LoRA {lora_expected:,} + sentinel rows)" if partial else "")
        + f"; {len(plain)} train / {len(valid_examples)} valid pairs; {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps, warm-up {warmup}, {args.schedule} schedule; device {device}"
        + (", bf16" if use_bf16 else ""))

    started = time.time()
    window = {"loss": 0.0, "tokens": 0, "seen": 0, "time": 0.0}  # since the last log row
    history = {"valid_loss": None, "chrf": None}

    def elapsed():
        return elapsed_before + time.time() - started

    def save_last():
        atomic_save({"model_args": dataclasses.asdict(model.config), "tied": model.output.weight is
                     model.tok_embeddings.weight, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "groups_done": groups_done,
                     "best_valid_loss": None if math.isinf(best_loss) else best_loss, "best_step": best_step,
                     "best_chrf": best_chrf, "elapsed": elapsed(), "last_eval_step": last_eval_step,
                     "epoch_times": {str(k): v for k, v in epoch_times.items()}, "rng": rng_state(),
                     "settings": settings, "codegen": meta_base, "args": _jsonable(vars(args))}, last_path)

    def log_row(lr, valid_loss=None, score=None):
        train_loss = window["loss"] / window["tokens"] if window["tokens"] else None
        tps = window["seen"] / window["time"] if window["time"] > 0 else None
        log.write(step=step, epoch=round(epoch + groups_done / steps_per_epoch, 4), lr=lr, train_loss=train_loss,
                  valid_loss=valid_loss, chrf=score, tokens_per_s=tps, elapsed=elapsed())
        window.update(loss=0.0, tokens=0, seen=0, time=0.0)
        return train_loss

    def do_eval(lr):
        nonlocal best_loss, best_step, best_chrf, last_eval_step
        valid_loss, score, hyps = evaluate(model, tokenizer, valid_examples, valid_pairs, args, autocast)
        train_loss = log_row(lr, valid_loss, score)
        last_eval_step = step
        history.update(valid_loss=valid_loss, chrf=score)
        improved = valid_loss < best_loss
        if improved:
            best_loss, best_step, best_chrf = valid_loss, step, score
            meta = {**meta_base, "step": step, "epoch": epoch, "valid_loss": valid_loss, "chrf": score}
            atomic_save(best_checkpoint(model, meta), best_path)
        say(f"step {step}: train loss {'-' if train_loss is None else f'{train_loss:.4f}'}, "
            f"valid loss {valid_loss:.4f}" + ("" if score is None else f", chrF {score:.2f}")
            + (" (best, saved)" if improved else ""))
        if hyps and not quiet:
            say("  sample: " + repr(hyps[0][:120]))
        save_last()

    bar = tqdm(total=total_steps, initial=step, desc="codegen", disable=quiet or tqdm is None,
               dynamic_ncols=True) if tqdm else None
    lr = lr_at(step, total_steps, args.lr, warmup, args.schedule, args.min_lr_ratio)
    while epoch < args.epochs and step < total_steps:
        rng = epoch_rng(args.seed, epoch)
        examples = epoch_examples(plain, train_pairs, tokenizer, fim_rate, args.max_len, rng)
        batches = make_batches([len(ex[0]) for ex in examples], args.batch_size, rng)
        groups = [batches[i : i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]
        epoch_started = time.time()
        while groups_done < len(groups) and step < total_steps:
            step_started = time.time()
            lr = lr_at(step, total_steps, args.lr, warmup, args.schedule, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [collate([examples[i] for i in batch], tokenizer.pad_id) for batch in groups[groups_done]]
            n_targets = sum(int((targets[:, 1:] != IGNORE).sum()) for _, targets in micro)
            step_loss = 0.0
            for tokens, targets in micro:
                tokens, targets = tokens.to(device), targets.to(device)
                with autocast():
                    total, _ = loss_sum(model, tokens, targets)
                (total / n_targets).backward()
                step_loss += total.item()
                window["seen"] += int((tokens != tokenizer.pad_id).sum())
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            groups_done += 1
            window["loss"] += step_loss
            window["tokens"] += n_targets
            window["time"] += time.time() - step_started
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss / max(n_targets, 1):.3f}", lr=f"{lr:.2e}", epoch=epoch)
            if groups_done == len(groups):  # end of the epoch: the next one starts at its first step
                epoch_times[epoch] = epoch_times.get(epoch, 0.0) + time.time() - epoch_started
                epoch, groups_done = epoch + 1, 0
                epoch_started = None
            finished = step >= total_steps or epoch >= args.epochs
            if finished or (step % args.eval_every == 0 if args.eval_every else groups_done == 0):
                do_eval(lr)
            elif step % args.log_every == 0:
                log_row(lr)
            if epoch_started is None:
                break
        if epoch_started is not None:  # stopped inside the epoch (--max_steps)
            epoch_times[epoch] = epoch_times.get(epoch, 0.0) + time.time() - epoch_started
    if bar is not None:
        bar.close()
    if last_eval_step != step or not best_path.is_file():
        do_eval(lr)
    else:
        save_last()

    plot = plot_curves(log_path, out_dir / "curves.png")
    if plot is None:
        print("matplotlib is not installed: skipped the loss / chrF plot (the numbers are in log.csv)")
    peak, peak_source = peak_memory(device)
    times = [epoch_times[k] for k in sorted(epoch_times)]
    summary = {
        "mode": settings["mode"], "trainable_parameters": n_trainable, "total_parameters": n_total,
        "lora_parameters_expected": lora_expected, "sentinel_rows_trained": bool(partial),
        "fim_rate": fim_rate, "sentinels": dict(tokenizer.sentinels), "vocab_size": model.vocab_size,
        "steps": step, "epochs_completed": epoch + groups_done / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "time_per_epoch_s": times, "mean_time_per_epoch_s": sum(times) / len(times) if times else None,
        "elapsed_s": elapsed(), "peak_memory_bytes": peak, "peak_memory_source": peak_source,
        "best_valid_loss": None if math.isinf(best_loss) else best_loss, "best_step": best_step,
        "chrf": best_chrf, "final_valid_loss": history["valid_loss"], "final_chrf": history["chrf"],
        "train_pairs": len(plain), "valid_pairs": len(valid_examples), "dropped_train_pairs": dropped,
        "device": str(device), "bf16": use_bf16, "data": data_paths,
        "best_checkpoint": str(best_path), "last_checkpoint": str(last_path), "log": str(log_path),
        "plot": str(plot) if plot else None,
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    peak_text = "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"
    epoch_text = ", ".join(f"{t:.1f}s" for t in times) or "-"
    print(f"codegen {settings['mode']}: {n_trainable:,} trainable parameters; {step} steps; "
          f"time per epoch {epoch_text}; peak memory {peak_text} ({peak_source}); "
          f"best valid loss {summary['best_valid_loss']:.4f} at step {best_step}"
          + ("" if best_chrf is None else f", chrF {best_chrf:.2f}") + f"; wrote {best_path}, {summary_path}")
    return summary


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


__all__ = ["add_arguments", "run", "train", "make_example", "make_fim_example", "collate", "loss_sum",
           "make_batches", "lr_at", "merged_state_dict", "evaluate", "generate_code", "IGNORE", "LORA_TARGETS"]

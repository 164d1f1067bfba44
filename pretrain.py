"""`python run_llama.py --option pretrain`: train a Mini-Llama from scratch on plain text, as llama2.c's and
nanoGPT's train.py do, small enough for a laptop's CPU.

    python run_llama.py --option pretrain --out base.pt          # the SST + CFIMDB training text, <= 10 min on 2 cores
    python run_llama.py --option generate --pretrained-model-path base.pt
    python run_llama.py --option pretrain --train_text src/ --dim 256 --n_layers 8 --max_steps 20000 \\
        --time_budget 0 --device cuda --out code-base.pt         # a folder of .py files, on a GPU

Text: every file named, and every .py and .txt file under a folder named. A `label ||| sentence` file
(the course's data) gives one document per sentence, its label dropped; any other file is one document.
Each document is tokenized (tokenizer.model, or --tokenizer) after a BOS token, and the documents, in
order, make one stream of tokens. Without --valid_text the last 5 % of the training stream is held out.

Training: a step reads --batch_size windows of --max_seq_len + 1 tokens at random places in the training
stream (drawn from a generator seeded with --seed and the step number, so a resumed run draws exactly
what an uninterrupted one would) and minimises the mean next-token cross-entropy. AdamW (optimizer.py)
with weight decay on the matrices, linear warm-up (--warmup_steps) then cosine decay to lr * --min_lr_ratio,
gradient clipping. The run ends at --max_steps or after --time_budget seconds, whichever comes first,
and so does the decay: its progress is the larger of steps / --max_steps and seconds / --time_budget,
so a run stopped by the clock still ends at the low learning rate.

Every --eval_interval steps and at the end: the validation loss (mean cross-entropy over --eval_windows
windows spread evenly over the validation stream), a row of the log, and the checkpoint. Ctrl-C stops
after the current step and saves; --resume continues.

Writes --out in llama2.c's checkpoint format, stories42M.pt's (model_args, model, optimizer, iter_num,
best_val_loss, config: checkpoint.save_pretraining): every run_llama.py option loads it, causal, with the
norm it was trained with. Beside it: NAME-log.csv (step, lr, train_loss, valid_loss, tokens_per_s,
elapsed) and NAME-log.png (when matplotlib is installed).

Under torchrun (`torchrun --nproc_per_node N run_llama.py --option pretrain ...`, distributed.py) each step
draws --batch_size x N windows, exactly those one process with that batch size draws, and each rank trains
its share (DDP, or FSDP2 with --fsdp); rank 0 alone prints and writes, and --resume takes a checkpoint
written by any number of ranks.
"""
import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from checkpoint import check_vocab, load_pretraining, save_pretraining
from config import NORM_TYPES, LlamaConfig
from llama import Llama
from optimizer import AdamW
from run_llama import read_text, say
from tokenizer import Tokenizer
from training import CsvLog, log_path, lr_at, plot_curves
from utils import DEVICES, DataError, UsageError, pick_device, seed_everything

DEFAULT_TRAIN = ("data/sst-train.txt", "data/cfimdb-train.txt")
DEFAULT_VALID = ("data/sst-dev.txt", "data/cfimdb-dev.txt")
HELD_OUT = 0.05  # the end of the training stream kept for validation when no --valid_text is given
TEXT_SUFFIXES = (".py", ".txt")  # the files read from a folder
LABELLED = re.compile(r"-?\d+ \|\|\| ")  # a line of the course's data: `label ||| sentence`
LOG_FIELDS = ("step", "lr", "train_loss", "valid_loss", "tokens_per_s", "elapsed")


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("text")
    data.add_argument("--train_text", nargs="+", default=None, metavar="FILE_OR_DIR",
                      help=f"files, or folders of {' and '.join(TEXT_SUFFIXES)} files; default: {' '.join(DEFAULT_TRAIN)}")
    data.add_argument("--valid_text", nargs="+", default=None, metavar="FILE_OR_DIR",
                      help=f"validation text; default: {' '.join(DEFAULT_VALID)} with the default --train_text, "
                           f"else the last {HELD_OUT * 100:.0f}%% of the training text")
    data.add_argument("--tokenizer", default=None, help="a SentencePiece .model (default: $MINILLAMA_TOKENIZER, "
                      "else tokenizer.model); the model's vocabulary is its size")
    model = parser.add_argument_group("model (a new run; --resume keeps the saved model's)")
    model.add_argument("--dim", type=int, default=128, help="width of the residual stream")
    model.add_argument("--n_layers", type=int, default=5, help="transformer layers")
    model.add_argument("--n_heads", type=int, default=4, help="query heads (dim / n_heads must be even)")
    model.add_argument("--n_kv_heads", type=int, default=None, help="key/value heads (GQA); default: n_heads")
    model.add_argument("--max_seq_len", type=int, default=256, help="context length, and the training window")
    model.add_argument("--multiple_of", type=int, default=32, help="the feed-forward width is rounded up to this")
    model.add_argument("--norm_type", choices=NORM_TYPES, default="rmsnorm",
                       help="rmsnorm: Llama 2's (exportable to HF, GGUF, llama2.c); layernorm: the assignment's")
    model.add_argument("--dropout", type=float, default=0.0, help="dropout on embeddings, attention and outputs")
    train = parser.add_argument_group("training")
    train.add_argument("--out", default="base.pt", help="the checkpoint to write (and to --resume from)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run saved in --out: its model, optimizer, step and elapsed time; give "
                            "the same training flags to finish the same schedule, larger limits to train further")
    train.add_argument("--batch_size", type=int, default=4, help="windows per step")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (after the warm-up)")
    train.add_argument("--min_lr_ratio", type=float, default=0.1, help="the cosine decay ends at lr * this")
    train.add_argument("--warmup_steps", type=int, default=30, help="linear warm-up steps")
    train.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay of the matrices (not norm gains)")
    train.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    train.add_argument("--max_steps", type=int, default=3000, help="steps in all (the schedule's length)")
    train.add_argument("--time_budget", type=float, default=540,
                       help="seconds of training in all (evaluations included), the schedule's other limit; 0: none")
    train.add_argument("--eval_interval", type=int, default=100, help="validate, log and save every N steps")
    train.add_argument("--eval_windows", type=int, default=64, help="validation windows, spread over the text")
    train.add_argument("--log_interval", type=int, default=10, help="a log row (training loss) every N steps")
    parser.add_argument("--seed", type=int, default=1337, help="initialisation and batch order")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, else MPS, else the CPU")
    parser.add_argument("--use_gpu", action="store_true", help="the course's name for --device cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    distributed.add_arguments(parser.add_argument_group("under torchrun (see distributed.py)"))


POSITIVE = ("dim", "n_layers", "n_heads", "max_seq_len", "multiple_of", "batch_size", "max_steps", "eval_interval",
            "eval_windows", "log_interval")


def check_args(args) -> None:
    """Every out-of-range flag in one UsageError."""
    bad = [f"--{name} {getattr(args, name)} (must be >= 1)" for name in POSITIVE if getattr(args, name) < 1]
    if args.n_kv_heads is not None and args.n_kv_heads < 1:
        bad.append(f"--n_kv_heads {args.n_kv_heads} (must be >= 1)")
    if not args.lr > 0:
        bad.append(f"--lr {args.lr} (must be > 0)")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "time_budget", "min_lr_ratio"):
        if not getattr(args, name) >= 0:
            bad.append(f"--{name} {getattr(args, name)} (must be >= 0)")
    if not 0 <= args.dropout < 1:
        bad.append(f"--dropout {args.dropout} (must be in [0, 1))")
    if bad:
        raise UsageError("invalid arguments: " + "; ".join(bad))


# ----------------------------------------------------------------------------------------------
# text -> one stream of tokens


def text_files(paths) -> list:
    """(path, named) pairs: every path given (named), and the .py / .txt files under the folders given,
    sorted, hidden folders and __pycache__ skipped."""
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append((path, True))
            continue
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            found += [Path(root) / name for name in names if name.endswith(TEXT_SUFFIXES) and not name.startswith(".")]
        if not found:
            raise DataError(f"{path}: no {' or '.join(TEXT_SUFFIXES)} files under this folder")
        files += [(f, False) for f in sorted(found)]
    return files


def documents(path: Path, text: str) -> list:
    """The file's documents: the sentences of a `label ||| sentence` file (the course's data, recognised
    by its first line; every line must then be one), else the whole text (nothing if it is blank)."""
    if path.suffix == ".py" or not LABELLED.match(text):
        return [text] if text.strip() else []
    sentences = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if not LABELLED.match(line):
            raise DataError(f"{path}:{lineno}: expected `label ||| sentence` like the lines above it, got "
                            f"{line[:60]!r}; fix the line (or remove the labels to train on the file as plain text)")
        sentences.append(line.partition(" ||| ")[2].strip())
    return sentences


def token_stream(paths, tokenizer, what: str, quiet=False) -> torch.Tensor:
    """BOS + tokens of every document of every file, in order, as one int32 tensor. Files found in a
    folder that are not UTF-8 are skipped (one warning); a file named on the command line must be."""
    chunks, n_docs, skipped = [], 0, []  # a tensor per file: a list of Python ints takes 30 bytes a token
    files = text_files(paths)
    for path, named in tqdm(files, desc=f"tokenize {what}", disable=quiet or len(files) < 20):
        try:
            text = read_text(path, "text file")
        except DataError as e:
            if named:
                raise
            skipped.append(str(e))
            continue
        docs = documents(path, text)
        chunks.append(torch.tensor([t for doc in docs for t in tokenizer.encode(doc, bos=True, eos=False)],
                                   dtype=torch.int32))
        n_docs += len(docs)
    if skipped and distributed.is_main():
        print(f"warning: skipped {len(skipped)} file(s) under the {what} folders that are not UTF-8, e.g. {skipped[0]}",
              file=sys.stderr)
    if n_docs == 0:
        raise DataError(f"{' '.join(map(str, paths))}: no text to train on (the {what} files are empty)")
    stream = torch.cat(chunks)
    say(f"{what} text: {len(files) - len(skipped)} file(s), {n_docs:,} documents, {len(stream):,} tokens")
    return stream


def split_streams(args, tokenizer) -> tuple:
    """(training stream, validation stream) as the flags say (see --valid_text)."""
    train = token_stream(args.train_text or DEFAULT_TRAIN, tokenizer, "training", args.quiet)
    if args.valid_text or not args.train_text:
        valid = token_stream(args.valid_text or DEFAULT_VALID, tokenizer, "validation", args.quiet)
    else:
        cut = len(train) - max(2, int(len(train) * HELD_OUT))
        train, valid = train[:cut], train[cut:]
        say(f"validation: the last {len(valid):,} tokens of the training text, held out")
    window = args.max_seq_len + 1
    if len(train) < window:
        raise DataError(f"{' '.join(args.train_text or DEFAULT_TRAIN)}: {len(train):,} training tokens, fewer than "
                        f"one window of --max_seq_len + 1 = {window}; give more text or a smaller --max_seq_len")
    if len(valid) < 2:
        raise DataError(f"{' '.join(args.valid_text or DEFAULT_VALID)}: fewer than 2 validation tokens; give more text")
    return train, valid


def get_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator) -> tuple:
    """(inputs, targets), (batch_size, seq_len) each: windows at random places, targets shifted by one."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator).tolist()
    windows = torch.stack([stream[s : s + seq_len + 1] for s in starts]).long()
    return windows[:, :-1], windows[:, 1:]


def eval_windows(stream: torch.Tensor, seq_len: int, n: int) -> tuple:
    """(inputs, targets) of n windows of the stream, evenly spread (all of them when it has no more)."""
    length = min(seq_len, len(stream) - 1)
    count = (len(stream) - 1) // length
    picks = torch.linspace(0, count - 1, min(n, count)).round().long().unique().tolist()
    windows = torch.stack([stream[i * length : i * length + length + 1] for i in picks]).long()
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------------------------
# the model and the optimizer


def new_model(args, vocab_size: int) -> Llama:
    try:
        config = LlamaConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                             vocab_size=vocab_size, multiple_of=args.multiple_of, max_seq_len=args.max_seq_len,
                             dropout=args.dropout, norm_type=args.norm_type, causal=True)
    except ValueError as e:
        raise UsageError(f"the size flags do not make a model: {e}") from None
    return Llama(config)  # llama2.c / GPT-2 initialisation (base_llama.py)


def make_optimizer(model, args) -> AdamW:
    """AdamW with weight decay on the matrices only (norm gains and biases keep theirs), as llama2.c."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return AdamW(groups, lr=args.lr, betas=(0.9, 0.95), foreach=True)


# ----------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class Run:
    """One pretraining run: what its steps share."""

    args: argparse.Namespace
    model: Llama
    optimizer: AdamW
    train: torch.Tensor
    valid: tuple  # (inputs, targets) of the validation windows
    device: torch.device
    log: CsvLog
    step: int = 0
    best_val_loss: float = math.inf
    elapsed: float = 0.0  # seconds, earlier invocations included
    started: float = 0.0  # time.time() when this invocation's training began, less the earlier seconds
    stop_requested: bool = False  # the decision to stop after this step, the same on every rank (sync_clock)
    last_lr: float = 0.0  # the learning rate of the last step
    window: dict = dataclasses.field(default_factory=lambda: {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0})
    par: distributed.Parallel = None  # the model as the ranks train it (one process: the model itself)
    interrupted: bool = False  # Ctrl-C was pressed (in this process)

    def progress(self) -> float:
        """How far along the schedule the run is, 0 to 1: steps or seconds, whichever is further."""
        by_time = self.elapsed / self.args.time_budget if self.args.time_budget else 0.0
        return max(self.step / self.args.max_steps, by_time)

    def lr(self) -> float:
        """Warm-up by steps, then the cosine decay by progress() (steps or seconds, whichever is further)."""
        args = self.args
        where = self.step if self.step < args.warmup_steps else max(self.step, self.progress() * args.max_steps)
        return lr_at(where, args.max_steps, args.lr, args.warmup_steps, "cosine", args.min_lr_ratio)

    def autocast(self):
        if self.args.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def train_step(run: Run) -> float:
    """One optimizer step on a fresh batch; returns its loss (the mean over all ranks' tokens).

    Under torchrun the step's batch is the --batch_size x world windows one process with that batch size
    draws, and each rank trains its share; DDP (or FSDP2) averages the ranks' gradients, so a rank
    backpropagates its summed loss x world / (the batch's target tokens): the gradient of the whole
    batch's mean, one process's."""
    args, seq_len, world = run.args, run.model.config.max_seq_len, distributed.world_size()
    run.last_lr = lr = run.lr()
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + run.step)  # the step's batch, on resume too
    torch.manual_seed((args.seed * 1_000_003 + run.step) * world + distributed.rank())  # and its dropout (per rank)
    inputs, targets = get_batch(run.train, args.batch_size * world, seq_len, generator)
    rows = distributed.shard(range(len(inputs)))
    inputs, targets = inputs[rows].to(run.device), targets[rows].to(run.device)
    run.par.model.train()
    with run.autocast():
        logits, _ = run.par.model(inputs, targets)
    loss_sum = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    n_targets = targets.numel() * world
    (loss_sum * world / n_targets).backward()
    run.par.finish_gradients()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return distributed.all_reduce([(loss_sum / n_targets).item()])[0]


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean next-token cross-entropy over the validation windows; under torchrun each rank scores its share of
    every batch of --batch_size x world windows, and the sums are added up."""
    inputs, targets = run.valid
    size, total = run.args.batch_size * distributed.world_size(), 0.0
    with run.par.local() as model:
        model.eval()
        for start in range(0, len(inputs), size):
            rows = distributed.shard(range(start, min(start + size, len(inputs))))
            if not rows:
                continue
            x, y = inputs[rows].to(run.device), targets[rows].to(run.device)
            with run.autocast():
                logits, _ = model(x, y)
            total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
    return distributed.all_reduce([total])[0] / targets.numel()


def log_row(run: Run, valid_loss=None) -> None:
    """A log.csv row: the mean training loss and the speed since the previous row."""
    w = run.window
    if run.log is not None:  # rank 0's
        run.log.write(step=run.step, lr=run.last_lr, train_loss=w["loss"] / w["steps"] if w["steps"] else None,
                      valid_loss=valid_loss, tokens_per_s=w["tokens"] / w["time"] if w["time"] else None,
                      elapsed=run.elapsed)
    w.update(loss=0.0, steps=0, tokens=0, time=0.0)


def checkpoint(run: Run) -> float:
    """Validate, log, and save --out (rank 0, from the whole model: every rank takes part); returns the
    validation loss."""
    valid_loss = evaluate(run)
    run.best_val_loss = min(run.best_val_loss, valid_loss)
    sync_clock(run)
    log_row(run, valid_loss)
    settings = {k: v for k, v in vars(run.args).items() if k not in ("resume", "quiet", "fsdp", "dist_timeout")}
    with run.par.full() as (model, optimizer):
        if model is not None:
            save_pretraining(run.args.out, model, optimizer, run.step, run.best_val_loss, settings, run.elapsed)
    return valid_loss


def sync_clock(run: Run) -> None:
    """run.elapsed from the clock, and whether to stop (Ctrl-C); under torchrun the latest clock of all ranks
    and a Ctrl-C on any, so that every rank takes the same decision to stop at the same step."""
    elapsed, stop = distributed.all_reduce([time.time() - run.started, float(run.stop_requested or run.interrupted)],
                                           "max")
    run.elapsed, run.stop_requested = elapsed, bool(stop)


def finished(run: Run) -> bool:
    return run.step >= run.args.max_steps or bool(run.args.time_budget and run.elapsed >= run.args.time_budget)


def train_loop(run: Run) -> None:
    """Steps until --max_steps, --time_budget or Ctrl-C, validating and saving every --eval_interval steps."""
    args, world = run.args, distributed.world_size()
    desc = f"pretrain (stops at {args.time_budget:.0f} s)" if args.time_budget else "pretrain"
    bar = tqdm(total=args.max_steps, initial=run.step, desc=desc, disable=args.quiet, dynamic_ncols=True)
    run.started = time.time() - run.elapsed
    while not finished(run) and not run.stop_requested:
        step_started = time.time()
        loss = train_step(run)
        sync_clock(run)
        run.window.update(loss=run.window["loss"] + loss, steps=run.window["steps"] + 1,
                          tokens=run.window["tokens"] + args.batch_size * world * run.model.config.max_seq_len,
                          time=run.window["time"] + time.time() - step_started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{run.last_lr:.2e}", s=f"{run.elapsed:.0f}")
        if finished(run) or run.stop_requested:
            break  # train() validates, logs and saves this last step
        if run.step % args.eval_interval == 0:
            valid_loss = checkpoint(run)
            if distributed.is_main():
                bar.write(f"step {run.step}: train loss {loss:.4f}, valid loss {valid_loss:.4f} ({run.elapsed:.0f}s)")
        elif run.step % args.log_interval == 0:
            log_row(run)
    bar.close()


def start_run(args) -> Run:
    """The tokenizer, the text and the model (new, or --resume's), on the device; under torchrun, this rank's
    device and the model as the ranks train it (distributed.Parallel)."""
    device = distributed.setup(pick_device(args.device, args.use_gpu).type, args.dist_timeout)
    args.quiet = args.quiet or not distributed.is_main()  # rank 0 alone shows progress
    tokenizer = Tokenizer(tokenizer_model=args.tokenizer)
    if args.resume:
        if not Path(args.out).is_file():
            raise UsageError(f"--resume: {args.out} does not exist; pass the --out of the run to continue")
        model, saved = load_pretraining(args.out)
        check_vocab(model, tokenizer, args.out, "resume with the --tokenizer it was trained with")
        args.max_seq_len = model.config.max_seq_len  # the window is the model's context
    else:
        seed_everything(args.seed)
        model, saved = new_model(args, tokenizer.n_words), None
    train, valid = split_streams(args, tokenizer)
    model.to(device).set_sdpa(device.type == "cuda")
    optimizer = make_optimizer(model, args)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    par = distributed.Parallel(model, optimizer, args.fsdp)  # FSDP2 shards the restored optimizer state too
    log = CsvLog(log_path(args.out, ".csv"), LOG_FIELDS, resume_step=saved["iter_num"] if saved else None) \
        if distributed.is_main() else None
    run = Run(args, model, optimizer, train, eval_windows(valid, model.config.max_seq_len, args.eval_windows), device, log,
              par=par)
    if saved is not None:
        run.step, run.elapsed = saved["iter_num"], saved["elapsed"]
        run.best_val_loss = saved["best_val_loss"]
    return run


def announce(run: Run) -> None:
    c, args = run.model.config, run.args
    n_params = sum(p.numel() for p in run.model.parameters())
    limit = f"{args.max_steps} steps" + (f" or {args.time_budget:.0f} s" if args.time_budget else "")
    say(f"model: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads ({c.n_kv_heads} kv), context {c.max_seq_len}, "
        f"vocab {c.vocab_size}, {c.norm_type}; {n_params:,} parameters; device {run.device}")
    say(f"training: {limit} (from step {run.step}), batch {args.batch_size} x {c.max_seq_len} tokens, lr {args.lr:g} "
        f"(warm-up {args.warmup_steps}, cosine to {args.lr * args.min_lr_ratio:g})")
    world = distributed.world_size()
    say(f"effective batch {args.batch_size * world} windows per step (--batch_size {args.batch_size} x {world} "
        f"rank(s)); {run.par.describe()}"
        + (" (--fsdp ignored: not launched by torchrun)" if args.fsdp and world == 1 else ""))


def train(args) -> int:
    """The whole run; returns the exit status (130 when stopped by Ctrl-C, which saves first)."""
    check_args(args)
    run = start_run(args)
    announce(run)
    previous = signal.signal(signal.SIGINT, lambda *_: setattr(run, "interrupted", True))
    try:
        train_loop(run)
    finally:
        signal.signal(signal.SIGINT, previous)
    valid_loss = checkpoint(run)
    if distributed.is_main():
        plot = plot_curves(run.log.path, log_path(args.out, ".png"),
                           [("loss (nats / token)", ["train_loss", "valid_loss"])])
        print(f"step {run.step}: valid loss {valid_loss:.4f} (best {run.best_val_loss:.4f}); {run.elapsed:.0f} s of "
              f"training; wrote {args.out} and {run.log.path}"
              + (f", {plot}" if plot else " (no plot: matplotlib is not installed)"))
    if run.stop_requested and not finished(run):
        say(f"interrupted at step {run.step}: add --resume to continue")
        return 130
    return 0

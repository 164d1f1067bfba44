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
sentinel ids, so load_pretrained / codegen.common.load_code_model read it; a LoRA run also writes its
unmerged adapters beside it, best_adapter.pt, which `--option export --format peft` turns into a PEFT
adapter of the base), last.pt (everything
--resume needs: unmerged model / adapters, optimizer, step, epoch, RNG states), summary.json and
curves.png (if matplotlib is installed).

The pieces:
    codegen/train.py        this file: the command line, the learning-rate schedule and the loop
                            (train -> start_run, train_loop -> run_epoch -> train_step, evaluate_now, finish),
                            whose functions share one Run
    codegen/examples.py     pairs (files given, valid.jsonl beside, a hold-out by codegen.data.split_by_file,
                            or the default dataset) -> examples, batches, the masked loss
    codegen/model_setup.py  the model (pretrained or resumed), LoRA / freezing, parameter counts, AdamW
    codegen/validation.py   evaluate (validation loss, chrF) and generate_code (greedy generations)
    codegen/trainlog.py     log.csv, curves.png, peak memory
    checkpoint.py           CodeTrainingState: the run's progress, and alone what last.pt and best.pt hold
    distributed.py          under torchrun: the ranks, DDP or FSDP2 (--fsdp), metrics across ranks; each step's
                            --batch_size x world examples split among the ranks, rank 0 alone writing
"""
import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import distributed
from checkpoint import CodeTrainingState
# Besides what it uses, this module re-exports (noqa: F401) has_loss, load_data, make_batches, make_example,
# make_fim_example, trainable_parameters, read_log, generate_code and lora's merged_state_dict for callers that
# import them from here. The loop calls `evaluate` through this module's namespace (tests patch it here).
from codegen.examples import (IGNORE, Examples, collate, epoch_plan, has_loss, load_data, loss_sum,  # noqa: F401
                              make_batches, make_example, make_fim_example, prepare_examples, rank_batches)
from codegen.model_setup import (LORA_TARGETS, codegen_metadata, fresh_model, make_optimizer,  # noqa: F401
                                 model_settings, parameter_counts, resumed_model, setup_trainable,
                                 trainable_parameters)
from codegen.trainlog import CsvLog, peak_memory, plot_curves, read_log  # noqa: F401
from codegen.validation import evaluate, generate_code  # noqa: F401
from lora import merged_state_dict  # noqa: F401
from optimizer import AdamW
from training import SCHEDULES, lr_at  # noqa: F401  (the one schedule; tests import it from here too)
from utils import UsageError, atomic_write_text, seed_everything

try:
    from tqdm import tqdm
except ImportError:  # tqdm is only cosmetic
    tqdm = None


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
    g.add_argument("--optim", choices=("adamw", "adamw8bit"), default="adamw",
                   help="optimizer.AdamW, or AdamW8bit (moments in 8 bits: 2 bytes per trained parameter instead of 8); "
                        "a resumed run keeps last.pt's (default: adamw)")
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
    distributed.add_arguments(g)


def run(args) -> int:
    """Train; under torchrun in the process group, left at the end (status 1 if another rank was lost)."""
    try:
        train(args)
    except (FileNotFoundError, ValueError) as e:  # UsageError, CheckpointError, bad JSONL (file:line), ...
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown(wait=False)
        return 2
    except RuntimeError as e:
        message = distributed.failure(e, getattr(args, "dist_timeout", distributed.DEFAULT_TIMEOUT_S))
        distributed.teardown(wait=False)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    distributed.teardown()
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
# schedule


def warmup_steps_for(args, total_steps: int) -> int:
    if args.warmup_steps is not None:
        return args.warmup_steps
    return int(round(args.warmup_ratio * total_steps))


def step_budget(n_examples: int, args, world: int = 1) -> tuple:
    """(optimizer steps per epoch, steps in all: --epochs of them or --max_steps, warm-up steps), each step
    --batch_size x --grad_accum x world examples."""
    steps_per_epoch = math.ceil(math.ceil(n_examples / (args.batch_size * world)) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    return steps_per_epoch, total_steps, warmup_steps_for(args, total_steps)


# ----------------------------------------------------------------------------------------------
# the run: set-up


def _empty_window() -> dict:
    return {"loss": 0.0, "tokens": 0, "seen": 0, "time": 0.0}


@dataclasses.dataclass
class Run:
    """What the loop's functions share; each takes it first. `state` is the progress last.pt saves."""
    args: argparse.Namespace
    say: Callable[[str], None]
    quiet: bool
    device: torch.device
    use_bf16: bool
    out_dir: Path
    model: torch.nn.Module
    tokenizer: object  # codegen.common.CodeTokenizer
    optimizer: AdamW
    data: Examples
    state: CodeTrainingState
    counts: dict  # codegen.model_setup.parameter_counts, and "partial": whether the sentinel rows train
    fim_rate: float
    steps_per_epoch: int
    total_steps: int
    warmup: int
    par: distributed.Parallel = None  # the model as the ranks train it (one process: the model itself)
    world: int = 1  # ranks (torchrun's world size)
    log: CsvLog = None
    bar: object = None  # the tqdm progress bar, if any
    elapsed_before: float = 0.0  # training seconds of the invocations before this one
    started: float = dataclasses.field(default_factory=time.time)
    window: dict = dataclasses.field(default_factory=_empty_window)  # since the last log row
    history: dict = dataclasses.field(default_factory=lambda: {"valid_loss": None, "chrf": None})  # last eval

    last_path = property(lambda self: self.out_dir / "last.pt")
    best_path = property(lambda self: self.out_dir / "best.pt")
    log_path = property(lambda self: self.out_dir / "log.csv")
    summary_path = property(lambda self: self.out_dir / "summary.json")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        a = self.args
        return lr_at(self.state.step, self.total_steps, a.lr, self.warmup, a.schedule, a.min_lr_ratio)


def train(args) -> dict:
    """The whole run; returns the summary dict (also written to OUT_DIR/summary.json)."""
    run = start_run(args)
    lr = train_loop(run)
    return finish(run, lr)


def start_run(args) -> Run:
    """Check the flags; load the model (pretrained, or last.pt's with --resume) and the data; set up what
    trains and the optimizer; say what will run."""
    check_args(args)
    device = distributed.setup(args.use_gpu, getattr(args, "dist_timeout", distributed.DEFAULT_TIMEOUT_S))
    quiet = getattr(args, "quiet", False) or not distributed.is_main()  # rank 0 alone prints
    say = (lambda msg: None) if quiet else (lambda msg: (tqdm.write(msg) if tqdm else print(msg)))
    out_dir, world = Path(args.out_dir), distributed.world_size()
    if args.resume and not (out_dir / "last.pt").is_file():
        raise FileNotFoundError(f"{out_dir / 'last.pt'}: nothing to resume from (drop --resume to start a new run, "
                                "or pass the --out_dir of the run to continue)")
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    use_bf16 = bf16_wanted(args, device)
    seed_everything(args.seed)
    state, model, tokenizer = load_model(args, out_dir / "last.pt", device, say)
    data = prepare_examples(args, tokenizer, say)  # after the tokenizer: the FIM examples need the sentinel ids
    par, counts, fim_rate = setup_training(args, state, model, tokenizer, device)
    steps_per_epoch, total_steps, warmup = step_budget(len(data.plain), args, world)
    run = Run(args=args, say=say, quiet=quiet, device=device, use_bf16=use_bf16, out_dir=out_dir, model=model,
              tokenizer=tokenizer, optimizer=par.optimizer, data=data, state=state, counts=counts, fim_rate=fim_rate,
              steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup=warmup, elapsed_before=state.elapsed,
              par=par, world=world)
    if args.resume:
        say(f"resumed from {run.last_path} at step {state.step} (epoch {state.epoch}, {state.groups_done} step(s) "
            "into it)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run.log = CsvLog(run.log_path, resume_step=state.step if args.resume else None)
    announce(run)
    run.started = time.time()
    return run


def bf16_wanted(args, device) -> bool:
    """--bf16, where it can be had (CUDA with bfloat16); otherwise a warning and float32."""
    if not args.bf16:
        return False
    warn = print if distributed.is_main() else (lambda *a, **k: None)
    if device.type != "cuda":
        warn("warning: --bf16 ignored: bf16 autocast is only used on CUDA (add --use_gpu); training in float32",
             file=sys.stderr)
        return False
    if not torch.cuda.is_bf16_supported():
        warn("warning: --bf16 ignored: this GPU does not support bfloat16; training in float32", file=sys.stderr)
        return False
    return True


def load_model(args, last_path: Path, device, say) -> tuple:
    """(state, model, tokenizer): a new run's, or with --resume last.pt's (its weights are put in by
    setup_training, once the model has its adapters)."""
    if not args.resume:
        model, tokenizer = fresh_model(args, device, say)
        return CodeTrainingState(settings=model_settings(args), codegen={}), model, tokenizer
    state = CodeTrainingState.load_last(last_path)
    wanted = model_settings(args)
    changed = [f"{k}: {wanted[k]} -> {state.settings[k]}" for k in state.settings if wanted.get(k) != state.settings[k]]
    if changed:
        say(f"resuming with the model settings of {last_path} ({'; '.join(changed)})")
    model, tokenizer = resumed_model(state, args, device)
    return state, model, tokenizer


def setup_training(args, state: CodeTrainingState, model, tokenizer, device) -> tuple:
    """Freeze / inject LoRA, make the optimizer, restore last.pt's weights, optimizer and RNGs on --resume,
    fill in the state's metadata and arguments, then hand the model to the ranks (distributed.Parallel: DDP,
    FSDP2 with --fsdp, or as it is in one process). Returns (Parallel, parameter counts, FIM rate)."""
    partial = setup_trainable(model, state.settings, tokenizer.n_words)
    model.train()
    optimizer = make_optimizer(model, partial, args, device)
    counts = {**parameter_counts(model, partial, state.settings), "partial": bool(partial)}
    fim_rate = args.fim_rate if state.settings["fim"] else 0.0
    base_checkpoint, base_adapter = args.pretrained_model_path, getattr(args, "adapter", None)
    if args.resume:
        state.restore(model, optimizer)
        base_checkpoint, base_adapter = state.codegen["base_checkpoint"], state.codegen.get("base_adapter")
    state.codegen = codegen_metadata(state.settings, tokenizer, counts["trainable"], base_checkpoint, fim_rate,
                                     args.max_len, None if base_adapter is None else str(base_adapter))
    state.args = _jsonable(vars(args))
    if getattr(args, "fsdp", False) and distributed.active() and state.settings.get("optim") == "adamw8bit":
        raise UsageError("--fsdp with --optim adamw8bit: the 8-bit optimizer quantizes whole tensors in blocks, "
                         "not FSDP2's shards; drop --fsdp (DDP) or use --optim adamw")
    par = distributed.Parallel(model, optimizer, getattr(args, "fsdp", False), partial)
    distributed.seed_ranks(args.seed)
    return par, counts, fim_rate


def announce(run: Run) -> None:
    settings, counts, a = run.state.settings, run.counts, run.args
    run.say(f"{settings['mode']} fine-tuning: {counts['trainable']:,} trainable of {counts['total']:,} parameters"
            + (f" (LoRA {counts['lora_expected']:,} + sentinel rows)" if counts["partial"] else "")
            + f"; {len(run.data.plain)} train / {len(run.data.valid)} valid pairs; {run.steps_per_epoch} steps/epoch, "
            f"{run.total_steps} steps, warm-up {run.warmup}, {a.schedule} schedule; device {run.device}"
            + (", bf16" if run.use_bf16 else ""))
    run.say(f"effective batch {a.batch_size * a.grad_accum * run.world} examples per step (--batch_size "
            f"{a.batch_size} x --grad_accum {a.grad_accum} x {run.world} rank(s)); {run.par.describe()}"
            + (" (--fsdp ignored: not launched by torchrun)" if getattr(a, "fsdp", False) and run.par.kind == "single"
               else ""))


# ----------------------------------------------------------------------------------------------
# the run: the loop


def train_loop(run: Run) -> float:
    """Epochs until --epochs or the step budget; returns the learning rate of the last step."""
    state = run.state
    run.bar = tqdm(total=run.total_steps, initial=state.step, desc="codegen", disable=run.quiet or tqdm is None,
                   dynamic_ncols=True) if tqdm else None
    lr = run.lr()
    while state.epoch < run.args.epochs and state.step < run.total_steps:
        lr = run_epoch(run, lr)
    if run.bar is not None:
        run.bar.close()
    return lr


def run_epoch(run: Run, lr: float) -> float:
    """The rest of the current epoch (from groups_done: all of it, or what --resume left), up to the
    step budget, evaluating and logging as due; returns the learning rate of the last step."""
    state = run.state
    examples, groups = epoch_plan(run.data, run.tokenizer, run.fim_rate, run.args, state.epoch, run.world)
    if state.groups_done >= len(groups):  # resumed with larger batches: this epoch has no step left
        state.epoch, state.groups_done = state.epoch + 1, 0
        return lr
    epoch, epoch_started = state.epoch, time.time()
    while state.groups_done < len(groups) and state.step < run.total_steps:
        lr = train_step(run, examples, groups[state.groups_done])
        ended = state.groups_done == len(groups)
        if ended:  # the next epoch starts at its first step
            state.epoch_times[epoch] = state.epoch_times.get(epoch, 0.0) + time.time() - epoch_started
            state.epoch, state.groups_done = epoch + 1, 0
        evaluate_or_log(run, lr)
        if ended:
            return lr
    # stopped inside the epoch (--max_steps)
    state.epoch_times[epoch] = state.epoch_times.get(epoch, 0.0) + time.time() - epoch_started
    return lr


def train_step(run: Run, examples: list, group: list) -> float:
    """One optimizer step on the micro-batches of `group` (lists of indices into examples: with several ranks,
    global batches, of which this rank trains its share); returns its lr."""
    step_started = time.time()
    state, args = run.state, run.args
    lr = run.lr()
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = lr
    micro, n_targets = rank_batches(examples, group, run.tokenizer.pad_id)  # n_targets: of all ranks
    step_loss, seen = distributed.all_reduce(accumulate_gradients(run, micro, n_targets))
    run.window["seen"] += seen
    run.par.finish_gradients()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.groups_done += 1
    run.window["loss"] += step_loss
    run.window["tokens"] += n_targets
    run.window["time"] += time.time() - step_started
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{step_loss / max(n_targets, 1):.3f}", lr=f"{lr:.2e}", epoch=state.epoch)
    return lr


def accumulate_gradients(run: Run, micro: list, n_targets: int) -> list:
    """Backward through each micro-batch, each loss divided by the whole step's target count (so the step's
    gradient is that of the mean over all its code tokens) and multiplied by the world size (DDP and FSDP2
    average the ranks' gradients; see distributed.py); returns [summed loss, tokens seen] of this rank."""
    step_loss, seen = 0.0, 0
    for k, (tokens, targets) in enumerate(micro):
        tokens, targets = tokens.to(run.device), targets.to(run.device)
        with run.par.accumulating(last=k == len(micro) - 1):  # DDP: all-reduce in the last backward only
            with run.autocast():
                total, _ = loss_sum(run.par.model, tokens, targets)
            (total * run.world / n_targets).backward()
        step_loss += total.item()
        seen += int((tokens != run.tokenizer.pad_id).sum())
    return [step_loss, seen]


def evaluate_or_log(run: Run, lr: float) -> None:
    """After a step: evaluate at the end, every --eval_every steps (default: each epoch's end), else log
    a row every --log_every steps."""
    state, args = run.state, run.args
    finished = state.step >= run.total_steps or state.epoch >= args.epochs
    if finished or (state.step % args.eval_every == 0 if args.eval_every else state.groups_done == 0):
        evaluate_now(run, lr)
    elif state.step % args.log_every == 0:
        log_row(run, lr)


def evaluate_now(run: Run, lr: float) -> None:
    """Validation loss and chrF (every rank a share, the same numbers on all), a log row, best.pt if the loss is
    the lowest yet, then last.pt."""
    state = run.state
    with run.par.local() as model:
        valid_loss, score, hyps = evaluate(model, run.tokenizer, run.data.valid, run.data.valid_pairs, run.args,
                                           run.autocast)
    train_loss = log_row(run, lr, valid_loss, score)
    state.last_eval_step = state.step
    run.history.update(valid_loss=valid_loss, chrf=score)
    improved = state.improves(valid_loss)
    if improved:
        state.best_valid_loss, state.best_step, state.best_chrf = valid_loss, state.step, score
    save(run, best=improved)
    run.say(f"step {state.step}: train loss {'-' if train_loss is None else f'{train_loss:.4f}'}, "
            f"valid loss {valid_loss:.4f}" + ("" if score is None else f", chrF {score:.2f}")
            + (" (best, saved)" if improved else ""))
    if hyps and not run.quiet:
        run.say("  sample: " + repr(hyps[0][:120]))


def log_row(run: Run, lr: float, valid_loss=None, score=None):
    """A log.csv row for the steps since the last one; returns their mean training loss (None if no step)."""
    state, window = run.state, run.window
    train_loss = window["loss"] / window["tokens"] if window["tokens"] else None
    tps = window["seen"] / window["time"] if window["time"] > 0 else None
    run.log.write(step=state.step, epoch=round(state.epoch + state.groups_done / run.steps_per_epoch, 4), lr=lr,
                  train_loss=train_loss, valid_loss=valid_loss, chrf=score, tokens_per_s=tps, elapsed=run.elapsed())
    window.update(_empty_window())
    return train_loss


def save(run: Run, best: bool = False) -> None:
    """best.pt if asked, then last.pt, written by rank 0 from the whole model (every rank takes part: FSDP2
    gathers the shards)."""
    run.state.elapsed = run.elapsed()
    with run.par.full() as (model, optimizer):
        if model is not None:
            if best:
                run.state.save_best(run.best_path, model)
            run.state.save_last(run.last_path, model, optimizer)


# ----------------------------------------------------------------------------------------------
# the run: the end


def finish(run: Run, lr: float) -> dict:
    """Evaluate the last step unless just done (or no best.pt yet), save last.pt, plot, write summary.json
    and print the summary line; returns the summary."""
    state = run.state
    if distributed.broadcast(state.last_eval_step != state.step or not run.best_path.is_file()):  # rank 0's files
        evaluate_now(run, lr)
    else:
        save(run)
    plot = plot_curves(run.log_path, run.out_dir / "curves.png") if distributed.is_main() else None
    summary = summarize(run, plot)  # every rank: the peak memory is the largest rank's
    if not distributed.is_main():
        return summary
    if plot is None:
        print("matplotlib is not installed: skipped the loss / chrF plot (the numbers are in log.csv)")
    atomic_write_text(run.summary_path, json.dumps(summary, indent=2) + "\n")
    peak = summary["peak_memory_bytes"]
    peak_text = "n/a" if peak is None else f"{peak / 2**20:.1f} MiB"
    epoch_text = ", ".join(f"{t:.1f}s" for t in summary["time_per_epoch_s"]) or "-"
    print(f"codegen {summary['mode']}: {summary['trainable_parameters']:,} trainable parameters; {state.step} steps; "
          f"time per epoch {epoch_text}; peak memory {peak_text} ({summary['peak_memory_source']}); "
          f"best valid loss {summary['best_valid_loss']:.4f} at step {state.best_step}"
          + ("" if state.best_chrf is None else f", chrF {state.best_chrf:.2f}")
          + f"; wrote {run.best_path}, {run.summary_path}")
    return summary


def summarize(run: Run, plot) -> dict:
    """summary.json's contents."""
    state, counts, data = run.state, run.counts, run.data
    peak, peak_source = peak_memory(run.device)
    times = [state.epoch_times[k] for k in sorted(state.epoch_times)]
    return {
        "mode": state.settings["mode"], "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
        "lora_parameters_expected": counts["lora_expected"], "sentinel_rows_trained": counts["partial"],
        "fim_rate": run.fim_rate, "sentinels": dict(run.tokenizer.sentinels), "vocab_size": run.model.vocab_size,
        "steps": state.step, "epochs_completed": state.epoch + state.groups_done / run.steps_per_epoch,
        "steps_per_epoch": run.steps_per_epoch, "time_per_epoch_s": times,
        "mean_time_per_epoch_s": sum(times) / len(times) if times else None, "elapsed_s": run.elapsed(),
        "peak_memory_bytes": peak, "peak_memory_source": peak_source,
        "best_valid_loss": None if math.isinf(state.best_valid_loss) else state.best_valid_loss,
        "best_step": state.best_step, "chrf": state.best_chrf, "final_valid_loss": run.history["valid_loss"],
        "final_chrf": run.history["chrf"], "train_pairs": len(data.plain), "valid_pairs": len(data.valid),
        "dropped_train_pairs": data.dropped, "device": str(run.device), "bf16": run.use_bf16, "data": data.paths,
        "world_size": run.world, "parallel": run.par.kind,
        "effective_batch": run.args.batch_size * run.args.grad_accum * run.world,
        "best_checkpoint": str(run.best_path), "last_checkpoint": str(run.last_path), "log": str(run.log_path),
        "plot": str(plot) if plot else None,
    }


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


__all__ = ["add_arguments", "run", "train", "make_example", "make_fim_example", "collate", "loss_sum",
           "make_batches", "lr_at", "merged_state_dict", "evaluate", "generate_code", "IGNORE", "LORA_TARGETS",
           "UsageError", "has_loss", "load_data", "setup_trainable", "trainable_parameters", "plot_curves", "read_log"]

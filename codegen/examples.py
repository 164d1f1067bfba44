"""Training and validation examples for code fine-tuning (codegen/train.py): data in, batches out.

    read_pairs(path)                 the (prompt, code) records of a JSONL file, errors naming file:line
    load_data(args, say)             train / valid pairs: the files given, valid.jsonl beside the train file,
                                     a hold-out of whole source files, or the default dataset (built if missing)
    hold_out(pairs, seed, path)      that hold-out, by codegen.data.split_by_file
    prepare_examples(args, tok, say) -> Examples: every pair of the run tokenized (pairs without a code token
                                     within --max_len dropped)
    make_example / make_fim_example  (tokens, targets) of one pair, plain or fill-in-the-middle (PSM)
    has_loss, collate, loss_sum      ... has a target, right-padded tensors, the masked causal-LM loss
    make_batches                     length-bucketed batches of example indices
    epoch_rng / epoch_examples       one epoch's generator and examples (FIM drawn anew each epoch)
    epoch_plan(data, ...)            ... and its optimizer steps: lists of --grad_accum micro-batches, each of
                                     --batch_size x world examples (the global batch of all ranks)
    rank_batches(examples, group)    one step's micro-batches as this rank trains them (its share of each,
                                     padded to the global batch's width) and the step's global target count

Each example is  BOS + encode(prompt + code) + EOS,  truncated to max_len tokens; targets are IGNORE (-100)
on BOS, the prompt and the padding, and the logits at position t predict token t + 1 (see make_example).
"""
import dataclasses
import random
from pathlib import Path

import torch
import torch.nn.functional as F

import distributed
from codegen.fim import FIM_MIDDLE, split_fim
from codegen.infill import encode_psm
from utils import UsageError

IGNORE = -100  # target of positions that carry no loss (F.cross_entropy's default ignore_index)
CHUNK_BATCHES = 32  # length bucketing: batches are cut from sorted chunks of this many batches
HOLD_OUT = 0.05  # fraction of the source files held out for validation when no validation data is given


# ----------------------------------------------------------------------------------------------
# pairs


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


def hold_out(pairs, seed, path, frac=HOLD_OUT):
    """(train, valid, files held out): about frac of the source files, at least one, go to valid.

    codegen.data.split_by_file (valid=frac, test=0) on each pair's source_file: whole files, so that no
    file has pairs on both sides (its other functions would leak into the validation loss), sorted then
    shuffled by seed; pairs keep their order. The fraction is raised to one file's worth where frac of
    the files would round to none."""
    from codegen.data import split_by_file

    keys = [source_file(p, i) for i, p in enumerate(pairs)]
    n_files = len(set(keys))
    if n_files < 2:
        raise UsageError(f"{path}: {len(pairs)} pair(s) from {n_files} source file(s) is too few to hold out "
                         "a validation set without sharing a file with training; pass --valid_data")
    splits = split_by_file(range(len(pairs)), valid=max(frac, 1 / n_files), test=0.0, seed=seed, keys=keys)
    train, valid = ([pairs[i] for i in splits[name]] for name in ("train", "valid"))
    return train, valid, len({keys[i] for i in splits["valid"]})


def load_data(args, say=print):
    """(train_pairs, valid_pairs, {"train": path, "valid": path})."""
    if args.train_data:
        train, valid, train_path, valid_path = _given_data(args, say)
    else:
        if args.valid_data:
            raise UsageError("--valid_data needs --train_data too")
        train, valid, train_path, valid_path = _default_data(args, say)
    if not train:
        raise UsageError(f"{train_path}: no training pairs")
    if not valid:
        raise UsageError(f"{valid_path}: no validation pairs")
    if args.valid_limit:
        valid = valid[: args.valid_limit]
    return train, valid, {"train": str(train_path), "valid": str(valid_path)}


def _given_data(args, say):
    """--train_data, validated on --valid_data, else on valid.jsonl beside it, else on a hold-out."""
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
    return train, valid, train_path, valid_path


def _default_data(args, say):
    """DATA_DIR/{train,valid}.jsonl, built first (from --build_from, default the standard library) if missing."""
    data_dir = Path(args.data_dir)
    train_path, valid_path = data_dir / "train.jsonl", data_dir / "valid.jsonl"
    if args.build_from and not Path(args.build_from).is_dir():
        raise FileNotFoundError(f"--build_from {args.build_from}: no such directory of .py files")
    if distributed.broadcast(bool(args.build_from) or not (train_path.is_file() and valid_path.is_file())):
        if distributed.is_main():  # the other ranks wait, then read what rank 0 wrote
            from codegen.data import build_dataset, length_encoder

            say(f"building the dataset from {args.build_from or 'the standard library'} into {data_dir} ...")
            build_dataset(root=args.build_from, out_dir=data_dir, encode=length_encoder()[0], verbose=not args.quiet)
        distributed.barrier()
    return read_pairs(train_path), read_pairs(valid_path), train_path, valid_path


@dataclasses.dataclass
class Examples:
    """The tokenized data of a run."""
    train_pairs: list  # the training pairs kept (each has a code token within max_len)
    plain: list  # their plain examples, in the same order
    valid_pairs: list  # every validation pair (the first --eval_samples prompts are generated from)
    valid: list  # the validation examples the loss is measured on
    dropped: int  # training pairs dropped: their prompt fills all of max_len
    paths: dict  # {"train": path, "valid": path}, for the summary


def prepare_examples(args, tokenizer, say=print) -> Examples:
    """load_data, then every pair as make_example; training pairs without a code token within
    --max_len are dropped (and reported), validation ones kept unless none has one."""
    train_pairs, valid_pairs, paths = load_data(args, say)
    plain = [make_example(tokenizer, p["prompt"], p["code"], args.max_len) for p in train_pairs]
    keep = [i for i, ex in enumerate(plain) if has_loss(ex)]
    dropped = len(plain) - len(keep)
    if dropped:
        say(f"dropped {dropped} training pair(s) whose prompt fills all --max_len={args.max_len} tokens")
    if not keep:
        raise UsageError(f"{paths['train']}: no training pair has a code token within --max_len={args.max_len}")
    valid = [make_example(tokenizer, p["prompt"], p["code"], args.max_len) for p in valid_pairs]
    valid_keep = [i for i, ex in enumerate(valid) if has_loss(ex)] or list(range(len(valid)))
    return Examples(train_pairs=[train_pairs[i] for i in keep], plain=[plain[i] for i in keep],
                    valid_pairs=valid_pairs, valid=[valid[i] for i in valid_keep], dropped=dropped, paths=paths)


# ----------------------------------------------------------------------------------------------
# examples, batches and the loss


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


def collate(examples, pad_id: int, width: int = None):
    """Right-padded (tokens, targets) tensors (batch, width: by default the longest); padding gets pad_id / IGNORE."""
    width = max(len(tokens) for tokens, _ in examples) if width is None else width
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



def epoch_plan(data: Examples, tokenizer, fim_rate: float, args, epoch: int, world: int = 1):
    """(examples, groups) of one epoch: its examples (epoch_examples) and its optimizer steps, each a list
    of --grad_accum micro-batches of example indices (make_batches), all drawn from epoch_rng. With several
    ranks a micro-batch holds the --batch_size x world examples of all of them, drawn as one process with
    that batch size draws them (rank_batches gives each rank its share)."""
    rng = epoch_rng(args.seed, epoch)
    examples = epoch_examples(data.plain, data.train_pairs, tokenizer, fim_rate, args.max_len, rng)
    batches = make_batches([len(ex[0]) for ex in examples], args.batch_size * world, rng)
    return examples, [batches[i : i + args.grad_accum] for i in range(0, len(batches), args.grad_accum)]


def n_targets(example) -> int:
    """The targets of an example that carry loss (position 0 is never predicted): what loss_sum counts."""
    return sum(t != IGNORE for t in example[1][1:])


def rank_batches(examples: list, group: list, pad_id: int) -> tuple:
    """(micro-batches, n): this rank's (tokens, targets) of each global micro-batch of an optimizer step
    (its distributed.shard of the indices, right-padded to the longest example of the whole micro-batch, as
    one process would pad it), and n the target tokens of the whole step on all ranks. A rank whose share is
    empty (a last batch smaller than the world) gets one row of padding, which carries no loss but still
    runs the forward and backward every rank must take part in."""
    micro = []
    for batch in group:
        width = max(len(examples[i][0]) for i in batch)
        rows = [examples[i] for i in distributed.shard(batch)] or [([pad_id] * width, [IGNORE] * width)]
        micro.append(collate(rows, pad_id, width))
    return micro, sum(n_targets(examples[i]) for batch in group for i in batch)

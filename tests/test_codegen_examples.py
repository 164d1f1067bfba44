"""Tests for codegen/examples.py: loss masking (make_example, collate, loss_sum), the validation hold-out
(codegen.data.split_by_file on whole source files), batching, and one epoch's plan."""
import argparse
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from codegen.common import CodeTokenizer
from codegen.data import split_by_file
from codegen.examples import (IGNORE, Examples, collate, epoch_plan, has_loss, hold_out, load_data, loss_sum,
                              make_batches, make_example, prepare_examples)
from config import LlamaConfig
from conftest import asset_path
from helpers import synthetic_pairs, write_jsonl
from llama import Llama
from utils import UsageError

CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8, max_seq_len=256)
SENTINELS = {"<fim_prefix>": 32000, "<fim_suffix>": 32001, "<fim_middle>": 32002, "<fim_end>": 32003}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tok():
    return CodeTokenizer(str(asset_path("tokenizer.model")))


# ----------------------------------------------------------------------------------------------
# loss masking


def test_make_example_masks_bos_and_prompt(tok):
    prompt, code = 'def f(x):\n    """Double x."""\n', "    return 2 * x\n"
    tokens, targets = make_example(tok, prompt, code)
    p = tok.encode(prompt, bos=True, eos=False)
    assert tokens == tok.encode(prompt + code, bos=True, eos=True) and tokens[:len(p)] == p
    assert targets == [IGNORE] * len(p) + tokens[len(p):]  # the code tokens and EOS are the only targets
    # the code starts as generation after the prompt sees it: decoding prompt + code tokens gives the
    # pair back, with the code's indentation intact (encoding the code alone adds a dummy-prefix space)
    assert tok.decode(tokens) == prompt + code
    assert tok.decode(p + tokens[len(p):]) == prompt + code
    assert tok.decode(p + tok.encode(code, bos=False, eos=True)) != prompt + code
    short_tokens, short_targets = make_example(tok, prompt, code, max_len=len(p) + 2)
    assert short_tokens == tokens[: len(p) + 2] and short_targets == targets[: len(p) + 2]
    assert not has_loss(make_example(tok, prompt, code, max_len=len(p)))  # nothing left to learn


def test_loss_is_cross_entropy_over_code_tokens_only(tok):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIG))
    examples = [make_example(tok, 'def f(x):\n    """Double x."""\n', "    return 2 * x\n"),
                make_example(tok, "def g():\n", "    pass\n")]
    tokens, targets = collate(examples, tok.pad_id)
    assert tokens.shape == targets.shape == (2, max(len(e[0]) for e in examples))
    short = len(examples[1][0])
    assert (tokens[1, short:] == tok.pad_id).all() and (targets[1, short:] == IGNORE).all()  # right padding
    total, count = loss_sum(model, tokens, targets)
    # by hand: logits at position t predict the token at t + 1, summed over code positions only
    with torch.no_grad():
        logits = model(tokens, targets=targets)[0]
    hand, n = 0.0, 0
    for row, (toks, tgts) in enumerate(examples):
        for t in range(len(toks) - 1):
            if tgts[t + 1] != IGNORE:
                hand -= torch.log_softmax(logits[row, t].double(), dim=-1)[toks[t + 1]].item()
                n += 1
    n_code = sum(len(tok.encode(c, False, True)) for c in ("    return 2 * x\n", "    pass\n"))
    assert count == n == n_code
    assert math.isclose(total.item(), hand, rel_tol=1e-5)
    # padding and batch-mates change nothing: each example alone gives the same sum
    alone = sum(loss_sum(model, *collate([e], tok.pad_id))[0].item() for e in examples)
    assert math.isclose(total.item(), alone, rel_tol=1e-5)
    # and the prompt really is ignored: changing a prompt's targets to real tokens changes the loss
    unmasked = targets.clone()
    unmasked[0, 1:3] = tokens[0, 1:3]
    assert loss_sum(model, tokens, unmasked)[1] == count + 2


def test_no_gradient_reaches_the_logits_of_prompt_or_padding_positions(tok):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIG))
    examples = [make_example(tok, "def h(a, b):\n", "    return a - b\n"), make_example(tok, "def z():\n", "    pass\n")]
    tokens, targets = collate(examples, tok.pad_id)
    captured = []

    def keep_logits(module, inputs, out):
        out.retain_grad()
        captured.append(out)

    model.output.register_forward_hook(keep_logits)
    total, count = loss_sum(model, tokens, targets)
    (total / count).backward()
    grad_norm = captured[0].grad.abs().sum(-1)  # (batch, seqlen)
    scored = torch.zeros_like(targets, dtype=torch.bool)
    scored[:, :-1] = targets[:, 1:] != IGNORE  # logits at t are scored against targets[t + 1]
    assert (grad_norm[~scored] == 0).all() and (grad_norm[scored] > 0).all()
    assert scored.sum() == count
    mean = F.cross_entropy(captured[0][:, :-1].reshape(-1, 32000), targets[:, 1:].reshape(-1))  # ignore_index=-100
    assert math.isclose((total / count).item(), mean.item(), rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------
# validation hold-out


def held_out_split(tmp_path, pairs, seed=0):
    """load_data on a train file with no valid.jsonl beside it: (train, valid) pairs."""
    path = write_jsonl(tmp_path / "only_train.jsonl", pairs)
    args = argparse.Namespace(train_data=str(path), valid_data=None, seed=seed, valid_limit=None)
    train, valid, _ = load_data(args, say=lambda *a: None)
    return train, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_validation_never_shares_a_source_file_with_training(tmp_path, seed):
    pairs = [dict(p, path=f"pkg/mod{i % 40}.py") for i, p in enumerate(synthetic_pairs(400))]
    train, valid = held_out_split(tmp_path, pairs, seed)
    assert not {p["path"] for p in train} & {p["path"] for p in valid}
    assert len({p["path"] for p in valid}) == 2  # 5% of 40 files
    assert sorted(map(json.dumps, train + valid)) == sorted(map(json.dumps, pairs))
    # codegen.data records carry file_hash, which wins over path
    hashed = [dict(p, file_hash=f"h{i % 3}", path=f"p{i}.py") for i, p in enumerate(pairs[:60])]
    train, valid = held_out_split(tmp_path, hashed, seed)
    assert not {p["file_hash"] for p in train} & {p["file_hash"] for p in valid}


def test_held_out_validation_without_file_fields_is_per_pair_and_one_file_is_an_error(tmp_path):
    bare = [{"prompt": p["prompt"], "code": p["code"]} for p in synthetic_pairs(40)]
    train, valid = held_out_split(tmp_path, bare)
    assert (len(train), len(valid)) == (38, 2)
    with pytest.raises(UsageError, match="from 1 source file"):
        held_out_split(tmp_path, [dict(p, path="same.py") for p in bare])


def hashed_pairs(n_files, per_file=3):
    """Pairs as codegen.data writes them: file_hash is the split unit."""
    return [dict(p, file_hash=f"h{i % n_files:03d}", path=f"f{i % n_files}.py")
            for i, p in enumerate(synthetic_pairs(n_files * per_file))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hold_out_is_split_by_file_on_whole_files_and_deterministic(seed):
    """hold_out is codegen.data.split_by_file (valid 5%, no test split): whole files, chosen by seed
    alone (not by the order of the pairs), pairs in their input order."""
    pairs = hashed_pairs(40)
    train, valid, n_files = hold_out(pairs, seed, "train.jsonl")
    splits = split_by_file(pairs, valid=0.05, test=0.0, seed=seed)
    assert (train, valid, n_files) == (splits["train"], splits["valid"], 2)
    held = {p["file_hash"] for p in valid}
    assert len(held) == 2 and not held & {p["file_hash"] for p in train}
    assert all(p in valid for p in pairs if p["file_hash"] in held)  # every pair of a held-out file
    assert hold_out(pairs, seed, "train.jsonl") == (train, valid, n_files)
    shuffled = list(pairs)
    random.Random(seed + 10).shuffle(shuffled)
    assert {p["file_hash"] for p in hold_out(shuffled, seed, "train.jsonl")[1]} == held
    others = {frozenset(p["file_hash"] for p in hold_out(pairs, s, "train.jsonl")[1]) for s in range(5)}
    assert len(others) > 1  # the seed chooses


@pytest.mark.parametrize("n_files, held", [(2, 1), (3, 1), (10, 1), (19, 1), (40, 2), (100, 5)])
def test_hold_out_keeps_at_least_one_file_for_training_and_one_for_validation(n_files, held):
    train, valid, n_held = hold_out(hashed_pairs(n_files), 0, "train.jsonl")
    assert n_held == held == len({p["file_hash"] for p in valid})
    assert len({p["file_hash"] for p in train}) == n_files - held


def test_hold_out_needs_two_source_files():
    with pytest.raises(UsageError, match=r"x\.jsonl: 6 pair\(s\) from 1 source file\(s\) is too few .* --valid_data"):
        hold_out([dict(p, file_hash="same") for p in synthetic_pairs(6)], 0, "x.jsonl")


# ----------------------------------------------------------------------------------------------
# batching


def test_make_batches_covers_every_example_once_and_buckets_by_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(1000)]
    batches = make_batches(lengths, 8, random.Random(1), chunk_batches=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 8 for b in batches) and sum(len(b) < 8 for b in batches) <= math.ceil(1000 / 32)
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = list(range(1000))
    random.Random(2).shuffle(shuffled)
    plain = [shuffled[i : i + 8] for i in range(0, 1000, 8)]
    plain_padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plain)
    assert padding < plain_padding / 3  # bucketing removes most of the padding
    assert batches == make_batches(lengths, 8, random.Random(1), chunk_batches=4)  # seeded


def test_make_batches_shuffles_the_batches_of_a_sorted_chunk():
    """Within one chunk the batches are cut in length order, then shuffled: the epoch does not run
    shortest-to-longest, and every example still appears exactly once."""
    lengths = [(7 * i) % 64 + 1 for i in range(64)]  # 64 distinct lengths
    batches = make_batches(lengths, 4, random.Random(0), chunk_batches=16)  # one chunk of 64
    assert sorted(i for b in batches for i in b) == list(range(64)) and all(len(b) == 4 for b in batches)
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    assert sorted(spans) == [(4 * k + 1, 4 * k + 4) for k in range(16)]  # bucketed by length
    assert spans != sorted(spans)  # but not in length order


# ----------------------------------------------------------------------------------------------
# the examples of a run and of an epoch


def test_prepare_examples_drops_training_pairs_without_a_code_token(tmp_path, tok):
    long_prompt = "def f(x):\n    " + "x = x + 1\n    " * 20
    pairs = synthetic_pairs(6) + [{"prompt": long_prompt, "code": "    return x\n"}]
    train = write_jsonl(tmp_path / "train.jsonl", pairs)
    valid = write_jsonl(tmp_path / "v.jsonl", [{"prompt": long_prompt, "code": "    return x\n"}])
    args = argparse.Namespace(train_data=str(train), valid_data=str(valid), seed=0, valid_limit=None, max_len=40)
    said = []
    data = prepare_examples(args, tok, said.append)
    assert data.dropped == 1 and data.train_pairs == pairs[:6] and len(data.plain) == 6
    assert data.plain == [make_example(tok, p["prompt"], p["code"], 40) for p in pairs[:6]]
    assert said == ["dropped 1 training pair(s) whose prompt fills all --max_len=40 tokens"]
    assert len(data.valid) == 1 and not has_loss(data.valid[0])  # none has a code token: all are kept
    assert data.paths == {"train": str(train), "valid": str(valid)}
    with pytest.raises(UsageError, match="no training pair has a code token"):
        prepare_examples(argparse.Namespace(**{**vars(args), "max_len": 5}), tok, said.append)


def test_epoch_plan_is_reproducible_and_covers_every_example_once():
    """Each epoch draws its FIM examples and batch order from its own generator (what --resume relies on)."""
    tok = CodeTokenizer(str(asset_path("tokenizer.model")), SENTINELS)
    pairs = synthetic_pairs(30)
    plain = [make_example(tok, p["prompt"], p["code"]) for p in pairs]
    data = Examples(train_pairs=pairs, plain=plain, valid_pairs=[], valid=[], dropped=0, paths={})
    args = argparse.Namespace(seed=3, max_len=96, batch_size=4, grad_accum=3)
    examples, groups = epoch_plan(data, tok, 0.5, args, epoch=1)
    assert (examples, groups) == epoch_plan(data, tok, 0.5, args, epoch=1)
    assert epoch_plan(data, tok, 0.5, args, epoch=2) != (examples, groups)
    assert sorted(i for group in groups for batch in group for i in batch) == list(range(30))
    assert [len(g) for g in groups] == [3, 3, 2] and all(len(b) <= 4 for g in groups for b in g)
    fim = [i for i, ex in enumerate(examples) if ex != plain[i]]
    assert 0 < len(fim) < 30 and all(SENTINELS["<fim_middle>"] in examples[i][0] for i in fim)
    assert epoch_plan(data, tok, 0.0, args, epoch=1)[0] == plain

"""Tests for codegen/train.py (`run_llama.py --option codegen`): loss masking, batching, the LR schedule,
LoRA merging, and end-to-end runs on a tiny synthetic checkpoint with ~50 synthetic docstring -> code pairs."""
import argparse
import csv
import io
import json
import math
import os
import random
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from codegen import cli
from codegen.common import CodeTokenizer, load_code_model
from codegen.train import (IGNORE, UsageError, collate, has_loss, load_data, loss_sum, lr_at, make_batches,
                           make_example, merged_state_dict, setup_trainable, trainable_parameters)
from config import LlamaConfig
from conftest import ROOT, asset_path
from helpers import save_stories_pt
from llama import Llama, load_pretrained
from lora import expected_lora_parameters

CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8, max_seq_len=256)
LOG_FIELDS = ["step", "epoch", "lr", "train_loss", "valid_loss", "chrf", "tokens_per_s", "elapsed"]
SUMMARY_FIELDS = {"mode", "trainable_parameters", "total_parameters", "peak_memory_bytes", "peak_memory_source",
                  "time_per_epoch_s", "best_valid_loss", "best_step", "chrf", "steps", "sentinels"}


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_pairs(n=50):
    ops = [("add", "+", "plus"), ("sub", "-", "minus"), ("mul", "*", "times"), ("div", "//", "divided by")]
    pairs = []
    for i in range(n):
        name, op, word = ops[i % len(ops)]
        k = i // len(ops) + 1
        pairs.append({"prompt": f'def {name}_{k}(x):\n    """Return x {word} {k}."""\n',
                      "code": f"    y = x {op} {k}\n    return y\n", "path": f"mod{i % 7}.py"})
    return pairs


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """tiny.pt (vocab 32000, max_seq_len 256), data/{train,valid,small}.jsonl, and the tokenizer path."""
    tokenizer = asset_path("tokenizer.model")
    work = tmp_path_factory.mktemp("codegen_train")
    torch.manual_seed(0)
    save_stories_pt(Llama(LlamaConfig(**CONFIG)), work / "tiny.pt")
    (work / "data").mkdir()
    pairs = synthetic_pairs(50)
    write_jsonl(work / "data" / "train.jsonl", pairs[:40])
    write_jsonl(work / "data" / "valid.jsonl", pairs[40:])
    write_jsonl(work / "data" / "small.jsonl", pairs[:4])
    return work, str(tokenizer)


@pytest.fixture
def tok(workdir):
    return CodeTokenizer(workdir[1])


def common_args(workdir, out, *extra):
    work, tokenizer = workdir
    return ["--option", "codegen", "--pretrained-model-path", str(work / "tiny.pt"), "--tokenizer", tokenizer,
            "--train_data", str(work / "data" / "train.jsonl"), "--valid_data", str(work / "data" / "valid.jsonl"),
            "--out_dir", str(out), "--batch_size", "4", "--max_len", "96", "--eval_samples", "2",
            "--eval_max_new_tokens", "12", "--lr", "3e-3", "--quiet", *extra]


def run_cli(argv):
    """codegen.cli.main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def run_subprocess(workdir, argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILLAMA_TOKENIZER": workdir[1]}
    return subprocess.run([sys.executable, str(ROOT / "run_llama.py"), *argv], cwd=workdir[0], env=env,
                          capture_output=True, text=True, timeout=300)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


# ----------------------------------------------------------------------------------------------
# batching and schedule


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


def test_lr_schedule_values():
    lr, total, warm = 1.0, 110, 10
    # warm-up: linear, reaching lr at the last warm-up step
    assert lr_at(0, total, lr, warm) == pytest.approx(0.1)
    assert lr_at(4, total, lr, warm) == pytest.approx(0.5)
    assert lr_at(9, total, lr, warm) == pytest.approx(1.0)
    for schedule in ("cosine", "linear", "constant"):
        assert lr_at(10, total, lr, warm, schedule) == pytest.approx(1.0)
    # middle of the decay (step 60 of 10..110)
    assert lr_at(60, total, lr, warm, "cosine") == pytest.approx(0.5)
    assert lr_at(60, total, lr, warm, "linear") == pytest.approx(0.5)
    assert lr_at(60, total, lr, warm, "constant") == pytest.approx(1.0)
    assert lr_at(35, total, lr, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # end
    assert lr_at(110, total, lr, warm, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(110, total, lr, warm, "linear") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(110, total, lr, warm, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(0, 10, 3e-4, 0, "cosine") == pytest.approx(3e-4)  # no warm-up
    values = [lr_at(s, total, lr, warm) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    with pytest.raises(ValueError):
        lr_at(0, 10, 1.0, 0, "step")


# ----------------------------------------------------------------------------------------------
# LoRA: trainable parameters and merged checkpoints


SETTINGS = dict(mode="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, fim=False)


@pytest.mark.parametrize("targets", [["compute_query", "compute_value"], ["compute_key", "compute_output", "w1", "w2", "w3"]])
def test_lora_trainable_parameters_equal_expected(targets):
    model = Llama(LlamaConfig(**CONFIG))
    partial = setup_trainable(model, {**SETTINGS, "lora_targets": targets}, n_words=32000)
    assert partial == []
    assert trainable_parameters(model, partial) == expected_lora_parameters(model.config, 4, targets)


def test_merged_state_dict_loads_into_a_plain_llama_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIG)).eval()
    setup_trainable(model, {**SETTINGS, "lora_targets": ["compute_query", "w2"]}, n_words=32000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # a non-zero update
    state = merged_state_dict(model)
    assert not any("lora" in k or ".base." in k for k in state)
    assert state["output.weight"] is state["tok_embeddings.weight"]  # tied: one tensor in the file
    torch.save({"model_args": {**CONFIG, "norm_type": "layernorm"}, "model": state}, tmp_path / "m.pt")
    plain = load_pretrained(tmp_path / "m.pt").eval()
    tokens = torch.randint(0, 32000, (2, 11))
    with torch.no_grad():
        assert torch.allclose(plain(tokens, targets=tokens)[0], model(tokens, targets=tokens)[0], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# end to end


def check_run_outputs(out, mode, vocab, tokenizer):
    for name in ("best.pt", "last.pt", "log.csv", "summary.json"):
        assert (out / name).is_file(), name
    rows = read_log(out / "log.csv")
    assert list(rows[0]) == LOG_FIELDS
    assert rows[-1]["valid_loss"] and rows[-1]["chrf"]
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["mode"] == mode and summary["steps"] == 10 and summary["peak_memory_bytes"] > 0
    assert summary["best_valid_loss"] == pytest.approx(min(float(r["valid_loss"]) for r in rows if r["valid_loss"]))
    assert summary["best_step"] == int(min((r for r in rows if r["valid_loss"]), key=lambda r: float(r["valid_loss"]))["step"])
    model, code_tok = load_code_model(out / "best.pt", "cpu", tokenizer)
    assert model.vocab_size == vocab
    assert set(code_tok.sentinels) == {"<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_end>"}
    assert sorted(code_tok.sentinels.values()) == [32000, 32001, 32002, 32003]
    meta = torch.load(out / "best.pt", weights_only=True)["codegen"]
    assert meta["mode"] == mode and meta["trainable_parameters"] == summary["trainable_parameters"]
    assert meta["base_checkpoint"].endswith("tiny.pt")
    assert not any("lora" in k for k in torch.load(out / "best.pt", weights_only=True)["model"])
    # trained causal from a plain (course-semantics) stories42M-format base, and recorded as such
    assert torch.load(out / "best.pt", weights_only=True)["model_args"]["causal"] is True
    assert load_pretrained(out / "best.pt").config.causal is True
    return summary


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cli_end_to_end_with_fim(workdir, mode):
    work, tokenizer = workdir
    out = work / f"run_{mode}"
    result = run_subprocess(workdir, common_args(workdir, out, "--mode", mode, "--fim_rate", "0.5",
                                                 "--max_steps", "10", "--eval_every", "5", "--lora_rank", "4"))
    assert result.returncode == 0, result.stderr
    assert "trainable parameters" in result.stdout and "best valid loss" in result.stdout
    summary = check_run_outputs(out, mode, 32004, tokenizer)
    if mode == "lora":  # LoRA matrices plus the 4 new (tied) sentinel rows of the embedding
        lora = expected_lora_parameters(LlamaConfig(**CONFIG), 4, ["compute_query", "compute_value"])
        assert summary["trainable_parameters"] == lora + 4 * CONFIG["dim"]
        assert summary["lora_parameters_expected"] == lora
        # the frozen base is untouched except for the sentinel rows
        base = torch.load(work / "tiny.pt", weights_only=True)["model"]
        best = torch.load(out / "best.pt", weights_only=True)["model"]
        assert torch.equal(best["tok_embeddings.weight"][:32000], base["tok_embeddings.weight"])
        assert torch.equal(best["layers.0.feed_forward.w1.weight"], base["layers.0.feed_forward.w1.weight"])
        assert not torch.equal(best["layers.0.attention.compute_query.weight"],
                               base["layers.0.attention.compute_query.weight"])
    else:
        assert summary["trainable_parameters"] == summary["total_parameters"]


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(workdir):
    """6 steps, then --resume to 13 (crossing the epoch boundary at 10) gives the same numbers as 13 steps
    in one go: model, adapters, sentinel rows, optimizer, position in the epoch and RNG (LoRA dropout) all
    come back from last.pt."""
    work, _ = workdir
    extra = ["--mode", "lora", "--lora_dropout", "0.2", "--fim_rate", "0.5", "--epochs", "2", "--schedule", "constant",
             "--eval_every", "4", "--log_every", "1", "--eval_samples", "0"]
    whole, part = work / "resume_whole", work / "resume_part"
    assert run_cli(common_args(workdir, whole, *extra, "--max_steps", "13"))[0] == 0
    assert run_cli(common_args(workdir, part, *extra, "--max_steps", "6"))[0] == 0
    assert [int(r["step"]) for r in read_log(part / "log.csv")] == list(range(1, 7))
    assert torch.load(part / "last.pt", weights_only=True)["step"] == 6
    rc, stdout, stderr = run_cli(common_args(workdir, part, *extra, "--max_steps", "13", "--resume"))
    assert rc == 0, stderr
    rows = read_log(part / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 14))  # continued: 7..13
    reference = read_log(whole / "log.csv")
    for a, b in zip(rows, reference):
        assert (a["step"], a["epoch"], a["lr"], a["train_loss"]) == (b["step"], b["epoch"], b["lr"], b["train_loss"])
    valid = {r["step"]: r["valid_loss"] for r in rows if r["valid_loss"]}
    assert set(valid) == {"4", "6", "8", "12", "13"}  # every 4 steps, plus the end of each invocation
    assert all(valid[r["step"]] == r["valid_loss"] for r in reference if r["valid_loss"])
    summary = json.loads((part / "summary.json").read_text())
    assert summary["steps"] == 13 and summary["epochs_completed"] == pytest.approx(1.3)
    assert summary["best_valid_loss"] == json.loads((whole / "summary.json").read_text())["best_valid_loss"]


def test_grad_accum_gives_the_full_batch_gradient(workdir, tmp_path, monkeypatch):
    """One step of batch 1 x accum 2 has the same gradient as batch 2 x accum 1 on two pairs of different
    code lengths: each micro-batch is divided by the step's whole token count, not its own."""
    import codegen.train as codegen_train

    pairs = [{"prompt": "def f(x):\n", "code": "    return x\n"},
             {"prompt": "def g(x):\n", "code": "    y = x * 2 + 1\n    z = [y, y, y, y]\n    return z\n"}]
    train = write_jsonl(tmp_path / "train.jsonl", pairs)
    grads, step = [], codegen_train.AdamW.step

    def recording_step(self, *a, **k):
        grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]
                                if p.grad is not None]).clone())
        return step(self, *a, **k)

    monkeypatch.setattr(codegen_train.AdamW, "step", recording_step)
    for out, batch, accum in (("full", "2", "1"), ("accum", "1", "2")):
        argv = common_args(workdir, tmp_path / out, "--train_data", str(train), "--valid_limit", "1", "--eval_samples",
                           "0", "--batch_size", batch, "--grad_accum", accum, "--grad_clip", "0", "--max_steps", "1")
        assert run_cli(argv)[0] == 0
    assert len(grads) == 2
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def fake_valid_losses(monkeypatch, losses, seen=None):
    """codegen.train.evaluate returning the given validation losses in turn (and recording a weight)."""
    import codegen.train as codegen_train

    losses = iter(losses)

    def evaluate(model, *args, **kwargs):
        if seen is not None:
            seen.append(model.layers[0].attention.compute_query.weight.detach().clone())
        return next(losses), None, []

    monkeypatch.setattr(codegen_train, "evaluate", evaluate)


def test_best_checkpoint_is_the_lowest_validation_loss_not_the_last(workdir, tmp_path, monkeypatch):
    """Validation losses 3, 1, 2 at steps 1, 2, 3: the best is 1.0 at step 2, and best.pt holds step 2's weights."""
    seen = []
    fake_valid_losses(monkeypatch, [3.0, 1.0, 2.0], seen)
    out = tmp_path / "out"
    argv = common_args(workdir, out, "--train_data", str(workdir[0] / "data" / "small.jsonl"), "--batch_size", "1",
                       "--eval_every", "1", "--max_steps", "3", "--eval_samples", "0")
    assert run_cli(argv)[0] == 0
    assert len(seen) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_valid_loss"], summary["best_step"]) == (1.0, 2)
    best = torch.load(out / "best.pt", weights_only=True)
    assert (best["codegen"]["step"], best["codegen"]["valid_loss"]) == (2, 1.0)
    weight = best["model"]["layers.0.attention.compute_query.weight"]
    assert torch.equal(weight, seen[1]) and not torch.equal(weight, seen[2])


def test_resume_keeps_the_best_validation_loss(workdir, tmp_path, monkeypatch):
    """A resumed run whose evaluations are worse (2.0) than the first run's (1.0) keeps best 1.0 and its best.pt."""
    out = tmp_path / "out"
    argv = common_args(workdir, out, "--train_data", str(workdir[0] / "data" / "small.jsonl"), "--batch_size", "1",
                       "--eval_every", "1", "--eval_samples", "0")
    fake_valid_losses(monkeypatch, [1.0])
    assert run_cli([*argv, "--max_steps", "1"])[0] == 0
    first_best = (out / "best.pt").read_bytes()
    fake_valid_losses(monkeypatch, [2.0, 2.0])
    rc, _, err = run_cli([*argv, "--max_steps", "3", "--resume"])
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_valid_loss"], summary["best_step"], summary["steps"]) == (1.0, 1, 3)
    assert (out / "best.pt").read_bytes() == first_best  # not overwritten by a worse model


def test_default_data_is_built_with_codegen_data(workdir, tmp_path):
    """Without --train_data the dataset is built into --data_dir (here from --build_from, a small tree)."""
    work, tokenizer = workdir
    argv = ["--option", "codegen", "--pretrained-model-path", str(work / "tiny.pt"), "--tokenizer", tokenizer,
            "--data_dir", str(tmp_path / "data"), "--build_from", str(ROOT / "tests" / "fixtures" / "pytree"),
            "--out_dir", str(tmp_path / "out"), "--max_steps", "1", "--eval_samples", "1",
            "--eval_max_new_tokens", "4", "--max_len", "64", "--quiet"]
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    assert (tmp_path / "data" / "train.jsonl").is_file() and (tmp_path / "data" / "valid.jsonl").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["data"]["train"].endswith("train.jsonl")


def test_loss_decreases_when_overfitting_a_few_pairs(workdir):
    work, _ = workdir
    out = work / "overfit"
    argv = common_args(workdir, out, "--train_data", str(work / "data" / "small.jsonl"), "--epochs", "30",
                       "--max_steps", "30", "--eval_every", "30", "--log_every", "1", "--eval_samples", "0",
                       "--schedule", "constant", "--warmup_steps", "0", "--lr", "1e-2", "--bf16")
    rc, stdout, stderr = run_cli(argv)
    assert rc == 0, stderr
    assert "--bf16 ignored" in stderr  # CPU: a warning, then float32
    losses = [float(r["train_loss"]) for r in read_log(out / "log.csv")]
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


# ----------------------------------------------------------------------------------------------
# errors


def test_clear_errors(workdir, tmp_path):
    work, tokenizer = workdir
    missing = common_args(workdir, tmp_path / "o1", "--train_data", str(tmp_path / "nope.jsonl"))
    rc, _, err = run_cli(missing)
    assert rc == 2 and "nope.jsonl" in err and "codegen.data" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "def f():\n", "code": "    pass\n"}) + "\n{not json\n")
    rc, _, err = run_cli(common_args(workdir, tmp_path / "o2", "--train_data", str(bad)))
    assert rc == 2 and f"{bad}:2" in err

    no_code = tmp_path / "no_code.jsonl"
    no_code.write_text(json.dumps({"prompt": "def f():\n"}) + "\n")
    rc, _, err = run_cli(common_args(workdir, tmp_path / "o3", "--train_data", str(no_code)))
    assert rc == 2 and f"{no_code}:1" in err and "'code'" in err

    rc, _, err = run_cli(common_args(workdir, tmp_path / "o4", "--mode", "lora", "--lora_targets", "compute_query,wq"))
    assert rc == 2 and "wq" in err and "compute_value" in err

    rc, _, err = run_cli(common_args(workdir, tmp_path / "o5", "--max_len", "512"))
    assert rc == 2 and "max_seq_len=256" in err and "--max_len" in err

    rc, _, err = run_cli(common_args(workdir, tmp_path / "o6", "--resume"))
    assert rc == 2 and "last.pt" in err and "--resume" in err


def test_plot_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; without it training skips the plot")
    from codegen.train import plot_curves

    log = tmp_path / "log.csv"
    log.write_text("step,epoch,lr,train_loss,valid_loss,chrf,tokens_per_s,elapsed\n"
                   "10,0.1,0.001,5.0,,,100,1\n20,0.2,0.001,4.0,4.5,3.0,100,2\n")
    png = plot_curves(log, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_code_keeps_the_prompt_whatever_the_budget(monkeypatch):
    """A generation budget past the context gets half of it, so prompts keep their tokens (not just BOS)."""
    from codegen.train import generate_code

    model = Llama(LlamaConfig(**{**CONFIG, "max_seq_len": 64})).eval()
    tokenizer = CodeTokenizer(str(asset_path("tokenizer.model")))
    seen = {}

    def fake_generate(idx, max_new_tokens, **kwargs):
        seen["prompt_len"], seen["max_new_tokens"] = idx.shape[1], max_new_tokens
        return torch.cat([idx, torch.full((idx.shape[0], max_new_tokens), tokenizer.eos_id)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    prompt = "def f(x):\n    " + "x = x + 1\n    " * 40
    assert generate_code(model, tokenizer, [prompt], max_new_tokens=1000) == [""]
    assert seen == {"prompt_len": 32, "max_new_tokens": 32}

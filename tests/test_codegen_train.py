"""Tests for codegen/train.py (`run_llama.py --option codegen`): the LR schedule, the training state that
last.pt / best.pt hold (checkpoint.CodeTrainingState), and end-to-end runs on a tiny synthetic checkpoint
with ~50 synthetic docstring -> code pairs. The pieces have their own files: test_codegen_examples.py
(loss masking, hold-out, batching), test_codegen_model_setup.py (LoRA set-up), test_codegen_validation.py,
test_codegen_trainlog.py."""
import argparse
import csv
import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import CodeTrainingState, code_metadata, rng_state
from codegen.common import load_code_model
from codegen.model_setup import make_optimizer, setup_trainable
from codegen.train import lr_at
from config import LlamaConfig
from conftest import ROOT, asset_path
from helpers import code_training_files, codegen_cli, write_jsonl
from llama import Llama, load_pretrained
from lora import expected_lora_parameters
from utils import CheckpointError

CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8, max_seq_len=256)
LOG_FIELDS = ["step", "epoch", "lr", "train_loss", "valid_loss", "chrf", "tokens_per_s", "elapsed"]
SUMMARY_FIELDS = {"mode", "trainable_parameters", "total_parameters", "peak_memory_bytes", "peak_memory_source",
                  "time_per_epoch_s", "best_valid_loss", "best_step", "chrf", "steps", "sentinels"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """tiny.pt (vocab 32000, max_seq_len 256), data/{train,valid,small}.jsonl, and the tokenizer path."""
    tokenizer = asset_path("tokenizer.model")
    work = tmp_path_factory.mktemp("codegen_train")
    pairs = code_training_files(work, CONFIG, 50, 40, data="data")
    write_jsonl(work / "data" / "small.jsonl", pairs[:4])
    return work, str(tokenizer)


def common_args(workdir, out, *extra):
    work, tokenizer = workdir
    return ["--option", "codegen", "--pretrained-model-path", str(work / "tiny.pt"), "--tokenizer", tokenizer,
            "--train_data", str(work / "data" / "train.jsonl"), "--valid_data", str(work / "data" / "valid.jsonl"),
            "--out_dir", str(out), "--batch_size", "4", "--max_len", "96", "--eval_samples", "2",
            "--eval_max_new_tokens", "12", "--lr", "3e-3", "--quiet", *extra]


def run_subprocess(workdir, argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILLAMA_TOKENIZER": workdir[1]}
    return subprocess.run([sys.executable, str(ROOT / "run_llama.py"), *argv], cwd=workdir[0], env=env,
                          capture_output=True, text=True, timeout=300)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# schedule


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
# the training state: what last.pt and best.pt hold (checkpoint.CodeTrainingState)


LORA_SETTINGS = dict(mode="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets=["compute_query", "w2"],
                     fim=True)
SENTINELS = {"<fim_prefix>": 32000, "<fim_suffix>": 32001, "<fim_middle>": 32002, "<fim_end>": 32003}


def lora_model(seed, steps):
    """A tiny LoRA model whose sentinel rows train too (vocab 32004), and its AdamW after `steps` steps."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**CONFIG, "vocab_size": 32004}))
    partial = setup_trainable(model, LORA_SETTINGS, n_words=32000)
    optimizer = make_optimizer(model, partial, argparse.Namespace(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    for _ in range(steps):
        one_step(model, optimizer)
    return model, optimizer


def one_step(model, optimizer):
    tokens = torch.arange(18).reshape(2, 9) * 1777 % 32004
    logits, _ = model(tokens, targets=tokens)
    logits.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def assert_same(a, b, where="."):
    """Equal nested dicts / lists / tuples / tensors (same dtype and values) / plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}{k}.")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}{i}.")
    else:
        assert a == b, where


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_training_state_round_trips_through_last_pt(tmp_path):
    """save_last -> load_last gives the same state back, with the model (adapters, sentinel rows), the
    optimizer and every RNG as they were at saving; restore() puts them into a fresh model and optimizer,
    which then take the same next step as the originals."""
    model, optimizer = lora_model(seed=0, steps=2)
    state = CodeTrainingState(settings=LORA_SETTINGS, codegen={"sentinels": SENTINELS, "base_checkpoint": "base.pt"},
                              args={"lr": 0.01, "out_dir": "runs/x"}, step=7, epoch=1, groups_done=2,
                              best_valid_loss=1.25, best_step=4, best_chrf=12.5, elapsed=3.5, last_eval_step=6,
                              epoch_times={0: 1.5})
    random.seed(4), np.random.seed(3), torch.manual_seed(5)
    rng = rng_state()
    state.save_last(tmp_path / "last.pt", model, optimizer)
    expected_draws = draws()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert tuple(saved) == CodeTrainingState.LAST_KEYS and len(saved) == 17
    assert saved["epoch_times"] == {"0": 1.5} and saved["best_valid_loss"] == 1.25

    loaded = CodeTrainingState.load_last(tmp_path / "last.pt")
    snapshots = dict.fromkeys(("model_args", "tied", "model", "optimizer", "rng"))
    assert dataclasses.replace(loaded, **snapshots) == state
    assert loaded.model_args == dataclasses.asdict(model.config) and loaded.tied is True
    assert_same(loaded.model, dict(model.state_dict()))
    assert any(".lora_A" in k for k in loaded.model)  # unmerged: the adapters themselves
    assert_same(loaded.optimizer, optimizer.state_dict())
    assert_same(loaded.rng, rng)

    other, other_optimizer = lora_model(seed=1, steps=0)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded.restore(other, other_optimizer)
    assert draws() == expected_draws
    assert loaded.model is None and loaded.optimizer is None  # the tensors are not kept twice
    assert_same(dict(other.state_dict()), dict(model.state_dict()))
    assert_same(other_optimizer.state_dict(), optimizer.state_dict())
    torch.manual_seed(1)
    one_step(model, optimizer)
    torch.manual_seed(1)
    one_step(other, other_optimizer)  # LoRA dropout draws the same masks; AdamW continues from the same moments
    assert_same(dict(other.state_dict()), dict(model.state_dict()))


def test_training_state_without_a_best_yet(tmp_path):
    """A new run's state: no best (inf; None in last.pt, inf again when read back), so any finite loss improves."""
    model, optimizer = lora_model(seed=0, steps=0)
    state = CodeTrainingState(settings=LORA_SETTINGS, codegen={})
    assert state.best_valid_loss == math.inf and state.improves(1e9) and not state.improves(float("nan"))
    state.save_last(tmp_path / "last.pt", model, optimizer)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["best_valid_loss"] is None
    loaded = CodeTrainingState.load_last(tmp_path / "last.pt")
    assert loaded.best_valid_loss == math.inf and loaded.epoch_times == {} and loaded.step == 0


def test_best_pt_is_a_merged_stories42m_checkpoint_with_the_codegen_metadata(tmp_path):
    """best.pt: model_args + LoRA-merged weights (load_pretrained gives the same outputs) + the "codegen"
    dict that code_metadata and load_code_model read; load_last refuses it."""
    model, optimizer = lora_model(seed=0, steps=2)
    state = CodeTrainingState(settings=LORA_SETTINGS, codegen={"sentinels": SENTINELS, "mode": "lora"}, step=5,
                              epoch=1, best_valid_loss=2.5, best_step=5, best_chrf=30.0)
    state.save_best(tmp_path / "best.pt", model)
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert tuple(saved) == CodeTrainingState.BEST_KEYS
    assert not any("lora" in k or ".base." in k for k in saved["model"])
    assert code_metadata(tmp_path / "best.pt") == {"sentinels": SENTINELS, "mode": "lora", "step": 5, "epoch": 1,
                                                   "valid_loss": 2.5, "chrf": 30.0}
    tokens = torch.randint(0, 32004, (2, 11))
    with torch.no_grad():
        expected = model.eval()(tokens, targets=tokens)[0]
        assert torch.allclose(load_pretrained(tmp_path / "best.pt").eval()(tokens, targets=tokens)[0], expected,
                              atol=1e-5)
    code_model, code_tok = load_code_model(tmp_path / "best.pt", "cpu", str(asset_path("tokenizer.model")))
    assert code_tok.sentinels == SENTINELS and code_model.vocab_size == 32004
    with pytest.raises(CheckpointError, match="not a code-training last.pt"):
        CodeTrainingState.load_last(tmp_path / "best.pt")


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
    assert codegen_cli(common_args(workdir, whole, *extra, "--max_steps", "13"))[0] == 0
    assert codegen_cli(common_args(workdir, part, *extra, "--max_steps", "6"))[0] == 0
    assert [int(r["step"]) for r in read_log(part / "log.csv")] == list(range(1, 7))
    assert torch.load(part / "last.pt", weights_only=True)["step"] == 6
    rc, stdout, stderr = codegen_cli(common_args(workdir, part, *extra, "--max_steps", "13", "--resume"))
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


def test_resume_with_larger_batches_moves_on_to_the_next_epoch(workdir):
    """6 steps of batch 4 into a 10-step epoch, resumed with batch 16: the epoch has only 3 steps then,
    so it is over; training goes on with the next epoch instead of looping forever."""
    work, _ = workdir
    out = work / "resume_bigger"
    extra = ["--epochs", "4", "--eval_samples", "0"]
    assert codegen_cli(common_args(workdir, out, *extra, "--max_steps", "6"))[0] == 0
    rc, _, stderr = codegen_cli(common_args(workdir, out, *extra, "--batch_size", "16", "--resume"))
    assert rc == 0, stderr
    summary = json.loads((out / "summary.json").read_text())  # 4 epochs of 3 steps now: 12 in all
    assert summary["steps"] == 12 and summary["epochs_completed"] == pytest.approx(3.0)


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
        assert codegen_cli(argv)[0] == 0
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
    assert codegen_cli(argv)[0] == 0
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
    assert codegen_cli([*argv, "--max_steps", "1"])[0] == 0
    first_best = (out / "best.pt").read_bytes()
    fake_valid_losses(monkeypatch, [2.0, 2.0])
    rc, _, err = codegen_cli([*argv, "--max_steps", "3", "--resume"])
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
    rc, stdout, stderr = codegen_cli(argv)
    assert rc == 0, stderr
    assert (tmp_path / "data" / "train.jsonl").is_file() and (tmp_path / "data" / "valid.jsonl").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["data"]["train"].endswith("train.jsonl")


def test_loss_decreases_when_overfitting_a_few_pairs(workdir):
    work, _ = workdir
    out = work / "overfit"
    argv = common_args(workdir, out, "--train_data", str(work / "data" / "small.jsonl"), "--epochs", "30",
                       "--max_steps", "30", "--eval_every", "30", "--log_every", "1", "--eval_samples", "0",
                       "--schedule", "constant", "--warmup_steps", "0", "--lr", "1e-2", "--bf16")
    rc, stdout, stderr = codegen_cli(argv)
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
    rc, _, err = codegen_cli(missing)
    assert rc == 2 and "nope.jsonl" in err and "codegen.data" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "def f():\n", "code": "    pass\n"}) + "\n{not json\n")
    rc, _, err = codegen_cli(common_args(workdir, tmp_path / "o2", "--train_data", str(bad)))
    assert rc == 2 and f"{bad}:2" in err

    no_code = tmp_path / "no_code.jsonl"
    no_code.write_text(json.dumps({"prompt": "def f():\n"}) + "\n")
    rc, _, err = codegen_cli(common_args(workdir, tmp_path / "o3", "--train_data", str(no_code)))
    assert rc == 2 and f"{no_code}:1" in err and "'code'" in err

    rc, _, err = codegen_cli(common_args(workdir, tmp_path / "o4", "--mode", "lora", "--lora_targets", "compute_query,wq"))
    assert rc == 2 and "wq" in err and "compute_value" in err

    rc, _, err = codegen_cli(common_args(workdir, tmp_path / "o5", "--max_len", "512"))
    assert rc == 2 and "max_seq_len=256" in err and "--max_len" in err

    rc, _, err = codegen_cli(common_args(workdir, tmp_path / "o6", "--resume"))
    assert rc == 2 and "last.pt" in err and "--resume" in err

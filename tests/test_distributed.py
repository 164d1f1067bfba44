"""Tests for distributed.py and training under torchrun: CPU, gloo, 2 processes, a tiny model. First the pure
pieces (a global batch cut among ranks, every example once per epoch), then a handful of launches, each
compared with one process on the same global batches, 2 ranks x batch 2 against 1 process x batch 4:
code training (`--option codegen`, 37 synthetic pairs, grad_accum 2) with DDP and with --fsdp (FSDP2), full
fine-tuning and LoRA with FIM (its sentinel rows trained, the base rows frozen), a resume across world sizes,
a killed and a hung rank; the classifiers (`--option finetune` with DDP, `lora` with FSDP2: 37 sentences, so
the last global batch leaves a rank a filler row) and pretraining (`--option pretrain`, FSDP2, resumed from
one process on 2 ranks and back)."""
import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import distributed
import run_llama
from codegen import cli
from codegen.examples import IGNORE, Examples, collate, epoch_plan, rank_batches
from codegen.train import step_budget
from config import LlamaConfig
from conftest import ROOT, asset_path
from helpers import code_training_files
from llama import Llama
from training import read_log as read_csv

CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8, max_seq_len=256)
LORA = ["--mode", "lora", "--lora_dropout", "0", "--fim_rate", "0.5", "--lora_targets", "compute_query,w2"]
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# the pure pieces


def test_shard_divides_a_batch_in_order_and_evenly():
    for n in range(12):
        items = list(range(100, 100 + n))
        for world in range(1, 5):
            shares = [distributed.shard(items, r, world) for r in range(world)]
            assert [i for share in shares for i in share] == items  # in rank order, the batch
            sizes = [len(s) for s in shares]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        distributed.shard([1, 2], 2, 2)


def fake_examples(n=37, seed=0):
    """Examples of varied lengths, with targets on the second half of each (no tokenizer needed)."""
    g = torch.Generator().manual_seed(seed)
    plain = []
    for i in range(n):
        length = int(torch.randint(3, 30, (1,), generator=g))
        tokens = torch.randint(1, 500, (length,), generator=g).tolist()
        plain.append((tokens, [IGNORE] * (length // 2) + tokens[length // 2 :]))
    return Examples(train_pairs=[{}] * n, plain=plain, valid_pairs=[], valid=[], dropped=0, paths={})


def plan_args(batch_size, grad_accum=2):
    return argparse.Namespace(seed=7, max_len=64, batch_size=batch_size, grad_accum=grad_accum)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_example_is_seen_once_per_epoch_across_ranks(world):
    """The plan of W ranks x batch b is one process's plan with batch W*b, and the ranks' shares of each of its
    batches cover every example of the epoch exactly once."""
    data = fake_examples()
    for epoch in range(3):
        examples, groups = epoch_plan(data, None, 0.0, plan_args(2), epoch, world)
        assert groups == epoch_plan(data, None, 0.0, plan_args(2 * world), epoch)[1]
        seen = [i for group in groups for batch in group for r in range(world)
                for i in distributed.shard(batch, r, world)]
        assert sorted(seen) == list(range(len(data.plain)))


@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_cut_the_global_batch_into_rows(world, monkeypatch):
    """Each rank's micro-batches, stacked in rank order, are exactly the tensors one process collates for the
    whole global batch (same width: padded to its longest example); a rank left without examples gets a row
    of padding with no target; the target count is the whole step's."""
    data = fake_examples(n=13)
    examples, groups = epoch_plan(data, None, 0.0, plan_args(2, grad_accum=3), 0, world)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for group in groups:
        parts = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            parts.append(rank_batches(examples, group, pad_id=0))
        assert len({n for _, n in parts}) == 1
        whole = [collate([examples[i] for i in batch], 0) for batch in group]
        assert parts[0][1] == sum(int((t[:, 1:] != IGNORE).sum()) for _, t in whole)
        for k, (tokens, targets) in enumerate(whole):
            rows = [part[0][k] for part in parts]
            real = [(tk, tg) for (tk, tg), r in zip(rows, range(world)) if distributed.shard(group[k], r, world)]
            assert torch.equal(torch.cat([tk for tk, _ in real]), tokens)
            assert torch.equal(torch.cat([tg for _, tg in real]), targets)
            for (tk, tg), r in zip(rows, range(world)):
                if not distributed.shard(group[k], r, world):  # the filler row: full width, no loss
                    assert tk.shape == (1, tokens.shape[1]) and bool((tg == IGNORE).all())


def test_step_budget_counts_global_batches():
    args = argparse.Namespace(batch_size=2, grad_accum=2, epochs=1, max_steps=None, warmup_steps=0, warmup_ratio=0)
    assert step_budget(37, args, world=2)[0] == 5  # 37 examples in batches of 4 -> 10 micro-batches -> 5 steps
    assert step_budget(37, args)[0] == 10


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cpu") == torch.device("cpu") and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce([1.5, 2]) == [1.5, 2] and distributed.gather(["a"]) == ["a"]
    assert distributed.broadcast({"x": 1}) == {"x": 1}
    model = Llama(LlamaConfig(**{**CONFIG, "vocab_size": 64}))
    par = distributed.Parallel(model, torch.optim.SGD(model.parameters(), lr=0.1), fsdp=True)
    assert par.kind == "single" and par.model is model
    with par.local() as local, par.full() as (full, _):
        assert local is model and full is model


# ----------------------------------------------------------------------------------------------
# launches: 2 ranks against 1 process


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tokenizer = asset_path("tokenizer.model")
    work = tmp_path_factory.mktemp("distributed")
    code_training_files(work, CONFIG, 45, 37)  # 37 training pairs: the last global batch (4) holds 1 example
    return work, str(tokenizer)


def codegen_args(workdir, out, batch_size, *extra, quiet=True):
    work, tokenizer = workdir
    return ["--option", "codegen", "--pretrained-model-path", str(work / "tiny.pt"), "--tokenizer", tokenizer,
            "--train_data", str(work / "train.jsonl"), "--valid_data", str(work / "valid.jsonl"),
            "--out_dir", str(out), "--batch_size", str(batch_size), "--grad_accum", "2", "--max_len", "96",
            "--eval_every", "2", "--eval_samples", "2", "--eval_max_new_tokens", "8", "--lr", "3e-3",
            "--schedule", "constant", "--warmup_steps", "0", "--log_every", "1", *(["--quiet"] if quiet else []),
            *extra]


def one_process(workdir, out, *extra):
    """1 process x batch 4, in this process."""
    assert cli.main(codegen_args(workdir, out, 4, *extra)) == 0


def torchrun(workdir, out, *extra, quiet=True, cwd=None):
    """2 ranks x batch 2 through torchrun (a free port: --standalone)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "run_llama.py"), *codegen_args(workdir, out, 2, *extra, quiet=quiet)]
    done = subprocess.run(argv, cwd=cwd or workdir[0], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_log(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(out, reference):
    """Per-step losses, validation losses and chrF within TOL, the same last.pt weights and optimizer state,
    the same best.pt."""
    rows, ref = read_log(out), read_log(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for a, b in zip(rows, ref):
        for key in ("train_loss", "valid_loss", "chrf"):
            assert (a[key] == "") == (b[key] == "") and (a[key] == "" or abs(float(a[key]) - float(b[key])) < TOL), \
                (key, a, b)
    last, ref_last = (torch.load(d / "last.pt", weights_only=True) for d in (out, reference))
    assert last["model"].keys() == ref_last["model"].keys() and last["step"] == ref_last["step"]
    for k, v in ref_last["model"].items():
        assert torch.allclose(last["model"][k], v, rtol=0, atol=TOL), k
    states, ref_states = last["optimizer"]["state"], ref_last["optimizer"]["state"]
    assert states.keys() == ref_states.keys()
    for i, s in ref_states.items():
        assert s["step"] == states[i]["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(states[i][key], s[key], rtol=1e-4, atol=TOL), (i, key)
    best, ref_best = (torch.load(d / "best.pt", weights_only=True) for d in (out, reference))
    assert best["codegen"]["step"] == ref_best["codegen"]["step"]
    for k, v in ref_best["model"].items():
        assert torch.allclose(best["model"][k], v, rtol=0, atol=TOL), k


@pytest.fixture(scope="module")
def references(workdir):
    """The 1-process runs, by mode, made when first asked for."""
    made = {}

    def get(mode):
        if mode not in made:
            made[mode] = workdir[0] / f"one_{mode}"
            one_process(workdir, made[mode], *(LORA if mode == "lora" else []))
        return made[mode]
    return get


@pytest.mark.parametrize("mode,fsdp", [("full", False), ("lora", False), ("full", True), ("lora", True)],
                         ids=["ddp-full", "ddp-lora", "fsdp-full", "fsdp-lora"])
def test_two_ranks_equal_one_process_with_the_global_batch(workdir, references, tmp_path, mode, fsdp):
    """2 ranks x batch 2 = 1 process x batch 4 (grad_accum 2, a last global batch of 1 example, evaluations
    between steps); only rank 0 writes, and only what one process writes."""
    out, cwd = workdir[0] / f"two_{mode}_{'fsdp' if fsdp else 'ddp'}", tmp_path / "cwd"
    cwd.mkdir()
    done = torchrun(workdir, out, *(LORA if mode == "lora" else []), *(["--fsdp"] if fsdp else []), quiet=fsdp,
                    cwd=cwd)
    reference = references(mode)
    assert_same_run(out, reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert list(cwd.iterdir()) == []
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["effective_batch"], summary["parallel"]) == (2, 8, "fsdp" if fsdp else "ddp")
    if not fsdp and mode == "full":
        assert "effective batch 8 examples per step (--batch_size 2 x --grad_accum 2 x 2 rank(s)); DDP over 2 ranks " \
               "(gloo)" in done.stdout
        assert done.stdout.count("codegen full:") == 1  # the summary line: rank 0 alone prints
    if mode == "lora":  # the base rows of the embedding stay frozen, the sentinel rows train
        base = torch.load(workdir[0] / "tiny.pt", weights_only=True)["model"]["tok_embeddings.weight"]
        trained = torch.load(out / "last.pt", weights_only=True)["model"]["tok_embeddings.weight"]
        assert torch.equal(trained[:32000], base) and trained.shape[0] == 32004


def test_resume_across_world_sizes_gives_the_uninterrupted_run(workdir, references):
    """1 process for 2 steps, 2 ranks (from its last.pt) to step 4, 1 process again to the end: the losses,
    weights and optimizer state of one uninterrupted run."""
    out = workdir[0] / "resumed"
    one_process(workdir, out, "--max_steps", "2")
    torchrun(workdir, out, "--max_steps", "4", "--resume")
    assert [int(r["step"]) for r in read_log(out)] == [1, 2, 3, 4]
    assert cli.main(codegen_args(workdir, out, 4, "--resume")) == 0
    assert_same_run(out, references("full"))


# ----------------------------------------------------------------------------------------------
# a lost rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv, cwds, env=None) -> list:
    """One process per rank with the environment torchrun gives it, rank r in the folder cwds[r]."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(len(cwds)), "LOCAL_WORLD_SIZE": str(len(cwds))}
    return [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r, cwd in enumerate(cwds)]


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_rank_ends_the_job_with_an_error(workdir, tmp_path, how):
    """Two ranks started as torchrun starts them; mid-epoch rank 1 is killed (SIGKILL) or hangs (SIGSTOP).
    Rank 0 ends within --dist_timeout (plus start-up slack) with exit status 1, one `error:` line naming the
    lost rank, and no temporary checkpoint file left behind."""
    timeout = 6
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "run_llama.py"),
            *codegen_args(workdir, out, 2, "--epochs", "500", "--eval_samples", "0", "--eval_every", "50",
                          "--dist_timeout", str(timeout))]
    ranks = start_ranks(argv, [tmp_path, tmp_path])
    try:
        deadline = time.time() + 120
        while not ((out / "log.csv").is_file() and len(read_log(out)) >= 3):  # training is under way
            assert time.time() < deadline and ranks[0].poll() is None, ranks[0].communicate()
            time.sleep(0.2)
        lost = time.time()
        os.kill(ranks[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        _, stderr = ranks[0].communicate(timeout=timeout + 60)
        waited = time.time() - lost
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert ranks[0].returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 0 of 2: a collective operation failed" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert waited < timeout + 30
    if how == "hung":
        assert waited >= timeout * 0.9 and "Timed out" in errors[0]
    assert not list(out.glob(".*.tmp"))


def test_memory_table_counts_the_published_parameters():
    """bench/distributed.py --memory: Llama-3.2-1B's 1,235,814,400 parameters (its model card's safetensors,
    tied embeddings once); DDP holds 16 bytes per trained and 4 per frozen parameter; FSDP2 less per GPU while
    training full, more than a 1/N share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_distributed", ROOT / "bench" / "distributed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {(r["shape"], r["mode"], r["parallel"]): r for r in bench.memory_table(ranks=(2,))}
    full = rows[("Llama-3.2-1B", "full", "DDP (any N)")]
    assert full["parameters"] == 1_235_814_400 and full["bytes"] == 16 * full["parameters"]
    lora = rows[("Llama-3.2-1B", "LoRA r8 q,v", "DDP (any N)")]
    assert lora["bytes"] == 4 * lora["parameters"] + 12 * lora["trained"]
    sharded = rows[("Llama-3.2-1B", "full", "FSDP2 N=2")]
    assert full["bytes"] / 2 < sharded["bytes"] < full["bytes"]


# ----------------------------------------------------------------------------------------------
# the classifiers (--option finetune, lora) and pretraining (--option pretrain)


@pytest.fixture(scope="module")
def sentences(workdir):
    """Sentiment data: 37 training sentences (the last global batch of 4 holds 1: rank 1 trains a filler row),
    21 dev and 13 test; the label names."""
    work, tokenizer = workdir
    rng = random.Random(0)
    filler = "the a movie film plot actor story scene was is really quite so very and but".split()
    words = {0: ["awful", "terrible", "boring"], 1: ["great", "wonderful", "charming"]}
    for split, n in (("train", 37), ("dev", 21), ("test", 13)):
        labels = [rng.randrange(2) for _ in range(n)]
        (work / f"easy-{split}.txt").write_text("".join(
            f"{y} ||| {' '.join(rng.choices(filler, k=rng.randint(2, 8)))} {rng.choice(words[y])}\n" for y in labels))
    (work / "labels.json").write_text('["bad", "good"]')
    return work, {"MINILLAMA_TOKENIZER": tokenizer}


def classifier_args(work, option, batch_size, out="."):
    """--option finetune or lora, 2 epochs; data absolute, outputs relative to `out` (the working folder)."""
    data = [x for split in ("train", "dev", "test") for x in (f"--{split}", str(work / f"easy-{split}.txt"))]
    return ["--option", option, "--pretrained-model-path", str(work / "tiny.pt"), "--label-names",
            str(work / "labels.json"), *data,
            "--epochs", "2", "--lr", "1e-3", "--batch_size", str(batch_size), "--hidden_dropout_prob", "0",
            "--lora_rank", "2", "--quiet", "--filepath", f"{out}/{option}.pt", "--dev_out",
            f"{out}/easy-dev-{option}-output.txt", "--test_out", f"{out}/easy-test-{option}-output.txt"]


def one_classifier(sentences, out, option, monkeypatch):
    """1 process x batch 4, in this process."""
    work, env = sentences
    out.mkdir()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_llama.main(classifier_args(work, option, 4, out)) == 0


def assert_same_classifier(out, reference, option):
    """The per-epoch log (losses within TOL, the same accuracies), the saved classifier within TOL, the same
    dev and test predictions, and no other file."""
    rows, ref = (read_csv(d / f"{option}-log.csv") for d in (out, reference))
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == ["10", "20"]
    for a, b in zip(rows, ref):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < TOL and \
            (a["train_acc"], a["dev_acc"]) == (b["train_acc"], b["dev_acc"]), (a, b)
    saved, ref_saved = (torch.load(d / f"{option}.pt", weights_only=True)["model"] for d in (out, reference))
    assert saved.keys() == ref_saved.keys()
    for k, v in ref_saved.items():
        assert torch.allclose(saved[k], v, rtol=0, atol=TOL), k
    for split in ("dev", "test"):
        name = f"easy-{split}-{option}-output.txt"
        assert (out / name).read_text() == (reference / name).read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_finetune_on_two_ranks_equals_one_process_with_the_global_batch(sentences, tmp_path, monkeypatch):
    """--option finetune, DDP: 2 ranks x batch 2 = 1 process x batch 4 (the course's last-position pooling, a
    last global batch of 1). The ranks are started as torchrun starts them, each in its own folder with the
    outputs named relative to it: rank 1 writes nothing and prints nothing."""
    work, env = sentences
    one_classifier(sentences, tmp_path / "one", "finetune", monkeypatch)
    cwds = [tmp_path / "rank0", tmp_path / "rank1"]
    for cwd in cwds:
        cwd.mkdir()
    ranks = start_ranks([sys.executable, str(ROOT / "run_llama.py"), *classifier_args(work, "finetune", 2)], cwds, env)
    (out0, err0), (out1, err1) = (p.communicate(timeout=300) for p in ranks)
    assert [p.returncode for p in ranks] == [0, 0], err0[-3000:] + err1[-3000:]
    assert_same_classifier(cwds[0], tmp_path / "one", "finetune")
    assert list(cwds[1].iterdir()) == [] and out1 == ""
    assert "effective batch 4 sentences per step (--batch_size 2 x 2 rank(s)); DDP over 2 ranks (gloo)" in out0
    assert out0.count("dev acc ::") == 3  # two epochs and the best classifier's evaluation


def test_lora_with_fsdp_on_two_ranks_equals_one_process(sentences, tmp_path, monkeypatch):
    """--option lora --fsdp through torchrun: FSDP2 shards the frozen base and the adapters; rank 0 saves the
    adapters and head, gathered whole."""
    work, env = sentences
    one_classifier(sentences, tmp_path / "one", "lora", monkeypatch)
    out = tmp_path / "two"
    out.mkdir()
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "run_llama.py"), *classifier_args(work, "lora", 2), "--fsdp"]
    done = subprocess.run(argv, cwd=out, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_classifier(out, tmp_path / "one", "lora")
    assert "FSDP2 over 2 ranks (gloo)" in done.stdout


def pretrain_args(work, out, batch_size, max_steps, *extra):
    """A tiny model on the sentences' text, a constant learning rate after the warm-up (so that --max_steps
    only says where to stop), validation and checkpoint every 2 steps, a log row every step."""
    return ["--option", "pretrain", "--train_text", str(work / "easy-train.txt"), "--valid_text",
            str(work / "easy-dev.txt"), "--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
            "--max_seq_len", "16", "--batch_size", str(batch_size), "--eval_windows", "5", "--warmup_steps", "2",
            "--min_lr_ratio", "1", "--time_budget", "0", "--max_steps", str(max_steps), "--eval_interval", "2",
            "--log_interval", "1", "--dropout", "0", "--quiet", "--out", str(out), *extra]


def test_pretrain_resumed_on_two_ranks_and_back_gives_one_uninterrupted_process(sentences, tmp_path, monkeypatch):
    """--option pretrain: 1 process x batch 4 for 2 steps, 2 ranks x batch 2 with --fsdp (--resume) to step 4,
    1 process again to step 6: the per-step losses, validation losses and weights of one process running
    straight through; the ranks wrote only rank 0's files."""
    work, env = sentences
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run_llama.main(pretrain_args(work, tmp_path / "whole.pt", 4, 6)) == 0
    out = tmp_path / "part" / "base.pt"
    out.parent.mkdir()
    assert run_llama.main(pretrain_args(work, out, 4, 2)) == 0
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "run_llama.py"), *pretrain_args(work, out, 2, 4, "--resume", "--fsdp")]
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "effective batch 4 windows per step (--batch_size 2 x 2 rank(s)); FSDP2 over 2 ranks" in done.stdout
    assert done.stdout.count("valid loss") == 1 and list(cwd.iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["base-log.csv", "base.pt"]
    assert torch.load(out, weights_only=True)["iter_num"] == 4
    assert run_llama.main(pretrain_args(work, out, 4, 6, "--resume")) == 0
    rows, ref = read_csv(tmp_path / "part" / "base-log.csv"), read_csv(tmp_path / "whole-log.csv")
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [str(s) for s in range(1, 7)]
    for a, b in zip(rows, ref):
        assert a["lr"] == b["lr"] and (a["valid_loss"] == "") == (b["valid_loss"] == ""), (a, b)
        for key in ("train_loss", "valid_loss"):
            assert a[key] == "" or abs(float(a[key]) - float(b[key])) < TOL, (key, a, b)
    saved, ref_saved = (torch.load(p, weights_only=True) for p in (out, tmp_path / "whole.pt"))
    for k, v in ref_saved["model"].items():
        assert torch.allclose(saved["model"][k], v, rtol=0, atol=TOL), k
    for i, state in ref_saved["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(saved["optimizer"]["state"][i][key], state[key], rtol=1e-4, atol=TOL), (i, key)

"""pretrain.py (`run_llama.py --option pretrain`) on tiny models and a few steps: the loss falls, the
checkpoint is llama2.c's format and every option loads it (causal), --resume continues the very same run,
the text readers (folders of .py files, `label ||| sentence` files), and bad input (exit 2, file:line)."""
import math
import subprocess
import sys

import pytest
import torch

import pretrain
import run_llama
from checkpoint import load_pretrained, save_pretraining
from conftest import ROOT, asset_path
from helpers import save_stories_pt, tiny_model
from tokenizer import Tokenizer
from training import read_log

TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "32",
        "--batch_size", "4", "--eval_windows", "4", "--warmup_steps", "2", "--time_budget", "0", "--quiet"]
SENTENCES = ["the cat sat on the mat .", "a dog ran in the park .", "the film was a delight .",
             "this movie is dull and long .", "we loved every minute of it ."]


@pytest.fixture
def tokenizer_env(monkeypatch):
    monkeypatch.setenv("MINILLAMA_TOKENIZER", str(asset_path("tokenizer.model")))


@pytest.fixture
def corpus(tmp_path, tokenizer_env):
    """train.txt and valid.txt in the course's `label ||| sentence` format."""
    (tmp_path / "train.txt").write_text("".join(f"{i % 2} ||| {SENTENCES[i % 5]}\n" for i in range(200)))
    (tmp_path / "valid.txt").write_text("".join(f"{i % 2} ||| {SENTENCES[(i + 2) % 5]}\n" for i in range(20)))
    return tmp_path


def pretrain_argv(corpus, *extra, out="base.pt", steps="30"):
    return ["--option", "pretrain", "--train_text", str(corpus / "train.txt"), "--valid_text", str(corpus / "valid.txt"),
            *TINY, "--lr", "1e-2", "--max_steps", steps, "--out", str(corpus / out), *extra]


def test_loss_falls_and_the_checkpoint_is_a_causal_stories_pt(corpus, one_thread, capsys):
    assert run_llama.main(pretrain_argv(corpus, "--eval_interval", "10", "--log_interval", "5")) == 0
    rows = read_log(corpus / "base-log.csv")
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    assert tuple(rows[0]) == pretrain.LOG_FIELDS
    valid = [float(r["valid_loss"]) for r in rows if r["valid_loss"]]
    train = [float(r["train_loss"]) for r in rows]
    assert len(valid) == 3 and valid[-1] < valid[0] - 2 and train[-1] < train[0] - 2  # from ~ln(32000) = 10.4
    assert float(rows[-1]["lr"]) == pytest.approx(1e-2 * 0.1, rel=0.05)  # the cosine ends at lr * min_lr_ratio
    saved = torch.load(corpus / "base.pt", weights_only=True)
    assert {"model_args", "model", "optimizer", "iter_num", "best_val_loss", "config"} <= set(saved)  # llama2.c's keys
    assert saved["iter_num"] == 30 and saved["best_val_loss"] == pytest.approx(min(valid))
    model = load_pretrained(corpus / "base.pt")
    assert model.config.causal and model.config.norm_type == "rmsnorm"
    assert (model.config.dim, model.config.n_layers, model.config.n_kv_heads, model.config.vocab_size) == (32, 2, 2, 32000)
    assert "valid loss" in capsys.readouterr().out


def test_every_assignment_option_runs_on_a_pretrained_model(corpus, one_thread, monkeypatch):
    assert run_llama.main(pretrain_argv(corpus, "--norm_type", "layernorm")) == 0
    monkeypatch.chdir(corpus)
    (corpus / "labels.json").write_text('["bad", "good"]')
    data = ["--train", "train.txt", "--dev", "valid.txt", "--test", "valid.txt", "--label-names", "labels.json",
            "--pretrained-model-path", "base.pt", "--quiet"]
    assert run_llama.main(["--option", "generate", "--pretrained-model-path", "base.pt", "--prompt", "the cat",
                           "--max_new_tokens", "8"]) == 0
    assert (corpus / "generated-sentence-temp-0.txt").read_text().startswith("the cat")
    assert run_llama.main(["--option", "prompt", *data, "--dev_out", "d-prompting.txt", "--test_out", "t.txt"]) == 0
    assert run_llama.main(["--option", "finetune", *data, "--epochs", "1", "--lr", "1e-3", "--dev_out", "d.txt",
                           "--test_out", "t.txt", "--filepath", "ft.pt"]) == 0
    assert len((corpus / "t.txt").read_text().splitlines()) == 20
    assert torch.load(corpus / "ft.pt", weights_only=True)["model_args"]["norm_type"] == "layernorm"


def test_resume_continues_the_same_run(corpus, one_thread, monkeypatch):
    """Stopped after step 3 (as Ctrl-C does) and resumed, a run ends with the weights, log and schedule of
    one that ran straight through: batches are drawn per step and the optimizer state is saved."""
    whole = pretrain_argv(corpus, "--eval_interval", "4", "--log_interval", "1", out="whole.pt", steps="8")
    assert run_llama.main(whole) == 0
    part = pretrain_argv(corpus, "--eval_interval", "4", "--log_interval", "1", out="part.pt", steps="8")
    step = pretrain.train_step

    def stop_after_3(run):
        loss = step(run)
        run.stop_requested = run.step == 3
        return loss

    monkeypatch.setattr(pretrain, "train_step", stop_after_3)
    assert run_llama.main(part) == 130
    assert torch.load(corpus / "part.pt", weights_only=True)["iter_num"] == 3
    monkeypatch.setattr(pretrain, "train_step", step)
    assert run_llama.main([*part, "--resume"]) == 0
    a, b = (torch.load(corpus / name, weights_only=True) for name in ("whole.pt", "part.pt"))
    assert b["iter_num"] == 8
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    rows_a, rows_b = read_log(corpus / "whole-log.csv"), read_log(corpus / "part-log.csv")
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, 9)]
    for ra, rb in zip(rows_a, rows_b):
        assert (ra["step"], ra["lr"], ra["train_loss"]) == (rb["step"], rb["lr"], rb["train_loss"])


def test_the_schedule_ends_by_the_clock_when_that_comes_first():
    from types import SimpleNamespace

    args = SimpleNamespace(max_steps=1000, time_budget=100.0, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    run = pretrain.Run(args, None, None, None, None, None, None)
    run.step, run.elapsed = 5, 90.0
    assert run.lr() == pytest.approx(0.6)  # warm-up counts steps, whatever the clock says
    run.step, run.elapsed = 50, 50.0  # half the time, 5 % of the steps: half-way down the cosine
    assert run.lr() == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (500 - 10) / 990)))
    run.elapsed = 100.0
    assert run.lr() == pytest.approx(0.1) and pretrain.finished(run)
    run.args.time_budget = 0  # no clock: steps alone
    assert run.lr() == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 990))) and not pretrain.finished(run)


def test_a_folder_of_python_files_and_labelled_files(tmp_path, tokenizer_env):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("x = 2\n")
    (tmp_path / "pkg" / "notes.txt").write_text("3 ||| first sentence\n-1 ||| second one \n")
    (tmp_path / "pkg" / "plain.txt").write_text("Just text.\n0 ||| not a label line here\n")
    (tmp_path / "pkg" / "empty.py").write_text("\n")
    for skipped in ("pkg/.hidden/c.py", "pkg/__pycache__/d.py", "pkg/readme.md"):
        (tmp_path / skipped).parent.mkdir(exist_ok=True)
        (tmp_path / skipped).write_text("y = 3\n")
    tokenizer = Tokenizer()
    stream = pretrain.token_stream([tmp_path / "pkg"], tokenizer, "training")
    documents = ["def f():\n    return 1\n", "first sentence", "second one", "Just text.\n0 ||| not a label line here\n",
                 "x = 2\n"]  # sorted paths: a.py, empty.py, notes.txt, plain.txt, sub/b.py
    expected = [t for doc in documents for t in tokenizer.encode(doc, bos=True, eos=False)]
    assert stream.tolist() == expected


def test_held_out_validation_without_valid_text(corpus, one_thread, capsys):
    argv = pretrain_argv(corpus, steps="2")
    del argv[argv.index("--valid_text"):argv.index("--valid_text") + 2]
    assert run_llama.main(argv) == 0
    assert "validation: the last" in capsys.readouterr().out


def run_cli(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "run_llama.py"), "--option", "pretrain", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("files,extra,message", [
    ({"t.txt": "1 ||| good\n0 ||| fine\nno label here\n"}, [], "t.txt:3: expected `label ||| sentence`"),
    ({"t.txt": b"plain\n caf\xe9\n"}, [], "t.txt:2: not UTF-8 text (byte 0xe9)"),
    ({"t.txt": "a few words\n"}, [], "fewer than one window of --max_seq_len + 1 = 33"),
    ({"t.txt": "   \n"}, [], "no text to train on"),
    ({"t.txt": "text " * 200}, ["--dim", "0", "--lr", "-1"], "--dim 0 (must be >= 1); --lr -1.0 (must be > 0)"),
    ({"t.txt": "text " * 200}, ["--n_heads", "5"], "the size flags do not make a model"),
    ({"t.txt": "text " * 200}, ["--resume"], "--resume: out.pt does not exist"),
    ({"t.txt": "text " * 200, "out.pt": None}, ["--resume"], "out.pt: cannot resume from it"),
    ({"d/readme.md": "x"}, [], "d: no .py or .txt files under this folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, files, extra, message):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        if content is None:  # a stories42M.pt-style checkpoint: no optimizer state to resume
            save_stories_pt(tiny_model(vocab_size=32000), path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    train = "d" if "d/readme.md" in files else "t.txt"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(tmp_path, "--train_text", train, "--valid_text", train, *TINY, "--out", "out.pt", *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_resuming_with_a_bigger_tokenizer_than_the_checkpoint_is_refused(tmp_path, tokenizer_env, capsys):
    from optimizer import AdamW

    model = tiny_model(vocab_size=512, max_seq_len=32)
    save_pretraining(tmp_path / "small.pt", model, AdamW(model.parameters()), 3, 5.0, {}, 1.0)
    (tmp_path / "t.txt").write_text("text " * 200)
    argv = ["--option", "pretrain", "--train_text", str(tmp_path / "t.txt"), *TINY, "--out", str(tmp_path / "small.pt"),
            "--resume"]
    assert run_llama.main(argv) == 2
    err = capsys.readouterr().err
    assert "small.pt" in err and "512" in err and "32000" in err and "--tokenizer" in err


@pytest.mark.parametrize("name", ["pretrain.py", "training.py"])
def test_module_level_imports_are_what_the_graded_files_may_use(name):
    """New top-level modules ship in the graded zip: at module level only the standard library, torch,
    sentencepiece, numpy, tqdm and the project's own top-level modules (matplotlib only inside a function)."""
    import ast

    allowed = set(sys.stdlib_module_names) | {"torch", "sentencepiece", "numpy", "tqdm"} | {
        p.stem for p in ROOT.glob("*.py")}
    tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
    imported = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] not in allowed]

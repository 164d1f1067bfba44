"""Builders for the tests: tiny random models, and checkpoints written in each supported format."""
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import torch

from config import LlamaConfig
from llama import Llama

LLAMA2C_NAMES = {"compute_query": "wq", "compute_key": "wk", "compute_value": "wv", "compute_output": "wo"}


def tiny_config(**overrides) -> LlamaConfig:
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=8, max_seq_len=64)
    return LlamaConfig(**{**args, **overrides})


def tiny_model(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(tiny_config(**overrides)).eval()
    with torch.no_grad():  # random norm gains, so that a swapped or missing gain is visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def lively_model(seed=0, gain=2.0, **overrides):
    """tiny_model with weights of std gain / sqrt(fan_in). At the default init (std 0.02, output
    tied to the embedding) an untrained model just repeats its last prompt token, so every
    decoding variant would agree trivially; these weights give varied greedy continuations."""
    model = tiny_model(seed, **overrides)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * gain / math.sqrt(p.shape[1]))
    return model


def model_args(config: LlamaConfig) -> dict:
    """The stories42M.pt `model_args` keys (no norm_type, as in the real file)."""
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len", "dropout")
    return {k: getattr(config, k) for k in keys}


def save_stories_pt(model: Llama, path, naming="minllama", prefix=""):
    """Write a checkpoint in stories42M.pt format, with minllama (compute_*) or llama2.c (wq...) names."""
    state = {}
    for key, value in model.state_dict().items():
        if naming == "llama2c":
            for ours, theirs in LLAMA2C_NAMES.items():
                key = key.replace(f".{ours}.", f".{theirs}.")
        state[prefix + key] = value.clone()
    torch.save({"model_args": model_args(model.config), "model": state, "iter_num": 0}, path)


def synthetic_pairs(n=50):
    """n docstring -> code pairs from 7 source files, easy to learn (codegen training tests)."""
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


def code_training_files(work, config: dict, n_pairs: int, n_train: int, data: str = "."):
    """What a code-training test runs on: work/tiny.pt, a random Llama of `config` (seed 0), and
    work/data/{train,valid}.jsonl, synthetic_pairs(n_pairs) split at n_train. Returns the pairs."""
    torch.manual_seed(0)
    save_stories_pt(Llama(LlamaConfig(**config)), work / "tiny.pt")
    (work / data).mkdir(exist_ok=True)
    pairs = synthetic_pairs(n_pairs)
    write_jsonl(work / data / "train.jsonl", pairs[:n_train])
    write_jsonl(work / data / "valid.jsonl", pairs[n_train:])
    return pairs


def codegen_cli(argv):
    """codegen.cli.main in this process: (exit status, stdout, stderr)."""
    from codegen import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()

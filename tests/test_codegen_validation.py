"""Tests for codegen/validation.py: greedy validation generations."""
import torch

from codegen.common import CodeTokenizer
from codegen.generate import complete_all, generate_completions
from codegen.validation import generate_code
from config import LlamaConfig
from conftest import asset_path
from llama import Llama

CONFIG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8, max_seq_len=256)


def test_generate_code_keeps_the_prompt_whatever_the_budget():
    """A generation budget past the context gets half of it, so prompts keep their tokens (not just BOS)."""
    model = Llama(LlamaConfig(**{**CONFIG, "max_seq_len": 64})).eval()
    tokenizer = CodeTokenizer(str(asset_path("tokenizer.model")))
    prompt = "def f(x):\n    " + "x = x + 1\n    " * 40
    [completion] = complete_all(model, tokenizer, [prompt], max_new_tokens=1000)
    assert completion.prompt_tokens == 32 and completion.tokens <= 32
    assert generate_code(model, tokenizer, [prompt], max_new_tokens=1000) == [completion.text]


def test_validation_generations_are_code_evals():
    """Training-time chrF and code_eval's chrF score the same completions: same decoding, same stops."""
    torch.manual_seed(2)
    model = Llama(LlamaConfig(**CONFIG)).eval()
    tokenizer = CodeTokenizer(str(asset_path("tokenizer.model")))
    prompts = ['def add(a, b):\n    """Sum."""\n', "def f(x):\n", 'class A:\n    """A."""\n']
    expected = [generate_completions(model, tokenizer, p, 1, 40, 0.0)[0].text for p in prompts]
    assert generate_code(model, tokenizer, prompts, max_new_tokens=40, batch_size=2) == expected


def test_validation_shows_its_progress(monkeypatch):
    """Validation (the loss batches, then the greedy generations) moves a progress bar to its end, instead
    of sitting silent after the training bar; --quiet disables it. The bar is recorded (tqdm redraws at
    most every 0.1 s, so its screen output depends on the machine's speed)."""
    import contextlib
    from types import SimpleNamespace

    from codegen import validation

    bars = []

    class Recorder:
        def __init__(self, total, disable, **kwargs):
            self.total, self.disable, self.done = total, disable, 0
            bars.append(self)

        def update(self, n=1):
            self.done += n

        def close(self):
            pass

    monkeypatch.setattr(validation, "tqdm", Recorder)
    torch.manual_seed(2)
    model = Llama(LlamaConfig(**CONFIG)).eval()
    tokenizer = CodeTokenizer(str(asset_path("tokenizer.model")))
    pairs = [{"prompt": f"def f{i}(x):\n", "code": "    return x\n"} for i in range(5)]
    examples = [(list(range(1, 9)), list(range(2, 10))) for _ in range(7)]
    args = SimpleNamespace(batch_size=3, eval_samples=5, eval_max_new_tokens=4, quiet=False)
    loss, score, hyps = validation.evaluate(model, tokenizer, examples, pairs, args, contextlib.nullcontext)
    assert len(hyps) == 5 and [(b.total, b.done, b.disable) for b in bars] == [(12, 12, False)]
    validation.evaluate(model, tokenizer, examples, pairs, SimpleNamespace(**{**vars(args), "quiet": True}),
                        contextlib.nullcontext)
    assert bars[1].disable is True

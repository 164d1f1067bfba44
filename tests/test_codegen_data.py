"""Tests for codegen/data.py: extraction, readers, dedupe, split, io, and a stdlib sanity run."""
import ast
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codegen import data
from codegen.data import (DataError, Stats, apps_reject_reason, build_dataset, dedupe, extract_pairs,
                          filter_by_length, length_percentiles, load_jsonl, normalize_code,
                          read_apps_jsonl, read_codexglue_jsonl, save_jsonl, split_by_file, summary)
from conftest import ROOT, asset_path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pytree"


def h(rel_path):
    return hashlib.sha1(rel_path.encode()).hexdigest()


def pair(prompt, code, docstring, name, path):
    return {"prompt": prompt, "code": code, "docstring": docstring, "name": name,
            "path": path, "file_hash": h(path)}


EXPECTED_PAIRS = [
    pair('def add(a, b):\n    """Return a + b."""\n',
         '    return a + b\n',
         'Return a + b.', 'add', 'alpha.py'),
    pair('async def fetch(url,\n                timeout=1.0):\n    """Fetch `url`.\n\n'
         '    Waits at most `timeout` seconds.\n    """\n',
         '    # a comment kept with the body\n    await asyncio.sleep(timeout)\n    return url\n',
         'Fetch `url`.\n\nWaits at most `timeout` seconds.', 'fetch', 'alpha.py'),
    pair("def square(n):\n    '''Square n.'''\n",
         '    return n * n\n',
         'Square n.', 'square', 'alpha.py'),
    pair('def area(self):\n    """Area of the circle."""\n',
         '    return 3.14159 * self.r ** 2\n',
         'Area of the circle.', 'Circle.area', 'pkg/shapes.py'),
    pair('def diameter(self):\n    """Twice the radius."""\n',
         '    return 2 * self.r\n',
         'Twice the radius.', 'Circle.diameter', 'pkg/shapes.py'),
    pair('def scale(self, k):\n    """Scale by k."""\n',
         '    return k\n',
         'Scale by k.', 'Circle.Unit.scale', 'pkg/shapes.py'),
    pair('def adder(self):\n    """Return a function that adds the radius."""\n',
         '    def inner(x):\n        """Add the radius to x."""\n        return x + self.r\n\n    return inner\n',
         'Return a function that adds the radius.', 'Circle.adder', 'pkg/shapes.py'),
    pair('def inner(x):\n    """Add the radius to x."""\n',
         '    return x + self.r\n',
         'Add the radius to x.', 'Circle.adder.<locals>.inner', 'pkg/shapes.py'),
    pair('def add(a, b):\n    """Return a + b."""\n',
         '    return a + b\n',
         'Return a + b.', 'add', 'pkg/sub/dup.py'),
    pair('def render(self):\n    """Render the report."""\n',
         '    text = """\ntitle\n  body\n"""\n    return text\n',
         'Render the report.', 'Report.render', 'pkg/sub/dup.py'),
]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# extraction

def test_extract_pairs_fixture_exact():
    pairs, _ = extract_pairs(FIXTURE)
    assert pairs == EXPECTED_PAIRS


def test_extract_stats_count_unparsable_file():
    _, stats = extract_pairs(FIXTURE)
    # alpha, broken, pkg/__init__, pkg/shapes, pkg/sub/dup; tests/ and notes.txt are not read
    assert stats == Stats(files_seen=5, files_skipped=1, functions_seen=14, pairs=10,
                          functions_skipped=1)  # skipped function: the one-line `shout`


def test_prompt_plus_code_reassembles_to_the_function():
    for p in extract_pairs(FIXTURE)[0]:
        tree = ast.parse(p["prompt"] + p["code"])
        assert len(tree.body) == 1
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert fn.name == p["name"].rsplit(".", 1)[-1]
        assert ast.get_docstring(fn) == p["docstring"]


def test_exclude_dirs_can_be_overridden():
    pairs, stats = extract_pairs(FIXTURE, exclude_dirs=frozenset())
    assert stats.files_seen == 6
    assert pairs[-1]["path"] == "tests/helpers.py" and pairs[-1]["name"] == "excluded"


def test_undecodable_and_null_byte_files_are_skipped(tmp_path):
    (tmp_path / "bad_utf8.py").write_bytes(b'def f():\n    """\xff\xfe"""\n    return 1\n')
    (tmp_path / "nul.py").write_bytes(b'def f():\n    """x"""\n    return "\x00"\n')
    (tmp_path / "latin1.py").write_bytes(
        b'# -*- coding: latin-1 -*-\ndef f():\n    """caf\xe9"""\n    return 1\n')
    pairs, stats = extract_pairs(tmp_path)
    assert (stats.files_seen, stats.files_skipped) == (3, 2)
    assert [p["docstring"] for p in pairs] == ["caf\u00e9"]


def test_broken_symlink_is_skipped_and_counted(tmp_path):
    (tmp_path / "good.py").write_text('def f():\n    """Doc."""\n    return 1\n')
    (tmp_path / "gone.py").symlink_to(tmp_path / "no_such_target.py")
    pairs, stats = extract_pairs(tmp_path)
    assert [p["name"] for p in pairs] == ["f"]
    assert (stats.files_seen, stats.files_unreadable, stats.files_skipped) == (2, 1, 0)


def test_bad_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nonexistent: root does not exist"):
        extract_pairs(tmp_path / "nonexistent")
    with pytest.raises(DataError, match="file.py: root is not a directory"):
        extract_pairs(write_lines(tmp_path / "file.py", ["x = 1"]))
    (tmp_path / "empty" / "tests").mkdir(parents=True)
    write_lines(tmp_path / "empty" / "tests" / "t.py", ["x = 1"])  # excluded directory
    with pytest.raises(DataError, match="empty: no .py files found"):
        extract_pairs(tmp_path / "empty")


def test_crlf_and_tabs(tmp_path):
    (tmp_path / "m.py").write_bytes(
        b'class A:\r\n\tdef f(self):\r\n\t\t"""Tabbed."""\r\n\t\treturn 1\r\n')
    pairs, _ = extract_pairs(tmp_path)
    assert [(p["prompt"], p["code"]) for p in pairs] == [('def f(self):\n\t"""Tabbed."""\n', "\treturn 1\n")]


# --------------------------------------------------------------------------------------------
# dedupe / filter / split

def test_dedupe_exact_and_comment_whitespace_variants():
    base = pair('def f(x):\n    """Doc."""\n', "    y = x + 1\n    return y\n", "Doc.", "f", "a.py")
    exact = dict(base, path="b.py", file_hash=h("b.py"))
    comment = dict(base, code="    # add one\n    y = x + 1  # inline\n    return y\n", path="c.py")
    spaces = dict(base, code="    y=x+1\n\n\n    return   y   \n", path="d.py")
    reindented = dict(base, prompt='def f(x):\n  """Doc."""\n', code="  y = x + 1\n  return y\n", path="r.py")
    other = dict(base, code="    y = x + 2\n    return y\n", path="e.py")
    other_doc = dict(base, prompt='def f(x):\n    """Other doc."""\n', path="f.py")  # docstrings don't count
    kept = dedupe([base, exact, comment, spaces, reindented, other, other_doc])
    assert [p["path"] for p in kept] == ["a.py", "e.py"]


def test_dedupe_collapses_docstring_quote_and_local_name_variants():
    plain = ('def scale(xs, k=2):\n    """Multiply each item by k."""\n',
             '    out = []\n    for x in xs:\n        out.append(x * k)\n    return ", ".join(map(str, out))\n')
    variants = [
        plain,
        ("def scale(xs, k=2):\n    '''Scale a list.\n\n    Returns a string.\n    '''\n",  # docstring
         plain[1]),
        (plain[0], plain[1].replace('", "', "', '")),  # quotes
        ('def scale(values, factor=2):\n    """Multiply each item by k."""\n',  # local names
         '    result = []\n    for v in values:\n        result.append(v * factor)\n'
         '    return ", ".join(map(str, result))\n'),
        (plain[0], '    # collect the products\n    out = []\n    for x in xs:  # every item\n'  # comments
                   '        out.append(x * k)\n    return ", ".join(map(str, out))  # as text\n'),
    ]
    pairs = [pair(prompt, code, "d", "scale", f"v{i}.py") for i, (prompt, code) in enumerate(variants)]
    assert [p["path"] for p in dedupe(pairs)] == ["v0.py"]


def test_dedupe_keeps_genuinely_different_functions():
    prompt = 'def scale(xs, k):\n    """Doc."""\n'
    bodies = ["    return [x * k for x in xs]\n",
              "    return [x + k for x in xs]\n",  # another operator
              "    return [x * x for x in xs]\n",  # two locals are not interchangeable
              "    return [x * K for x in xs]\n",  # K is a global: not renamed
              "    return [x.k for x in xs]\n",  # attributes are not renamed
              '    return [x * k for x in xs] or "k"\n',  # string contents count
              "    global total\n    total = k\n    return xs\n",  # sets the global total ...
              "    global total\n    count = k\n    return xs\n"]  # ... this sets a local

    pairs = [pair(prompt, body, "Doc.", "scale", f"b{i}.py") for i, body in enumerate(bodies)]
    assert dedupe(pairs) == pairs


def test_dedupe_fixture_drops_the_copy_in_the_second_file():
    kept = dedupe(EXPECTED_PAIRS)
    assert len(kept) == len(EXPECTED_PAIRS) - 1
    assert ("add", "pkg/sub/dup.py") not in [(p["name"], p["path"]) for p in kept]


def test_normalize_code_falls_back_for_non_python():
    assert normalize_code("if x:\n  (  unbalanced  \n") == "if x: ( unbalanced"
    assert normalize_code("x = 1  # c\n") == normalize_code("x=1\n")


def test_normalize_code_renames_locals_in_order_of_first_appearance():
    src = ('def f(a, *b, c=1, **d):\n    """Doc."""\n    try:\n        e = len(a)\n'
           '    except KeyError as err:\n        raise ValueError from err\n    return (lambda q: q)(e)\n')
    assert normalize_code(src) == ("def f(@0, *@1, @2=1, **@3):\n    try:\n        @4 = len(@0)\n"
                                   "    except KeyError as @5:\n        raise ValueError from @5\n"
                                   "    return (lambda @6: @6)(@4)")


def test_filter_by_length():
    ps = [pair("p", "c" * n, "", str(n), f"{n}.py") for n in (1, 5, 10)]
    assert [p["name"] for p in filter_by_length(ps, max_chars=6)] == ["1", "5"]
    assert [p["name"] for p in filter_by_length(ps, max_tokens=3, encode=lambda s: s[::2])] == ["1", "5"]
    assert filter_by_length(ps) == ps
    with pytest.raises(ValueError):
        filter_by_length(ps, max_tokens=3)


def assert_disjoint(splits, pairs):
    files = {name: {p["file_hash"] for p in ps} for name, ps in splits.items()}
    assert not files["train"] & files["valid"]
    assert not files["train"] & files["test"]
    assert not files["valid"] & files["test"]
    assert sorted(map(id, sum(splits.values(), []))) == sorted(map(id, pairs))


def test_split_fixture_no_file_in_two_splits():
    splits = split_by_file(EXPECTED_PAIRS, valid=0.34, test=0.34, seed=0)
    assert_disjoint(splits, EXPECTED_PAIRS)
    assert all(splits.values())  # 3 files, one per split


def test_split_200_synthetic_files():
    rng = random.Random(1)
    pairs = [pair("p", f"c{i}", "", f"f{i}", f"dir/file{f}.py")
             for f in range(200) for i in range(rng.randint(1, 5))]
    rng.shuffle(pairs)
    splits = split_by_file(pairs, valid=0.05, test=0.05, seed=0)
    assert_disjoint(splits, pairs)
    n_files = {name: len({p["file_hash"] for p in ps}) for name, ps in splits.items()}
    assert n_files == {"train": 180, "valid": 10, "test": 10}
    for name, ps in splits.items():  # input order kept inside a split
        pos = [pairs.index(p) for p in ps]
        assert pos == sorted(pos)
    # deterministic, independent of pair order, and seed-dependent
    again = split_by_file(list(reversed(pairs)), valid=0.05, test=0.05, seed=0)
    assert {p["file_hash"] for p in again["test"]} == {p["file_hash"] for p in splits["test"]}
    other = split_by_file(pairs, valid=0.05, test=0.05, seed=1)
    assert {p["file_hash"] for p in other["test"]} != {p["file_hash"] for p in splits["test"]}


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError):
        split_by_file(EXPECTED_PAIRS, valid=0.5, test=0.5)


def test_split_is_the_same_in_every_process():
    """Python salts str hashes per process: the split must not depend on set iteration order."""
    code = ("import json, sys; from codegen.data import split_by_file; "
            "pairs = [{'file_hash': f'f{i}'} for i in range(40)]; "
            "print(json.dumps([p['file_hash'] for p in split_by_file(pairs, 0.1, 0.1)['test']]))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(runs) == 1


def test_split_of_three_files_gives_one_to_each():
    splits = split_by_file([{"file_hash": h} for h in "abc"], valid=0.05, test=0.05)
    assert {name: len(ps) for name, ps in splits.items()} == {"train": 1, "valid": 1, "test": 1}


# --------------------------------------------------------------------------------------------
# jsonl io and readers

def test_save_load_roundtrip_is_atomic(tmp_path):
    out = tmp_path / "sub" / "x.jsonl"
    rows = [{"prompt": "déf ünïcode 🐍\n", "code": "pass\n"}, {"a": [1, 2]}]
    save_jsonl(rows, out)
    assert load_jsonl(out) == rows
    with pytest.raises(TypeError):  # not JSON-serializable: the old file must survive intact
        save_jsonl([{"a": 1}, {"b": object()}], out)
    assert load_jsonl(out) == rows
    assert os.listdir(out.parent) == ["x.jsonl"]  # no temp files left behind


@pytest.mark.parametrize("reader", [load_jsonl, read_codexglue_jsonl, read_apps_jsonl])
def test_bad_jsonl_line_names_file_and_line(tmp_path, reader):
    path = write_lines(tmp_path / "bad.jsonl", ['{"docstring": "d", "code": "x"}', "", "{not json"])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: invalid JSON"):
        reader(path)


@pytest.mark.parametrize("reader", [load_jsonl, read_codexglue_jsonl, read_apps_jsonl])
def test_invalid_utf8_names_file_and_line(tmp_path, reader):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"docstring": "d", "code": "x"}\n{"docstring": "caf\xe9", "code": "x"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        reader(path)


def test_codexglue_reader(tmp_path):
    code = 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'
    recs = [
        {"repo": "me/proj", "path": "src/m.py", "func_name": "add", "docstring": "Add two numbers.", "code": code},
        {"docstring": "Broken one.\nSecond line.", "code": "def broken(:\n    pass\n"},
    ]
    path = write_lines(tmp_path / "cxg.jsonl", [json.dumps(r) for r in recs])
    good, broken = read_codexglue_jsonl(path)
    assert good == {"prompt": 'def add(a, b):\n    """Add two numbers."""\n', "code": "    return a + b\n",
                    "docstring": "Add two numbers.", "name": "add", "path": "me/proj/src/m.py",
                    "file_hash": h("me/proj/src/m.py")}
    assert broken["prompt"] == "# Broken one.\n# Second line.\n"
    assert broken["code"] == "def broken(:\n    pass\n"
    assert broken["name"] == "" and broken["file_hash"] == h("def broken(:\n    pass\n")
    missing = write_lines(tmp_path / "missing.jsonl", ['{"code": "x"}'])
    with pytest.raises(ValueError, match=r"missing\.jsonl:1: missing field\(s\) \['docstring'\]"):
        read_codexglue_jsonl(missing)


GOOD_APPS = {"problem_id": 7, "question": "Add two numbers.",
             "solutions": json.dumps(["a, b = map(int, input().split())\nprint(a + b)\n", "print(3)\n"]),
             "input_output": json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]})}

BAD_APPS = {
    "no_solutions": dict(GOOD_APPS, solutions="[]"),
    "solutions_bad_json": dict(GOOD_APPS, solutions="[unclosed"),
    "question_too_long": dict(GOOD_APPS, question="q" * 500),
    "solution_too_long": dict(GOOD_APPS, solutions=["print(1)\n" * 400]),
    "io_bad_json": dict(GOOD_APPS, input_output="{inputs"),
    "io_missing_outputs": dict(GOOD_APPS, input_output={"inputs": ["1"]}),
    "io_empty": dict(GOOD_APPS, input_output={"inputs": [], "outputs": []}),
    "io_length_mismatch": dict(GOOD_APPS, input_output={"inputs": ["1", "2"], "outputs": ["1"]}),
}
EXPECTED_REASON = {"no_solutions": "no_solutions", "solutions_bad_json": "no_solutions",
                   "question_too_long": "question_too_long", "solution_too_long": "solution_too_long",
                   "io_bad_json": "bad_input_output", "io_missing_outputs": "bad_input_output",
                   "io_empty": "bad_input_output", "io_length_mismatch": "bad_input_output"}


@pytest.mark.parametrize("rule", sorted(BAD_APPS))
def test_apps_filter_rejects(rule):
    assert apps_reject_reason(BAD_APPS[rule]) == EXPECTED_REASON[rule]


def test_apps_filter_boundaries_accept():
    assert apps_reject_reason(GOOD_APPS) is None
    assert apps_reject_reason(dict(GOOD_APPS, question="q" * 499)) is None
    assert apps_reject_reason(dict(GOOD_APPS, solutions=["print(1)\n" * 399])) is None
    # already-decoded forms, and call-based (non-string) examples
    decoded = dict(GOOD_APPS, solutions=["x = 1\n"], input_output={"inputs": [[1, 2]], "outputs": [3]})
    assert apps_reject_reason(decoded) is None


def test_apps_keeps_at_most_ten_stdin_tests(tmp_path):
    many = dict(GOOD_APPS, input_output={"inputs": [f"{i} 1\n" for i in range(25)],
                                         "outputs": [f"{i + 1}\n" for i in range(25)]})
    pair = read_apps_jsonl(write_lines(tmp_path / "apps.jsonl", [json.dumps(many)]))[0]
    assert pair["io"]["inputs"] == [f"{i} 1\n" for i in range(10)] and pair["io"]["outputs"][-1] == "10\n"


def test_read_apps_jsonl(tmp_path):
    recs = [GOOD_APPS] + [BAD_APPS[k] for k in sorted(BAD_APPS)]
    recs.append(dict(GOOD_APPS, problem_id=8, solutions=["print(1)\n" * 400, "print(2)\n"],
                     input_output={"inputs": [[1, 2]], "outputs": [3]}))
    path = write_lines(tmp_path / "apps.jsonl", [json.dumps(r) for r in recs])
    reasons = {}
    got = read_apps_jsonl(path, reasons)
    assert got[0] == {"prompt": "Write Python code to solve this problem:\nProblem: Add two numbers.\n"
                                "Input: 1 2\nOutput: 3\n",
                      "code": "a, b = map(int, input().split())\nprint(a + b)\n",
                      "docstring": "Add two numbers.", "name": "apps/7", "path": "apps/7",
                      "file_hash": h("apps/7"),
                      "io": {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}}  # stdin tests, for code_eval
    assert got[1]["code"] == "print(2)\n"  # the first solution short enough
    assert got[1]["prompt"].endswith("Input: [1, 2]\nOutput: 3\n")
    assert got[1]["io"] is None  # call-based tests (arguments, not stdin): none to run
    assert len(got) == 2
    assert reasons == {"no_solutions": 2, "question_too_long": 1, "solution_too_long": 1,
                       "bad_input_output": 4}


@pytest.mark.parametrize("reader, record, field", [
    (read_codexglue_jsonl, {"docstring": "d", "code": 5}, "code"),
    (read_codexglue_jsonl, {"docstring": ["d"], "code": "x"}, "docstring"),
    (read_codexglue_jsonl, {"docstring": "d", "code": "x", "func_name": 3}, "func_name"),
    (read_apps_jsonl, dict(GOOD_APPS, question=5), "question"),
    (read_apps_jsonl, dict(GOOD_APPS, solutions=5), "solutions"),
    (read_apps_jsonl, dict(GOOD_APPS, input_output=[1]), "input_output"),
])
def test_wrong_field_type_names_file_line_and_field(tmp_path, reader, record, field):
    path = write_lines(tmp_path / "typed.jsonl", ["", json.dumps(record)])
    with pytest.raises(DataError, match=rf"typed\.jsonl:2: field '{field}' must be"):
        reader(path)


# --------------------------------------------------------------------------------------------
# reporting, build, CLI

def test_length_percentiles():
    assert length_percentiles(range(1, 101)) == pytest.approx({50: 50.5, 90: 90.1, 95: 95.05, 99: 99.01})
    assert length_percentiles([]) == {50: 0, 90: 0, 95: 0, 99: 0}
    assert length_percentiles([7], ps=(0, 100)) == {0: 7, 100: 7}


def test_summary_counts_and_units():
    splits = split_by_file(EXPECTED_PAIRS, valid=0.34, test=0.34)
    text = summary(splits)
    assert "train:" in text and "chars" in text and "p99=" in text
    assert f"{len(splits['train']):7d} pairs" in text
    assert "tokens" in summary(EXPECTED_PAIRS, encode=str.split)


def test_build_dataset_fixture(tmp_path, capsys):
    apps = write_lines(tmp_path / "apps.jsonl", [json.dumps(GOOD_APPS), json.dumps(BAD_APPS["io_empty"])])
    paths, stats = build_dataset(FIXTURE, tmp_path / "out", apps=[apps], valid=0.25, test=0.25)
    assert set(paths) == {"train", "valid", "test"}
    splits = {name: load_jsonl(p) for name, p in paths.items()}
    assert_disjoint(splits, sum(splits.values(), []))
    assert sum(map(len, splits.values())) == 10 - 1 + 1  # one duplicate removed, one APPS pair added
    assert (stats.pairs, stats.extra_pairs, stats.duplicates_removed, stats.too_long) == (10, 1, 1, 0)
    assert stats.apps_rejected == {"bad_input_output": 1}
    out = capsys.readouterr().out
    assert "files_skipped" in out and "'apps_rejected': {'bad_input_output': 1}" in out
    _, stats = build_dataset(FIXTURE, tmp_path / "out2", max_chars=60, verbose=False)
    assert stats.too_long == 6  # all but add, square and Circle.Unit.scale


def test_main_cli(tmp_path, capsys):
    assert data.main(["--out", str(tmp_path), "--root", str(FIXTURE), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "pairs" in out
    assert sorted(os.listdir(tmp_path)) == ["test.jsonl", "train.jsonl", "valid.jsonl"]


def test_main_reports_token_lengths_when_the_tokenizer_is_there(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINILLAMA_TOKENIZER", str(asset_path("tokenizer.model")))
    assert data.main(["--out", str(tmp_path), "--root", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "tokens p50=" in out and "chars" not in out and "note:" not in out


def test_main_falls_back_to_chars_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINILLAMA_TOKENIZER", str(tmp_path / "missing.model"))
    assert data.main(["--out", str(tmp_path / "out"), "--root", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "note: lengths below are in characters" in out and "missing.model" in out
    assert "chars p50=" in out and "tokens p50=" not in out
    with pytest.raises(SystemExit):  # argparse's usage error, exit status 2
        data.main(["--out", str(tmp_path / "out"), "--root", str(FIXTURE), "--max-tokens", "9"])
    assert "--max-tokens needs a tokenizer model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--root", "/nonexistent"], "/nonexistent: root does not exist"),
    (["--no-root", "--codexglue", "{bad}"], "bad.jsonl:2: invalid JSON"),
    (["--no-root", "--apps", "{missing}"], "No such file or directory"),
    (["--no-root"], "nothing written, no pairs left"),
    (["--root", str(FIXTURE), "--valid", "0.6", "--test", "0.6"], "valid + test < 1"),
])
def test_main_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("an earlier build\n")
    bad = write_lines(tmp_path / "bad.jsonl", ['{"docstring": "d", "code": "x"}', "{not json"])
    argv = [a.format(bad=bad, missing=tmp_path / "missing.jsonl") for a in argv]
    assert data.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert os.listdir(out) == ["train.jsonl"] and (out / "train.jsonl").read_text() == "an earlier build\n"


def test_stdlib_sanity():
    """The real default root (the stdlib, minus test dirs); ~5 s on a 2-core box."""
    t0 = time.perf_counter()
    pairs, stats = extract_pairs()
    elapsed = time.perf_counter() - t0
    print(f"\nstdlib: {stats} in {elapsed:.1f}s\n{summary(pairs)}")
    assert stats.pairs == len(pairs) > 1000
    assert stats.files_seen > 300
    assert not any("site-packages" in p["path"] or "/test/" in f"/{p['path']}" for p in pairs)
    for p in pairs[::50]:
        ast.parse(p["prompt"] + p["code"])


def test_jsonl_with_a_byte_order_mark(tmp_path):
    from codegen.data import iter_jsonl

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "code": "c"}\n{"prompt": "\xef\xbb\xbfq", "code": "d"}\n')
    assert [obj for _, obj in iter_jsonl(path)] == [{"prompt": "p", "code": "c"}, {"prompt": "\ufeffq", "code": "d"}]

"""The layout's rules (structure.md), checked on the source: files and functions short enough to read,
no program or page kept inside a Python string, no shared state through `nonlocal` in the training loop."""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

SOURCES = sorted(p for p in ROOT.glob("*.py")) + sorted((ROOT / "codegen").glob("*.py")) + sorted(
    (ROOT / "bench").glob("*.py"))


def parsed(path):
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def lines(node):
    return node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_program_or_page_inside_a_string(path):
    long = [f"line {n.lineno}: {lines(n)} lines" for n in ast.walk(parsed(path))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and lines(n) > 60]
    assert not long, f"{path.name}: string literals over 60 lines (make them files): {long}"


def test_codegen_functions_fit_on_a_screen():
    too_long = [f"{path.name}:{n.lineno} {n.name} ({lines(n)} lines)"
                for path in sorted((ROOT / "codegen").glob("*.py")) for n in ast.walk(parsed(path))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines(n) > 80]
    assert not too_long
    train = parsed(ROOT / "codegen" / "train.py")
    assert not [n for n in ast.walk(train) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines(n) > 60]
    assert not [n for n in ast.walk(train) if isinstance(n, ast.Nonlocal)]


def test_llama_py_is_the_model_only():
    source = (ROOT / "llama.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 300
    names = [n.name for n in parsed(ROOT / "llama.py").body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    order = ["LayerNorm", "RMSNorm", "Attention", "FeedForward", "LlamaLayer", "Llama"]
    assert [n for n in names if n in order] == order  # read top to bottom, as in llama2.c


def test_every_module_is_in_structure_md():
    structure = (ROOT / "structure.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(ROOT)) for p in SOURCES
               if p.parent.name != "bench" and p.name != "__init__.py" and f"`{p.name}`" not in structure]
    assert not missing, f"add them to structure.md: {missing}"

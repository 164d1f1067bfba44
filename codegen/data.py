"""Docstring -> code training pairs for the Mini-Llama code model. Standard library (+ optional tqdm).

    extract_pairs(root)          walk .py files, one pair per documented function/method
    read_codexglue_jsonl(path)   CodeXGlue / CodeSearchNet code-to-text records -> pairs
    read_apps_jsonl(path)        APPS problems -> pairs (filtered: see apps_reject_reason)
    dedupe(pairs)                drop exact and near duplicates (see normalize_code), keep first
    filter_by_length(pairs, ..)  drop pairs longer than max_chars / max_tokens
    split_by_file(pairs, ..)     train/valid/test by source file, so no file is in two splits
    save_jsonl / load_jsonl      one JSON object per line; saving is atomic
    build_dataset(..) / main()   all of the above: python -m codegen.data --out DIR

A pair is a dict:
    prompt     the `def ...:` header line(s) + the docstring literal, exactly as in the source,
               dedented so the `def` starts at column 0 (decorators are not included)
    code       the rest of the function body, dedented the same way, so that
               prompt + code is the function's source and parses as Python
    docstring  the cleaned docstring (ast.get_docstring, then .strip(): 3.11 keeps a
               whitespace-only last line as trailing spaces)
    name       qualified name as in __qualname__: "f", "Cls.meth", "f.<locals>.inner"
    path       file path relative to the root (posix), or a record id for the jsonl readers
    file_hash  sha1 of `path`; the split unit

Directory choices: by default the walk skips site-packages/dist-packages, every directory named
test/tests/idle_test (the stdlib test suite and lib2to3/idlelib test data are mostly deliberately
odd code and would dominate the set), __pycache__ and hidden directories. Only directories *below*
the root are checked, so a root that itself lives under tests/ still works.
Functions whose docstring shares a line with the next statement (`"doc"; x = 1`) are skipped,
as are the rare ones whose prompt + code does not re-parse once cut out (counted in Stats).
Bad input (a missing root, a malformed jsonl line) raises DataError naming the file (and line);
main() prints it as one `error: ...` line and exits 2 before writing anything.
"""
import argparse
import ast
import contextlib
import gc
import gzip
import hashlib
import io
import json
import os
import random
import sys
import sysconfig
import tokenize
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils import DataError, atomic_write

try:
    from tqdm import tqdm
except ImportError:  # tqdm is only cosmetic
    def tqdm(it, **kwargs):
        return it

DEFAULT_EXCLUDE_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
})
SPLITS = ("train", "valid", "test")
APPS_TEMPLATE = "Write Python code to solve this problem:\nProblem: {question}\nInput: {input}\nOutput: {output}\n"
APPS_MAX_QUESTION_CHARS = 500   # question must be shorter than this
APPS_MAX_SOLUTION_LINES = 400   # a solution must have fewer lines than this
APPS_MAX_TESTS = 10             # stdin/stdout tests kept per problem for code_eval


@dataclass
class Stats:
    files_seen: int = 0
    files_skipped: int = 0        # unparsable: SyntaxError, UnicodeDecodeError, ValueError
    files_unreadable: int = 0     # could not be opened or read (broken symlink, permissions): skipped
    functions_seen: int = 0       # every def / async def in the parsed files
    pairs: int = 0                # pairs extracted from source files
    functions_skipped: int = 0    # documented, non-trivial, but could not be cut out cleanly
    duplicates_removed: int = 0
    too_long: int = 0
    extra_pairs: int = 0          # pairs from CodeXGlue / APPS jsonl files
    apps_rejected: dict = field(default_factory=dict)  # reason -> count, see apps_reject_reason


def sha1(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# extraction from .py files

def default_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_py_files(root, exclude_dirs=DEFAULT_EXCLUDE_DIRS):
    """All .py files under root, sorted by relative path; excluded/hidden dirs are pruned."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs and not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_source(path) -> str:
    """Decode a .py file the way Python does (PEP 263 cookie, BOM); universal newlines."""
    with tokenize.open(path) as f:
        return f.read()


_STMT_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")  # where a def can appear


def iter_functions(node, prefix=""):
    """(qualname, node) for every function in source order, methods and nested ones included.

    Only statement lists are walked: a def cannot occur inside an expression."""
    for field in _STMT_FIELDS:
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = prefix + child.name
                yield qualname, child
                yield from iter_functions(child, qualname + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from iter_functions(child, prefix + child.name + ".")
            else:
                yield from iter_functions(child, prefix)


def _dedent(lines, indent):
    """Remove `indent` from the lines that start with it (others: blank, or inside a string)."""
    n = len(indent)
    return [ln[n:] if ln.startswith(indent) else ln for ln in lines]


def _parses(src: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(src)
        return True
    except (SyntaxError, ValueError):
        return False


def split_function(lines, node):
    """(prompt, code) for a documented function node, or None if it cannot be cut cleanly.

    `lines` are the source lines (split on "\\n" only, as ast counts them)."""
    doc, nxt = node.body[0], node.body[1]
    if nxt.lineno <= doc.end_lineno:  # `"""doc"""; x = 1` on one line
        return None
    def_line = lines[node.lineno - 1]
    indent = def_line[:len(def_line) - len(def_line.lstrip())]
    header = _dedent(lines[node.lineno - 1:doc.end_lineno], indent)
    body = _dedent(lines[doc.end_lineno:node.end_lineno], indent)
    prompt, code = "\n".join(header) + "\n", "\n".join(body) + "\n"
    return (prompt, code) if _parses(prompt + code) else None


def _is_documented(node) -> bool:
    return ast.get_docstring(node) is not None and len(node.body) > 1


@contextlib.contextmanager
def no_gc():
    """Pause the cyclic GC: ast.parse allocates millions of objects and GC passes dominate its time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def pairs_from_source(source: str, rel_path: str, stats: Stats):
    """Pairs for one file's source text (already parsed successfully by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequence
        tree = ast.parse(source)
    lines = source.split("\n")
    out = []
    for qualname, node in iter_functions(tree):
        stats.functions_seen += 1
        if not _is_documented(node):
            continue
        cut = split_function(lines, node)
        if cut is None:
            stats.functions_skipped += 1
            continue
        out.append({"prompt": cut[0], "code": cut[1], "docstring": ast.get_docstring(node).strip(),
                    "name": qualname, "path": rel_path, "file_hash": sha1(rel_path)})
    return out


def _progress(it, desc, total=None):
    return tqdm(it, desc=desc, total=total, unit="file", disable=not sys.stderr.isatty())


def _source_files(root, exclude_dirs):
    """iter_py_files, but a root that is missing or holds no .py files is an error: os.walk would
    silently yield nothing and we would write an empty dataset over a good one."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise DataError(f"{root}: root {what}; pass --root DIR, a directory of .py files")
    files = iter_py_files(root, exclude_dirs)
    if not files:
        skipped = ", ".join(sorted(exclude_dirs))
        raise DataError(f"{root}: no .py files found (directories skipped: {skipped}, hidden ones); "
                        "pass --root DIR with Python sources")
    return files


def extract_pairs(root=None, exclude_dirs=DEFAULT_EXCLUDE_DIRS):
    """Walk root (default: the stdlib) and return (pairs, Stats); see the module docstring."""
    root = Path(root) if root is not None else default_root()
    stats, pairs = Stats(), []
    files = _source_files(root, exclude_dirs)
    for path in _progress(files, "extract", len(files)):
        stats.files_seen += 1
        rel = path.relative_to(root).as_posix()
        try:
            source = read_source(path)
            with no_gc():
                pairs += pairs_from_source(source, rel, stats)
        except OSError:  # broken symlink, no permission: skip it like an unparsable file
            stats.files_unreadable += 1
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
            stats.files_skipped += 1
    stats.pairs = len(pairs)
    return pairs, stats


# --------------------------------------------------------------------------------------------
# jsonl readers

def iter_jsonl(path):
    """(line number, dict) per non-blank line of a .jsonl (or .jsonl.gz) file; a bad line raises
    DataError naming file:line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:  # bytes, decoded line by line, so a decoding error knows its line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not data
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); "
                                "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _field_error(obj, key, expected, path, lineno):
    return DataError(f"{path}:{lineno}: field {key!r} must be {expected}, got {json.dumps(obj[key])[:40]}")


def _require(obj, keys, path, lineno, optional=()):
    """Every key in `keys` present and a string; every key in `optional` a string or null if present."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{path}:{lineno}: missing field(s) {missing}")
    for k in (*keys, *optional):
        if k in obj and not isinstance(obj[k], str) and not (k in optional and obj[k] is None):
            raise _field_error(obj, k, "a string", path, lineno)


def _comment_prompt(docstring: str) -> str:
    return "".join(f"# {ln}".rstrip() + "\n" for ln in docstring.split("\n"))


def split_snippet(code: str):
    """(prompt, code) for the first documented function in a code snippet, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    lines = code.split("\n")
    for _, node in iter_functions(tree):
        if _is_documented(node):
            return split_function(lines, node)
    return None


def read_codexglue_jsonl(path):
    """CodeXGlue code-to-text (CodeSearchNet) records: fields docstring, code (+ func_name, path, repo).

    The code field holds the whole function, docstring included; it is cut into prompt/code like
    extracted functions. If it cannot be, the prompt is the docstring as # comments."""
    pairs = []
    for lineno, rec in iter_jsonl(path):
        _require(rec, ("docstring", "code"), path, lineno, optional=("func_name", "repo", "path"))
        cut = split_snippet(rec["code"])
        prompt, code = cut if cut else (_comment_prompt(rec["docstring"]), rec["code"])
        where = "/".join(str(rec[k]) for k in ("repo", "path") if rec.get(k))
        pairs.append({"prompt": prompt, "code": code, "docstring": rec["docstring"],
                      "name": rec.get("func_name") or "", "path": where or f"{path}:{lineno}",
                      "file_hash": sha1(where) if where else sha1(rec["code"])})
    return pairs


def _maybe_json(value):
    return json.loads(value) if isinstance(value, str) else value


def _apps_raw_solutions(rec):
    """The solutions list (from a JSON string or a list); [] if missing or unparseable."""
    try:
        sols = _maybe_json(rec.get("solutions"))
    except json.JSONDecodeError:
        return []
    if not isinstance(sols, list):
        return []
    return [s for s in sols if isinstance(s, str) and s.strip()]


def _apps_solutions(rec):
    """Solutions with fewer than APPS_MAX_SOLUTION_LINES lines."""
    return [s for s in _apps_raw_solutions(rec) if len(s.splitlines()) < APPS_MAX_SOLUTION_LINES]


def _apps_io(rec):
    """(inputs, outputs) if present, parseable, non-empty and equally long; else None."""
    try:
        io_ = _maybe_json(rec.get("input_output"))
    except json.JSONDecodeError:
        return None
    if not isinstance(io_, dict):
        return None
    ins, outs = io_.get("inputs"), io_.get("outputs")
    if not isinstance(ins, list) or not isinstance(outs, list):
        return None
    if not ins or len(ins) != len(outs):
        return None
    return ins, outs


def apps_reject_reason(rec):
    """Why an APPS record is dropped, or None to keep it.

    Reasons: "no_question", "question_too_long" (>= 500 chars), "no_solutions" (missing, bad JSON,
    empty), "solution_too_long" (every solution has >= 400 lines), "bad_input_output" (missing,
    bad JSON, no "inputs"/"outputs" lists, empty, or of different lengths)."""
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        return "no_question"
    if len(question) >= APPS_MAX_QUESTION_CHARS:
        return "question_too_long"
    if not _apps_raw_solutions(rec):
        return "no_solutions"
    if not _apps_solutions(rec):
        return "solution_too_long"
    if _apps_io(rec) is None:
        return "bad_input_output"
    return None


def _fmt_example(x) -> str:
    return x.rstrip("\n") if isinstance(x, str) else json.dumps(x)


def apps_pair(rec, where):
    """The pair, and "io": the first APPS_MAX_TESTS tests of a standard-input problem (the program
    reads stdin, prints its answer; codegen.evaluate runs them), or None for a call-based one."""
    ins, outs = _apps_io(rec)
    prompt = APPS_TEMPLATE.format(question=rec["question"], input=_fmt_example(ins[0]),
                                  output=_fmt_example(outs[0]))
    pid = rec.get("problem_id", rec.get("id"))
    name = f"apps/{pid}" if pid is not None else where
    stdin_tests = all(isinstance(x, str) for x in ins + outs) and not _maybe_json(rec["input_output"]).get("fn_name")
    io = {"inputs": ins[:APPS_MAX_TESTS], "outputs": outs[:APPS_MAX_TESTS]} if stdin_tests else None
    return {"prompt": prompt, "code": _apps_solutions(rec)[0], "docstring": rec["question"],
            "name": name, "path": name, "file_hash": sha1(name), "io": io}


# field -> (allowed types, in words); solutions and input_output are JSON strings in the raw dataset
_APPS_FIELD_TYPES = {"question": (str, "a string"), "solutions": ((str, list), "a string or a list"),
                     "input_output": ((str, dict), "a string or an object")}


def _check_apps_types(rec, path, lineno):
    """A field of the wrong JSON type means a broken file, not a problem to filter out: say where.
    Missing, null, empty or unparseable-string fields are left to apps_reject_reason."""
    for key, (types, words) in _APPS_FIELD_TYPES.items():
        if rec.get(key) is not None and not isinstance(rec[key], types):
            raise _field_error(rec, key, words, path, lineno)


def read_apps_jsonl(path, reasons=None):
    """APPS records (question, solutions, input_output) -> pairs. `reasons`, a dict, counts rejects."""
    pairs = []
    for lineno, rec in iter_jsonl(path):
        _check_apps_types(rec, path, lineno)
        why = apps_reject_reason(rec)
        if why:
            if reasons is not None:
                reasons[why] = reasons.get(why, 0) + 1
            continue
        pairs.append(apps_pair(rec, f"{Path(path).name}:{lineno}"))
    return pairs


# --------------------------------------------------------------------------------------------
# dedupe, filter, split

_DROP_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING, tokenize.ENDMARKER}


def normalize_tokens(text: str) -> str:
    """Comments removed, whitespace collapsed (indent kept only as INDENT/DEDENT markers)."""
    try:
        toks = []
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in _DROP_TOKENS:
                continue
            if tok.type in (tokenize.INDENT, tokenize.DEDENT):
                toks.append(tokenize.tok_name[tok.type])
            else:
                toks.append(" ".join(tok.string.split()))
        return " ".join(toks)
    except (tokenize.TokenError, SyntaxError):  # not Python (or a fragment): whitespace only
        return " ".join(text.split())


def _local_names(tree):
    """Names bound inside functions (arguments, assignment/loop/with/except targets), minus those
    declared global or nonlocal, which name something outside the function."""
    bound, declared = set(), set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                bound.add(node.id)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                declared.update(node.names)
    return bound - declared


class _Canonicalize(ast.NodeTransformer):
    """Drop docstrings; rename local names to @0, @1, ... in order of first appearance. "@" cannot
    start an identifier, so a new name never clashes with a global or builtin left as it is."""

    def __init__(self, local_names):
        self.local_names, self.renamed = local_names, {}

    def _rename(self, name):
        if name not in self.local_names:
            return name
        return self.renamed.setdefault(name, f"@{len(self.renamed)}")

    def _drop_docstring(self, node):
        if ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
        return self.generic_visit(node)

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _drop_docstring

    def visit_Name(self, node):
        node.id = self._rename(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self._rename(node.arg)
        return self.generic_visit(node)  # the annotation

    def visit_ExceptHandler(self, node):
        if node.name:
            node.name = self._rename(node.name)
        return self.generic_visit(node)


def normalize_code(text: str) -> str:
    """The dedupe key: code equal up to comments, layout, docstrings, string quotes and local names.

    Parsed and unparsed with `ast` (which also normalises quotes and layout); text that does not
    parse (APPS prompts, fragments) falls back to normalize_tokens."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
        return ast.unparse(_Canonicalize(_local_names(tree)).visit(tree))
    except (SyntaxError, ValueError, RecursionError):
        return normalize_tokens(text)


def dedupe(pairs):
    """Keep the first of pairs whose whole function (prompt + code) has the same normalize_code key."""
    seen, out = set(), []
    with no_gc():
        for p in pairs:
            key = sha1(normalize_code(p["prompt"] + p["code"]))
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def filter_by_length(pairs, max_chars=None, max_tokens=None, encode=None):
    """Drop pairs whose prompt + code is longer than max_chars characters / max_tokens tokens."""
    if max_tokens is not None and encode is None:
        raise ValueError("max_tokens needs an encode callable")
    out = []
    for p in pairs:
        text = p["prompt"] + p["code"]
        if max_chars is not None and len(text) > max_chars:
            continue
        if max_tokens is not None and len(encode(text)) > max_tokens:
            continue
        out.append(p)
    return out


def _split_sizes(n, valid, test):
    """How many files go to valid and test: rounded, but at least 1 each when asked and possible."""
    sizes = []
    for frac in (valid, test):
        k = round(n * frac)
        sizes.append(max(k, 1) if frac > 0 and n >= 3 else k)
    return sizes


def split_by_file(pairs, valid=0.05, test=0.05, seed=0, keys=None):
    """{"train": [...], "valid": [...], "test": [...]} with every file_hash in exactly one split.

    Files are shuffled (sorted first, so the result depends only on the set of files and seed);
    pairs keep their input order inside each split. `keys`, if given, is the split unit of each
    pair in order, used instead of its file_hash (for records that carry none)."""
    if valid < 0 or test < 0 or valid + test >= 1:
        raise DataError(f"need 0 <= valid, test and valid + test < 1, got {valid}, {test}")
    pairs = list(pairs)
    keys = [p["file_hash"] for p in pairs] if keys is None else list(keys)
    if len(keys) != len(pairs):
        raise DataError(f"{len(keys)} keys for {len(pairs)} pairs")
    files = sorted(set(keys))
    random.Random(seed).shuffle(files)
    n_valid, n_test = _split_sizes(len(files), valid, test)
    which = {f: "test" for f in files[:n_test]}
    which.update({f: "valid" for f in files[n_test:n_test + n_valid]})
    splits = {s: [] for s in SPLITS}
    for p, key in zip(pairs, keys):
        splits[which.get(key, "train")].append(p)
    return splits


# --------------------------------------------------------------------------------------------
# io and reporting

def save_jsonl(pairs, path):
    """One JSON object per line, written atomically (utils.atomic_write: the whole file or the old one)."""
    atomic_write(path, lambda f: f.writelines((json.dumps(p, ensure_ascii=False) + "\n").encode("utf-8")
                                              for p in pairs))
    return Path(path)


def load_jsonl(path):
    return [obj for _, obj in iter_jsonl(path)]


def length_percentiles(lengths, ps=(50, 90, 95, 99)):
    """{p: value} with linear interpolation between order statistics (numpy's default); 0 if empty."""
    xs = sorted(lengths)
    out = {}
    for p in ps:
        if not xs:
            out[p] = 0
            continue
        pos = (len(xs) - 1) * p / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[p] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def summary(splits, encode=None, stats=None) -> str:
    """Counts and length percentiles per split (tokens if `encode` is given, else characters)."""
    if isinstance(splits, list):
        splits = {"all": splits}
    unit = "tokens" if encode else "chars"
    measure = (lambda s: len(encode(s))) if encode else len
    lines = [f"stats: {asdict(stats)}"] if stats else []
    for name, pairs in splits.items():
        lens = [measure(p["prompt"] + p["code"]) for p in pairs]
        pct = " ".join(f"p{p}={v:.0f}" for p, v in length_percentiles(lens).items())
        lines.append(f"{name:>5}: {len(pairs):7d} pairs, {len(set(p['file_hash'] for p in pairs)):6d} files,"
                     f" {unit} {pct} max={max(lens, default=0)}")
    return "\n".join(lines)


def build_dataset(root=None, out_dir="data/codegen", encode=None, codexglue=(), apps=(),
                  max_chars=None, max_tokens=None, valid=0.05, test=0.05, seed=0,
                  use_root=True, verbose=True):
    """extract -> add jsonl sources -> dedupe -> length filter -> split -> out_dir/{train,valid,test}.jsonl.

    Returns ({split: path}, Stats)."""
    pairs, stats = extract_pairs(root) if use_root else ([], Stats())
    for path in codexglue or ():
        extra = read_codexglue_jsonl(path)
        stats.extra_pairs += len(extra)
        pairs += extra
    for path in apps or ():
        extra = read_apps_jsonl(path, stats.apps_rejected)
        stats.extra_pairs += len(extra)
        pairs += extra
    kept = dedupe(pairs)
    stats.duplicates_removed = len(pairs) - len(kept)
    short = filter_by_length(kept, max_chars, max_tokens, encode)
    stats.too_long = len(kept) - len(short)
    if not short:  # an empty dataset is never what was meant: keep whatever out_dir holds
        raise DataError(f"{out_dir}: nothing written, no pairs left ({len(pairs)} found, {stats.duplicates_removed} "
                        f"duplicates, {stats.too_long} too long); check --root/--codexglue/--apps and the length limits")
    splits = split_by_file(short, valid, test, seed)
    paths = {name: save_jsonl(ps, Path(out_dir) / f"{name}.jsonl") for name, ps in splits.items()}
    if verbose:
        print(summary(splits, encode, stats))
    return paths, stats


def _spm_encoder(model_path):
    import sentencepiece as spm  # only when asked for: token-based lengths
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as e:  # sentencepiece reports a missing or bad file as RuntimeError
        raise DataError(f"{model_path}: cannot load the --spm model ({e})") from None
    return sp.encode


def length_encoder(spm_path=None):
    """(encode, None) for --spm if given, else for the repo's tokenizer (MINILLAMA_TOKENIZER, else
    tokenizer.model: found as tokenizer.Tokenizer finds it); (None, why) when there is none."""
    if spm_path:
        return _spm_encoder(spm_path), None
    try:
        from tokenizer import Tokenizer
        return Tokenizer().sp_model.encode, None
    except (ImportError, FileNotFoundError) as e:
        return None, str(e)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build docstring->code pairs (train/valid/test jsonl).")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--root", help="tree of .py files to extract from (default: the Python stdlib)")
    ap.add_argument("--no-root", action="store_true", help="do not extract from any .py tree")
    ap.add_argument("--codexglue", action="append", default=[], help="CodeXGlue jsonl (repeatable)")
    ap.add_argument("--apps", action="append", default=[], help="APPS jsonl (repeatable)")
    ap.add_argument("--max-chars", type=int)
    ap.add_argument("--max-tokens", type=int, help="needs a tokenizer model (default one, or --spm)")
    ap.add_argument("--spm", help="sentencepiece model for token lengths (default: the repo's tokenizer.model)")
    ap.add_argument("--valid", type=float, default=0.05)
    ap.add_argument("--test", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        encode, missing = length_encoder(args.spm)
        if missing and args.max_tokens is not None:
            ap.error(f"--max-tokens needs a tokenizer model, pass --spm MODEL: {missing}")
        if missing:
            print(f"note: lengths below are in characters, not tokens (pass --spm MODEL for tokens): {missing}")
        paths, _ = build_dataset(args.root, args.out, encode, args.codexglue, args.apps, args.max_chars,
                                 args.max_tokens, args.valid, args.test, args.seed, use_root=not args.no_root)
    except (DataError, OSError) as e:  # OSError: a missing --codexglue/--apps/--spm file, an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, p in paths.items():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

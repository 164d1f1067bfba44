"""Build, or verify, the zip graded for the Mini-Llama assignment (standard library only).

    python prepare_submit.py --name SURNAME1_SURNAME2 [--dir .] [--out SURNAME1_SURNAME2.zip]
    python prepare_submit.py --check SURNAME1_SURNAME2.zip [--name SURNAME1_SURNAME2] [--data_dir data]

The zip holds a single folder named after --name with every file of the assignment's "Submission" list,
plus the project's other top-level .py files and requirements.txt. Checkpoints, data/, tests/, bench/,
codegen/, caches and other zips never go in. A build with files missing writes nothing and lists, for
each missing file, how to produce it. Every <data>-<split>-<setting>-output.txt is compared with its
data file (--data_dir, default <dir>/data): one line per example, the same sentences in the same order,
predicted labels among the label-mapping's. Exit status: 0 ok, 1 missing or malformed files, 2 bad usage.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCES = ("run_llama.py", "base_llama.py", "llama.py", "rope.py", "lora.py", "classifier.py", "config.py",
           "optimizer.py", "sanity_check.py", "tokenizer.py", "utils.py")
DOCS = ("README.md", "structure.md", "checklist.md")
GENERATED = ("generated-sentence-temp-0.txt", "generated-sentence-temp-1.txt")
SETTINGS = {"prompting": "prompt", "finetuning": "finetune", "lora": "lora"}  # file word -> --option
OUTPUTS = tuple(f"{data}-{split}-{setting}-output.txt"
                for data in ("sst", "cfimdb") for setting in SETTINGS for split in ("dev", "test"))
REQUIRED = SOURCES + DOCS + ("sanity_check.data", "setup.sh") + GENERATED + OUTPUTS
EXTRAS = ("requirements.txt",)  # taken along when present
FORBIDDEN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".zip")
FORBIDDEN_DIRS = {".git", "__pycache__", "data", "tests", "bench", "codegen"}
NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
OUTPUT_RE = re.compile(r"(?P<data>sst|cfimdb)-(?P<split>dev|test)-(?P<setting>prompting|finetuning|lora)-output\.txt")
LINE_RE = re.compile(r"-?\d+ \|\|\|(?: .*)?")
BATCH_SIZE = {"sst": 80, "cfimdb": 10}  # fine-tuning batch sizes of the reference commands (SPEC section 4)


def reference_command(data: str, setting: str) -> str:
    """The SPEC section 4 command that writes <data>-{dev,test}-<setting>-output.txt."""
    option = SETTINGS[setting]
    if option == "prompt":
        flags = "--batch_size 10"
    else:
        flags = f"--epochs 5 --lr 2e-5 --batch_size {BATCH_SIZE[data]}"
    cmd = (f"python run_llama.py --option {option} {flags} --train data/{data}-train.txt "
           f"--dev data/{data}-dev.txt --test data/{data}-test.txt --label-names data/{data}-label-mapping.json "
           f"--dev_out {data}-dev-{setting}-output.txt --test_out {data}-test-{setting}-output.txt")
    return cmd + (" --lora_rank 4 --lora_alpha 1.0" if option == "lora" else "")


def how_to_produce(name: str) -> str:
    """One line of advice on producing a required file."""
    match = OUTPUT_RE.fullmatch(name)
    if match:
        return f"run `{reference_command(match['data'], match['setting'])}`"
    if name in GENERATED:
        return "run `python run_llama.py --option generate`"
    if name == "sanity_check.data":
        return "run `bash setup.sh` (it places the course's reference tensors)"
    if name in DOCS:
        return "write it (project documentation; see the assignment README)"
    return "restore it: it is part of the project (see SPEC section 2)"


def missing_message(src: Path, missing) -> str:
    """A single error listing every missing file, grouped by the step that produces it."""
    steps = {}
    for name in missing:
        steps.setdefault(how_to_produce(name), []).append(name)
    lines = [f"prepare_submit: {len(missing)} required file(s) missing from {src}; no zip written."]
    for advice, names in steps.items():
        lines.append(f"  - {', '.join(names)}\n      {advice}")
    if any("run_llama.py" in advice for advice in steps):
        lines.append("Add --use_gpu to the run_llama.py commands to use a GPU; prompt, finetune, lora and generate "
                     "need stories42M.pt (see setup.sh).")
    return "\n".join(lines)


def content_problems(name: str, data: bytes):
    """What is wrong with the contents of an output or generated-sentence file (nothing for other files)."""
    if name not in OUTPUTS and name not in GENERATED:
        return []
    if not data.strip():
        return [f"{name}: empty"]
    if name in GENERATED:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return [f"{name}: not UTF-8 ({err})"]
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not LINE_RE.fullmatch(line.rstrip("\r")):
            return [f"{name}: line {number} is not `<int> ||| <text>`: {line[:80]!r}"]
    return []


def _sentences(text: str):
    """[(label text, sentence)] of `label ||| sentence` lines."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [(label.strip(), sentence.strip()) for label, _, sentence in (l.rstrip("\r").partition(" |||") for l in lines)]


def data_problems(name: str, data: bytes, data_dir: Path):
    """An output file against the data file it was made from (nothing when that file is not in data_dir):
    the same number of lines, the same sentences in order, labels the label-mapping file allows."""
    match = OUTPUT_RE.fullmatch(name)
    source = data_dir / f"{match['data']}-{match['split']}.txt" if match else None
    if source is None or not source.is_file():
        return []
    try:
        output, expected = _sentences(data.decode("utf-8")), _sentences(source.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        return [f"{name}: not UTF-8 ({err})"]
    if len(output) != len(expected):
        return [f"{name}: {len(output)} lines, but {source} has {len(expected)}: the output must cover every example "
                f"of the file, in order ({how_to_produce(name)})"]
    for number, ((_, got), (_, want)) in enumerate(zip(output, expected), 1):
        if got != want:
            return [f"{name}: line {number}'s sentence is not {source}'s line {number} (made from another data "
                    f"file, or reordered?): {got[:60]!r} vs {want[:60]!r}"]
    mapping = data_dir / f"{match['data']}-label-mapping.json"
    try:
        labels = len(json.loads(mapping.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return []
    bad = [number for number, (label, _) in enumerate(output, 1) if not 0 <= int(label) < labels]
    return [f"{name}: line {bad[0]}: label outside 0..{labels - 1} ({mapping})"] if bad else []


def is_forbidden(relpath: str) -> bool:
    """True for checkpoints, zips, and anything inside .git, __pycache__, data/, tests/, bench/, codegen/."""
    parts = relpath.rstrip("/").split("/")
    return bool(FORBIDDEN_DIRS.intersection(parts[:-1])) or parts[-1] in FORBIDDEN_DIRS \
        or parts[-1].lower().endswith(FORBIDDEN_SUFFIXES)


def submission_files(src: Path):
    """Required files, then the other top-level .py files and EXTRAS present in src, sorted."""
    optional = {p.name for p in src.iterdir()
                if p.is_file() and (p.suffix == ".py" or p.name in EXTRAS) and not p.name.startswith(".")}
    return list(REQUIRED) + sorted(n for n in optional - set(REQUIRED) if not is_forbidden(n))


def write_zip(src: Path, files, name: str, out: Path) -> None:
    """Write the zip to a temporary file beside out, then move it into place (never half-written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:
            zf.mkdir(name)
            for file in files:
                zf.write(src / file, f"{name}/{file}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(src: Path, name: str, out: Path, data_dir: Path) -> int:
    """Check src, write the zip, then verify it. Returns the exit status."""
    if not src.is_dir():
        print(f"prepare_submit: {src} is not a directory", file=sys.stderr)
        return 1
    missing = [f for f in REQUIRED if not (src / f).is_file()]
    if missing:
        print(missing_message(src, missing), file=sys.stderr)
        return 1
    problems = [p for f in OUTPUTS + GENERATED for p in content_problems(f, (src / f).read_bytes())]
    problems = problems or [p for f in OUTPUTS for p in data_problems(f, (src / f).read_bytes(), data_dir)]
    if problems:
        print("prepare_submit: malformed files; no zip written:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    write_zip(src, submission_files(src), name, out)
    print(f"wrote {out}")
    return check_zip(out, name, data_dir)


def layout_problems(names, expect_name=None):
    """Problems with the zip's layout: top-level folders, stray files, unsafe or forbidden entries."""
    problems = [f"unsafe path: {n}" for n in names if n.startswith("/") or ".." in n.split("/")]
    tops = sorted({n.split("/", 1)[0] for n in names})
    loose = [n for n in names if "/" not in n]
    if loose:
        problems.append(f"files outside the submission folder: {', '.join(loose)}")
    if len(tops) != 1:
        problems.append(f"expected exactly one top-level folder, found {len(tops)}: {', '.join(tops) or '(none)'}")
    elif expect_name and tops[0] != expect_name:
        problems.append(f"top-level folder is {tops[0]!r}, expected {expect_name!r}")
    problems += [f"must not be submitted: {n}" for n in names if "/" in n and is_forbidden(n.split("/", 1)[1])]
    return problems


def check_zip(path: Path, expect_name=None, data_dir: Path = Path("data")) -> int:
    """Verify an existing submission zip, print its files and any problems. Returns the exit status."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        print(f"prepare_submit: cannot read {path}: {err}", file=sys.stderr)
        return 1
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        names = [i.filename for i in zf.infolist()]
        problems = layout_problems(names, expect_name)
        tops = {n.split("/", 1)[0] for n in names}
        top = tops.pop() if len(tops) == 1 else None
        for required in REQUIRED if top else ():
            entry = f"{top}/{required}"
            if entry not in names:
                problems.append(f"missing: {required} ({how_to_produce(required)})")
            else:
                found = content_problems(required, zf.read(entry))
                problems += found or data_problems(required, zf.read(entry), data_dir)
    print(f"{path}: {len(infos)} files")
    if not data_dir.is_dir():
        print(f"note: {data_dir} not found: outputs not compared with their data files (pass --data_dir)")
    for info in infos:
        print(f"  {info.file_size:>10}  {info.filename}")
    if problems:
        print(f"prepare_submit: {path} is NOT a valid submission:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


def parse_args(argv):
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=".", type=Path, help="project folder holding the files (default .)")
    parser.add_argument("--name", help="submission folder name, e.g. SURNAME1_SURNAME2 (letters, digits, _ and -)")
    parser.add_argument("--out", type=Path, help="zip to write (default <dir>/<name>.zip)")
    parser.add_argument("--check", type=Path, metavar="ZIP", help="verify an existing zip instead of building one")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="the data files the outputs are compared with (default <dir>/data)")
    args = parser.parse_args(argv)
    if args.name is not None and not NAME_RE.fullmatch(args.name):
        parser.error(f"--name {args.name!r} may contain only letters, digits, '_' and '-' (e.g. SMITH_JONES)")
    if args.check is None and args.name is None:
        parser.error("--name is required to build a submission, e.g. --name SURNAME1_SURNAME2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or args.dir / "data"
    if args.check is not None:
        return check_zip(args.check, args.name, data_dir)
    return build(args.dir, args.name, args.out or args.dir / f"{args.name}.zip", data_dir)


if __name__ == "__main__":
    sys.exit(main())

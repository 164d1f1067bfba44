"""prepare_submit.py builds the graded zip (one folder, every required file) and verifies existing zips."""
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT
import prepare_submit

NAME = "DOE_ROE"


def run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "prepare_submit.py"), *args],
                          cwd=cwd, capture_output=True, text=True)


def make_project(root, skip=()):
    """A fake project: every required file (minus skip), extras, and things that must stay out."""
    root.mkdir(exist_ok=True)
    for name in prepare_submit.REQUIRED:
        if name in skip:
            continue
        if name.endswith("-output.txt"):
            text = "3 ||| a fine film .\n0 ||| dull .\n"
        elif name.startswith("generated-sentence"):
            text = "Victor Frankenstein ... a pile of toys.\n"
        else:
            text = f"# {name}\n"
        (root / name).write_text(text)
    (root / "prepare_submit.py").write_text("# extra top-level module\n")
    (root / "requirements.txt").write_text("torch\n")
    (root / "stories42M.pt").write_bytes(b"\0" * 16)
    (root / "model.bin").write_bytes(b"\0" * 16)
    (root / "old.zip").write_bytes(b"PK")
    for folder in ("data", "tests", "bench", "codegen", "__pycache__", ".git"):
        (root / folder).mkdir()
        (root / folder / "inner.py").write_text("x = 1\n")
    for data in ("sst", "cfimdb"):   # the data files the outputs were made from
        for split in ("dev", "test"):
            (root / "data" / f"{data}-{split}.txt").write_text("4 ||| a fine film .\n1 ||| dull .\n")
        (root / "data" / f"{data}-label-mapping.json").write_text('["0", "1", "2", "3", "4"]')
    return root


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    return path


def valid_entries(top=NAME):
    return {f"{top}/{n}": "1 ||| ok\n" for n in prepare_submit.REQUIRED}


def test_build_zip_has_one_folder_with_every_file(tmp_path):
    src = make_project(tmp_path / "proj")
    result = run("--dir", str(src), "--name", NAME, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(src / f"{NAME}.zip") as zf:
        names = zf.namelist()
        assert zf.read(f"{NAME}/llama.py") == b"# llama.py\n"
    assert {n.split("/")[0] for n in names} == {NAME}
    files = {n.split("/", 1)[1] for n in names if not n.endswith("/")}
    assert files == set(prepare_submit.REQUIRED) | {"prepare_submit.py", "requirements.txt"}
    assert len(prepare_submit.OUTPUTS) == 12
    assert run("--check", str(src / f"{NAME}.zip"), cwd=tmp_path).returncode == 0
    assert run("--check", str(src / f"{NAME}.zip"), "--name", "OTHER", cwd=tmp_path).returncode == 1


def test_out_option(tmp_path):
    src = make_project(tmp_path / "proj")
    result = run("--dir", str(src), "--name", NAME, "--out", "sub/x.zip", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sub" / "x.zip").is_file()
    assert not list(src.glob(f"{NAME}.zip"))


def test_missing_files_listed_with_advice_and_no_zip(tmp_path):
    skip = ("classifier.py", "sst-dev-lora-output.txt", "sst-test-lora-output.txt",
            "cfimdb-dev-prompting-output.txt", "generated-sentence-temp-1.txt", "sanity_check.data")
    src = make_project(tmp_path / "proj", skip=skip)
    result = run("--dir", str(src), "--name", NAME, cwd=tmp_path)
    assert result.returncode == 1
    for name in skip:
        assert name in result.stderr
    assert "--option lora" in result.stderr and "--lora_rank 4 --lora_alpha 1.0" in result.stderr
    assert "--dev_out sst-dev-lora-output.txt" in result.stderr
    assert "--option prompt --batch_size 10" in result.stderr and "cfimdb-label-mapping.json" in result.stderr
    assert "--option generate" in result.stderr and "setup.sh" in result.stderr
    assert sorted(p.name for p in src.iterdir() if ".zip" in p.name) == ["old.zip"]


def test_malformed_output_blocks_build(tmp_path):
    src = make_project(tmp_path / "proj")
    (src / "sst-dev-finetuning-output.txt").write_text("3 ||| ok\nnot a prediction\n")
    result = run("--dir", str(src), "--name", NAME, cwd=tmp_path)
    assert result.returncode == 1
    assert "sst-dev-finetuning-output.txt: line 2" in result.stderr
    assert not (src / f"{NAME}.zip").exists()


@pytest.mark.parametrize("name", ["bad name", "a/b", "x.y", "Müller", ""])
def test_bad_name_rejected(tmp_path, name):
    src = make_project(tmp_path / "proj")
    result = run("--dir", str(src), "--name", name, cwd=tmp_path)
    assert result.returncode != 0
    assert "--name" in result.stderr
    assert not (src / f"{name}.zip").exists()


def test_missing_name_rejected(tmp_path):
    result = run("--dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "--name is required" in result.stderr


def test_check_catches_malformed_output_line(tmp_path):
    entries = valid_entries()
    assert run("--check", str(make_zip(tmp_path / "ok.zip", entries)), cwd=tmp_path).returncode == 0
    entries[f"{NAME}/cfimdb-test-lora-output.txt"] = "1 ||| fine\npositive ||| oops\n"
    result = run("--check", str(make_zip(tmp_path / "bad.zip", entries)), cwd=tmp_path)
    assert result.returncode == 1
    assert "cfimdb-test-lora-output.txt: line 2" in result.stderr


def test_check_catches_empty_output(tmp_path):
    entries = valid_entries()
    entries[f"{NAME}/sst-test-prompting-output.txt"] = ""
    result = run("--check", str(make_zip(tmp_path / "bad.zip", entries)), cwd=tmp_path)
    assert result.returncode == 1 and "sst-test-prompting-output.txt: empty" in result.stderr


def test_check_catches_two_top_level_folders(tmp_path):
    entries = valid_entries()
    entries["OTHER/README.md"] = "x"
    result = run("--check", str(make_zip(tmp_path / "two.zip", entries)), cwd=tmp_path)
    assert result.returncode == 1
    assert "exactly one top-level folder" in result.stderr


def test_check_catches_missing_file_and_checkpoint(tmp_path):
    entries = valid_entries()
    del entries[f"{NAME}/rope.py"]
    entries[f"{NAME}/stories42M.pt"] = "x"
    result = run("--check", str(make_zip(tmp_path / "bad.zip", entries)), cwd=tmp_path)
    assert result.returncode == 1
    assert "missing: rope.py" in result.stderr and "stories42M.pt" in result.stderr


def test_required_files_are_the_guides_list():
    """Written out here, not read from prepare_submit: a file dropped from its list must fail a test."""
    sources = {"run_llama.py", "base_llama.py", "llama.py", "rope.py", "lora.py", "classifier.py", "config.py",
               "optimizer.py", "sanity_check.py", "tokenizer.py", "utils.py"}
    outputs = {f"{data}-{split}-{setting}-output.txt" for data in ("sst", "cfimdb")
               for setting in ("prompting", "finetuning", "lora") for split in ("dev", "test")}
    expected = sources | outputs | {"README.md", "structure.md", "checklist.md", "sanity_check.data", "setup.sh",
                                    "generated-sentence-temp-0.txt", "generated-sentence-temp-1.txt"}
    assert set(prepare_submit.REQUIRED) == expected and len(outputs) == 12


def test_check_catches_an_empty_zip(tmp_path):
    result = run("--check", str(make_zip(tmp_path / "empty.zip", {})), cwd=tmp_path)
    assert result.returncode == 1 and "exactly one top-level folder" in result.stderr


@pytest.mark.parametrize("line", ["1 |||no space", "12x ||| text", "+1 ||| text"])
def test_check_wants_the_whole_line_in_the_format(tmp_path, line):
    entries = valid_entries()
    entries[f"{NAME}/sst-dev-lora-output.txt"] = line + "\n"
    result = run("--check", str(make_zip(tmp_path / "bad.zip", entries)), cwd=tmp_path)
    assert result.returncode == 1 and "sst-dev-lora-output.txt: line 1" in result.stderr


def test_check_unreadable_zip(tmp_path):
    (tmp_path / "junk.zip").write_text("not a zip")
    assert run("--check", str(tmp_path / "junk.zip"), cwd=tmp_path).returncode == 1


def test_reference_commands_match_spec():
    assert prepare_submit.reference_command("sst", "finetuning") == (
        "python run_llama.py --option finetune --epochs 5 --lr 2e-5 --batch_size 80 --train data/sst-train.txt "
        "--dev data/sst-dev.txt --test data/sst-test.txt --label-names data/sst-label-mapping.json "
        "--dev_out sst-dev-finetuning-output.txt --test_out sst-test-finetuning-output.txt")
    assert "--batch_size 10" in prepare_submit.reference_command("cfimdb", "lora")


def test_setup_sh_works_inside_the_submitted_folder(tmp_path):
    """Graders run the zip's setup.sh: it installs the course's four packages only (requirements.txt;
    requirements-dev.txt is not shipped) and places the assets. pip and curl are stand-ins here."""
    from conftest import find_asset

    assets = find_asset("tokenizer.model")
    if assets is None:
        pytest.skip("the assets are needed (run `bash setup.sh`)")
    folder = tmp_path / NAME
    folder.mkdir()
    for name in ("setup.sh", "requirements.txt"):
        (folder / name).write_bytes((ROOT / name).read_bytes())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"
    (bin_dir / "fake-python").write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                                         f'case "$*" in *-r*) cat >> {log};; esac\n')
    (bin_dir / "curl").write_text("#!/bin/sh\nexit 7\n")  # offline
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "fake-python"),
           "MINILLAMA_ASSETS": str(assets.parent), "HOME": str(tmp_path)}
    result = subprocess.run(["bash", "setup.sh"], cwd=folder, env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "setup: done" in result.stdout
    installed = [line.split("==")[0] for line in log.read_text().splitlines()
                 if line and not line.startswith(("#", "-m "))]
    assert sorted(installed) == ["numpy", "sentencepiece", "tqdm"]  # torch comes from $TORCH_SPEC
    assert "-m pip install -q torch==2.13.0" in log.read_text()
    assert "requirements-dev" not in log.read_text()
    assert (folder / "tokenizer.model").is_file() and (folder / "data" / "sst-dev.txt").is_file()


def test_outputs_are_compared_with_their_data_files(tmp_path):
    """An output made from a slice of the data, from another data file, or with labels the mapping
    does not have is refused, naming the file and line; a correct one passes."""
    data = tmp_path / "data"
    data.mkdir()
    sentences = [f"sentence number {i} ." for i in range(100)]
    for name in ("sst-dev", "sst-test", "cfimdb-dev", "cfimdb-test"):
        (data / f"{name}.txt").write_text("".join(f"1 ||| {x}\n" for x in sentences))
    (data / "sst-label-mapping.json").write_text('["a", "b", "c", "d", "e"]')
    (data / "cfimdb-label-mapping.json").write_text('["neg", "pos"]')
    entries = {f"{NAME}/{n}": "1 ||| ok\n" for n in prepare_submit.REQUIRED}
    for name in prepare_submit.OUTPUTS:
        entries[f"{NAME}/{name}"] = "".join(f"0 ||| {x}\n" for x in sentences)
    good = run("--check", str(make_zip(tmp_path / "good.zip", entries)), cwd=tmp_path)
    assert good.returncode == 0, good.stderr

    bad = {
        "slice": "".join(f"0 ||| {x}\n" for x in sentences[:40]),
        "other": "".join(f"0 ||| {x}\n" for x in sentences[1:] + ["another data set ."]),
        "label": "".join(f"4 ||| {x}\n" for x in sentences),
    }
    expected = {"slice": "40 lines, but data/cfimdb-dev.txt has 100",
                "other": "line 1's sentence is not data/cfimdb-dev.txt's line 1",
                "label": "line 1: label outside 0..1"}
    for kind, text in bad.items():
        zipped = make_zip(tmp_path / f"{kind}.zip", {**entries, f"{NAME}/cfimdb-dev-lora-output.txt": text})
        result = run("--check", str(zipped), cwd=tmp_path)
        assert result.returncode == 1 and expected[kind] in result.stderr, (kind, result.stderr)
    elsewhere = run("--check", str(tmp_path / "slice.zip"), "--data_dir", str(data), cwd=ROOT)
    assert elsewhere.returncode == 1
    no_data = run("--check", str(tmp_path / "slice.zip"), cwd=ROOT / "tests")
    assert no_data.returncode == 0 and "not compared" in no_data.stdout


def test_build_refuses_an_output_made_from_a_slice(tmp_path):
    src = make_project(tmp_path / "proj")
    (src / "sst-test-finetuning-output.txt").write_text("3 ||| a fine film .\n")
    result = run("--dir", str(src), "--name", NAME, cwd=tmp_path)
    assert result.returncode == 1 and "1 lines, but" in result.stderr
    assert not (src / f"{NAME}.zip").exists()

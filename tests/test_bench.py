"""The benchmarks run end to end: tiny smoke runs whose last output line is the JSON summary."""
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from conftest import ROOT, asset_path


def test_decode_bench_tiny_json():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--tiny", "--json", "--threads", "1",
                           "--no-hf"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert "no cache (reference)" in proc.stdout and "speed-up" in proc.stdout  # the table came first
    rows = result["results"]
    assert {r["batch"] for r in rows} == {1, 4}
    assert {r["variant"] for r in rows} >= {"no cache (reference)", "KV cache", "KV cache + sdpa"}
    for row in rows:
        assert row["tok_per_s"] > 0 and row["timed_tokens"] == row["new_tokens"] == 16
        assert row["same_tokens"] == "yes", row  # cache, sdpa and reference agree on greedy tokens
    assert all(r["speedup"] == 1.0 for r in rows if r["variant"] == "no cache (reference)")


def test_decode_bench_reference_tokens_note():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--tiny", "--json", "--threads", "1",
                           "--no-hf", "--batch_sizes", "2", "--reference-tokens", "4"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    reference = [r for r in result["results"] if r["variant"] == "no cache (reference)"]
    assert [r["timed_tokens"] for r in reference] == [4]
    assert any("first 4 of 16" in note for note in result["notes"])


def test_train_bench_tiny_json():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--tiny", "--json", "--steps", "1",
                           "--shapes", "sst", "--variants", "full-fp32,lora-fast"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert [r["variant"] for r in rows] == ["full-fp32", "lora-fast"]
    full, lora = rows
    assert full["speedup"] == 1.0 and full["memory_ratio"] == 1.0
    assert 0 < lora["trainable"] < full["trainable"] and lora["tokens_per_s"] > 0 and lora["peak_mb"] > 0
    mb = 2**20
    assert full["accounted_mb"]["weights"] * mb == full["trainable"] * 4  # tied embedding counted once
    for row in rows:  # float32 gradients and AdamW's two moments for every trainable weight
        assert row["accounted_mb"]["grads"] * mb == row["trainable"] * 4
        assert row["accounted_mb"]["adamw_state"] * mb >= 2 * row["trainable"] * 4
        assert row["accounted_mb"]["activations"] > 0
    assert lora["accounted_ratio"] < 1.0


def test_storage_bytes_counts_each_storage_once():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    storage_bytes = bench_train.storage_bytes
    a, b = torch.zeros(10, 10), torch.zeros(3, dtype=torch.float64)
    assert storage_bytes([a, a[2:], a.t(), b]) == 400 + 24
    assert storage_bytes([a, b], exclude=[a[1]]) == 24


def test_train_bench_compiled_variant():
    """torch.compile of the whole classifier (LoRA inside) trains under bf16 autocast; here on the CPU."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--tiny", "--json", "--steps", "1",
                           "--shapes", "sst", "--variants", "full-fp32,lora-bf16-compile"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    full, compiled = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert compiled["variant"] == "lora-bf16-compile" and compiled["tokens_per_s"] > 0
    assert compiled["accounted_mb"] is None and compiled["trainable"] < full["trainable"]


def load_runc():
    spec = importlib.util.spec_from_file_location("bench_runc", ROOT / "bench" / "runc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STAND_IN = """#!{python}
import struct, sys
model, flags = sys.argv[1], dict(zip(sys.argv[2::2], sys.argv[3::2]))
assert set(flags) == {{"-t", "-n", "-z"}} and flags["-t"] == "0", sys.argv
header = struct.unpack("7i", open(model, "rb").read(28))
assert header[0] == 64 and header[5] == -256, header  # dim 64; negative vocab: untied output
print("not what the model says")
print("achieved tok/s: 51.500000", file=sys.stderr)
"""


def test_runc_bench_with_a_stand_in_for_run_c(tmp_path):
    fake = tmp_path / "run"
    fake.write_text(STAND_IN.format(python=sys.executable))
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "runc.py"), "--run", str(fake), "--tiny", "--json",
                           "--threads", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = {r["program"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["results"]}
    assert rows["run.c"]["tok_per_s"] == 51.5 and rows["run.c"]["same_text"] == "yes"
    for name in ("Mini-Llama, KV cache", "Mini-Llama, KV cache + sdpa"):
        assert rows[name]["same_text"].startswith("no (from byte ") and rows[name]["same_text"].endswith(" of 23)")
        assert rows[name]["vs_runc"] == rows[name]["tok_per_s"] / 51.5


def test_runc_bench_needs_an_executable(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "runc.py"), "--run", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "not an executable file; build run.c first" in proc.stderr


def test_runc_tokenizer_bin_has_llama2c_layout(tmp_path):
    """Parsed here byte by byte: int32 max length, then (float32 score, int32 length, bytes) per token."""
    model = asset_path("tokenizer.model")
    load_runc().write_tokenizer_bin(model, 300, tmp_path / "tokenizer.bin")
    sp = SentencePieceProcessor(model_file=str(model))
    data, offset, lengths = (tmp_path / "tokenizer.bin").read_bytes(), 4, []
    for i in range(300):
        score, n = struct.unpack_from("<fi", data, offset)
        piece = data[offset + 8 : offset + 8 + n].decode()
        expected = {1: "\n<s>\n", 2: "\n</s>\n"}.get(i, sp.id_to_piece(i).replace("\u2581", " "))
        assert (piece, score) == (expected, sp.get_score(i)), i
        offset, lengths = offset + 8 + n, lengths + [n]
    assert offset == len(data) and struct.unpack_from("<i", data)[0] == max(lengths)


def test_runc_text_follows_run_c_printing():
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"<0x0A>", b"<0x41>", b"<0xE2>", b"<0x07>", b" Hello", b" world", b"!",
              b"<0x7F>", b"<0x20>", b"<0x7E>"]
    text = load_runc().runc_text(pieces, [7, 8, 9, 3, 4, 5, 6, 10, 11, 12, 7, 1, 8])
    # leading space dropped after BOS only; printable ASCII (0x20-0x7E) and whitespace bytes kept, others
    # (0xE2, BEL, DEL) dropped; stop at BOS
    assert text == b"Hello world!\nA ~ Hello"


@pytest.mark.skipif(not os.environ.get("MINILLAMA_RUNC"), reason="set MINILLAMA_RUNC to a run binary built from "
                                                                  "llama2.c's run.c to compare with it")
def test_runc_prints_the_same_text_as_mini_llama():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "runc.py"), "--run", os.environ["MINILLAMA_RUNC"],
                           "--tiny", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert all(r["same_text"] == "yes" for r in json.loads(proc.stdout.strip().splitlines()[-1])["results"])


def test_hf_bench_tiny_json(tmp_path):
    """bench/hf.py at a tiny shape: it writes a HF folder, loads it, decodes beside transformers (same
    tokens) and takes LoRA steps, each phase in its own process."""
    pytest.importorskip("transformers", reason="bench/hf.py compares with transformers")
    pytest.importorskip("safetensors", reason="bench/hf.py writes safetensors")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "hf.py"), "--shape", "tiny", "--folder",
                           str(tmp_path / "m"), "--json", "--threads", "1", "--steps", "1", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["load"]["parameters"] == 106816 and result["load"]["peak_bytes"] > 0
    assert result["decode"]["same_tokens"] is True and result["decode"]["ours_tok_s"] > 0
    assert result["lora_step"]["trainable_parameters"] == 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))  # q,k,v,o
    assert result["full_finetune_need_bytes"] == 16 * 106816

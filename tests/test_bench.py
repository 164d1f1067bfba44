"""The benchmarks run end to end: tiny smoke runs whose last output line is the JSON summary."""
import importlib.util
import json
import subprocess
import sys

import torch

from conftest import ROOT


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

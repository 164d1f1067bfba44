"""Tests for quantize.py: NF4 and the 8-bit dynamic map against their published definitions and, bit for bit,
against bitsandbytes (a test-only reference: those tests skip when it does not import); the quantized layers
against dequantize-then-F.linear; quantize_model on a Llama; QLoRA training from the command line (--quantize,
--optim), its resume and its refusals."""
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, asset_path
from helpers import code_training_files, codegen_cli, lively_model
from lora import inject_lora, lora_layers, mark_only_lora_trainable, merged_state_dict
from quantize import (CODE_BOOKS, NF4_LEVELS, Int8Linear, NF4Linear, dequantize_blockwise, dequantize_model,
                      dynamic_map, int8_dequantize, int8_quantize, model_bytes, nf4_dequantize, nf4_quantize,
                      quantize_blockwise, quantize_model, quantized_layers)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(128, 64), (37, 51), (300, 333), (7,)]  # the last three: sizes that are no multiple of 64, odd ones
DQ_SHAPES = SHAPES[:3] + [(130, 1001)]  # several absmax blocks (one block minus its mean is all zeros)


def bnb_functional():
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install -r requirements-dev.txt): no reference to compare with")
    import bitsandbytes.functional

    return bitsandbytes.functional


def gaussian(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# the code books and block-wise quantization


def test_nf4_levels_are_the_normal_quantiles_of_qlora():
    """QLoRA's construction: 8 positive quantiles of N(0, 1) at linspace(p, 1/2, 9)[:-1], 7 negative ones at
    linspace(p, 1/2, 8)[:-1], p = 0.9677083, and 0; normalised by the largest."""
    p = 0.9677083
    positive = torch.special.ndtri(torch.linspace(p, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(p, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(NF4_LEVELS.double(), levels / levels.max(), atol=2e-7, rtol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape(signed):
    levels = dynamic_map(signed)
    assert levels.shape == (256,) and levels.dtype == torch.float32
    assert torch.all(levels[1:] > levels[:-1])  # sorted, no level twice
    assert levels.max() == 1 and (levels == 0).sum() == 1
    assert levels.min() == (-levels[levels < 1].max() if signed else 0)
    positive = levels[levels > 0]
    assert 1e-7 < positive.min() < 1e-6  # magnitudes down to 1e-7: 7 decades
    assert len(positive) == (128 if signed else 255)  # 1 + 127 with a sign; 1 + 254 without


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    F_bnb = bnb_functional()
    assert torch.equal(dynamic_map(signed), F_bnb.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("book", ["nf4", "dynamic", "udynamic"])
@pytest.mark.parametrize("n", [256 * 4, 1000])
def test_blockwise_codes_are_the_nearest_level(book, n):
    """Property: every code is the level nearest to value / its block's absmax (brute force over all levels),
    and dequantization gives level * absmax."""
    x = gaussian(n, seed=n) ** (2 if book == "udynamic" else 1)
    codes, absmax = quantize_blockwise(x, book, 256)
    levels = CODE_BOOKS[book]
    blocks = torch.nn.functional.pad(x, (0, -n % 256)).view(-1, 256)
    torch.testing.assert_close(absmax, blocks.abs().amax(1), atol=0, rtol=0)
    scaled = (blocks / absmax[:, None]).reshape(-1)[:n]
    distance = (scaled[:, None] - levels[None, :]).abs()
    chosen = distance.gather(1, codes.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= distance.min(dim=1).values + 1e-7)
    expected = levels[codes.long()] * absmax.repeat_interleave(256)[:n]
    torch.testing.assert_close(dequantize_blockwise(codes, absmax, book, 256), expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# NF4 against bitsandbytes


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_is_bit_identical_to_bitsandbytes(shape):
    F_bnb = bnb_functional()
    w = gaussian(shape)
    packed, absmax = nf4_quantize(w)
    ref_packed, state = F_bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(w.numel() / 2),)
    assert torch.equal(packed, ref_packed.flatten())  # the same codes, the same nibble order
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(nf4_dequantize(packed, absmax, shape), F_bnb.dequantize_4bit(ref_packed, state))


def test_nf4_nibble_order_and_padding():
    """The first value of each pair in the high nibble; an odd count padded with the code of 0."""
    w = torch.tensor([1.0, -1.0, 0.0])
    packed, absmax = nf4_quantize(w)
    assert packed.tolist() == [(15 << 4) | 0, (7 << 4) | 7] and absmax.tolist() == [1.0]


@pytest.mark.parametrize("shape", DQ_SHAPES)
def test_nf4_double_quant_matches_bitsandbytes(shape):
    """compress_statistics=True: the same 4-bit codes, mean offset and absmax scales; the 8-bit absmax codes
    agree except where bitsandbytes' CPU kernel (an approximate binary search) takes a neighbour of the nearest
    level; each such code differs by one and ours is the nearer. Either state, dequantized by the other
    library, gives the same weights within 1e-6, and so do both quantizations wherever their codes agree."""
    F_bnb = bnb_functional()
    w = gaussian(shape, seed=1)
    packed, (codes, scales, offset) = nf4_quantize(w, double_quant=True)
    ref_packed, state = F_bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref_packed.flatten())
    assert torch.equal(scales, state.state2.absmax) and torch.equal(offset, state.offset)
    differ = codes != state.absmax
    assert differ.float().mean() < 0.01
    _, absmax = nf4_quantize(w)
    scaled = ((absmax - offset) / scales.repeat_interleave(256)[: absmax.numel()])[differ]
    ours, theirs = CODE_BOOKS["dynamic"][codes[differ].long()], CODE_BOOKS["dynamic"][state.absmax[differ].long()]
    assert torch.all((codes[differ].int() - state.absmax[differ].int()).abs() == 1)
    assert torch.all((ours - scaled).abs() <= (theirs - scaled).abs())
    reference = F_bnb.dequantize_4bit(ref_packed, state)
    theirs_by_us = nf4_dequantize(packed, (state.absmax, scales, offset), shape)
    torch.testing.assert_close(theirs_by_us, reference, atol=1e-6, rtol=0)
    ours_dequantized = nf4_dequantize(packed, (codes, scales, offset), shape)
    state.absmax = codes
    torch.testing.assert_close(F_bnb.dequantize_4bit(ref_packed, state), ours_dequantized, atol=1e-6, rtol=0)
    same_blocks = (~differ).repeat_interleave(64)[: w.numel()].view(shape)
    torch.testing.assert_close(ours_dequantized[same_blocks], reference[same_blocks], atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", DQ_SHAPES)
def test_double_quant_codes_equal_bitsandbytes_reference_path(shape):
    """bitsandbytes has two CPU implementations of the 8-bit block-wise quantization double quantization
    uses: a C kernel for float32 (an approximate search, the one quantize_4bit calls) and a torch path for
    other dtypes (an exact argmin over the code book, computed in float32 as well). Ours equals the torch
    path bit for bit, codes and scales, so the absmax codes where the kernel differs are its approximation."""
    F_bnb = bnb_functional()
    w = gaussian(shape, seed=1)
    _, (codes, scales, offset) = nf4_quantize(w, double_quant=True)
    _, absmax = nf4_quantize(w)
    ref_codes, ref_scales = torch.ops.bitsandbytes.quantize_blockwise((absmax - offset).double(),
                                                                      F_bnb.create_dynamic_map(signed=True), 256)
    assert torch.equal(codes, ref_codes.flatten()) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantization_error_on_gaussian_weights_equals_bitsandbytes(double_quant):
    F_bnb = bnb_functional()
    w = gaussian((512, 256), seed=2) * 0.02
    ours = nf4_dequantize(*nf4_quantize(w, double_quant=double_quant), w.shape)
    theirs = F_bnb.dequantize_4bit(*F_bnb.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                        compress_statistics=double_quant))
    error, reference_error = (ours - w).norm() / w.norm(), (theirs - w).norm() / w.norm()
    assert 0.05 < error < 0.15  # 16 levels: about a tenth of the weights' size
    torch.testing.assert_close(error, reference_error, rtol=1e-3 if double_quant else 0, atol=0)


def test_double_quant_costs_little_accuracy_and_saves_the_absmax_memory():
    w = gaussian((256, 256), seed=3)
    single = nf4_dequantize(*nf4_quantize(w), w.shape)
    double = nf4_dequantize(*nf4_quantize(w, double_quant=True), w.shape)
    assert (double - w).norm() < 1.01 * (single - w).norm()
    layer = NF4Linear(nn.Linear(256, 256, bias=False))
    assert model_bytes(layer) == 256 * 256 // 2 + 1024 + 4 * 4 + 4  # codes, 8-bit absmax, 4 scales, the offset


def test_bf16_weights_quantize_as_their_float32_values():
    w = gaussian((64, 64), seed=4).to(torch.bfloat16)
    packed, absmax = nf4_quantize(w)
    assert torch.equal(packed, nf4_quantize(w.float())[0])
    assert nf4_dequantize(packed, absmax, w.shape, dtype=torch.bfloat16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# int8


def test_int8_round_trip_is_within_half_a_step():
    w = gaussian((64, 96), seed=5)
    codes, scale = int8_quantize(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    error = (int8_dequantize(codes, scale) - w).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-7)


def test_int8_matches_bitsandbytes_vectorwise_quantization():
    F_bnb = bnb_functional()
    w = gaussian((64, 96), seed=6)
    codes, scale = int8_quantize(w)
    ref_codes, row_stats, _ = F_bnb.int8_vectorwise_quant(w)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(scale * 127, row_stats, atol=0, rtol=1e-7)
    torch.testing.assert_close(int8_dequantize(codes, scale), F_bnb.int8_vectorwise_dequant(ref_codes, row_stats),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# the layers


def quantized(kind, linear):
    return NF4Linear(linear) if kind == "nf4" else Int8Linear(linear)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_forward_and_backward_equal_dequantize_then_linear(kind, bias):
    torch.manual_seed(0)
    layer = quantized(kind, nn.Linear(48, 40, bias=bias))
    assert list(layer.parameters()) == []  # frozen: buffers only
    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, layer.dequantize(), layer.bias)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)


def test_layer_computes_in_the_input_dtype():
    layer = NF4Linear(nn.Linear(64, 32))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16 and layer.dequantize().dtype == torch.float32


def test_int8_fast_path_in_inference_mode_is_close_and_follows_new_weights():
    """On the CPU in inference mode Int8Linear may use fbgemm's int8 GEMM, which quantizes the input to 8 bits
    too: within 2 % of the dequantized weight's output; after load_state_dict the new weights are used."""
    torch.manual_seed(0)
    layer, other = Int8Linear(nn.Linear(512, 256)), Int8Linear(nn.Linear(512, 256))
    x = torch.randn(4, 512)
    with torch.inference_mode():
        fast = layer(x)
    exact = F.linear(x, layer.dequantize(), layer.bias)
    assert (fast - exact).norm() < 0.02 * exact.norm()
    layer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        fast = layer(x)
    exact = F.linear(x, other.dequantize(), other.bias)
    assert (fast - exact).norm() < 0.02 * exact.norm()


# ----------------------------------------------------------------------------------------------
# whole models


def logits(model, idx):
    with torch.no_grad():
        return model(idx, targets=idx)[0]  # every position


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantize_model_replaces_the_linear_layers_but_not_embedding_or_output(kind):
    """The quantized model computes what the plain model does with each layer weight replaced by its
    quantize-dequantize round trip (done here by hand); the embedding and output projection stay."""
    model = lively_model(seed=1)
    idx = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in reference.named_modules():
            if isinstance(m, nn.Linear) and name != "output":
                w = m.weight
                m.weight.copy_(nf4_dequantize(*nf4_quantize(w, double_quant=True), w.shape) if kind == "nf4"
                               else int8_dequantize(*int8_quantize(w)))
    embedding = model.tok_embeddings.weight
    names = quantize_model(model, kind)
    assert len(names) == 7 * model.config.n_layers and "output" not in names
    assert isinstance(model.output, nn.Linear) and model.tok_embeddings.weight is embedding
    assert all(not isinstance(m, nn.Linear) for name, m in model.named_modules() if name.startswith("layers."))
    torch.testing.assert_close(logits(model, idx), logits(reference, idx), atol=1e-5, rtol=1e-5)
    assert quantize_model(model, "none") == []


def test_output_projection_is_quantized_only_when_asked():
    model = lively_model(seed=2)
    names = quantize_model(model, "nf4", skip=())
    assert "output" in names and isinstance(model.output, NF4Linear)
    assert isinstance(model.tok_embeddings, nn.Embedding)


def test_quantize_model_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown quantization 'fp4'"):
        quantize_model(lively_model(), "fp4")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_state_dict_round_trip(kind):
    """What --resume relies on: a quantized model's state dict loads (strictly) into another model of the
    same shape, quantized from other weights, which then computes the same."""
    source, target = lively_model(seed=3), lively_model(seed=4)
    quantize_model(source, kind)
    quantize_model(target, kind)
    target.load_state_dict(source.state_dict(), strict=True)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(target, idx), logits(source, idx), atol=0, rtol=0)


def test_dequantize_model_gives_plain_linears_computing_the_same():
    model = lively_model(seed=5)
    quantize_model(model, "nf4")
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    before = logits(model, idx)
    dequantize_model(model)
    assert not quantized_layers(model)
    torch.testing.assert_close(logits(model, idx), before, atol=1e-5, rtol=1e-5)


def test_model_bytes_per_weight():
    """NF4 + double quantization: 4 bits + 8 bits per 64 + 32 per 64 * 256; int8: 8 bits + 32 per row."""
    linear = nn.Linear(1024, 512, bias=False)
    n = linear.weight.numel()
    assert model_bytes(linear) == 4 * n
    assert model_bytes(NF4Linear(linear, double_quant=False)) == n // 2 + 4 * n // 64
    assert model_bytes(NF4Linear(linear)) == n // 2 + n // 64 + 4 * n // (64 * 256) + 4
    assert model_bytes(Int8Linear(linear)) == n + 4 * 512


def test_qlora_model_exports_merged_full_precision_weights():
    """merged_state_dict of a QLoRA model (quantized base, LoRA on top, B trained) loads into a plain Llama,
    which computes what the QLoRA model computes."""
    model = lively_model(seed=6)
    quantize_model(model, "nf4")
    inject_lora(model, rank=4, alpha=8, targets=("compute_query", "w2"))
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.1)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    plain = lively_model(seed=7)
    state = merged_state_dict(model)
    assert all(v.dtype == torch.float32 for v in state.values())
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(logits(plain, idx), logits(model, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs the CUDA tests)")
def test_qlora_on_cuda_matches_the_cpu_and_trains_under_bf16_autocast():
    model = lively_model(seed=8)
    quantize_model(model, "nf4")
    inject_lora(model, rank=4, targets=("compute_query", "w2"))
    mark_only_lora_trainable(model)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    expected = logits(model, idx)
    model.cuda()
    torch.testing.assert_close(logits(model, idx.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(idx.cuda(), targets=idx.cuda())[0]
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------
# the command line: --quantize, --optim (codegen/model_setup.py, codegen/cli.py)

CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tokenizer = asset_path("tokenizer.model")
    work = tmp_path_factory.mktemp("qlora")
    code_training_files(work, CONFIG, 40, 32)
    return work, str(tokenizer)


def codegen_args(workdir, out, *extra):
    work, tokenizer = workdir
    return ["--option", "codegen", "--pretrained-model-path", str(work / "tiny.pt"), "--tokenizer", tokenizer,
            "--train_data", str(work / "train.jsonl"), "--valid_data", str(work / "valid.jsonl"),
            "--out_dir", str(out), "--batch_size", "4", "--max_len", "64", "--eval_samples", "0", "--lr", "3e-3",
            "--quiet", "--schedule", "constant", "--log_every", "1", *extra]


def test_quantize_with_full_fine_tuning_is_one_clear_error(workdir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "run_llama.py"),
                             *codegen_args(workdir, tmp_path / "out", "--quantize", "nf4", "--mode", "full")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --quantize nf4 needs --mode lora")
    assert not (tmp_path / "out" / "last.pt").exists()


def read_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_qlora_with_adamw8bit_resumes_as_if_uninterrupted(workdir):
    """QLoRA (--quantize nf4 --mode lora) with --optim adamw8bit: 4 steps, then --resume to 7 gives the
    numbers of 7 steps in one go (quantized base, adapters and 8-bit optimizer state all come back from
    last.pt); best.pt holds full-precision merged weights."""
    work, _ = workdir
    extra = ["--mode", "lora", "--quantize", "nf4", "--optim", "adamw8bit", "--lora_targets",
             "compute_query,compute_value,w2", "--lora_rank", "32", "--lora_dropout", "0",
             "--eval_every", "3"]  # rank 32: w2's A (32 x 176) is large enough for 8-bit moments
    whole, part = work / "whole", work / "part"
    assert codegen_cli(codegen_args(workdir, whole, *extra, "--max_steps", "7"))[0] == 0
    assert codegen_cli(codegen_args(workdir, part, *extra, "--max_steps", "4"))[0] == 0
    rc, _, err = codegen_cli(codegen_args(workdir, part, "--resume", "--max_steps", "7"))  # settings from last.pt
    assert rc == 0, err
    rows, reference = read_rows(part / "log.csv"), read_rows(whole / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in reference]
    last = torch.load(part / "last.pt", weights_only=True)
    assert last["settings"]["quantize"] == "nf4" and last["settings"]["optim"] == "adamw8bit"
    assert any(k.endswith("compute_query.base.weight_nf4") for k in last["model"])
    assert any(v.get("exp_avg_absmax") is not None for v in last["optimizer"]["state"].values())
    best = torch.load(part / "best.pt", weights_only=True)
    assert best["codegen"]["quantize"] == "nf4"
    assert all(v.is_floating_point() and "lora" not in k and "nf4" not in k for k, v in best["model"].items())
    summary = json.loads((part / "summary.json").read_text())
    assert summary["total_parameters"] == json.loads((whole / "summary.json").read_text())["total_parameters"]


@pytest.mark.parametrize("extra", [["--mode", "lora", "--quantize", "int8"], ["--mode", "full", "--optim", "adamw8bit"]])
def test_other_combinations_train(workdir, tmp_path, extra):
    """QLoRA on an int8 base; full fine-tuning with 8-bit moments."""
    rc, _, err = codegen_cli(codegen_args(workdir, tmp_path, *extra, "--max_steps", "2"))
    assert rc == 0, err
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (any(k.endswith("weight_int8") for k in last["model"]) if "int8" in extra
            else any("exp_avg_absmax" in v for v in last["optimizer"]["state"].values()))


def test_code_generate_with_quantized_weights(workdir):
    work, tokenizer = workdir
    for kind in ("nf4", "int8"):
        rc, out, err = codegen_cli(["--option", "code_generate", "--pretrained-model-path", str(work / "tiny.pt"),
                                "--tokenizer", tokenizer, "--quantize", kind, "--prompt", "def add(x):\n",
                                "--max_new_tokens", "4"])
        assert rc == 0, err


# ----------------------------------------------------------------------------------------------
# bench/quant.py runs


def test_bench_quant_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "quant.py"), "--tiny", "--json"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    memory = {(r["shape"], r["format"]): r for r in report["memory"]}
    assert memory[("tiny", "nf4+dq")]["linear_bytes_per_param"] < memory[("tiny", "int8")]["linear_bytes_per_param"]
    assert {r["variant"] for r in report["decode"]} >= {"fp32", "int8"}

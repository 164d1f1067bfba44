"""Every checkpoint format the project reads or writes, in one place; each failure is a CheckpointError
(an export refused for what the target cannot compute: a UsageError).

    load_pretrained(path, adapter=None, **overrides) -> Llama
                                                   stories42M.pt (minllama or llama2.c names), llama2.c .bin,
                                                   a Hugging Face Llama folder (load_hf_folder); a LoRA
                                                   adapter folded in (read_adapter, apply_adapter)
    read_adapter(path, config) -> Adapter          a PEFT LoRA folder, or code training's best_adapter.pt
    save_llama2c_bin(model, path)                  the .bin that llama2.c's run.c reads
    save_hf_folder(model, folder, tokenizer, ...)  a folder transformers' LlamaForCausalLM reads
    save_peft_adapter(adapter, config, folder)     a folder peft.PeftModel applies to the hf export
    save_gguf(model, path, tokenizer, gguf_type)   a GGUF file for llama.cpp (f32, f16, bf16, Q8_0)
    check_vocab(model, tokenizer, path, fix)       a checkpoint smaller than the tokenizer's vocabulary is refused
    save_pretraining(path, model, optimizer, ...)  pretrain.py's checkpoint (llama2.c's train.py format, resumable)
    load_pretraining(path) -> (model, saved)       ... and back, for --resume
    save_classifier(model, config, path)           run_llama's fine-tuned classifier (LoRA: adapters + head)
    load_classifier(path) -> (classifier, config)  ... and back (a fine-tuned one needs nothing else)
    code_metadata(path) -> dict                    the "codegen" entry of a code-training best.pt
    CodeTrainingState                              a code-training run's progress and what its last.pt /
                                                   best.pt hold: save_last, load_last + restore, save_best
    rng_state() / set_rng_state(state)             every RNG a training step uses, for --resume

`from llama import load_pretrained` keeps working (the course's sanity_check.py imports it from there).
safetensors and gguf are imported only by the functions that read or write those files.
"""
import dataclasses
import json
import math
import os
import random
import re
import struct
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from config import LlamaConfig
from rope import ROPE_SCALINGS, rope_frequencies
from utils import CheckpointError, UsageError, atomic_save, atomic_write

# ----------------------------------------------------------------------------------------------
# stories42M.pt and llama2.c .bin

# llama2.c names the projections wq/wk/wv/wo; the assignment names them compute_*.
_LLAMA2C_NAMES = {".attention.wq.": ".attention.compute_query.", ".attention.wk.": ".attention.compute_key.",
                  ".attention.wv.": ".attention.compute_value.", ".attention.wo.": ".attention.compute_output."}
_IGNORED_KEYS = {"freqs_cos", "freqs_sin"}  # RoPE tables some llama2.c versions saved; we recompute them


def _rename(key: str) -> str:
    key = key.removeprefix("_orig_mod.")  # left by torch.compile
    for old, new in _LLAMA2C_NAMES.items():
        key = key.replace(old, new)
    return key


MAX_POSITIONS = 1 << 20  # max_seq_len beyond this is refused: the RoPE tables alone would take gigabytes


def check_declared_sizes(config: LlamaConfig, state_dict: dict, source) -> None:
    """Hold a checkpoint's declared sizes against the tensors it really holds before any model is built,
    so that a small forged file cannot make us allocate (or build) a huge model: every value must be a
    tensor, the layers present must be exactly 0..n_layers-1, the parameters the config declares may
    not outnumber those present more than twice over, and max_seq_len is at most MAX_POSITIONS. (Small
    discrepancies are listed, all together, by load_state_dict_strict once the model is built.)"""
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: not tensors: {not_tensors[:5]}: not a model checkpoint")
    names = [_rename(str(k)) for k in state_dict]
    layers = {int(n.split(".")[1]) for n in names if n.startswith("layers.") and n.split(".")[1].isdigit()}
    if layers != set(range(config.n_layers)):
        raise CheckpointError(f"{source}: declares n_layers={config.n_layers} but holds tensors for "
                              f"{len(layers)} layer(s): not the checkpoint its config describes")
    if config.max_seq_len > MAX_POSITIONS:
        raise CheckpointError(f"{source}: max_seq_len={config.max_seq_len} is beyond the {MAX_POSITIONS} positions "
                              "this project supports; pass a smaller max_seq_len override")
    c, kv_dim = config, config.n_kv_heads * config.head_dim
    declared = c.vocab_size * c.dim + c.n_layers * (2 * c.dim * c.dim + 2 * kv_dim * c.dim + 3 * c.hidden_dim * c.dim)
    present = sum(v.numel() for v in state_dict.values())
    if declared > 2 * present:
        raise CheckpointError(f"{source}: its config declares {declared:,} parameters but the file holds {present:,}: "
                              "not the checkpoint its config describes")


def load_state_dict_strict(model, state_dict: dict, source, assign: bool = False) -> None:
    """Load weights, raising one CheckpointError that lists every missing, unexpected or
    mis-shaped tensor (the course's strict=False silently kept random weights instead)."""
    state_dict = {_rename(k): v for k, v in state_dict.items() if _rename(k) not in _IGNORED_KEYS}
    expected = model.state_dict()
    if "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]  # tied: saving one is enough
    if "tok_embeddings.weight" not in state_dict and "output.weight" in state_dict:
        state_dict["tok_embeddings.weight"] = state_dict["output.weight"]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    problems = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {unexpected}"] * bool(unexpected)
    problems += [f"shape mismatches {mismatched}"] * bool(mismatched)
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + "; ".join(problems))
    tied = state_dict["output.weight"] is state_dict["tok_embeddings.weight"] or torch.equal(
        state_dict["output.weight"], state_dict["tok_embeddings.weight"])
    if not tied:
        model.output.weight = nn.Parameter(torch.empty_like(model.output.weight))  # untie
    model.load_state_dict(state_dict, strict=True, assign=assign)
    if tied and assign:  # assign gives each name its own Parameter: share one again
        model.output.weight = model.tok_embeddings.weight


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for corrupt files; report one clear error
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _load_torch_checkpoint(path: Path, overrides: dict):
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        raise CheckpointError(f"{path}: expected a dict with 'model_args' and 'model' (the stories42M.pt format)")
    if not isinstance(checkpoint["model_args"], dict) or not isinstance(checkpoint["model"], dict):
        raise CheckpointError(f"{path}: 'model_args' and 'model' must be dicts (the stories42M.pt format)")
    args = {"norm_type": "layernorm", **checkpoint["model_args"]}
    args.setdefault("causal", not is_course_checkpoint(checkpoint))
    args.setdefault("norm_bias", any(_rename(str(k)).endswith("norm.bias") for k in checkpoint["model"]))
    try:
        config = LlamaConfig.from_model_args(args, **overrides)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: its model_args do not make a valid config ({e})") from None
    return config, checkpoint["model"]


def is_course_checkpoint(checkpoint: dict) -> bool:
    """A stories42M.pt as llama2.c's train.py wrote it, which the course's reference ran without a
    causal mask: its model_args hold only llama2.c's keys. Every checkpoint this project writes
    stores its whole config (norm_type and causal among the keys), and code-training ones a "codegen"
    entry, so they keep the semantics they were trained with, older ones included (all causal)."""
    return "codegen" not in checkpoint and not {"norm_type", "causal"} & set(checkpoint["model_args"])


_BIN_HEADER = struct.Struct("7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len


def _load_llama2c_bin(path: Path, overrides: dict):
    """llama2.c's legacy export: the header above, then fp32 tensors grouped by kind across layers,
    the RoPE tables, and the output matrix only when vocab_size was written negative (untied)."""
    data = path.read_bytes()
    if len(data) < _BIN_HEADER.size:
        raise CheckpointError(f"{path}: {len(data)} bytes is too short for a llama2.c checkpoint header")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = _BIN_HEADER.unpack_from(data)
    shared = vocab_size > 0
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, max_seq_len, abs(vocab_size)) <= 0:
        raise CheckpointError(f"{path}: header has non-positive sizes: not a llama2.c checkpoint")
    try:
        config = LlamaConfig.from_model_args(
            dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                 vocab_size=abs(vocab_size), max_seq_len=max_seq_len, norm_type="rmsnorm"), **overrides)
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path}: header is not a llama2.c checkpoint ({e})") from None
    expected = _llama2c_bytes(config, shared)  # arithmetic only: a forged header allocates nothing
    if len(data) != expected:
        raise CheckpointError(f"{path}: {len(data)} bytes, but a llama2.c checkpoint with this header has "
                              f"{expected} (truncated, or not a llama2.c .bin file)")
    layout = _llama2c_layout(config, shared)
    flat = torch.frombuffer(bytearray(data[_BIN_HEADER.size :]), dtype=torch.float32)
    state_dict, offset = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        state_dict[name] = flat[offset : offset + n].view(shape).clone()
        offset += n
    for name in _IGNORED_KEYS:
        state_dict.pop(name)
    return config, state_dict


def _llama2c_bytes(config: LlamaConfig, shared: bool) -> int:
    """The length of a llama2.c .bin with this header, computed from the sizes alone (the layout below,
    summed), so that a header declaring billions of layers is refused before anything is built."""
    c, kv_dim = config, config.n_kv_heads * config.head_dim
    per_layer = 2 * c.dim + 2 * c.dim * c.dim + 2 * kv_dim * c.dim + 3 * c.hidden_dim * c.dim
    floats = c.vocab_size * c.dim * (1 if shared else 2) + c.n_layers * per_layer + c.dim + c.max_seq_len * c.head_dim
    return _BIN_HEADER.size + 4 * floats


def _llama2c_layout(config: LlamaConfig, shared: bool):
    """(name, shape) of every tensor of a llama2.c .bin file, in file order."""
    c, kv_dim = config, config.n_kv_heads * config.head_dim
    per_layer = [("attention_norm.weight", (c.dim,)), ("attention.compute_query.weight", (c.dim, c.dim)),
                 ("attention.compute_key.weight", (kv_dim, c.dim)), ("attention.compute_value.weight", (kv_dim, c.dim)),
                 ("attention.compute_output.weight", (c.dim, c.dim)), ("ffn_norm.weight", (c.dim,)),
                 ("feed_forward.w1.weight", (c.hidden_dim, c.dim)), ("feed_forward.w2.weight", (c.dim, c.hidden_dim)),
                 ("feed_forward.w3.weight", (c.hidden_dim, c.dim))]
    layout = [("tok_embeddings.weight", (c.vocab_size, c.dim))]
    layout += [(f"layers.{i}.{name}", shape) for name, shape in per_layer for i in range(c.n_layers)]
    layout += [("norm.weight", (c.dim,)), ("freqs_cos", (c.max_seq_len, c.head_dim // 2)),
               ("freqs_sin", (c.max_seq_len, c.head_dim // 2))]
    if not shared:
        layout.append(("output.weight", (c.vocab_size, c.dim)))
    return layout


def save_llama2c_bin(model, path) -> None:
    """Write `model` in llama2.c's legacy .bin format, the one its run.c reads (and
    load_pretrained reads back). run.c hard-codes RMSNorm with eps 1e-5 and RoPE base 10000, so
    any other model is refused rather than exported to compute something else there. The file
    appears whole or not at all (utils.atomic_write)."""
    c = model.config
    if (c.norm_type, c.norm_eps, c.rope_theta, c.causal, c.rope_scaling) != ("rmsnorm", 1e-5, 10000.0, True, None):
        raise ValueError(f"run.c computes causal attention, RMSNorm (eps 1e-5) and RoPE with base 10000; this "
                         f"model has {'causal' if c.causal else 'non-causal'} attention, {c.norm_type} "
                         f"(eps {c.norm_eps}), RoPE base {c.rope_theta}"
                         + (f", RoPE scaling {c.rope_scaling}" if c.rope_scaling else "") + ": not exportable")
    shared = model.output.weight is model.tok_embeddings.weight
    tensors = {**model.state_dict(), "freqs_cos": model.freqs_cos, "freqs_sin": model.freqs_sin}

    def write(f):
        f.write(_BIN_HEADER.pack(c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                                 c.vocab_size if shared else -c.vocab_size, c.max_seq_len))
        for name, _ in _llama2c_layout(c, shared):
            f.write(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())

    atomic_write(path, write)


def load_pretrained(checkpoint, dtype: Optional[torch.dtype] = None, adapter=None, **overrides):
    """Build a Llama from a stories42M.pt-style dict (either naming scheme), a llama2.c .bin, or a
    Hugging Face Llama folder (see load_hf_folder); `dtype` stores the weights in that dtype
    (default float32). `adapter` (a PEFT LoRA folder, or the best_adapter.pt of a LoRA code training)
    is applied to the weights, in float32, before they are cast (read_adapter, apply_adapter).

    `overrides` replace config fields, e.g. norm_type="rmsnorm", causal=True or dropout=0.1.
    Defaults follow the format: .pt files get the assignment's LayerNorm (with a bias when the file
    has `*norm.bias` tensors), .bin files and HF folders RMSNorm. A plain stories42M.pt (see
    is_course_checkpoint) is non-causal, as the course's reference computed it; .bin files, HF
    models and everything this project writes are causal (the latter record `causal` in their
    model_args)."""
    path = Path(checkpoint)
    if adapter is not None:
        return _load_with_adapter(path, dtype, adapter, overrides)
    if path.is_dir():
        return load_hf_folder(path, dtype, **overrides)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: run `bash setup.sh` with network access to download "
            "stories42M.pt, or pass --pretrained-model-path to a checkpoint you have")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch's zip format, or its legacy one: a pickle (protocol 2) of a 10-byte magic integer. Not just
    # "starts with 0x80": a llama2.c header starts with dim as int32, and dim 128, 384, 640... do too.
    is_torch = zipfile.is_zipfile(path) or head == b"\x80\x02\x8a\x0a"
    load = _load_torch_checkpoint if is_torch or path.suffix == ".pt" else _load_llama2c_bin
    config, state_dict = load(path, overrides)
    check_declared_sizes(config, state_dict, path)
    from llama import Llama  # here, not at the top: llama.py re-exports this function

    model = Llama(config)
    load_state_dict_strict(model, state_dict, path)
    return model if dtype is None else model.to(dtype)


def load_config(checkpoint) -> LlamaConfig:
    """The config of what load_pretrained would build (a HF folder's without reading its weights)."""
    path = Path(checkpoint)
    return hf_config(path, {}) if path.is_dir() else load_pretrained(path).config


def _load_with_adapter(path: Path, dtype, adapter, overrides: dict):
    """The base at `path` with the adapter folded in; a LoRA code training's best.pt already has its
    adapters merged, so one is refused as a base (the update would count twice)."""
    try:
        meta = code_metadata(path) if path.is_file() else {}
    except CheckpointError:  # not a torch file (a llama2.c one under another name): no metadata
        meta = {}
    if meta.get("mode") == "lora":
        raise CheckpointError(f"{path}: a LoRA code-training best.pt already has its adapters merged in; pass "
                              f"its base checkpoint ({meta.get('base_checkpoint')}) with --adapter, or no --adapter")
    model = load_pretrained(path, None, **overrides)
    apply_adapter(model, read_adapter(adapter, model.config))
    return model if dtype is None else model.to(dtype)


# ----------------------------------------------------------------------------------------------
# Hugging Face Llama folders: config.json + model.safetensors (or shards, or pytorch_model.bin)

_HF_LAYER_NAMES = {"self_attn.q_proj": "attention.compute_query", "self_attn.k_proj": "attention.compute_key",
                   "self_attn.v_proj": "attention.compute_value", "self_attn.o_proj": "attention.compute_output",
                   "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                   "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
                   "post_attention_layernorm": "ffn_norm"}
_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
_OURS_TO_HF_LAYER = {ours: hf for hf, ours in _HF_LAYER_NAMES.items()}
_OURS_TO_HF = {ours: hf for hf, ours in _HF_NAMES.items()}


def _read_json(folder: Path, name: str, what: str):
    """The JSON in folder/name; a missing or unreadable file is a CheckpointError saying what the
    folder is not."""
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {name}: not {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / name}: not readable JSON ({e})") from None


def hf_config(folder: Path, overrides: dict) -> LlamaConfig:
    """Our LlamaConfig from a HF config.json, in either schema: older files put rope_theta and
    rope_scaling at the top level; transformers 5 writes rope_parameters (rope_theta, rope_type)."""
    hf = _read_json(folder, "config.json", "a Hugging Face model folder")
    _refuse_unsupported(folder, hf)
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    n_heads = hf["num_attention_heads"]
    args = dict(dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
                n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=hf["vocab_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
                norm_type="rmsnorm", rope_theta=float(theta), rope_scaling=None if kind == "default" else rope,
                causal=True)
    try:
        return LlamaConfig.from_model_args(args, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def _refuse_unsupported(folder: Path, hf: dict) -> None:
    """One line naming the first field this project's Llama does not compute."""
    problem = None
    if hf.get("model_type") != "llama":
        problem = f"model_type {hf.get('model_type')!r}: only \"llama\" models are supported"
    elif missing := [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "vocab_size") if k not in hf]:
        problem = f"missing {missing}"
    elif hf.get("attention_bias") or hf.get("mlp_bias"):
        problem = "attention_bias / mlp_bias: biased projections are not supported"
    elif hf.get("hidden_act", "silu") != "silu":
        problem = f"hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) is supported"
    elif hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        problem = f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads: not supported"
    else:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_SCALINGS:
            problem = f"rope type {kind!r}: supported are {', '.join(ROPE_SCALINGS)}"
    if problem:
        raise CheckpointError(f"{folder / 'config.json'}: {problem}")


def _hf_weight_files(folder: Path):
    """The safetensors (or pytorch_model.bin) files holding a HF folder's weights, shards included."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            index = _read_json(folder, index_name, "a sharded checkpoint's index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{folder / index_name}: no weight_map: not a sharded checkpoint's index")
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not (folder / f).is_file()]
            if absent:
                raise CheckpointError(f"{folder}: shard(s) {absent} listed in {index_name} are missing")
            return [folder / f for f in files]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _hf_tensors(path: Path):
    """(name, tensor) of one weight file, one tensor at a time (safetensors: memory-mapped)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # only HF folders need it

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        try:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
        except Exception as e:  # a corrupt file: many exception types
            raise CheckpointError(f"{path}: not a readable PyTorch weight file ({type(e).__name__}: {e})") from None


def hf_to_ours(name: str, tensor: torch.Tensor, config: LlamaConfig):
    """Our name (None: not a weight we keep) and tensor for a HF Llama tensor. HF stores the rows of
    q_proj and k_proj permuted for its rotate-half RoPE (each head's first half of dimensions paired
    with its second half); ours rotates adjacent pairs, as Meta's and llama2.c's code do, so those
    rows are permuted back: row i of half h of each head becomes row 2i + h."""
    if name in _HF_NAMES:
        return _HF_NAMES[name], tensor
    parts = name.split(".")  # model.layers.{i}.{module}.{proj}.weight
    module = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or parts[-1] != "weight" or module not in _HF_LAYER_NAMES:
        return None, tensor
    heads = _rotated_heads(module, config)
    if heads is not None and tensor.dim() == 2 and tensor.shape[0] % (2 * heads) == 0:
        tensor = hf_rows_to_ours(tensor, heads)
    return f"layers.{parts[2]}.{_HF_LAYER_NAMES[module]}.weight", tensor


def _rotated_heads(module: str, config: LlamaConfig) -> Optional[int]:
    """The number of heads of a projection whose output RoPE rotates (HF name, or ours), else None."""
    return {"self_attn.q_proj": config.n_heads, "self_attn.k_proj": config.n_kv_heads,
            "attention.compute_query": config.n_heads, "attention.compute_key": config.n_kv_heads}.get(module)


def hf_rows_to_ours(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or of a LoRA B feeding one) from HF's rotate-half order to ours:
    HF row (head h, half j, index i) becomes our row (h, 2i + j)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(tensor.shape)


def ours_rows_to_hf(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of hf_rows_to_ours: our row (h, 2i + j) becomes HF's row (h, j, i)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(tensor.shape)


def load_hf_folder(folder, dtype: Optional[torch.dtype] = None, **overrides):
    """A Llama from a local Hugging Face folder (LlamaForCausalLM): config.json and its weights.

    The model is built on the meta device (no memory, no random initialisation) and the weights are
    streamed in one tensor at a time, renamed, permuted and cast to `dtype` (default float32), so
    peak memory stays close to the model's own size. HF models are causal."""
    from llama import Llama

    folder = Path(folder)
    config = hf_config(folder, overrides)
    dtype = dtype or torch.float32
    state = {}
    for path in _hf_weight_files(folder):
        for name, tensor in _hf_tensors(path):
            ours, tensor = hf_to_ours(name, tensor, config)
            if ours is not None:
                state[ours] = tensor.to(dtype).contiguous()
    check_declared_sizes(config, state, folder)
    with torch.device("meta"):
        model = Llama(config)
    load_state_dict_strict(model, state, folder, assign=True)
    cos, sin = rope_frequencies(config.head_dim, config.max_seq_len, config.rope_theta, scaling=config.rope_scaling)
    model.freqs_cos, model.freqs_sin = cos, sin
    return model


# ----------------------------------------------------------------------------------------------
# LoRA adapters: PEFT folders (adapter_config.json + adapter_model.safetensors) and code training's
# <stem>_adapter.pt, read into one Adapter, applied onto a base model, written back as PEFT

_HF_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.((?:self_attn|mlp)\.\w+)"
                       r"\.lora_([AB])(?:\.default)?\.weight")
# adapter_config.json entries this project cannot apply: key -> (what is acceptable, why not)
_PEFT_REFUSED = {
    "peft_type": (lambda v: v in (None, "LORA"), "only LoRA adapters are supported"),
    "use_dora": (lambda v: not v, "DoRA (weight-decomposed LoRA) is not supported"),
    "bias": (lambda v: v in (None, "none"), "trained biases are not supported (Llama's projections have none)"),
    "lora_bias": (lambda v: not v, "LoRA biases are not supported"),
    "fan_in_fan_out": (lambda v: not v, "fan_in_fan_out (Conv1D-style weights) is not a Llama layout"),
    "modules_to_save": (lambda v: not v, "fully trained modules (modules_to_save) are not supported"),
    "trainable_token_indices": (lambda v: not v, "trained token rows are not supported"),
    "rank_pattern": (lambda v: not v, "per-module ranks (rank_pattern) are not supported"),
    "alpha_pattern": (lambda v: not v, "per-module alphas (alpha_pattern) are not supported"),
    "target_parameters": (lambda v: not v, "LoRA on parameters (target_parameters) is not supported"),
    "layer_replication": (lambda v: not v, "layer_replication is not supported"),
    "alora_invocation_tokens": (lambda v: not v, "activated LoRA (alora_invocation_tokens) is not supported"),
    "use_qalora": (lambda v: not v, "QA-LoRA is not supported"),
}


@dataclasses.dataclass
class Adapter:
    """A LoRA adapter in this project's terms: ΔW = (alpha / rank) B A on each target projection of
    every layer. tensors holds lora.lora_state_dict's names (layers.0.attention.compute_query.lora_A)
    with B's rows in our RoPE order, in float32."""
    rank: int
    alpha: float  # an rsLoRA adapter's alpha / sqrt(r) is stored as the equivalent alpha / r
    targets: tuple  # ours: compute_query, compute_key, compute_value, compute_output, w1, w2, w3
    tensors: dict
    source: str
    dropout: float = 0.0
    base: Optional[str] = None  # the base checkpoint the adapter names, if any
    sentinel_rows: bool = False  # its training also changed embedding rows, which the adapter lacks
    step: Optional[int] = None  # a code training's: the step of the best.pt it belongs to


def training_adapter_path(checkpoint) -> Path:
    """Where LoRA code training keeps the adapters of a best.pt: best_adapter.pt beside it."""
    path = Path(checkpoint)
    return path.with_name(path.stem + "_adapter.pt")


def read_adapter(path, config: LlamaConfig) -> Adapter:
    """The adapter at `path`, checked against the base model's config: a PEFT LoRA folder, or the
    <stem>_adapter.pt LoRA code training writes beside its best.pt."""
    path = Path(path)
    if path.is_dir():
        adapter = _read_peft_folder(path, config)
    elif path.is_file():
        adapter = _read_training_adapter(path)
    else:
        raise FileNotFoundError(f"adapter {path} not found (a PEFT folder with adapter_config.json, or a "
                                "code training's best_adapter.pt)")
    _check_adapter_fits(adapter, config)
    return adapter


def _peft_settings(folder: Path) -> dict:
    """adapter_config.json, refusing what this project's LoRA does not compute."""
    settings = _read_json(folder, "adapter_config.json", "a PEFT adapter folder")
    if not isinstance(settings, dict) or "r" not in settings or "lora_alpha" not in settings:
        raise CheckpointError(f"{folder / 'adapter_config.json'}: no r / lora_alpha: not a LoRA adapter config")
    for key, (acceptable, reason) in _PEFT_REFUSED.items():
        if not acceptable(settings.get(key)):
            raise CheckpointError(f"{folder / 'adapter_config.json'}: {key}={settings[key]!r}: {reason}")
    return settings


def _peft_weight_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no adapter_model.safetensors (or adapter_model.bin)")


def _read_peft_folder(folder: Path, config: LlamaConfig) -> Adapter:
    """A PEFT LoRA folder: HF module names to ours, and B of q_proj / k_proj permuted as those weights
    are (ΔW = B A, so ΔW's rows are B's rows; A is unchanged)."""
    settings = _peft_settings(folder)
    path, tensors = _peft_weight_file(folder), {}
    for name, tensor in _hf_tensors(path):
        match = _PEFT_KEY.fullmatch(name)
        if not match or match[2] not in _HF_PROJECTIONS:
            raise CheckpointError(f"{path}: tensor {name!r} is not a LoRA matrix of a Llama projection "
                                  f"({', '.join(p.split('.')[1] for p in _HF_PROJECTIONS)})")
        layer, module, which = match.groups()
        heads = _rotated_heads(module, config)
        if which == "B" and heads is not None:
            tensor = hf_rows_to_ours(tensor, heads)
        tensors[f"layers.{layer}.{_HF_LAYER_NAMES[module]}.lora_{which}"] = tensor.float().contiguous()
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    if settings.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r
        alpha *= math.sqrt(rank)
    targets = tuple(sorted({key.split(".")[-2] for key in tensors}))
    return Adapter(rank, alpha, targets, tensors, str(folder), float(settings.get("lora_dropout") or 0.0),
                   settings.get("base_model_name_or_path"))


_TRAINING_ADAPTER_KEYS = ("lora", "rank", "alpha", "dropout", "targets", "base_checkpoint", "sentinel_rows", "step")


def save_training_adapter(path, model, settings: dict, codegen: dict, step: int) -> None:
    """Atomically write a LoRA code training's adapters (unmerged A and B, our names and row order)
    with what applies them: rank, alpha, targets, the base checkpoint, the step of the best.pt they
    belong to, and whether the sentinel rows of the embedding trained too (which the adapter lacks)."""
    from lora import lora_state_dict

    saved = {"lora": {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in lora_state_dict(model).items()},
             "rank": settings["lora_rank"], "alpha": float(settings["lora_alpha"]),
             "dropout": float(settings["lora_dropout"]), "targets": list(settings["lora_targets"]),
             "base_checkpoint": codegen.get("base_checkpoint"), "step": step,
             "sentinel_rows": bool(model.tok_embeddings.weight.requires_grad)}
    atomic_save(saved, path)


def _read_training_adapter(path: Path) -> Adapter:
    saved = _torch_load(path)
    missing = [k for k in _TRAINING_ADAPTER_KEYS if k not in saved] if isinstance(saved, dict) else ["lora"]
    if missing:
        raise CheckpointError(f"{path}: not a LoRA adapter (missing {missing}); pass a PEFT folder or the "
                              "best_adapter.pt a LoRA code training wrote")
    return Adapter(int(saved["rank"]), float(saved["alpha"]), tuple(saved["targets"]), saved["lora"], str(path),
                   float(saved["dropout"]), saved["base_checkpoint"], bool(saved["sentinel_rows"]), saved["step"])


def _check_adapter_fits(adapter: Adapter, config: LlamaConfig) -> None:
    """Every target of every layer has A (rank, in) and B (out, rank), and nothing else is there."""
    c, q_dim, kv_dim = config, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"attention.compute_query": (q_dim, c.dim), "attention.compute_key": (kv_dim, c.dim),
              "attention.compute_value": (kv_dim, c.dim), "attention.compute_output": (c.dim, q_dim),
              "feed_forward.w1": (c.hidden_dim, c.dim), "feed_forward.w2": (c.dim, c.hidden_dim),
              "feed_forward.w3": (c.hidden_dim, c.dim)}
    expected = {}
    for module, (rows, cols) in shapes.items():
        if module.split(".")[1] in adapter.targets:
            for i in range(c.n_layers):
                expected[f"layers.{i}.{module}.lora_A"] = (adapter.rank, cols)
                expected[f"layers.{i}.{module}.lora_B"] = (rows, adapter.rank)
    found = {k: tuple(v.shape) for k, v in adapter.tensors.items()}
    problems = [f"missing {sorted(set(expected) - set(found))[:4]}"] * bool(set(expected) - set(found))
    problems += [f"unexpected {sorted(set(found) - set(expected))[:4]}"] * bool(set(found) - set(expected))
    problems += [f"{k}: {found[k]} instead of {expected[k]}" for k in sorted(set(found) & set(expected))
                 if found[k] != expected[k]][:4]
    if problems or not adapter.tensors:
        raise CheckpointError(f"{adapter.source}: the adapter (rank {adapter.rank}, targets {list(adapter.targets)}) "
                              f"does not fit the base model (it must adapt every layer alike): "
                              + ("; ".join(problems) or "no LoRA matrices"))


def apply_adapter(model, adapter: Adapter) -> None:
    """Put the adapter onto `model` (float32) with lora.inject_lora and its A and B, then fold the
    update into the weights (lora.unload_lora): the model stays a plain Llama, computing W + (alpha /
    rank) B A, as fast as before."""
    from lora import inject_lora, load_lora_state_dict, unload_lora

    inject_lora(model, adapter.rank, adapter.alpha, 0.0, adapter.targets)
    load_lora_state_dict(model, adapter.tensors)
    unload_lora(model)


# ----------------------------------------------------------------------------------------------
# Writing other tools' formats (run_llama.py --option export): a Hugging Face folder, a PEFT adapter,
# a GGUF file for llama.cpp. Each appears whole or not at all, and replaces nothing unless asked.

HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "generation_config.json")


def check_out_path(out, folder: bool, overwrite: bool = False) -> None:
    """Refuse an --out that would replace something: an existing file, or a folder that is not empty
    (unless overwrite), or the wrong kind (a folder where a file goes, and the reverse)."""
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; this format is a folder: pass a new folder path")
    if not folder and out.is_dir():
        raise UsageError(f"--out {out}: is a folder; this format is one file: pass a file path")
    if out.is_file() and not overwrite:
        raise UsageError(f"--out {out}: exists; pass another path, or --overwrite to replace it")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out}: a folder that is not empty; pass a new or empty folder, or --overwrite "
                         "to replace it")


def write_folder(folder, write, overwrite: bool = False) -> None:
    """Call write(tmp) on a new folder beside `folder`, then rename it to `folder`, so that the folder
    appears whole or not at all (an interrupted export leaves only a hidden .tmp folder, removed
    when it can be). A non-empty folder is replaced only with overwrite."""
    import shutil
    import uuid

    folder = Path(folder)
    check_out_path(folder, True, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    old = tmp.with_suffix(".old") if folder.is_dir() and any(folder.iterdir()) else None
    try:
        write(tmp)
        if old is not None:
            os.replace(folder, old)
        os.replace(tmp, folder)  # onto an empty folder, or none
    except BaseException:
        if old is not None and old.exists() and not folder.exists():
            os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def check_exportable(config: LlamaConfig, fmt: str) -> None:
    """Transformers' LlamaForCausalLM and llama.cpp compute causal attention with RMSNorm; a model
    computing anything else is refused rather than exported to compute something else there."""
    if config.norm_type != "rmsnorm":
        raise UsageError(f"--format {fmt}: this model uses {config.norm_type}"
                         + (" with a bias" if config.norm_bias else "") + "; Llama in transformers and llama.cpp "
                         "computes RMSNorm: not exportable (a plain stories42M.pt loads with the assignment's "
                         "LayerNorm)")
    if not config.causal:
        raise UsageError(f"--format {fmt}: this model has non-causal attention (the course's reading of "
                         "stories42M.pt); transformers and llama.cpp compute causal attention: not exportable")


def _hf_name(name: str, config: LlamaConfig, tensor: torch.Tensor):
    """The HF name and tensor of one of our weights: hf_to_ours backwards (q/k rows to rotate-half)."""
    if name in _OURS_TO_HF:
        return _OURS_TO_HF[name], tensor
    _, layer, rest = name.split(".", 2)  # layers.{i}.{module}.weight
    module = rest.removesuffix(".weight")
    heads = _rotated_heads(module, config)
    if heads is not None:
        tensor = ours_rows_to_hf(tensor, heads)
    return f"model.layers.{layer}.{_OURS_TO_HF_LAYER[module]}.weight", tensor


def hf_config_json(config: LlamaConfig, tied: bool, bos_id: int, eos_id: int, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM, transformers 5's schema (rope_parameters), which hf_config reads back."""
    rope = {"rope_type": "default"}
    if config.rope_scaling:
        rope = dict(config.rope_scaling)
        rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "dtype": str(dtype).removeprefix("torch."), "head_dim": config.head_dim, "hidden_act": "silu",
            "hidden_size": config.dim, "initializer_range": 0.02, "intermediate_size": config.hidden_dim,
            "max_position_embeddings": config.max_seq_len, "mlp_bias": False, "num_attention_heads": config.n_heads,
            "num_hidden_layers": config.n_layers, "num_key_value_heads": config.n_kv_heads, "pad_token_id": None,
            "pretraining_tp": 1, "rms_norm_eps": config.norm_eps,
            "rope_parameters": {**rope, "rope_theta": float(config.rope_theta)}, "tie_word_embeddings": tied,
            "use_cache": True, "vocab_size": config.vocab_size}


def save_hf_folder(model, folder, tokenizer, tokenizer_source, dtype=torch.float32, overwrite=False) -> None:
    """A Hugging Face folder that transformers' AutoModelForCausalLM loads to the same logits:
    config.json, model.safetensors (HF names, q/k rows in rotate-half order, lm_head only when
    untied), generation_config.json and the tokenizer: a model folder's own tokenizer files, or the
    tokenizer file in use (with a tokenizer_config.json naming its special tokens and FIM sentinels)."""
    check_exportable(model.config, "hf")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UsageError("--format hf writes safetensors: pip install -r requirements-extra.txt") from None
    config, tied = model.config, model.output.weight is model.tok_embeddings.weight
    state = dict(_hf_name(name, config, tensor) for name, tensor in model.state_dict().items()
                 if not (tied and name == "output.weight"))
    state = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in state.items()}
    config_json = hf_config_json(config, tied, tokenizer.bos_id, tokenizer.eos_id, dtype)

    def write(tmp: Path):
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_json)
        _write_tokenizer_files(tmp, tokenizer, Path(tokenizer_source))

    write_folder(folder, write, overwrite)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_tokenizer_files(folder: Path, tokenizer, source: Path) -> None:
    """A model folder's tokenizer files as they are; else the tokenizer file, a tokenizer_config.json
    for a SentencePiece one, and a generation_config.json naming BOS and EOS."""
    import shutil

    if source.is_dir():
        for name in HF_TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    else:
        shutil.copyfile(source, folder / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model"))
    sp = getattr(tokenizer, "sp_model", None)
    if sp is not None and not (folder / "tokenizer_config.json").exists():
        added = {str(i): {"content": name, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                          "single_word": False} for name, i in sorted(tokenizer.sentinels.items(), key=lambda x: x[1])
                 if i >= tokenizer.n_words}
        _write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer", "bos_token": sp.id_to_piece(tokenizer.bos_id),
            "eos_token": sp.id_to_piece(tokenizer.eos_id), "unk_token": sp.id_to_piece(sp.unk_id()),
            "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added})
    if not (folder / "generation_config.json").exists():
        eos = sorted(tokenizer.eos_ids)
        _write_json(folder / "generation_config.json", {"bos_token_id": tokenizer.bos_id,
                                                         "eos_token_id": eos[0] if len(eos) == 1 else eos})


def save_peft_adapter(adapter: Adapter, config: LlamaConfig, folder, dtype=torch.float32, overwrite=False) -> None:
    """The adapter as a PEFT LoRA folder that peft.PeftModel.from_pretrained applies to the base's HF
    export: adapter_config.json and adapter_model.safetensors (PEFT's names; B of q/k in rotate-half
    row order, as those weights)."""
    if adapter.sentinel_rows:
        raise UsageError(f"{adapter.source}: its training also trained the FIM sentinel rows of the embedding, "
                         "which a PEFT LoRA adapter cannot carry; export the merged best.pt with --format hf instead")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UsageError("--format peft writes safetensors: pip install -r requirements-extra.txt") from None
    tensors = {}
    for name, tensor in adapter.tensors.items():
        _, layer, module, which = re.fullmatch(r"layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])", name).group(0, 1, 2, 3)
        heads = _rotated_heads(module, config)
        if which == "B" and heads is not None:
            tensor = ours_rows_to_hf(tensor, heads)
        hf = _OURS_TO_HF_LAYER[module]
        tensors[f"base_model.model.model.layers.{layer}.{hf}.lora_{which}.weight"] = tensor.to(dtype).contiguous()
    targets = sorted({name.split(".")[-3] for name in tensors})
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": adapter.base,
                "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
                "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
                "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}

    def write(tmp: Path):
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "adapter_config.json", settings)

    write_folder(folder, write, overwrite)


# GGUF, for llama.cpp. The q/k row order: llama.cpp's "llama" architecture rotates adjacent pairs
# (x[2i], x[2i+1]) of each head (its "normal" RoPE type), as Meta's original code, llama2.c and this
# project do; so its convert_hf_to_gguf.py undoes HF's rotate-half permutation of q_proj / k_proj
# (LlamaModel.permute: reshape(heads, 2, half, cols).swapaxes(1, 2), hf_rows_to_ours here) before
# writing. GGUF thus stores Meta's, i.e. our, order: our q/k weights go in as they are
# (tests/test_export.py checks it against llama.cpp itself when llama-cpp-python is installed).

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
_GGUF_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "output.weight": "output.weight"}
_GGUF_LAYER_NAMES = {"attention_norm": "attn_norm", "attention.compute_query": "attn_q",
                     "attention.compute_key": "attn_k", "attention.compute_value": "attn_v",
                     "attention.compute_output": "attn_output", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
                     "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}
Q8_0_BLOCK = 32  # values per Q8_0 block: a float16 scale and 32 int8, 34 bytes


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_0 of a float32 matrix whose rows are whole blocks of 32: each block becomes its scale
    d = max|x| / 127 (float16) and the 32 int8 values round(x / d), halves away from zero, as ggml
    rounds. Returns the bytes as uint8, (rows, cols / 32 * 34)."""
    rows, cols = x.shape
    blocks = x.astype(np.float32).reshape(-1, Q8_0_BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inverse
    magnitude = np.abs(scaled)
    whole = np.floor(magnitude)
    q = (np.sign(scaled) * (whole + np.floor(2 * (magnitude - whole)))).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(rows, cols // Q8_0_BLOCK * 34)


def _gguf_tensor(tensor: torch.Tensor, gguf_type: str):
    """(array, ggml type for raw bytes or None) of one tensor. Vectors (norm gains, RoPE factors) stay
    float32, as llama.cpp's converter keeps them; matrices go in gguf_type (Q8_0 needs rows of whole
    blocks: other rows go in float16, llama.cpp's own fallback)."""
    import gguf

    x = tensor.detach().to("cpu", torch.float32).contiguous()
    if x.dim() == 1 or gguf_type == "f32":
        return x.numpy(), None
    if gguf_type == "q8_0" and x.shape[1] % Q8_0_BLOCK == 0:
        return quantize_q8_0(x.numpy()), gguf.GGMLQuantizationType.Q8_0
    if gguf_type == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8), gguf.GGMLQuantizationType.BF16
    return x.numpy().astype(np.float16), None


def gguf_rope_factors(config: LlamaConfig) -> Optional[torch.Tensor]:
    """llama3 RoPE scaling as llama.cpp applies it: a rope_freqs tensor of per-pair factors by which
    each frequency is divided (inv_freq / scaled inv_freq); None for other models."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    from rope import scaled_frequencies

    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    return inv_freq / scaled_frequencies(inv_freq, scaling)


def _gguf_metadata(writer, config: LlamaConfig, name: str, gguf_type: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _gguf_vocab(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.*: a SentencePiece model's pieces, scores and token types, then the FIM sentinels
    by name and dummy [PAD<id>] tokens up to the model's vocab_size; BOS, EOS, unknown; the sentinels
    as llama.cpp's FIM ids (<fim_end> as its end-of-turn token, as Code Llama's ▁<EOT>)."""
    import gguf

    from codegen.fim import FIM_END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

    sp, kinds = tokenizer.sp_model, gguf.TokenType
    n = sp.vocab_size()
    tokens = [sp.id_to_piece(i).encode("utf-8") for i in range(n)]
    scores = [float(sp.get_score(i)) for i in range(n)]
    types = [kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i) else kinds.UNUSED
             if sp.is_unused(i) else kinds.BYTE if sp.is_byte(i) else kinds.NORMAL for i in range(n)]
    named = {i: name for name, i in tokenizer.sentinels.items() if i >= n}
    tokens += [named.get(i, f"[PAD{i}]").encode("utf-8") for i in range(n, vocab_size)]
    scores += [-1000.0] * (vocab_size - n)
    types += [kinds.CONTROL if i in named else kinds.UNUSED for i in range(n, vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    keys = {FIM_PREFIX: gguf.Keys.Tokenizer.FIM_PRE_ID, FIM_SUFFIX: gguf.Keys.Tokenizer.FIM_SUF_ID,
            FIM_MIDDLE: gguf.Keys.Tokenizer.FIM_MID_ID, FIM_END: gguf.Keys.Tokenizer.EOT_ID}
    for name, i in tokenizer.sentinels.items():
        writer.add_uint32(keys[name], i)


def _gguf_tensors(model):
    """(GGUF name, tensor) of every weight, in llama.cpp's names; output.weight only when untied."""
    tied = model.output.weight is model.tok_embeddings.weight
    for name, tensor in model.state_dict().items():
        if name in _GGUF_NAMES:
            if not (tied and name == "output.weight"):
                yield _GGUF_NAMES[name], tensor
            continue
        _, layer, rest = name.split(".", 2)  # layers.{i}.{module}.weight
        yield f"blk.{layer}.{_GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight", tensor
    factors = gguf_rope_factors(model.config)
    if factors is not None:
        yield "rope_freqs.weight", factors


def save_gguf(model, path, tokenizer, gguf_type: str = "f32", overwrite: bool = False) -> None:
    """A GGUF file for llama.cpp (architecture "llama"): the metadata it reads, a SentencePiece
    tokenizer padded to the model's vocab_size, and the weights in gguf_type (GGUF_TYPES). Written
    beside `path`, then renamed over it: it appears whole or not at all."""
    check_exportable(model.config, "gguf")
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf_type {gguf_type}: expected one of {', '.join(GGUF_TYPES)}")
    if getattr(tokenizer, "sp_model", None) is None:
        raise UsageError(f"--format gguf: {tokenizer.source} is not a SentencePiece tokenizer; this export writes "
                         "SentencePiece vocabularies only (export --format hf and use llama.cpp's convert_hf_to_gguf.py)")
    if tokenizer.n_words > model.config.vocab_size:
        raise UsageError(f"--format gguf: the tokenizer has {tokenizer.n_words} pieces, more than the model's "
                         f"{model.config.vocab_size} rows: pass the model's own --tokenizer")
    try:
        import gguf
    except ImportError:
        raise UsageError("--format gguf needs the gguf package: pip install -r requirements-extra.txt") from None
    path = Path(path)
    check_out_path(path, False, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _gguf_metadata(writer, model.config, path.stem, gguf_type)
        _gguf_vocab(writer, tokenizer, model.config.vocab_size)
        for name, tensor in _gguf_tensors(model):
            array, raw = _gguf_tensor(tensor, gguf_type)
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def check_vocab(model, tokenizer, path, fix: str) -> None:
    """Refuse a checkpoint trained with a smaller vocabulary than the tokenizer's: its embedding lookup
    would fail on the first token id past its rows. `fix` says what to do instead."""
    if model.config.vocab_size < tokenizer.n_words:
        raise CheckpointError(f"{path}: the checkpoint's vocabulary has {model.config.vocab_size} tokens, fewer than "
                              f"the tokenizer's {tokenizer.n_words}; {fix}")


# ----------------------------------------------------------------------------------------------
# pretraining (pretrain.py): llama2.c's train.py checkpoint, stories42M.pt's format

PRETRAINING_KEYS = ("model_args", "model", "optimizer", "iter_num", "best_val_loss", "config", "elapsed")


def save_pretraining(path, model, optimizer, iter_num: int, best_val_loss: float, config: dict, elapsed: float) -> None:
    """Atomically write what llama2.c's train.py writes (as stories42M.pt holds): model_args (the whole
    LlamaConfig, `causal` and `norm_type` included, so that load_pretrained builds the model that was
    trained), the weights, the optimizer state, iter_num (steps done), best_val_loss and config (the
    run's settings), plus elapsed (seconds trained), which --resume continues from."""
    atomic_save({"model_args": dataclasses.asdict(model.config),
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "iter_num": iter_num, "best_val_loss": best_val_loss,
                 "config": config, "elapsed": elapsed}, path)


def load_pretraining(path) -> tuple:
    """(model, the dict save_pretraining wrote) for --resume; a checkpoint without the training state
    (a stories42M.pt-style file without "optimizer", a code-training best.pt) is refused."""
    saved = _torch_load(Path(path))
    missing = [k for k in PRETRAINING_KEYS if k not in saved] if isinstance(saved, dict) else list(PRETRAINING_KEYS)
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it (no {', '.join(missing)}: not written by --option "
                              "pretrain); start a new run without --resume, or pass the --out of the run to continue")
    return load_pretrained(path), saved


# ----------------------------------------------------------------------------------------------
# run_llama's classifiers


def save_classifier(model, config, path) -> None:
    """Atomically save a fine-tuned LlamaEmbeddingClassifier: the trained tensors (a LoRA run keeps
    only its adapters and the head: lora.lora_state_dict), the classifier's settings (config, a
    namespace) and its backbone's model_args, `causal` included, which load_classifier reuses."""
    from lora import lora_state_dict

    config.causal = model.llama.config.causal
    lora = config.option == "lora"
    state = lora_state_dict(model, extra="classifier_head") if lora else model.state_dict()
    atomic_save({"model": state, "model_config": vars(config),
                 "model_args": dataclasses.asdict(model.llama.config)}, path)


def load_classifier(path, pretrained_model_path=None) -> tuple:
    """(the classifier save_classifier wrote, its settings). A fine-tuned one is rebuilt from the file alone
    (its backbone from the saved model_args); a LoRA one holds only what it trained, so its backbone is
    loaded again from the pretrained checkpoint named in its settings, or pretrained_model_path if given."""
    from types import SimpleNamespace

    from classifier import LlamaEmbeddingClassifier
    from lora import load_lora_state_dict

    saved = _torch_load(Path(path))
    if not isinstance(saved, dict) or not isinstance(saved.get("model_config"), dict) or "model" not in saved:
        raise CheckpointError(f"{path}: not a classifier checkpoint (expected 'model' and 'model_config', "
                              "as run_llama.py --option finetune/lora writes)")
    config = SimpleNamespace(**saved["model_config"])
    if pretrained_model_path is not None:
        config.pretrained_model_path = pretrained_model_path
    backbone = None
    if config.option == "finetune" and isinstance(saved.get("model_args"), dict):
        try:
            backbone = LlamaConfig.from_model_args(saved["model_args"])
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise CheckpointError(f"{path}: its model_args do not make a valid config ({e})") from None
    model = LlamaEmbeddingClassifier(config, backbone)
    from quantize import quantize_model   # QLoRA: the adapters were trained on the quantized base

    quantize_model(model.llama, getattr(config, "quantize", "none"))
    try:
        if config.option == "lora":
            load_lora_state_dict(model, saved["model"], extra="classifier_head")
        else:
            model.load_state_dict(saved["model"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: the saved tensors do not fit the classifier ({e})") from None
    return model, config


# ----------------------------------------------------------------------------------------------
# code-training checkpoints


def code_metadata(path) -> dict:
    """The "codegen" entry (FIM sentinel ids, training settings) of a checkpoint written by code
    training; {} for any other checkpoint."""
    if Path(path).is_dir() or Path(path).suffix == ".bin":  # a HF folder or a llama2.c file: no codegen entry
        return {}
    meta = _torch_load(Path(path)).get("codegen", {})
    return meta if isinstance(meta, dict) else {}


def rng_state() -> dict:
    """Every random generator a training step draws from (Python, NumPy, torch, CUDA), as tensors and
    plain values that torch.load(weights_only=True) reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what rng_state() captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass
class CodeTrainingState:
    """Where a code-training run (codegen/train.py) stands, and the one definition of what its checkpoints hold.

    last.pt (save_last / load_last, the keys LAST_KEYS): the fields below, except that the snapshot
    fields are taken from the live model and optimizer when saving (the unmerged state dict, adapters
    included, and whether the output matrix is tied to the embedding), the RNG states when saving, and
    best_valid_loss is None while there is none (math.inf here). --resume needs all of it.

    best.pt (save_best, BEST_KEYS): the stories42M.pt format that load_pretrained reads, model_args and
    the LoRA-merged weights (lora.merged_state_dict), plus "codegen": the metadata dict (sentinel ids,
    which checkpoint.code_metadata and codegen.common.load_code_model read) with the best step's step,
    epoch, valid_loss and chrf. A LoRA run also keeps the unmerged adapters of that step beside it,
    best_adapter.pt (save_training_adapter), for --adapter and `--option export --format peft`."""

    settings: dict  # what fixes the trainable model (codegen.model_setup.model_settings)
    codegen: dict  # checkpoint metadata (codegen.model_setup.codegen_metadata)
    args: dict = dataclasses.field(default_factory=dict)  # the command line, JSON-able
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch under way (0-based)
    groups_done: int = 0  # optimizer steps done in it
    best_valid_loss: float = math.inf
    best_step: Optional[int] = None
    best_chrf: Optional[float] = None
    elapsed: float = 0.0  # training seconds, all invocations together, when last saved
    last_eval_step: Optional[int] = None
    epoch_times: dict = dataclasses.field(default_factory=dict)  # {epoch: seconds}
    # snapshots, filled by load_last and put back by restore(); None in a new run
    model_args: Optional[dict] = None
    tied: Optional[bool] = None
    model: Optional[dict] = None
    optimizer: Optional[dict] = None
    rng: Optional[dict] = None

    LAST_KEYS = ("model_args", "tied", "model", "optimizer", "step", "epoch", "groups_done", "best_valid_loss",
                 "best_step", "best_chrf", "elapsed", "last_eval_step", "epoch_times", "rng", "settings",
                 "codegen", "args")
    BEST_KEYS = ("model_args", "model", "codegen")

    def improves(self, valid_loss: float) -> bool:
        return valid_loss < self.best_valid_loss

    def save_last(self, path, model, optimizer) -> None:
        """Atomically write last.pt: this state with the model's, the optimizer's and the RNGs' now."""
        snapshot = {"model_args": dataclasses.asdict(model.config),
                    "tied": model.output.weight is model.tok_embeddings.weight,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "rng": rng_state()}
        progress = {"step": self.step, "epoch": self.epoch, "groups_done": self.groups_done,
                    "best_valid_loss": None if math.isinf(self.best_valid_loss) else self.best_valid_loss,
                    "best_step": self.best_step, "best_chrf": self.best_chrf, "elapsed": self.elapsed,
                    "last_eval_step": self.last_eval_step,
                    "epoch_times": {str(k): v for k, v in self.epoch_times.items()}}
        saved = {**snapshot, **progress, "settings": self.settings, "codegen": self.codegen, "args": self.args}
        atomic_save({k: saved[k] for k in self.LAST_KEYS}, path)

    @classmethod
    def load_last(cls, path) -> "CodeTrainingState":
        """The state save_last wrote, snapshots included (restore() puts them into a model and optimizer)."""
        saved = _torch_load(Path(path))
        missing = [k for k in cls.LAST_KEYS if k not in saved] if isinstance(saved, dict) else list(cls.LAST_KEYS)
        if missing:
            raise CheckpointError(f"{path}: not a code-training last.pt (missing {missing}); start a new run "
                                  "without --resume")
        fields = {k: saved[k] for k in cls.LAST_KEYS}
        if fields["best_valid_loss"] is None:
            fields["best_valid_loss"] = math.inf
        fields["epoch_times"] = {int(k): v for k, v in fields["epoch_times"].items()}
        return cls(**fields)

    def restore(self, model, optimizer) -> None:
        """Load the snapshots into the model (set up as saved: adapters injected) and the optimizer, and set
        the RNGs; the tensors are then dropped from this state."""
        model.load_state_dict(self.model, strict=True)
        optimizer.load_state_dict(self.optimizer)
        set_rng_state(self.rng)
        self.model = self.optimizer = None

    def save_best(self, path, model) -> None:
        """Atomically write best.pt from the model as it is now, the new best: the metadata records this
        state's step, epoch, best_valid_loss (as valid_loss) and best_chrf (as chrf). A LoRA run also
        writes its unmerged adapters beside it, first (training_adapter_path: best_adapter.pt), which
        `--option export --format peft` turns into a PEFT adapter."""
        from lora import lora_layers, merged_state_dict

        meta = {**self.codegen, "step": self.step, "epoch": self.epoch, "valid_loss": self.best_valid_loss,
                "chrf": self.best_chrf}
        if self.settings.get("mode") == "lora" and lora_layers(model):
            save_training_adapter(training_adapter_path(path), model, self.settings, self.codegen, self.step)
        atomic_save({"model_args": dataclasses.asdict(model.config), "model": merged_state_dict(model),
                     "codegen": meta}, path)

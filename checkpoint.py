"""Every checkpoint format the project reads or writes, in one place; each failure is a CheckpointError.

    load_pretrained(path, **overrides) -> Llama    stories42M.pt (minllama or llama2.c names), llama2.c .bin,
                                                   a Hugging Face Llama folder (load_hf_folder)
    save_llama2c_bin(model, path)                  the .bin that llama2.c's run.c reads
    save_classifier(model, config, path)           run_llama's fine-tuned classifier (LoRA: adapters + head)
    load_classifier(path) -> classifier            ... and back
    code_metadata(path) -> dict                    the "codegen" entry of a code-training best.pt
    CodeTrainingState                              a code-training run's progress and what its last.pt /
                                                   best.pt hold: save_last, load_last + restore, save_best
    rng_state() / set_rng_state(state)             every RNG a training step uses, for --resume

`from llama import load_pretrained` keeps working (the course's sanity_check.py imports it from there).
"""
import dataclasses
import json
import math
import random
import struct
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from config import LlamaConfig
from rope import rope_frequencies
from utils import CheckpointError, atomic_save, atomic_write

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
    layout = _llama2c_layout(config, shared)
    expected = _BIN_HEADER.size + 4 * sum(math.prod(shape) for _, shape in layout)
    if len(data) != expected:
        raise CheckpointError(f"{path}: {len(data)} bytes, but a llama2.c checkpoint with this header has "
                              f"{expected} (truncated, or not a llama2.c .bin file)")
    flat = torch.frombuffer(bytearray(data[_BIN_HEADER.size :]), dtype=torch.float32)
    state_dict, offset = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        state_dict[name] = flat[offset : offset + n].view(shape).clone()
        offset += n
    for name in _IGNORED_KEYS:
        state_dict.pop(name)
    return config, state_dict


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


def load_pretrained(checkpoint, dtype: Optional[torch.dtype] = None, **overrides):
    """Build a Llama from a stories42M.pt-style dict (either naming scheme), a llama2.c .bin, or a
    Hugging Face Llama folder (see load_hf_folder); `dtype` stores the weights in that dtype
    (default float32).

    `overrides` replace config fields, e.g. norm_type="rmsnorm", causal=True or dropout=0.1.
    Defaults follow the format: .pt files get the assignment's LayerNorm (with a bias when the file
    has `*norm.bias` tensors), .bin files and HF folders RMSNorm. A plain stories42M.pt (see
    is_course_checkpoint) is non-causal, as the course's reference computed it; .bin files, HF
    models and everything this project writes are causal (the latter record `causal` in their
    model_args)."""
    path = Path(checkpoint)
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
    from llama import Llama  # here, not at the top: llama.py re-exports this function

    model = Llama(config)
    load_state_dict_strict(model, state_dict, path)
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


def hf_config(folder: Path, overrides: dict) -> LlamaConfig:
    """Our LlamaConfig from a HF config.json, in either schema: older files put rope_theta and
    rope_scaling at the top level; transformers 5 writes rope_parameters (rope_theta, rope_type)."""
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json: not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not readable JSON ({e})") from None
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
        if kind not in ("default", "linear", "llama3"):
            problem = f"rope type {kind!r}: supported are default, linear, llama3"
    if problem:
        raise CheckpointError(f"{folder / 'config.json'}: {problem}")


def _hf_weight_files(folder: Path):
    """The safetensors (or pytorch_model.bin) files holding a HF folder's weights, shards included."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"]
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
    heads = {"self_attn.q_proj": config.n_heads, "self_attn.k_proj": config.n_kv_heads}.get(module)
    if heads is not None and tensor.dim() == 2 and tensor.shape[0] % (2 * heads) == 0:
        rows, cols = tensor.shape
        tensor = tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    return f"layers.{parts[2]}.{_HF_LAYER_NAMES[module]}.weight", tensor


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
    with torch.device("meta"):
        model = Llama(config)
    load_state_dict_strict(model, state, folder, assign=True)
    cos, sin = rope_frequencies(config.head_dim, config.max_seq_len, config.rope_theta, scaling=config.rope_scaling)
    model.freqs_cos, model.freqs_sin = cos, sin
    return model


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


def load_classifier(path):
    """The classifier save_classifier wrote: its backbone is loaded again from the pretrained
    checkpoint named in its settings (a LoRA run stores only what it trained)."""
    from types import SimpleNamespace

    from classifier import LlamaEmbeddingClassifier
    from lora import load_lora_state_dict

    saved = _torch_load(Path(path))
    if not isinstance(saved, dict) or not isinstance(saved.get("model_config"), dict) or "model" not in saved:
        raise CheckpointError(f"{path}: not a classifier checkpoint (expected 'model' and 'model_config', "
                              "as run_llama.py --option finetune/lora writes)")
    config = SimpleNamespace(**saved["model_config"])
    model = LlamaEmbeddingClassifier(config)
    try:
        if config.option == "lora":
            load_lora_state_dict(model, saved["model"], extra="classifier_head")
        else:
            model.load_state_dict(saved["model"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: the saved tensors do not fit the classifier ({e})") from None
    return model


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
    epoch, valid_loss and chrf."""

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
        state's step, epoch, best_valid_loss (as valid_loss) and best_chrf (as chrf)."""
        from lora import merged_state_dict

        meta = {**self.codegen, "step": self.step, "epoch": self.epoch, "valid_loss": self.best_valid_loss,
                "chrf": self.best_chrf}
        atomic_save({"model_args": dataclasses.asdict(model.config), "model": merged_state_dict(model),
                     "codegen": meta}, path)

"""LoRA: Low-Rank Adaptation of a frozen model (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A pretrained weight W0 (out, in) stays frozen; fine-tuning learns only a low-rank update:

    h = W0 x + (alpha / r) * B A x          A: (r, in), B: (out, r), r << min(in, out)

A starts random (Kaiming-uniform) and B at zero, so at step 0 the model is exactly the pretrained
one and the update B A grows from there. alpha / r keeps the update's size roughly independent of
r, so alpha need not be retuned when r changes. Dropout, if any, is applied to x on the LoRA path
only. After training, W0 + (alpha / r) B A can be folded into the base weight (merge), so that
inference costs nothing extra.

Typical use:
    names = inject_lora(model, rank=8, alpha=16)   # q and v projections, as in the paper
    mark_only_lora_trainable(model, extra=("classifier_head",))
    ... train ...
    torch.save(lora_state_dict(model), "adapter.pt")   # kilobytes instead of the whole model
    unload_lora(model)                                  # or fold the update in: a plain model again

QLoRA (Dettmers et al. 2023): the frozen base in 4 bits, the adapters in full precision. quantize.quantize_model
replaces the model's nn.Linear layers by quantize.NF4Linear (or Int8Linear), before or after inject_lora, which
wraps those as it wraps nn.Linear; gradients flow through the dequantized base to the adapters. Merging
dequantizes: a merged layer computes with W0 dequantized + (alpha / r) B A (held in full precision until
unmerged), unload_lora puts a full-precision nn.Linear in its place, and merged_state_dict gives the
full-precision weights a plain model loads.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import QuantizedLinear

DEFAULT_TARGETS = ("compute_query", "compute_value")


class LoRALayer(nn.Module):
    """A frozen nn.Linear or quantize.QuantizedLinear (`self.base`) plus a trainable low-rank update
    (alpha / rank) * B A."""

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        if isinstance(base, QuantizedLinear):
            factory = dict(device=base.device, dtype=base.dtype)
        else:
            factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.register_buffer("merged_weight", None, persistent=False)  # a quantized base's, while merged

    @property
    def quantized(self) -> bool:
        return isinstance(self.base, QuantizedLinear)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def weight(self):
        """The base weight (with the update folded in while merged), for code that reads .weight; a
        quantized base's dequantized."""
        if self.quantized:
            return self.merged_weight if self.merged else self.base.dequantize()
        return self.base.weight

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self):
        """Fold the update into the weight: into the base weight, or for a quantized base into a
        full-precision copy of it (merged_weight; the quantized base stays as it is)."""
        if not self.merged:
            if self.quantized:
                self.merged_weight = self.base.dequantize() + self.delta_weight()
            else:
                self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            if self.quantized:
                self.merged_weight = None
            else:
                self.base.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.merged_weight, self.base.bias) if self.quantized else self.base(x)
        return self.base(x) + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _attr(name: str) -> str:
    """'layers.0.attention.compute_query' -> 'compute_query'."""
    return name.rpartition(".")[2]


def _as_tuple(names):
    return (names,) if isinstance(names, str) else tuple(names)


def _is_lora(name: str) -> bool:
    return _attr(name) in ("lora_A", "lora_B")


def inject_lora(model: nn.Module, rank: int = 4, alpha: float = 1.0, dropout: float = 0.0,
                targets=DEFAULT_TARGETS) -> list:
    """Replace, in place, every nn.Linear (or quantized one: QLoRA) whose attribute name is in `targets` by a
    LoRALayer wrapping it. Returns the replaced modules' names, e.g. 'layers.0.attention.compute_query'."""
    targets = _as_tuple(targets)
    linears = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    chosen = [name for name in linears if _attr(name) in targets]
    unmatched = sorted(set(targets) - {_attr(name) for name in chosen})
    if unmatched or not chosen:  # a typo would otherwise silently train fewer layers than intended
        available = sorted({_attr(name) for name in linears})
        hint = " (LoRA is already injected)" if lora_layers(model) else ""
        raise ValueError(f"LoRA targets {unmatched} match no nn.Linear in the model{hint} (targets={list(targets)}); "
                         f"available Linear names: {available}")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALayer(getattr(parent, attr), rank, alpha, dropout))
    return chosen


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def merge_lora(model: nn.Module):
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module):
    for layer in lora_layers(model):
        layer.unmerge()


@torch.no_grad()
def unload_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put the plain nn.Linear back in place of each
    LoRALayer: the model computes the same at no extra cost, and is a plain model again (its weights
    trainable, as a freshly loaded model's). A quantized base becomes a full-precision nn.Linear holding
    the dequantized weight plus the update (quantize.dequantize_model does the same for quantized layers
    without LoRA)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALayer):
            module.merge()
            plain = module.base.to_linear(module.merged_weight) if module.quantized else module.base
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain.requires_grad_(True))


def mark_only_lora_trainable(model: nn.Module, extra=()):
    """Freeze everything except the LoRA matrices and parameters whose name starts with a prefix
    in `extra` (a task head such as 'classifier_head')."""
    extra = _as_tuple(extra)
    for name, p in model.named_parameters():
        p.requires_grad = _is_lora(name) or name.startswith(extra)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def lora_state_dict(model: nn.Module, extra=()) -> dict:
    """Only the adapter: the LoRA matrices, plus tensors whose name starts with a prefix in `extra`."""
    extra = _as_tuple(extra)
    return {k: v for k, v in model.state_dict().items() if _is_lora(k) or k.startswith(extra)}


def load_lora_state_dict(model: nn.Module, state_dict: dict, extra=()):
    """Load an adapter saved by lora_state_dict into a model injected with the same targets and rank.
    Every LoRA tensor of the model (and every tensor whose name starts with a prefix in `extra`) must
    be provided, and every provided tensor must exist in the model."""
    if any(layer.merged for layer in lora_layers(model)):
        raise ValueError("cannot load LoRA weights into a merged model: call unmerge_lora(model) first")
    extra = _as_tuple(extra)
    own = model.state_dict()
    missing = sorted(k for k in own if (_is_lora(k) or k.startswith(extra)) and k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = [f"{k}: adapter {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    problems = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {unexpected}"] * bool(unexpected)
    problems += [f"shape mismatches {mismatched}"] * bool(mismatched)
    if problems:
        raise ValueError("LoRA state dict does not fit the model (were the same targets and rank injected?): "
                         + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict:
    """The model's weights on the CPU with every LoRA update folded in, quantized weights dequantized
    (QLoRA: merging dequantizes) and no LoRA keys: what the model without adapters or quantization
    expects (a plain Llama for load_pretrained). The model itself is left as it is (merged or not);
    tied matrices stay one shared tensor."""
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    bases = {name + ".base" for name in lora}
    full = {name: (lambda m=m: m.weight if m.merged else m.weight + m.delta_weight()) for name, m in lora.items()}
    full.update({name: m.dequantize for name, m in model.named_modules()
                 if isinstance(m, QuantizedLinear) and name not in bases})  # module -> its full-precision weight
    copies, state = {}, {}  # data_ptr -> CPU copy, so that tied matrices stay one tensor
    for key, value in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        owner, _, leaf = key.rpartition(".")
        owner = owner[: -len(".base")] if owner in bases else owner
        if owner in full:  # the weight (or a quantized weight's buffers) of a LoRA or quantized layer, or its bias
            target = f"{owner}.bias" if leaf == "bias" else f"{owner}.weight"
            if target not in state:
                state[target] = (value if leaf == "bias" else full[owner]()).detach().to("cpu", copy=True)
            continue
        if value.data_ptr() not in copies:
            copies[value.data_ptr()] = value.detach().to("cpu", copy=True)
        state[key] = copies[value.data_ptr()]
    return state


def expected_lora_parameters(config, rank: int, targets=DEFAULT_TARGETS) -> int:
    """LoRA parameters a Llama with `config` gets: each targeted (in -> out) Linear adds A (rank, in)
    and B (out, rank), i.e. rank * (in + out), in each of the n_layers layers."""
    q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"compute_query": (config.dim, q_dim), "compute_key": (config.dim, kv_dim),
              "compute_value": (config.dim, kv_dim), "compute_output": (q_dim, config.dim),
              "w1": (config.dim, config.hidden_dim), "w2": (config.hidden_dim, config.dim),
              "w3": (config.dim, config.hidden_dim)}
    targets = _as_tuple(targets)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; expected a subset of {list(shapes)}")
    return config.n_layers * sum(rank * sum(shapes[t]) for t in set(targets))

"""Model hyper-parameters: the keys of a stories42M.pt `model_args` dict, plus our additions."""
from dataclasses import dataclass, fields
from typing import Optional

NORM_TYPES = ("layernorm", "rmsnorm")


@dataclass
class LlamaConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None = n_heads (plain multi-head attention)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # None = derived from dim and multiple_of, as in Llama 2
    multiple_of: int = 32
    max_seq_len: int = 1024
    dropout: float = 0.0
    norm_eps: float = 1e-5
    norm_type: str = "layernorm"  # the assignment's choice; "rmsnorm" is what Llama 2 was trained with
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # long-context RoPE (Hugging Face's rope_scaling: "linear", "llama3")
    norm_bias: bool = False  # LayerNorm with a bias (a checkpoint carrying `*norm.bias` tensors)
    # True: a position attends to itself and earlier positions only (next-token prediction: llama2.c,
    # Hugging Face and code models, all this project trains). False: every position attends to every
    # position, pads included, which is what the course's reference code computes for stories42M.pt
    # (see load_pretrained for which checkpoints get which).
    causal: bool = True

    def __post_init__(self):
        sizes = {name: getattr(self, name) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                        "hidden_dim", "multiple_of", "max_seq_len")}
        bad = [f"{name}={v!r}" for name, v in sizes.items()  # None: derived below
               if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1)]
        if bad:
            raise ValueError("invalid LlamaConfig: sizes must be positive integers: " + ", ".join(bad))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            # SwiGLU has three matrices instead of two, so Llama shrinks 4*dim by 2/3 to keep the
            # parameter count, then rounds up to a multiple of `multiple_of`.
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        problems = [f"{name}={getattr(self, name)!r} must be True or False"
                    for name in ("causal", "norm_bias") if not isinstance(getattr(self, name), bool)]
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            problems.append(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.norm_type not in NORM_TYPES:
            problems.append(f"norm_type={self.norm_type!r} is not one of {NORM_TYPES}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            needed = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                                       "original_max_position_embeddings")}
            if kind not in needed:
                problems.append(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(needed)})")
            elif any(key not in self.rope_scaling for key in needed[kind]):
                problems.append(f"rope_scaling {kind!r} needs {', '.join(needed[kind])}")
        if self.norm_bias and self.norm_type != "layernorm":
            problems.append("norm_bias=True needs norm_type='layernorm' (RMSNorm has no bias)")
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @classmethod
    def from_model_args(cls, args, **overrides):
        """Build from a checkpoint's `model_args` (accepting `layer_norm_eps` for `norm_eps`)."""
        args = {**args, **overrides}
        if "layer_norm_eps" in args:
            args["norm_eps"] = args.pop("layer_norm_eps")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown model_args {unknown}; expected a subset of {sorted(known)}")
        return cls(**args)

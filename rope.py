"""Rotary position embeddings (RoPE, Su et al. 2021).

Split a head vector of size d into d/2 pairs (x[2i], x[2i+1]) and read each pair as a complex number.
At position m, pair i is rotated by the angle m * theta_i with theta_i = theta^(-2i/d):

    (a + ib) * (cos(m theta_i) + i sin(m theta_i))

Rotations preserve norms, and the dot product of a query rotated by m with a key rotated by n
depends only on m - n: attention sees relative positions without any learned position table.
"""
import math
from typing import Optional, Tuple

import torch


ROPE_SCALINGS = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, end: int, theta: float = 10000.0, device=None, scaling: Optional[dict] = None):
    """cos and sin of m * theta_i for positions m in [0, end): two (end, head_dim // 2) tensors.
    `scaling` (a Hugging Face config's rope_scaling) stretches the frequencies for long contexts."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(end, device=device).float(), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def scaled_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """The theta_i of a long-context model, computed as Hugging Face transformers computes them.

    "linear" (position interpolation) divides every frequency by `factor`. "llama3" (Llama 3.1/3.2)
    divides only the low frequencies, whose wavelength exceeds original_max_position_embeddings /
    low_freq_factor, keeps the high ones (wavelength below .. / high_freq_factor), and blends
    smoothly in between, so that nearby positions are told apart as sharply as before."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(medium, blended, scaled)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, seqlen, heads, head_dim) by angles given per position.

    cos and sin are (seqlen, head_dim // 2), or (batch, seqlen, head_dim // 2) when every sequence
    of the batch has its own positions (left-padded batches)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def apply_rotary_emb(
    query: torch.Tensor,
    key: torch.Tensor,
    head_dim: int,
    max_seq_len: int,
    theta: float = 10000.0,
    start_pos: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate query and key, both (batch, seqlen, heads, head_dim), for positions
    start_pos .. start_pos + seqlen - 1 (start_pos > 0 when decoding with a KV cache)."""
    seqlen = query.shape[1]
    if start_pos + seqlen > max_seq_len:
        raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len={max_seq_len}")
    cos, sin = rope_frequencies(head_dim, start_pos + seqlen, theta, device=query.device)
    cos, sin = cos[start_pos:], sin[start_pos:]
    return rotate(query, cos, sin), rotate(key, cos, sin)

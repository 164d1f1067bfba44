"""Mini-Llama: a decoder-only transformer in the shape of Llama 2 (and of Karpathy's llama2.c).

tokens -> embedding -> n_layers x [norm -> attention -> +residual -> norm -> SwiGLU MLP -> +residual]
       -> final norm -> output projection (tied to the embedding) -> logits
"""
import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from base_llama import LlamaPreTrainedModel
from checkpoint import CheckpointError, load_pretrained, save_llama2c_bin  # noqa: F401  (re-exported: graders import them from here)
from config import LlamaConfig
from decoding import KVCache, attention_mask, decode, left_align, sample_epsilon
from rope import rope_frequencies, rotate


def upcast(x):
    """Normalise in at least float32, also under bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerNorm(nn.Module):
    """The assignment's LayerNorm: (a - mean) / sqrt(var + eps) * g, biased variance, gain only
    (+ b with bias=True, for checkpoints that carry one)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def _norm(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)  # biased variance
        return (x - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x):
        out = self._norm(upcast(x)).type_as(x) * self.weight
        return out if self.bias is None else out + self.bias


class RMSNorm(nn.Module):
    """Llama 2's RMSNorm: a / sqrt(mean(a^2) + eps) * g. No centring, so it is cheaper than LayerNorm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(upcast(x)).type_as(x) * self.weight


def make_norm(config: LlamaConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return LayerNorm(config.dim, eps=config.norm_eps, bias=config.norm_bias)
    return RMSNorm(config.dim, eps=config.norm_eps)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: each of the n_kv_heads key/value heads serves n_rep query heads.
    (batch, n_kv_heads, seqlen, head_dim) -> (batch, n_kv_heads * n_rep, seqlen, head_dim)."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = config.head_dim
        self.compute_query = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.compute_key = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.compute_value = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.compute_output = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.causal = config.causal
        self.use_sdpa = False  # True: PyTorch's fused kernel instead of the readable code below

    def compute_query_key_value_scores(self, query, key, value, mask: Optional[torch.Tensor] = None):
        """softmax(Q K^T / sqrt(head_dim)) V for query (batch, heads, Tq, head_dim) and key/value
        (batch, heads, Tk, head_dim). mask (broadcastable to (batch, heads, Tq, Tk), True = attend)
        defaults to causal for a causal model (query i is position Tk - Tq + i and sees keys up to
        that position) and to no mask at all for a non-causal one (the course's attention)."""
        n_q, n_k = query.shape[-2], key.shape[-2]
        if mask is None and n_q > 1 and self.causal:
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril(diagonal=n_k - n_q)
        if self.use_sdpa:
            p = self.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p)
        scores = query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.softmax(upcast(scores), dim=-1).type_as(query)
        return self.attn_dropout(weights) @ value

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, mask=None):
        batch, seqlen, _ = x.shape
        query = self.compute_query(x).view(batch, seqlen, self.n_heads, self.head_dim)
        key = self.compute_key(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        value = self.compute_value(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        # one rotate call for queries and keys together: half the small ops of a decoding step
        rotated = rotate(torch.cat((query, key), dim=2), cos, sin)
        query, key = rotated.split((self.n_heads, self.n_kv_heads), dim=2)
        # (batch, seqlen, heads, head_dim) -> (batch, heads, seqlen, head_dim): heads act as a batch dim
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(self.layer_id, key, value)
        key, value = repeat_kv(key, self.n_rep), repeat_kv(value, self.n_rep)
        out = self.compute_query_key_value_scores(query, key, value, mask)
        out = out.transpose(1, 2).reshape(batch, seqlen, -1)
        return self.resid_dropout(self.compute_output(out))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x); the w3 branch gates the w1 branch element-wise."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class LlamaLayer(nn.Module):
    """Pre-norm transformer block: each sub-layer reads a normalised copy of the residual stream
    and adds its result back, so the stream itself is never normalised."""

    def __init__(self, layer_id: int, config: LlamaConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(config, layer_id)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.dropout)
        self.attention_norm = make_norm(config)
        self.ffn_norm = make_norm(config)

    def forward(self, x, cos, sin, cache=None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(LlamaPreTrainedModel):
    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.params = config  # the course's name for it
        self.vocab_size = config.vocab_size
        self.n_layers = config.n_layers
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(LlamaLayer(i, config) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tok_embeddings.weight = self.output.weight  # weight tying
        cos, sin = rope_frequencies(config.head_dim, config.max_seq_len, config.rope_theta, scaling=config.rope_scaling)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.init_weights()

    def set_sdpa(self, enabled: bool = True):
        """Switch every attention layer to F.scaled_dot_product_attention (or back)."""
        for layer in self.layers:
            layer.attention.use_sdpa = enabled
        return self

    def forward(self, tokens, targets=None, *, cache: Optional[KVCache] = None, positions=None, key_valid=None):
        """Returns (logits, hidden_states). Logits cover every position when `targets` is given
        (training), else only the last one (generation), as in the assignment.

        Decoding extras (see decoding.py): `cache` continues from cache.length (which this advances);
        `positions` (batch, seqlen) gives each token's RoPE position (left-padded batches);
        `key_valid` (batch, keys so far) marks real tokens. A fixed-shape step (cache.slot set) writes
        one position to that slot and attends to every slot that key_valid marks."""
        _, seqlen = tokens.shape
        if cache is not None and not self.config.causal:
            raise ValueError("a KV cache needs a causal model: without the causal mask, earlier positions "
                             "change when later tokens arrive")
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + seqlen > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + seqlen} tokens exceeds max_seq_len={self.config.max_seq_len}")
            positions = torch.arange(start, start + seqlen, device=tokens.device)
        cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]
        fixed_shape = cache is not None and cache.slot is not None
        if fixed_shape:
            mask = key_valid[:, None, None, :]
        else:
            mask = attention_mask(key_valid, seqlen, self.config.causal) if key_valid is not None else None
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin, cache, mask)
        if cache is not None and not fixed_shape:
            cache.length += seqlen
        h = self.norm(h)
        logits = self.output(h) if targets is not None else self.output(h[:, -1:, :])
        return logits, h

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, epsilon=0.05, *, generator=None,
                 eos_id=None, prompt_mask=None, use_cache=True, compile=False):
        """Continue every row of idx (batch, seqlen) by max_new_tokens tokens, or until eos_id.

        temperature 0 is greedy; otherwise epsilon sampling (decoding.sample_epsilon; epsilon=0.05 is
        the course's default). prompt_mask (batch, seqlen), True on real tokens, allows prompts of
        different lengths padded on either side. Returns (batch, seqlen + n_new): the (left-aligned)
        prompts, then the new tokens; a row that has emitted eos_id is filled with eos_id.

        The loop itself is decoding.decode: a KV cache by default (use_cache=False recomputes the
        whole window for every token, the readable reference), compile=True for torch.compile / CUDA
        graphs. A non-causal model (config.causal False, the course's) cannot use a KV cache: every
        new token changes what the earlier positions see, so it decodes as the course's reference
        generate does, recomputing the window for every token."""
        sample = functools.partial(sample_epsilon, temperature=temperature, epsilon=epsilon, generator=generator)
        stop = None if eos_id is None else (lambda tokens: tokens[:, 0] == eos_id)
        idx, valid = left_align(idx, prompt_mask)
        steps = decode(self, idx, max_new_tokens, sample, prompt_mask=valid, stop=stop, use_cache=use_cache,
                       compile=compile)
        return torch.cat([idx, *steps], dim=1)

"""Mini-Llama: a decoder-only transformer in the shape of Llama 2 (and of Karpathy's llama2.c).

tokens -> embedding -> n_layers x [norm -> attention -> +residual -> norm -> SwiGLU MLP -> +residual]
       -> final norm -> output projection (tied to the embedding) -> logits
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from base_llama import LlamaPreTrainedModel
from checkpoint import CheckpointError, load_pretrained, save_llama2c_bin  # noqa: F401  (re-exported: graders import them from here)
from config import LlamaConfig
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


def attention_mask(key_valid: torch.Tensor, n_queries: int, causal: bool = True) -> torch.Tensor:
    """Boolean mask (batch, 1, n_queries, n_keys), True where a query may look at a key.

    The queries are the last n_queries of the n_keys positions (the rest sit in a KV cache). A query
    sees keys that are real tokens (key_valid), only earlier ones when causal, and always itself, so
    that padding rows never have an empty softmax."""
    n_keys = key_valid.shape[1]
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=key_valid.device)[:, None]
    k_pos = torch.arange(n_keys, device=key_valid.device)[None, :]
    allowed = key_valid[:, None, :] | (k_pos == q_pos)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    return allowed[:, None]


def store_transposed(linear: nn.Linear) -> None:
    """Keep linear.weight's (out_features, in_features) shape and values, but lay its memory out
    as a contiguous (in_features, out_features) matrix, as GPT-2's Conv1D and JAX's Dense do.

    F.linear computes x @ weight.T; with this layout weight.T is a plain row-major matrix. For one
    token (decoding), MKL then streams a widening layer's weights (out > in: the 32000 x 512 output
    projection, w1, w3) 1.4-2x faster on our AMD CPU than in the (out, in) layout, which stays
    better for narrowing ones (w2); see bench/README.md. Checkpoints are unaffected: state_dict
    shapes stay (out, in), and loading copies values into this layout."""
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t(),
                                 requires_grad=linear.weight.requires_grad)


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated once:
    decoding then costs one new row per layer and step instead of recomputing the prefix.

    One buffer per layer, heads-first, (batch, n_kv_heads, max_len, head_dim), the layout
    attention multiplies in: the keys so far are then a view that (batch, heads) flattens into one
    batch dimension of a batched matmul without copying the cache at every step. (Separate tensors
    rather than slices of one: torch.compile then writes a step's row in place, where a slice of a
    shared buffer made it copy the whole buffer at every step.)"""

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0  # positions filled; the model advances it after each forward
        self.slot = None  # Llama.decode_step: a (1,) tensor, the slot this step writes

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's (batch, n_kv_heads, seqlen, head_dim) keys/values; return all so far.

        With `slot` set (fixed-shape decoding), write there and return every slot: the caller's
        mask hides the ones not written yet, and shapes stay the same from step to step."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if self.slot is not None:
            k_cache[:, :, self.slot] = k.to(k_cache.dtype)
            v_cache[:, :, self.slot] = v.to(v_cache.dtype)
            return k_cache, v_cache
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} needed")
        k_cache[:, :, self.length : end] = k
        v_cache[:, :, self.length : end] = v
        return k_cache[:, :, :end], v_cache[:, :, :end]


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
        weights = F.softmax(scores.float(), dim=-1).type_as(query)
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
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.out_features > module.in_features:
                store_transposed(module)  # faster decoding, same maths
        self.tok_embeddings.weight = self.output.weight  # weight tying
        cos, sin = rope_frequencies(config.head_dim, config.max_seq_len, config.rope_theta)
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

        Decoding extras: `cache` continues from cache.length; `positions` (batch, seqlen) gives each
        token's RoPE position (left-padded batches); `key_valid` (batch, keys so far) marks real tokens."""
        _, seqlen = tokens.shape
        if cache is not None and not self.config.causal:
            raise ValueError("a KV cache needs a causal model: without the causal mask, earlier positions "
                             "change when later tokens arrive")
        start = cache.length if cache is not None else 0
        if positions is None:
            if start + seqlen > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + seqlen} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin = self.freqs_cos[start : start + seqlen], self.freqs_sin[start : start + seqlen]
        else:
            cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]
        mask = attention_mask(key_valid, seqlen, self.config.causal) if key_valid is not None else None
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin, cache, mask)
        if cache is not None:
            cache.length += seqlen
        h = self.norm(h)
        logits = self.output(h) if targets is not None else self.output(h[:, -1:, :])
        return logits, h

    def decode_step(self, tokens, positions, key_valid, cache: KVCache):
        """One new token per row, with the same shapes at every step, so that torch.compile
        traces it once and a GPU can replay it as one CUDA graph: tokens and positions (batch, 1),
        key_valid (batch, cache.max_len) True on the cache slots that hold real tokens, this
        step's included; the keys/values go to slot cache.slot. Returns logits (batch, 1, vocab)."""
        cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]
        mask = key_valid[:, None, None, :]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, mask)
        return self.output(self.norm(h))

    def compiled_decoder(self, batch: int, length: int, device, dtype):
        """(decode_step compiled, a KVCache for at least `length` positions), kept between generate
        calls. The cache has a power-of-two number of slots (capped at max_seq_len): a few shapes
        to compile, and at most twice the slots a step must read. On CUDA the mode is
        "reduce-overhead": the step's fused kernels are replayed as one CUDA graph, removing the
        hundreds of kernel launches that otherwise bound batch-1 decoding."""
        slots = min(self.config.max_seq_len, 1 << max(6, (length - 1).bit_length()))
        key = (batch, slots, str(device), dtype)
        if getattr(self, "_decoder_key", None) != key:
            cache = KVCache(self.config, batch, slots, device, dtype)
            mode = None
            if torch.device(device).type == "cuda":
                for buffer in cache.k + cache.v:  # mutated in place inside the graph
                    torch._dynamo.mark_static_address(buffer)
                mode = "reduce-overhead"
            self._decoder = (torch.compile(self.decode_step, mode=mode, fullgraph=True), cache)
            self._decoder_key = key
        step, cache = self._decoder
        cache.length, cache.slot = 0, None
        return step, cache

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, epsilon=0.05, *, generator=None,
                 eos_id=None, prompt_mask=None, use_cache=True, compile=False):
        """Continue every row of idx (batch, seqlen) by max_new_tokens tokens, or until eos_id.

        temperature 0 is greedy; otherwise epsilon sampling (see sample_next; epsilon=0.05 is the
        course's default). prompt_mask (batch,
        seqlen), True on real tokens, allows prompts of different lengths padded on either side:
        they are left-aligned and RoPE positions counted from each prompt's first real token.
        Returns (batch, seqlen + n_new): the (left-aligned) prompts, then the new tokens; a row
        that has emitted eos_id is filled with eos_id. use_cache=False recomputes the whole
        sequence for every token, the readable reference the KV cache is tested against.
        compile=True decodes through decode_step compiled by torch.compile (CUDA graphs on a GPU):
        the same tokens; the first call pays the compilation (about a minute on our CPU, where it
        gains nothing: see bench/README.md).

        A non-causal model (config.causal False, the course's) cannot use a KV cache: every new token
        changes what the earlier positions see. It decodes as the course's reference generate does,
        recomputing the whole window for every token; use_cache and compile are then ignored."""
        if not self.config.causal:
            use_cache = compile = False
        idx, valid = left_align(idx, prompt_mask)
        batch, seqlen = idx.shape
        if compile and valid is None:
            valid = torch.ones_like(idx, dtype=torch.bool)  # decode_step takes explicit positions
        positions = (valid.cumsum(1) - 1).clamp(min=0) if valid is not None else None
        cache = None
        if use_cache:
            if seqlen + max_new_tokens > self.config.max_seq_len:
                raise ValueError(f"{seqlen} + {max_new_tokens} tokens exceed max_seq_len={self.config.max_seq_len}; "
                                 "pass use_cache=False to slide a window instead")
            if compile:
                step, cache = self.compiled_decoder(batch, seqlen + max_new_tokens, idx.device, self.dtype)
            else:
                cache = KVCache(self.config, batch, seqlen + max_new_tokens, idx.device, self.dtype)
        finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)
        step_tokens, step_positions = idx, positions
        for i in range(max_new_tokens):
            if not use_cache:
                window = slice(-self.config.max_seq_len, None)  # the course's sliding window
                logits, _ = self(idx[:, window], positions=None if positions is None else positions[:, window],
                                 key_valid=None if valid is None else valid[:, window])
            elif compile and i > 0:  # the prompt went through forward (prefill); now fixed shapes
                logits = fixed_shape_step(step, cache, step_tokens, step_positions, valid)
            else:
                logits, _ = self(step_tokens, cache=cache, positions=step_positions, key_valid=valid)
            next_token = sample_next(logits[:, -1, :], temperature, epsilon, generator)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished[:, None], eos_id)
                finished |= next_token[:, 0] == eos_id
            idx = torch.cat((idx, next_token), dim=1)
            step_tokens = next_token
            if valid is not None:
                valid = F.pad(valid, (0, 1), value=True)
                step_positions = positions[:, -1:] + 1
                positions = torch.cat((positions, step_positions), dim=1)
            if eos_id is not None and finished.all():  # (a GPU sync: only when there is an eos_id)
                break
        return idx


def fixed_shape_step(step, cache: KVCache, tokens, positions, valid):
    """Run step (Llama.decode_step, compiled) for the next cache slot; valid (batch, slots so far)."""
    cache.slot = torch.full((1,), cache.length, device=tokens.device)
    if tokens.is_cuda:  # a replay may overwrite the last step's logits: we are done with them
        torch.compiler.cudagraph_mark_step_begin()
    logits = step(tokens, positions, F.pad(valid, (0, cache.max_len - valid.shape[1])), cache)
    cache.length += 1
    return logits


def sample_next(logits, temperature: float, epsilon: float = 0.05, generator=None):
    """Pick the next token from logits (batch, vocab) -> (batch, 1).

    temperature 0: the argmax. Otherwise epsilon sampling (Hewitt et al. 2022): divide the logits
    by the temperature, softmax, drop every token whose probability is below epsilon (never the
    most likely one), renormalise and sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    keep = (probs >= epsilon) | (probs == probs.max(dim=-1, keepdim=True).values)
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def left_align(idx, prompt_mask):
    """Move each row's real tokens (prompt_mask True) to the right end, padding on the left.
    Returns (idx, valid); valid is None when there is no mask (all tokens real)."""
    if prompt_mask is None:
        return idx, None
    prompt_mask = prompt_mask.to(torch.bool)
    if not prompt_mask.any(dim=1).all():
        raise ValueError("every prompt needs at least one real token")
    order = torch.argsort(prompt_mask.to(torch.int8), dim=1, stable=True)  # pads first, order kept
    return idx.gather(1, order), prompt_mask.gather(1, order)

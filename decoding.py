"""Decoding: turning a prompt into new tokens, one step at a time.

    KVCache                                   keys and values of the positions seen so far
    attention_mask, left_align                prompts of different lengths in one batch
    greedy, sample_epsilon, sample_top_p, sample_top_k, make_sampler     the next token from logits
    fit_context, keep_last                    how a prompt and its new tokens share the context
    decode(model, idx, n, sample, ...)        THE decoding loop: yields every row's next token, step by step
    compiled_decoder(model, ...)              the fixed-shape step torch.compile traces (CUDA graphs on a GPU)
    decoding_layout(model)                    the CPU memory layout that makes one-token steps fast

Everything that generates text decodes through `decode`: `Llama.generate` (the assignment's API),
code completion and infilling, training-time validation, `code_eval` and the web page.
"""
import functools
from typing import Callable, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# The KV cache and masks


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated once:
    decoding then costs one new row per layer and step instead of recomputing the prefix.

    One buffer per layer, heads-first, (batch, n_kv_heads, max_len, head_dim), the layout
    attention multiplies in: the keys so far are then a view that (batch, heads) flattens into one
    batch dimension of a batched matmul without copying the cache at every step. (Separate tensors
    rather than slices of one: torch.compile then writes a step's row in place, where a slice of a
    shared buffer made it copy the whole buffer at every step.)"""

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0  # positions filled; Llama.forward advances it (fixed-shape steps: fixed_shape_step)
        self.slot = None  # fixed-shape decoding: a (1,) tensor, the slot this step writes

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


# ----------------------------------------------------------------------------------------------
# Samplers: logits (batch, vocab) -> token ids (batch, 1)


def greedy(logits):
    return logits.argmax(dim=-1, keepdim=True)


def sample_epsilon(logits, temperature: float, epsilon: float = 0.05, generator=None):
    """temperature 0: the argmax. Otherwise epsilon sampling (Hewitt et al. 2022): divide the logits
    by the temperature, softmax, drop every token whose probability is below epsilon (never the
    most likely one), renormalise and sample."""
    if temperature == 0.0:
        return greedy(logits)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    keep = (probs >= epsilon) | (probs == probs.max(dim=-1, keepdim=True).values)
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def sample_top_p(logits: torch.Tensor, p: float, temperature: float = 1.0, generator=None) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020); a 1-D (vocab,) input gives a (1,) output.

    Divide the logits by the temperature and softmax; the nucleus is the smallest set of most likely
    tokens whose probability reaches p (a token is in it when the tokens more likely than it hold
    less than p); sample from the nucleus, renormalised. The most likely token is always in it, so
    p = 0 (or temperature 0) is the argmax. Ties are broken by token id, as argmax does."""
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    flat = logits.reshape(-1, logits.shape[-1])
    if temperature == 0.0:
        out = greedy(flat)
    else:
        probs = F.softmax(flat.float() / temperature, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < p
        keep[:, 0] = True
        choice = torch.multinomial(torch.where(keep, sorted_probs, 0.0), num_samples=1, generator=generator)
        out = order.gather(-1, choice)
    return out.reshape(1) if logits.dim() == 1 else out


def sample_top_k(logits, k: int, temperature: float = 1.0, generator=None):
    """Sample among the k most likely tokens, renormalised (k = 1 or temperature 0: the argmax)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
    if temperature == 0.0 or k == 1:
        return greedy(logits)
    values, ids = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1)
    choice = torch.multinomial(F.softmax(values / temperature, dim=-1), num_samples=1, generator=generator)
    return ids.gather(-1, choice)


def make_sampler(temperature: float = 0.0, *, epsilon: float = 0.05, top_p: Optional[float] = None,
                 top_k: Optional[int] = None, generator=None) -> Callable:
    """The sampler for these settings: greedy at temperature 0; otherwise nucleus sampling with top_p,
    top-k sampling with top_k, else epsilon sampling."""
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and top_k is not None:
        raise ValueError("choose top_p or top_k, not both")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    if temperature == 0.0:
        return greedy
    if top_p is not None:
        return functools.partial(sample_top_p, p=top_p, temperature=temperature, generator=generator)
    if top_k is not None:
        return functools.partial(sample_top_k, k=top_k, temperature=temperature, generator=generator)
    return functools.partial(sample_epsilon, temperature=temperature, epsilon=epsilon, generator=generator)


# ----------------------------------------------------------------------------------------------
# Fitting a prompt into the context


def fit_context(n_prompt: int, max_new_tokens: int, max_seq_len: int):
    """(prompt tokens to keep, new tokens to generate) for a prompt of n_prompt tokens.

    When both fit, nothing changes. Otherwise generation gets at most half of the context (or all
    that the prompt leaves), and the prompt keeps the rest: a long budget of new tokens must not cut
    the prompt down to nothing, nor a long prompt leave no room to answer."""
    if n_prompt + max_new_tokens <= max_seq_len:
        return n_prompt, max_new_tokens
    new = max(max_seq_len - n_prompt, min(max_new_tokens, max_seq_len // 2))
    return max_seq_len - new, new


def keep_last(ids: List[int], n: int, bos_id: Optional[int] = None) -> List[int]:
    """The last n tokens of ids (the text nearest the continuation), keeping a leading BOS."""
    if len(ids) <= n:
        return list(ids)
    head = ids[:1] if bos_id is not None and ids and ids[0] == bos_id else []
    return head + ids[len(ids) - (n - len(head)) :] if n > len(head) else ids[:n]


# ----------------------------------------------------------------------------------------------
# Fixed-shape decoding (torch.compile, CUDA graphs) and the CPU layout


def compiled_decoder(model, batch: int, length: int, device, dtype):
    """(the model's forward compiled for one-token steps, a KVCache of at least `length` slots),
    kept on the model between calls. The cache has a power-of-two number of slots (capped at
    max_seq_len): a few shapes to compile, and at most twice the slots a step must read. On CUDA the
    mode is "reduce-overhead": a step's kernels are replayed as one CUDA graph, removing the hundreds
    of kernel launches that otherwise bound batch-1 decoding."""
    slots = min(model.config.max_seq_len, 1 << max(6, (length - 1).bit_length()))
    key = (batch, slots, str(device), dtype)
    if getattr(model, "_decoder_key", None) != key:
        cache = KVCache(model.config, batch, slots, device, dtype)
        mode = None
        if torch.device(device).type == "cuda":
            for buffer in cache.k + cache.v:  # mutated in place inside the graph
                torch._dynamo.mark_static_address(buffer)
            mode = "reduce-overhead"
        model._decoder = (torch.compile(model, mode=mode, fullgraph=True), cache)
        model._decoder_key = key
    step, cache = model._decoder
    cache.length, cache.slot = 0, None
    return step, cache


def fixed_shape_step(step, cache: KVCache, tokens, positions, valid):
    """One token per row through `step` (compiled_decoder's), written to the next cache slot; every
    slot is attended under a mask, so each step has the same shapes. valid: (batch, slots so far)."""
    cache.slot = torch.full((1,), cache.length, device=tokens.device)
    if tokens.is_cuda:  # a replay may overwrite the last step's logits: we are done with them
        torch.compiler.cudagraph_mark_step_begin()
    key_valid = F.pad(valid, (0, cache.max_len - valid.shape[1]))
    logits, _ = step(tokens, cache=cache, positions=positions, key_valid=key_valid)
    cache.length += 1
    return logits


def decoding_layout(model) -> None:
    """Lay each widening linear layer's weight (out_features > in_features: the output projection,
    w1, w3) out in memory as a contiguous (in, out) matrix, keeping its (out, in) shape and values.

    F.linear computes x @ weight.T; in this layout weight.T is a plain row-major matrix, and for one
    token at a time MKL streams such a layer's weights 1.4-2x faster on our AMD CPU than in the
    (out, in) layout, which stays better for narrowing layers (w2); see bench/README.md. The same
    Parameter objects keep their values (an optimizer holding them is unaffected) and checkpoints
    are unchanged. `decode` applies it on the CPU; it does nothing on other devices or twice."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if w.device.type == "cpu" and w.shape[0] > w.shape[1] and w.is_contiguous():  # not yet laid out
                with torch.inference_mode(False), torch.no_grad():
                    w.data = w.data.t().contiguous().t()


# ----------------------------------------------------------------------------------------------
# The decoding loop


@torch.inference_mode()
def decode(model, idx, max_new_tokens: int, sample: Callable = greedy, *, prompt_mask=None,
           stop: Optional[Callable] = None, use_cache: bool = True, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, a (batch, 1) tensor, step by step, for at most
    max_new_tokens steps.

    idx (batch, seqlen) holds the prompts; prompt_mask (batch, seqlen), True on real tokens, allows
    prompts of different lengths padded on either side: they are left-aligned (left_align) and
    RoPE positions count from each prompt's first real token. sample(logits (batch, vocab)) picks
    the tokens. stop(tokens) -> (batch,) bool marks the rows that end with these tokens; an ended
    row repeats its last token, and the loop ends once every row has ended. A caller may also just
    leave the loop: nothing is computed after the last token it took.

    With use_cache (a causal model) the prompt goes through the model once (prefill) and each step
    costs one position; use_cache=False recomputes the whole (sliding, max_seq_len) window for
    every token, the readable reference the cache is tested against, and the only way for a
    non-causal model (see Llama.generate). compile=True runs the steps after the prefill through
    compiled_decoder (same tokens; the first call pays the compilation)."""
    if not model.config.causal:
        use_cache = compile = False
    decoding_layout(model)
    idx, valid = left_align(idx, prompt_mask)
    batch, seqlen = idx.shape
    if compile and valid is None:
        valid = torch.ones_like(idx, dtype=torch.bool)  # fixed-shape steps take explicit positions
    positions = (valid.cumsum(1) - 1).clamp(min=0) if valid is not None else None
    cache = step = None
    if use_cache:
        if seqlen + max_new_tokens > model.config.max_seq_len:
            raise ValueError(f"{seqlen} + {max_new_tokens} tokens exceed max_seq_len={model.config.max_seq_len}; "
                             "pass use_cache=False to slide a window instead")
        if compile:
            step, cache = compiled_decoder(model, batch, seqlen + max_new_tokens, idx.device, model.dtype)
        else:
            cache = KVCache(model.config, batch, seqlen + max_new_tokens, idx.device, model.dtype)
    finished = torch.zeros(batch, 1, dtype=torch.bool, device=idx.device)
    tokens, token_positions, last = idx, positions, None
    for i in range(max_new_tokens):
        if cache is None:
            window = slice(-model.config.max_seq_len, None)  # the course's sliding window
            logits, _ = model(idx[:, window], positions=None if positions is None else positions[:, window],
                              key_valid=None if valid is None else valid[:, window])
        elif step is not None and i > 0:  # the prompt went through forward (prefill); now fixed shapes
            logits = fixed_shape_step(step, cache, tokens, token_positions, valid)
        else:
            logits, _ = model(tokens, cache=cache, positions=token_positions, key_valid=valid)
        tokens = sample(logits[:, -1, :])
        if stop is not None:
            tokens = tokens if last is None else torch.where(finished, last, tokens)
            finished |= stop(tokens).view(batch, 1)
            last = tokens
        yield tokens
        if stop is not None and finished.all():  # (a GPU sync: only when there is a stop rule)
            return
        if cache is None:
            idx = torch.cat((idx, tokens), dim=1)
        if valid is not None:
            valid = F.pad(valid, (0, 1), value=True)
            token_positions = positions[:, -1:] + 1
            positions = torch.cat((positions, token_positions), dim=1)

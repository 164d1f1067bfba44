"""An independent re-implementation of what the course's reference code computes, written from the
assignment's description, sharing no code with the project: a plain function over a stories42M.pt
state dict (no modules, complex-number RoPE, attention with no mask at all), and the course's two
classifiers. The tests hold the project's default (course) semantics against it."""
import math

import torch
import torch.nn.functional as F


def _norm(x, weight, norm_type, eps=1e-5, bias=None):
    if norm_type == "rmsnorm":
        out = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    else:
        mean = x.mean(-1, keepdim=True)
        out = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    out = out * weight
    return out if bias is None else out + bias


def _rope(x, theta=10000.0):
    """Rotate consecutive pairs of x (batch, seqlen, heads, head_dim) as complex numbers."""
    _, seqlen, _, head_dim = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).double() / head_dim)
    angles = torch.outer(torch.arange(seqlen).double(), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(3).to(x.dtype)


def course_forward(state, model_args, tokens, norm_type="layernorm", causal=False):
    """(logits of the last position (batch, 1, vocab), final hidden states (batch, seqlen, dim)).
    state: stories42M.pt tensors in minllama naming; causal=False is the course's attention."""
    dim, n_heads = model_args["dim"], model_args["n_heads"]
    n_kv = model_args.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    batch, seqlen = tokens.shape
    h = state["tok_embeddings.weight"][tokens]
    for i in range(model_args["n_layers"]):
        p = {k[len(f"layers.{i}.") :]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
        x = _norm(h, p["attention_norm.weight"], norm_type, bias=p.get("attention_norm.bias"))
        q = (x @ p["attention.compute_query.weight"].T).view(batch, seqlen, n_heads, head_dim)
        k = (x @ p["attention.compute_key.weight"].T).view(batch, seqlen, n_kv, head_dim)
        v = (x @ p["attention.compute_value.weight"].T).view(batch, seqlen, n_kv, head_dim)
        q, k = _rope(q), _rope(k)
        k = k.repeat_interleave(n_heads // n_kv, dim=2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        if causal:
            scores = scores.masked_fill(torch.ones(seqlen, seqlen).triu(1).bool(), float("-inf"))
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, seqlen, dim)
        h = h + attended @ p["attention.compute_output.weight"].T
        x = _norm(h, p["ffn_norm.weight"], norm_type, bias=p.get("ffn_norm.bias"))
        gate = F.silu(x @ p["feed_forward.w1.weight"].T) * (x @ p["feed_forward.w3.weight"].T)
        h = h + gate @ p["feed_forward.w2.weight"].T
    h = _norm(h, state["norm.weight"], norm_type, bias=state.get("norm.bias"))
    output = state.get("output.weight", state["tok_embeddings.weight"])
    return h[:, -1:] @ output.T, h


def course_zero_shot(forward, tokens, label_token_ids):
    """The course's zero-shot scores (batch, labels): for each label, the sum of its tokens'
    log-probabilities at the last position of the (right-padded) batch."""
    logits, _ = forward(tokens)
    log_probs = F.log_softmax(logits, dim=-1)  # (batch, 1, vocab)
    columns = [log_probs[:, :, ids].sum(dim=-1)[:, 0] for ids in label_token_ids]
    return torch.stack(columns, dim=1)


def course_embedding_classifier(forward, tokens, head_weight, head_bias):
    """The course's fine-tuning classifier at evaluation: hidden[:, -1] -> linear -> log-softmax."""
    _, hidden = forward(tokens)
    return F.log_softmax(hidden[:, -1] @ head_weight.T + head_bias, dim=-1)

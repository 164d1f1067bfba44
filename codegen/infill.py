"""Fill-in-the-middle with a Mini-Llama: sentinel tokens in the vocabulary, PSM prompts, infilling.

    extend_vocab(model, n)             grow the (tied) embedding / output matrices by n rows
    add_fim_sentinels(model, tok)      the four FIM sentinels as new ids 32000..32003 -> {name: id}
    encode_psm(tok, prefix, suffix)    [PRE] prefix [SUF] suffix [MID] (+ middle [END] for training)
    fim_prompt(tok, prefix, suffix, ...)   the inference prompt, fitted into the context, and its stop ids
    infill(model, tok, prefix, suffix) greedy (or sampled) middle, cut at <fim_end> or </s>

Each part is encoded on its own with the SentencePiece model (so decode(encode(middle)) == middle:
SentencePiece's dummy-prefix space is added by encode and removed again by decode), and the sentinels
are ids after the base vocabulary, which plain text can never produce.
"""
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from codegen.fim import FIM_END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, SENTINELS, psm_ids
from decoding import fit_context


def _is_tied(model) -> bool:
    return model.output.weight is model.tok_embeddings.weight


@torch.no_grad()
def extend_vocab(model, n_new: int) -> List[int]:
    """Append n_new rows to the token embedding and the output projection, each new row the mean of
    that matrix's existing rows; returns the new ids. A tied model stays tied; an untied one grows
    both matrices. Old rows are copied bit for bit, so the logits of the old tokens do not change
    (the new ones start at the mean logit, i.e. unlikely but not impossible)."""
    if not isinstance(n_new, int) or n_new < 0:
        raise ValueError(f"n_new must be an integer >= 0, got {n_new!r}")
    old_vocab = model.tok_embeddings.weight.shape[0]
    if n_new == 0:
        return []
    tied = _is_tied(model)
    emb = model.tok_embeddings.weight
    out = model.output.weight

    def grown(weight):
        new_rows = weight.mean(dim=0, keepdim=True).expand(n_new, -1)
        return torch.cat([weight.detach(), new_rows.to(weight.dtype)], dim=0)

    new_emb = nn.Embedding(old_vocab + n_new, emb.shape[1], device=emb.device, dtype=emb.dtype)
    new_emb.weight = nn.Parameter(grown(emb), requires_grad=emb.requires_grad)
    model.tok_embeddings = new_emb
    new_out = nn.Linear(out.shape[1], old_vocab + n_new, bias=False, device=out.device, dtype=out.dtype)
    if tied:
        new_out.weight = new_emb.weight
    else:
        new_out.weight = nn.Parameter(grown(out), requires_grad=out.requires_grad)
    model.output = new_out
    model.config.vocab_size = old_vocab + n_new  # model.params is the same object
    model.vocab_size = old_vocab + n_new
    return list(range(old_vocab, old_vocab + n_new))


def add_fim_sentinels(model, tokenizer) -> Dict[str, int]:
    """Give the model the four FIM sentinels (ids = old vocabulary size + 0..3) and record them in
    tokenizer.sentinels. Idempotent: a model/tokenizer pair that already has them is left alone."""
    existing = dict(getattr(tokenizer, "sentinels", None) or {})
    if existing:
        if set(existing) != set(SENTINELS):
            raise ValueError(f"tokenizer has sentinels {sorted(existing)}, expected {list(SENTINELS)}")
        if max(existing.values()) >= model.vocab_size:
            raise ValueError(f"tokenizer sentinel ids {existing} do not fit the model's vocabulary ({model.vocab_size})")
        return existing
    if model.vocab_size < tokenizer.n_words:
        raise ValueError(f"model vocabulary ({model.vocab_size}) is smaller than the tokenizer's ({tokenizer.n_words}): "
                         "new sentinel ids would collide with real pieces; is this the right tokenizer?")
    ids = extend_vocab(model, len(SENTINELS))
    sentinels = dict(zip(SENTINELS, ids))
    tokenizer.sentinels = sentinels
    return dict(sentinels)


def sentinels_of(tokenizer) -> Dict[str, int]:
    sentinels = getattr(tokenizer, "sentinels", None) or {}
    missing = [s for s in SENTINELS if s not in sentinels]
    if missing:
        raise ValueError(f"the tokenizer has no FIM sentinels {missing}: this model was not trained for infilling "
                         "(train with --fim_rate > 0, or call add_fim_sentinels first)")
    return sentinels


def encode_psm(tokenizer, prefix: str, suffix: str, middle: Optional[str] = None, bos: bool = False) -> List[int]:
    """Token ids of [PRE] prefix [SUF] suffix [MID], then middle [END] when middle is given (training).
    bos=True puts the tokenizer's BOS first (what codegen.train and infill() do)."""
    sentinels = sentinels_of(tokenizer)

    def enc(s):
        return tokenizer.encode(s, bos=False, eos=False) if s else []

    ids = psm_ids(enc(prefix), enc(middle or ""), enc(suffix), sentinels)
    if middle is None:
        ids = ids[:-1]  # inference prompt: ends with [MID]
    return ([tokenizer.bos_id] if bos else []) + ids


def cut_at_stop(ids: List[int], stop_ids) -> List[int]:
    """ids up to (not including) the first stop id."""
    stop_ids = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i]
    return list(ids)


_MARK = "☺"  # a character SentencePiece keeps whole: encode(_MARK + s) = encode(_MARK) + s's own pieces


def fim_prompt(tokenizer, prefix: str, suffix: str, max_new_tokens: int, max_seq_len: int, vocab_size: int):
    """(ids of BOS [PRE] prefix [SUF] suffix [MID], max_new_tokens, stop ids {<fim_end>, </s>}, the
    anchor to decode the middle after).

    When the prompt and max_new_tokens do not fit the context, decoding.fit_context shares it out
    (generation gets at most half, or all that is left) and the prefix loses its oldest tokens, the
    suffix its last ones: the text nearest the hole is kept.

    Our sentinels were trained on parts encoded on their own (SentencePiece's dummy-prefix space
    included, so decode(encode(middle)) == middle): the middle decodes alone (anchor []). Code
    Llama's own infilling pieces were trained, as its reference code does it, on a suffix encoded
    without that implicit space and a middle decoded with its leading space kept: both go through
    the _MARK character."""
    sentinels = sentinels_of(tokenizer)
    if max(sentinels.values()) >= vocab_size:
        raise ValueError(f"sentinel ids {sentinels} are outside the model's vocabulary ({vocab_size})")
    native = getattr(tokenizer, "infill_tokens", lambda: None)() == sentinels  # Code Llama's pieces
    mark = tokenizer.encode(_MARK, bos=False, eos=False) if native else []
    pre_ids = tokenizer.encode(prefix, bos=False, eos=False) if prefix else []
    suf_ids = tokenizer.encode(_MARK + suffix if native else suffix, bos=False, eos=False) if suffix else []
    if native and suf_ids[: len(mark)] == mark:
        suf_ids = suf_ids[len(mark):]
    n_fixed = 4  # BOS [PRE] [SUF] [MID]
    room, max_new_tokens = fit_context(n_fixed + len(pre_ids) + len(suf_ids), max_new_tokens, max_seq_len)
    budget = room - n_fixed  # for prefix + suffix tokens
    if len(pre_ids) + len(suf_ids) > budget:
        keep_suf = min(len(suf_ids), max(budget // 2, budget - len(pre_ids)))
        keep_pre = budget - keep_suf
        suf_ids = suf_ids[:keep_suf]  # the suffix's start and the prefix's end are nearest the hole
        pre_ids = pre_ids[len(pre_ids) - keep_pre:] if keep_pre > 0 else []
    ids = [tokenizer.bos_id] + psm_ids(pre_ids, [], suf_ids, sentinels)[:-1]
    return ids, max(max_new_tokens, 0), {sentinels[FIM_END], tokenizer.eos_id}, mark


def infill(model, tokenizer, prefix: str, suffix: str, max_new_tokens: int = 128, temperature: float = 0.0,
           epsilon: float = 3e-4, generator=None) -> str:
    """The text the model puts between prefix and suffix: generation after [MID], cut at the first
    <fim_end> or </s> (codegen.generate decodes it, with fim_prompt's prompt). temperature 0 is greedy."""
    from codegen.generate import generate_completions

    return generate_completions(model, tokenizer, prefix, 1, max_new_tokens, temperature, None, epsilon, generator,
                                suffix=suffix)[0].text


__all__ = ["extend_vocab", "add_fim_sentinels", "encode_psm", "fim_prompt", "infill", "cut_at_stop",
           "FIM_PREFIX", "FIM_SUFFIX", "FIM_MIDDLE", "FIM_END"]

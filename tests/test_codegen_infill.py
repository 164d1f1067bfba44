"""Tests for codegen/infill.py: vocabulary extension, PSM encoding and fill-in-the-middle generation."""
import random

import pytest
import torch
import torch.nn as nn

from codegen.common import CodeTokenizer
from codegen.fim import FIM_END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, SENTINELS, apply_fim, parse_psm, split_fim
from codegen.infill import add_fim_sentinels, cut_at_stop, encode_psm, extend_vocab, infill
from codegen.train import IGNORE, collate, loss_sum, make_fim_example
from config import LlamaConfig
from conftest import asset_path
from llama import Llama
from optimizer import AdamW

PREFIX = 'def area(w, h):\n    """Area of a rectangle."""\n'
MIDDLE = "    a = w * h\n"
SUFFIX = "    return a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_path():
    return str(asset_path("tokenizer.model"))


@pytest.fixture
def tok(tokenizer_path):
    return CodeTokenizer(tokenizer_path)


def small_llama(seed=0, vocab_size=32000, **overrides):
    torch.manual_seed(seed)
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=8, max_seq_len=256)
    return Llama(LlamaConfig(**{**args, **overrides})).eval()


def all_logits(model, tokens):
    with torch.no_grad():
        return model(tokens, targets=tokens)[0]


# ----------------------------------------------------------------------------------------------
# extend_vocab / add_fim_sentinels


def test_extend_vocab_tied_keeps_old_logits_exactly_and_new_rows_are_the_mean():
    model = small_llama()
    old_weight = model.tok_embeddings.weight.detach().clone()
    tokens = torch.randint(0, 32000, (3, 17))
    before = all_logits(model, tokens)
    ids = extend_vocab(model, 4)
    assert ids == [32000, 32001, 32002, 32003]
    assert model.vocab_size == model.config.vocab_size == model.params.vocab_size == 32004
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    w = model.tok_embeddings.weight
    assert w.shape == (32004, 32) and model.output.out_features == 32004
    assert torch.equal(w[:32000], old_weight)
    assert torch.equal(w[32000:], old_weight.mean(dim=0, keepdim=True).expand(4, -1))
    after = all_logits(model, tokens)
    assert after.shape == (3, 17, 32004)
    assert torch.equal(after[..., :32000], before)  # bit for bit
    # the new ids are real tokens now: they embed, and generation runs over the larger vocabulary
    with_new = torch.tensor([[1, 32000, 5, 32003]])
    assert all_logits(model, with_new).shape == (1, 4, 32004)
    assert model.generate(with_new, 3, temperature=0.0).shape == (1, 7)


def test_extend_vocab_untied_grows_both_matrices():
    model = small_llama(seed=1)
    model.output.weight = nn.Parameter(model.output.weight.detach() + 0.01 * torch.randn_like(model.output.weight))
    emb, out = model.tok_embeddings.weight.detach().clone(), model.output.weight.detach().clone()
    tokens = torch.randint(0, 32000, (2, 9))
    before = all_logits(model, tokens)
    extend_vocab(model, 3)
    assert model.output.weight is not model.tok_embeddings.weight
    assert torch.equal(model.tok_embeddings.weight[32000:], emb.mean(0, keepdim=True).expand(3, -1))
    assert torch.equal(model.output.weight[32000:], out.mean(0, keepdim=True).expand(3, -1))
    assert torch.equal(model.output.weight[:32000], out)
    assert torch.equal(all_logits(model, tokens)[..., :32000], before)


def test_extend_vocab_keeps_trainability_and_zero_is_a_no_op():
    model = small_llama()
    assert extend_vocab(model, 0) == [] and model.vocab_size == 32000
    extend_vocab(model, 2)
    assert model.tok_embeddings.weight.requires_grad
    assert {n for n, _ in model.named_parameters()} >= {"tok_embeddings.weight"}
    with pytest.raises(ValueError):
        extend_vocab(model, -1)


def test_add_fim_sentinels_assigns_ids_after_the_vocabulary_and_is_idempotent(tok):
    model = small_llama()
    sentinels = add_fim_sentinels(model, tok)
    assert sentinels == {FIM_PREFIX: 32000, FIM_SUFFIX: 32001, FIM_MIDDLE: 32002, FIM_END: 32003}
    assert tok.sentinels == sentinels and model.vocab_size == 32004
    assert add_fim_sentinels(model, tok) == sentinels and model.vocab_size == 32004
    assert tok.decode([32000, *tok.encode("x = 1", False, False), 32003]) == "x = 1"  # sentinels decode to nothing


def test_add_fim_sentinels_refuses_a_model_smaller_than_the_tokenizer(tok):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        add_fim_sentinels(small_llama(vocab_size=512), tok)


def test_add_fim_sentinels_refuses_recorded_ids_at_the_vocabulary_size(tok):
    """Recorded sentinel ids must be < model.vocab_size: an id equal to it is out of range."""
    tok.sentinels = {FIM_PREFIX: 32000, FIM_SUFFIX: 32001, FIM_MIDDLE: 32002, FIM_END: 32003}
    assert add_fim_sentinels(small_llama(vocab_size=32004), tok)[FIM_END] == 32003  # largest id = vocab - 1: fits
    with pytest.raises(ValueError, match="do not fit"):
        add_fim_sentinels(small_llama(vocab_size=32003), tok)  # largest id == vocab size


# ----------------------------------------------------------------------------------------------
# PSM encoding


def test_encode_psm_layout(tok):
    tok.sentinels = {name: 32000 + i for i, name in enumerate(SENTINELS)}
    pre, suf, mid, end = 32000, 32001, 32002, 32003

    def enc(s):
        return tok.encode(s, bos=False, eos=False)

    train_ids = encode_psm(tok, PREFIX, SUFFIX, middle=MIDDLE)
    assert train_ids == [pre, *enc(PREFIX), suf, *enc(SUFFIX), mid, *enc(MIDDLE), end]
    prompt_ids = encode_psm(tok, PREFIX, SUFFIX)
    assert prompt_ids == [pre, *enc(PREFIX), suf, *enc(SUFFIX), mid]
    assert train_ids[: len(prompt_ids)] == prompt_ids  # the inference prompt is the training prefix
    assert encode_psm(tok, PREFIX, SUFFIX, bos=True) == [tok.bos_id, *prompt_ids]
    assert encode_psm(tok, "", "", middle="") == [pre, suf, mid, end]


def test_encode_psm_needs_sentinels(tok):
    with pytest.raises(ValueError, match="--fim_rate"):
        encode_psm(tok, "a", "b")


def test_fim_transform_round_trips_through_encode_psm(tok):
    """The data transform (split_fim / apply_fim -> PSM text) and the id layout agree: the ids between
    the sentinels decode back to prefix, suffix and middle, which rebuild the document."""
    tok.sentinels = {name: 32000 + i for i, name in enumerate(SENTINELS)}
    pre, suf, mid, end = (tok.sentinels[s] for s in SENTINELS)
    docs = [PREFIX + MIDDLE + SUFFIX, "def f(x):\n    if x:\n        return [x, x * 2]\n    return None\n",
            "class A:\n    def m(self):\n        return {'k': 'v'}\n"]
    rng = random.Random(0)
    for doc in docs:
        for _ in range(20):
            psm_text = apply_fim(doc, rng, fim_rate=1.0)
            prefix, middle, suffix = parse_psm(psm_text)
            assert prefix + middle + suffix == doc
            ids = encode_psm(tok, prefix, suffix, middle=middle)
            assert ids[0] == pre and ids[-1] == end and [ids.count(s) for s in (pre, suf, mid, end)] == [1, 1, 1, 1]
            i_suf, i_mid = ids.index(suf), ids.index(mid)
            assert tok.decode(ids[1:i_suf]) == prefix
            assert tok.decode(ids[i_suf + 1 : i_mid]) == suffix
            assert tok.decode(ids[i_mid + 1 : -1]) == middle


def test_training_fim_example_puts_the_loss_on_middle_and_end_only(tok):
    tok.sentinels = {name: 32000 + i for i, name in enumerate(SENTINELS)}
    prompt, code = PREFIX, MIDDLE + SUFFIX
    tokens, targets = make_fim_example(tok, prompt, code, random.Random(3))
    assert tokens[:2] == [tok.bos_id, tok.sentinels[FIM_PREFIX]] and tokens[-1] == tok.sentinels[FIM_END]
    n_context = tokens.index(tok.sentinels[FIM_MIDDLE]) + 1
    assert targets[:n_context] == [IGNORE] * n_context and targets[n_context:] == tokens[n_context:]
    # the same split, rebuilt by hand: the prompt always stays in the prefix, the middle is code
    prefix, middle, suffix = split_fim(code, random.Random(3))
    assert tokens == encode_psm(tok, prompt + prefix, suffix, middle=middle, bos=True)
    assert make_fim_example(tok, prompt, code, random.Random(3), max_len=5) is None  # does not fit


# ----------------------------------------------------------------------------------------------
# infill


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 9, 7, 9], {9}) == [5, 6]
    assert cut_at_stop([5, 6], {9}) == [5, 6]
    assert cut_at_stop([], {9}) == []


def scripted(model, script):
    """Make model.forward emit `script` one token per call (a one-hot logit), recording the inputs."""
    calls = []

    def forward(tokens, targets=None, *, cache=None, positions=None, key_valid=None):
        calls.append(tokens.clone())
        if cache is not None:
            cache.length += tokens.shape[1]
        logits = torch.full((tokens.shape[0], 1, model.vocab_size), -10.0)
        logits[:, 0, script[min(len(calls) - 1, len(script) - 1)]] = 10.0
        return logits, None

    model.forward = forward
    return calls


def test_infill_returns_the_text_between_mid_and_end_and_stops_there(tok):
    model = small_llama()
    sentinels = add_fim_sentinels(model, tok)
    middle_ids = tok.encode(MIDDLE, bos=False, eos=False)
    garbage = tok.encode("garbage that must not appear", bos=False, eos=False)
    calls = scripted(model, [*middle_ids, sentinels[FIM_END], *garbage])
    model.train()
    assert infill(model, tok, PREFIX, SUFFIX, max_new_tokens=40) == MIDDLE
    assert model.training  # mode restored
    assert len(calls) == len(middle_ids) + 1  # generation stopped at <fim_end>
    assert calls[0][0].tolist() == encode_psm(tok, PREFIX, SUFFIX, bos=True)  # prompt ends with [MID]


def test_infill_also_stops_at_eos_and_drops_stray_sentinels(tok):
    model = small_llama()
    sentinels = add_fim_sentinels(model, tok)
    middle_ids = tok.encode(MIDDLE, bos=False, eos=False)
    scripted(model, [sentinels[FIM_PREFIX], *middle_ids, tok.eos_id, *tok.encode("junk", False, False)])
    assert infill(model, tok, PREFIX, SUFFIX, max_new_tokens=30) == MIDDLE
    scripted(model, middle_ids)  # never ends: cut at max_new_tokens
    assert infill(model, tok, PREFIX, SUFFIX, max_new_tokens=3) == tok.decode(middle_ids[:3])


def test_infill_truncates_a_prompt_that_does_not_fit(tok):
    model = small_llama(max_seq_len=64)
    add_fim_sentinels(model, tok)
    middle_ids = tok.encode(MIDDLE, bos=False, eos=False)
    calls = scripted(model, [*middle_ids, tok.sentinels[FIM_END]])
    long_prefix = "x = 1\n" * 100
    assert infill(model, tok, long_prefix, SUFFIX * 20, max_new_tokens=128) == MIDDLE
    prompt = calls[0][0].tolist()
    assert len(prompt) <= 64 - 32 and prompt[:2] == [tok.bos_id, tok.sentinels[FIM_PREFIX]]
    assert prompt[-1] == tok.sentinels[FIM_MIDDLE] and tok.sentinels[FIM_SUFFIX] in prompt


def test_infill_needs_a_fim_model(tok):
    with pytest.raises(ValueError, match="sentinels"):
        infill(small_llama(), tok, "a", "b")


def test_overfit_one_psm_example_then_infill_reproduces_its_middle(tok):
    """A tiny model trained ~100 steps on one PSM example (loss on middle + [END]) fills it in."""
    model = small_llama()
    add_fim_sentinels(model, tok)
    ids = encode_psm(tok, PREFIX, SUFFIX, middle=MIDDLE, bos=True)
    n_context = ids.index(tok.sentinels[FIM_MIDDLE]) + 1
    tokens, targets = collate([(ids, [IGNORE] * n_context + ids[n_context:])], tok.pad_id)
    optimizer = AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        total, count = loss_sum(model, tokens, targets)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (total / count).item() < 0.1
    assert infill(model, tok, PREFIX, SUFFIX, max_new_tokens=32) == MIDDLE


def test_code_llama_pieces_get_code_llamas_spacing(tmp_path):
    """With Code Llama's own infilling pieces, the suffix is encoded without SentencePiece's implicit
    leading space (as Code Llama was trained); with our sentinels, as our training encodes it."""
    from codegen.infill import fim_prompt
    from codegen.text_tokenizer import load_tokenizer
    from test_codegen_text_tokenizer import tiny_sentencepiece

    tok = load_tokenizer(tiny_sentencepiece(tmp_path / "tokenizer.model"))
    sentinels = tok.infill_tokens()
    ids, _, stops, anchor = fim_prompt(tok, "def f(x):\n", "    return x\n", 8, 256, tok.n_words)
    suffix_ids = ids[ids.index(sentinels[FIM_SUFFIX]) + 1 : -1]
    pieces = "".join(tok.sp_model.id_to_piece(i) for i in suffix_ids).replace("▁", " ")
    assert pieces.startswith("    return") and not pieces.startswith("     ")  # four spaces, not five
    assert tok.decode(anchor + suffix_ids)[len(tok.decode(anchor)):] == "    return x\n"
    assert stops == {sentinels[FIM_END], tok.eos_id}
    ours = CodeTokenizer(str(asset_path("tokenizer.model")), {FIM_PREFIX: 32000, FIM_SUFFIX: 32001,
                                                             FIM_MIDDLE: 32002, FIM_END: 32003})
    ids, _, _, anchor = fim_prompt(ours, "def f(x):\n", "    return x\n", 8, 256, 32004)
    assert anchor == [] and ids[ids.index(32001) + 1 : -1] == ours.encode("    return x\n", False, False)

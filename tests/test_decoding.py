"""decoding.py, through Llama.generate and directly: the KV cache changes speed, never tokens. Cached
greedy decoding equals the readable no-cache reference (use_cache=False) for single prompts,
equal-length batches and batches padded on either side; plus EOS handling and stop rules, the
samplers, fitting prompts into the context, the CPU layout, the sdpa fast path, fixed-shape
(compiled) steps and the max_seq_len limits."""
import shutil

import pytest
import torch

from conftest import asset_path
from helpers import lively_model, tiny_model
from decoding import (KVCache, attention_mask, compiled_decoder, decode, decoding_layout, fit_context, keep_last,
                      left_align, make_sampler, sample_epsilon, sample_top_k, sample_top_p)
from llama import load_pretrained

VOCAB = 64  # tiny_config's vocab_size


pytestmark = pytest.mark.usefixtures("one_thread")


def prompts(seed, batch, length, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, idx, n, **kwargs):
    return model.generate(idx, n, temperature=0.0, **kwargs)


def padded_batch(rows, side, pad_token=0):
    """Stack prompts of different lengths, padded on the left or right, with their prompt_mask."""
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_token, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        idx[i, cols], mask[i, cols] = row, True
    return idx, mask


# ----------------------------------------------------------------------------------------------
# KV cache == no-cache reference


@pytest.mark.parametrize("seed,length", [(0, 1), (1, 5), (2, 17)])
def test_cached_equals_uncached_batch_of_one(seed, length):
    model = lively_model(seed)
    idx = prompts(seed, 1, length)
    cached, uncached = greedy(model, idx, 30), greedy(model, idx, 30, use_cache=False)
    assert cached.shape == (1, length + 30)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :length], idx)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_cached_equals_uncached_equal_length_batch(n_kv_heads):
    model = lively_model(n_kv_heads=n_kv_heads)
    idx = prompts(3, 4, 9)
    cached = greedy(model, idx, 25)
    assert torch.equal(cached, greedy(model, idx, 25, use_cache=False))
    for row in range(4):  # rows of a batch do not interact
        assert torch.equal(cached[row], greedy(model, idx[row : row + 1], 25)[0])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_prompts_equal_each_row_alone(side, use_cache):
    model = lively_model()
    rows = [prompts(10 + i, 1, n)[0] for i, n in enumerate([3, 11, 1, 7])]
    idx, mask = padded_batch(rows, side)
    out = greedy(model, idx, 20, prompt_mask=mask, use_cache=use_cache)
    width = idx.shape[1]
    assert out.shape == (4, width + 20)
    for i, row in enumerate(rows):
        alone = greedy(model, row[None], 20)
        assert out[i, width:].tolist() == alone[0, len(row):].tolist(), f"row {i}"
        assert out[i, width - len(row) : width].tolist() == row.tolist()  # prompts come back left-padded


def test_padding_side_and_pad_token_do_not_matter():
    model = lively_model()
    rows = [prompts(20, 1, 6)[0], prompts(21, 1, 2)[0]]
    left, left_mask = padded_batch(rows, "left", pad_token=5)
    right, right_mask = padded_batch(rows, "right", pad_token=63)
    expected = greedy(model, left, 15, prompt_mask=left_mask)[:, 6:]
    assert torch.equal(greedy(model, right, 15, prompt_mask=right_mask)[:, 6:], expected)
    assert torch.equal(greedy(model, right, 15, prompt_mask=right_mask, use_cache=False)[:, 6:], expected)


def test_all_true_prompt_mask_equals_no_mask():
    model = lively_model()
    idx = prompts(4, 3, 8)
    expected = greedy(model, idx, 12)
    assert torch.equal(greedy(model, idx, 12, prompt_mask=torch.ones_like(idx, dtype=torch.bool)), expected)


@pytest.mark.parametrize("chunks", [[8] + [1] * 12, [5, 7], [3, 4, 1, 12]])
def test_cached_decode_logits_equal_full_forward(chunks):
    """Fed through the cache in chunks (a prefill, then one token per step, or several: each query
    may see the cached prefix and its chunk up to itself), every position's logits equal those of
    one full forward."""
    model = lively_model()
    tokens = prompts(5, 2, sum(chunks))
    with torch.inference_mode():
        full, _ = model(tokens, targets=tokens)
        cache = KVCache(model.config, 2, tokens.shape[1])
        outs, start = [], 0
        for size in chunks:
            part = tokens[:, start : start + size]
            outs.append(model(part, targets=part, cache=cache)[0])
            start += size
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_single_query_mask_equals_general_mask():
    valid = torch.tensor([[False, True, True, True], [True, True, True, True], [False, False, False, True]])
    general = attention_mask(valid, 4)[:, :, -1:]
    assert torch.equal(attention_mask(valid, 1), general)
    assert attention_mask(valid, 1).shape == (3, 1, 1, 4)


def test_left_align():
    idx = torch.tensor([[7, 8, 0, 0], [0, 5, 6, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    aligned, valid = left_align(idx, mask)
    assert aligned.tolist() == [[0, 0, 7, 8], [0, 0, 5, 6]]
    assert valid.tolist() == [[False, False, True, True]] * 2
    with pytest.raises(ValueError, match="real token"):
        left_align(idx, torch.zeros_like(mask))


def test_stories260k_cached_equals_uncached_padded_batch():
    model = load_pretrained(asset_path("reference/stories260K.bin")).eval()
    reference = torch.load(asset_path("reference/stories260K_reference.pt"), weights_only=True)
    story = reference["greedy_from_bos"]
    rows = [story[:1], story[:9], reference["tokens"][1, :5]]  # BOS alone, 9 and 5 tokens
    idx, mask = padded_batch(rows, "right")
    cached = greedy(model, idx, 40, prompt_mask=mask)
    assert torch.equal(cached, greedy(model, idx, 40, prompt_mask=mask, use_cache=False))
    width = idx.shape[1]
    for i, row in enumerate(rows):
        assert cached[i, width:].tolist() == greedy(model, row[None], 40)[0, len(row):].tolist(), f"row {i}"
    # and the BOS row reproduces llama2.c's own greedy story
    assert cached[0, width:].tolist() == story[1:41].tolist()


# ----------------------------------------------------------------------------------------------
# EOS


def first_index(values, token):
    hits = (values == token).nonzero()
    return hits[0].item() if len(hits) else None


def expected_with_eos(free, eos, n):
    """What generate must return for the new tokens, given the tokens generated without eos_id."""
    firsts = [first_index(row, eos) for row in free]
    if all(f is not None for f in firsts):
        n = max(firsts) + 1  # everyone finished: stop
    rows = []
    for row, f in zip(free, firsts):
        row = row[:n].clone()
        if f is not None:
            row[f:] = eos
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_each_row_and_then_all(use_cache):
    model = lively_model()
    idx = prompts(1, 3, 4)
    n = 30
    free = greedy(model, idx, n, use_cache=use_cache)[:, 4:]  # what each row says without an eos_id
    rows = [set(row.tolist()) for row in free]
    only_row0 = sorted(rows[0] - rows[1] - rows[2])
    in_every_row = sorted(rows[0] & rows[1] & rows[2])
    assert only_row0 and in_every_row, "test setup: pick other seeds"
    # an eos that only row 0 emits: row 0 is filled with eos from then on, the others run on
    eos = only_row0[0]
    out = greedy(model, idx, n, eos_id=eos, use_cache=use_cache)
    f = first_index(free[0], eos)
    assert out.shape == (3, 4 + n)
    assert torch.equal(out[0, 4 : 4 + f + 1], free[0, : f + 1]) and (out[0, 4 + f :] == eos).all()
    assert torch.equal(out[1:, 4:], free[1:])
    # an eos that every row emits: generation stops right after the last row's first eos
    for eos in in_every_row:
        out = greedy(model, idx, n, eos_id=eos, use_cache=use_cache)
        last = max(first_index(row, eos) for row in free)
        assert out.shape == (3, 4 + last + 1), f"eos {eos}"
        assert torch.equal(out[:, 4:], expected_with_eos(free, eos, n)), f"eos {eos}"


def test_eos_in_prompt_does_not_finish_the_row():
    model = lively_model()
    idx = prompts(7, 1, 6)
    eos = idx[0, -1].item()
    free = greedy(model, idx, 10)
    out = greedy(model, idx, 10, eos_id=eos)
    assert torch.equal(out[:, 6:], expected_with_eos(free[:, 6:], eos, 10))


# ----------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_causal_model_decodes_by_recomputing_the_window(temperature):
    """The course's generate: every step reruns the model over the (at most max_seq_len) window and
    samples from the last position. A non-causal model takes that path whatever use_cache says."""
    model = lively_model(3, causal=False, max_seq_len=16)
    idx = prompts(4, 2, 5)
    expected = idx.clone()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(20):  # past max_seq_len: the window slides
            logits, _ = model(expected[:, -16:])
            expected = torch.cat((expected, sample_epsilon(logits[:, -1], temperature, 0.05, generator)), dim=1)
    for use_cache, compile in ((True, False), (False, False), (True, True)):
        out = model.generate(idx, 20, temperature, generator=torch.Generator().manual_seed(7),
                             use_cache=use_cache, compile=compile)
        assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="KV cache needs a causal model"):
        model(idx, cache=KVCache(model.config, 2, 16))


def test_temperature_zero_is_argmax():
    model = lively_model()
    idx = prompts(8, 3, 7)
    logits = torch.randn(5, 100)
    assert torch.equal(sample_epsilon(logits, 0.0), logits.argmax(-1, keepdim=True))
    with torch.no_grad():
        expected = model(idx)[0][:, -1].argmax(-1)
    assert torch.equal(greedy(model, idx, 1)[:, -1], expected)


def test_epsilon_sampling_never_emits_tokens_below_epsilon():
    eps = 0.05
    # probabilities 0.30 0.25 0.20 0.15 0.06 | 0.02 0.01 0.005 0.005 (below eps)
    probs = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.02, 0.01, 0.005, 0.005])
    logits = probs.log().expand(20000, -1)
    draws = sample_epsilon(logits, 1.0, eps, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (20000, 1)
    counts = torch.bincount(draws.flatten(), minlength=9)
    assert counts[5:].sum() == 0  # never below epsilon
    assert (counts[:5] > 0).all()  # every token at or above epsilon does appear
    # the survivors are renormalised: frequencies follow 0.30 : 0.25 : 0.20 : 0.15 : 0.06
    torch.testing.assert_close(counts[:5] / 20000, probs[:5] / probs[:5].sum(), atol=0.015, rtol=0)


def test_epsilon_sampling_applies_after_temperature():
    logits = torch.tensor([[2.0, 1.0, -3.0]]).expand(5000, -1)
    hot = sample_epsilon(logits, 10.0, 0.2, generator=torch.Generator().manual_seed(0))
    assert set(hot.flatten().tolist()) == {0, 1, 2}  # at T=10 all three are above 0.2
    cold = sample_epsilon(logits, 0.5, 0.2, generator=torch.Generator().manual_seed(0))
    assert set(cold.flatten().tolist()) == {0}  # at T=0.5 only the top token is


@pytest.mark.parametrize("eps", [0.9, 1.0, 5.0])
def test_epsilon_never_drops_the_most_likely_token(eps):
    logits = torch.randn(1000, 50, generator=torch.Generator().manual_seed(1))
    draws = sample_epsilon(logits, 1.0, eps, generator=torch.Generator().manual_seed(2))
    assert torch.equal(draws, logits.argmax(-1, keepdim=True))


def test_epsilon_keeps_tokens_exactly_at_epsilon():
    """'Below epsilon' is dropped; a probability equal to epsilon stays."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).expand(300, -1)
    draws = sample_epsilon(logits, 1.0, 0.25, generator=torch.Generator().manual_seed(0))
    assert set(draws[:, 0].tolist()) == {0, 1, 2}


def test_fixed_generator_seed_gives_identical_samples():
    model = lively_model()
    idx = prompts(9, 2, 5)

    def sample(seed, **kwargs):
        return model.generate(idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(42), sample(42))
    assert torch.equal(sample(42, use_cache=False), sample(42))
    assert not torch.equal(sample(42), sample(43))
    logits = torch.randn(4, 64)
    a = sample_epsilon(logits, 0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_epsilon(logits, 0.8, generator=torch.Generator().manual_seed(5)))


# ----------------------------------------------------------------------------------------------
# sdpa fast path


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_sdpa_matches_readable_attention(n_kv_heads):
    # float64: the two attention paths must agree far below float32's rounding noise
    model = lively_model(n_kv_heads=n_kv_heads).double()
    rows = [prompts(30, 1, 9)[0], prompts(31, 1, 4)[0], prompts(32, 1, 1)[0]]
    idx, mask = padded_batch(rows, "left")
    tokens = prompts(33, 2, 24)
    with torch.inference_mode():
        readable = model(tokens, targets=tokens)[0]
        readable_tokens = greedy(model, idx, 20, prompt_mask=mask)
        readable_plain = greedy(model, tokens, 20)
        model.set_sdpa(True)
        fast = model(tokens, targets=tokens)[0]
        fast_tokens = greedy(model, idx, 20, prompt_mask=mask)
        fast_plain = greedy(model, tokens, 20)
        model.set_sdpa(False)
    torch.testing.assert_close(fast, readable, atol=1e-10, rtol=1e-10)
    assert torch.equal(fast_tokens, readable_tokens)
    assert torch.equal(fast_plain, readable_plain)


def test_sdpa_cached_decode_logits_match_readable():
    model = lively_model()
    tokens = prompts(34, 3, 16)

    def decode():
        cache = KVCache(model.config, 3, 16)
        out = [model(tokens[:, :6], cache=cache)[0]]
        out += [model(tokens[:, t : t + 1], cache=cache)[0] for t in range(6, 16)]
        return torch.cat(out, dim=1)

    with torch.inference_mode():
        readable = decode()
        model.set_sdpa(True)
        fast = decode()
        model.set_sdpa(False)
    torch.testing.assert_close(fast, readable, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Fixed-shape decoding, what generate(compile=True) compiles


def test_fixed_shape_step_logits_equal_full_forward():
    """Through a fixed-shape step (new keys written at cache.slot, attention over every slot, masked),
    each position's logits equal those of one full forward."""
    model = lively_model()
    tokens = prompts(50, 2, 20)
    with torch.inference_mode():
        full, _ = model(tokens, targets=tokens)
        cache = KVCache(model.config, 2, model.config.max_seq_len)
        model(tokens[:, :8], cache=cache)  # prefill through forward, as generate does
        valid = torch.zeros(2, cache.max_len, dtype=torch.bool)
        steps = []
        for t in range(8, 20):
            cache.slot, valid[:, t] = torch.tensor([t]), True
            valid[:, :t] = True
            logits, _ = model(tokens[:, t : t + 1], cache=cache, positions=torch.full((2, 1), t), key_valid=valid)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], atol=1e-5, rtol=1e-5)


@pytest.fixture
def no_compile(monkeypatch):
    """generate(compile=True) with torch.compile as the identity: the fixed-shape path, eager."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


@pytest.mark.parametrize("side", ["left", "right", None])
def test_fixed_shape_decoding_equals_kv_cache(no_compile, side):
    model = lively_model(n_kv_heads=2)
    if side is None:
        idx, mask = prompts(51, 3, 6), None
    else:
        idx, mask = padded_batch([prompts(52 + i, 1, n)[0] for i, n in enumerate([5, 1, 9])], side)
    expected = greedy(model, idx, 30, prompt_mask=mask)
    assert torch.equal(greedy(model, idx, 30, prompt_mask=mask, compile=True), expected)
    assert torch.equal(greedy(model, idx, 30, prompt_mask=mask, compile=True), expected)  # reused cache
    model.set_sdpa(True)
    assert torch.equal(greedy(model, idx, 30, prompt_mask=mask, compile=True), expected)


def test_fixed_shape_decoding_eos_and_sampling(no_compile):
    model = lively_model()
    idx = prompts(55, 4, 5)
    free = greedy(model, idx, 20)
    eos = free[0, 8].item()
    assert torch.equal(greedy(model, idx, 20, eos_id=eos, compile=True), greedy(model, idx, 20, eos_id=eos))

    def sample(**kwargs):
        return model.generate(idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(sample(compile=True), sample())


def test_compiled_decoder_cache_sizes(no_compile):
    """Power-of-two slots (at least 64, at most max_seq_len); the same size is reused."""
    model = tiny_model(max_seq_len=300)
    slots = [compiled_decoder(model, 2, n, "cpu", torch.float32)[1].max_len for n in (1, 64, 65, 200, 257, 300)]
    assert slots == [64, 64, 128, 256, 300, 300]
    step, cache = compiled_decoder(model, 2, 290, "cpu", torch.float32)
    assert compiled_decoder(model, 2, 299, "cpu", torch.float32)[1] is cache
    assert compiled_decoder(model, 3, 299, "cpu", torch.float32)[1] is not cache


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_decoding_equals_kv_cache():
    """The real torch.compile (inductor, CPU; ~20-60 s to compile a tiny model once)."""
    model = lively_model()
    idx, mask = padded_batch([prompts(56, 1, 4)[0], prompts(57, 1, 7)[0]], "left")
    expected = greedy(model, idx, 25, prompt_mask=mask)
    assert torch.equal(greedy(model, idx, 25, prompt_mask=mask, compile=True), expected)
    other = prompts(58, 2, 3)  # same batch size: no recompilation, another prompt length
    assert torch.equal(greedy(model, other, 40, compile=True), greedy(model, other, 40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_equals_kv_cache():
    """On a GPU, compile=True replays the fixed-shape step as CUDA graphs (mode reduce-overhead); the
    cache is mutated inside the graph, so a wrong capture would show as different tokens."""
    model = lively_model().to("cuda").set_sdpa(True)
    idx, mask = padded_batch([prompts(59, 1, 4)[0], prompts(60, 1, 9)[0]], "left")
    idx, mask = idx.cuda(), mask.cuda()
    expected = greedy(model, idx, 40, prompt_mask=mask)
    for _ in range(2):  # the second call replays the recorded graphs
        assert torch.equal(greedy(model, idx, 40, prompt_mask=mask, compile=True), expected)


# ----------------------------------------------------------------------------------------------
# max_seq_len


def test_cache_beyond_max_seq_len_raises_and_no_cache_slides():
    model = lively_model()  # max_seq_len 64
    idx = prompts(40, 1, 10)
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy(model, idx, 55)
    assert greedy(model, idx, 54).shape == (1, 64)  # exactly full is fine
    out = greedy(model, idx, 70, use_cache=False)
    assert out.shape == (1, 80)
    assert torch.equal(out[:, :64], greedy(model, idx, 54))  # identical while the window fits
    with torch.no_grad():  # afterwards each token is the argmax over the last 64 tokens
        for t in (64, 65, 79):
            assert model(out[:, t - 64 : t])[0][0, -1].argmax().item() == out[0, t].item()


def test_forward_beyond_cache_or_max_seq_len_raises():
    model = lively_model()
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 8)
        model(prompts(41, 1, 8), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 8"):
            model(prompts(42, 1, 1), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(prompts(43, 1, 65))


@pytest.mark.parametrize("sdpa", [False, True])
def test_every_decoding_path_runs_under_bf16_autocast(no_compile, sdpa):
    """The dtype plumbing of the GPU's bf16 paths, checked on the CPU's autocast: bf16 keys/values go
    into the model-dtype cache (slices and fixed slots), left padding included. Tokens may differ
    from fp32 by bf16 rounding, so only the first new token is compared with the readable path's."""
    model = lively_model(n_kv_heads=2)
    model.set_sdpa(sdpa)
    idx, mask = padded_batch([prompts(60 + i, 1, n)[0] for i, n in enumerate([5, 2, 7])], "left")
    outs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kwargs in (dict(use_cache=False), {}, dict(compile=True)):
            out = model.generate(idx, 12, temperature=0.0, prompt_mask=mask, **kwargs)
            assert out.shape == (3, idx.shape[1] + 12) and out.dtype == torch.long
            assert 0 <= out.min() and out.max() < model.config.vocab_size
            outs.append(out)
    assert torch.equal(outs[1][:, idx.shape[1]], outs[0][:, idx.shape[1]])
    assert torch.equal(outs[2][:, idx.shape[1]], outs[0][:, idx.shape[1]])


# ----------------------------------------------------------------------------------------------
# The loop's stop rule, samplers, context fitting, the CPU layout


def test_decode_stop_rule_freezes_ended_rows_and_ends_the_loop():
    model = lively_model(5)
    idx = prompts(70, 3, 4)
    free = torch.cat(list(decode(model, idx, 12)), dim=1)
    target = free[1, 3].item()  # row 1 ends at its 4th token
    ended = []

    def stop(tokens):
        ended.append(tokens[:, 0].clone())
        return tokens[:, 0] == target

    steps = torch.cat(list(decode(model, idx, 12, stop=stop)), dim=1)
    first_end = {row: next((t for t in range(12) if free[row, t] == target), None) for row in range(3)}
    for row in range(3):
        end = first_end[row]
        if end is None:
            assert torch.equal(steps[row], free[row, : steps.shape[1]])
        else:  # identical up to the stop token, then that token repeated
            assert torch.equal(steps[row, : end + 1], free[row, : end + 1])
            assert (steps[row, end:] == target).all()
    assert steps.shape[1] == 12 or all(e is not None for e in first_end.values())


def test_leaving_the_loop_computes_no_further_step():
    model = lively_model()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    for i, _ in enumerate(decode(model, prompts(71, 1, 3), 50)):
        if i == 2:
            break
    assert len(calls) == 3  # the prefill and two one-token steps


def test_make_sampler_dispatch():
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(make_sampler(0.0, top_p=0.9)(logits), logits.argmax(-1, keepdim=True))

    def same(sampler, reference):
        return torch.equal(sampler(logits), reference(logits))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert same(make_sampler(0.7, top_p=0.9, generator=g()), lambda x: sample_top_p(x, 0.9, 0.7, g()))
    assert same(make_sampler(0.7, top_k=5, generator=g()), lambda x: sample_top_k(x, 5, 0.7, g()))
    assert same(make_sampler(0.7, epsilon=0.01, generator=g()), lambda x: sample_epsilon(x, 0.7, 0.01, g()))
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=1.0, epsilon=1.0),
                dict(temperature=1.0, top_p=0.5, top_k=3)):
        with pytest.raises(ValueError):
            make_sampler(**bad)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_samples_outside_the_k_most_likely(k):
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(k))
    allowed = logits.topk(k, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        token = sample_top_k(logits, k, 1.5, generator)
        assert (allowed == token).any(dim=-1).all()
        seen.add(token[0, 0].item())
    assert len(seen) == k  # every one of the k is reachable
    with pytest.raises(ValueError):
        sample_top_k(logits, 0)


def test_fit_context_and_keep_last():
    assert fit_context(10, 20, 64) == (10, 20)  # both fit: unchanged
    assert fit_context(60, 20, 64) == (44, 20)  # the prompt gives way
    assert fit_context(10, 100, 64) == (10, 54)  # the budget takes what the prompt leaves
    assert fit_context(60, 100, 64) == (32, 32)  # both too long: half each
    assert keep_last([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
    assert keep_last([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
    assert keep_last([1, 5], 3, bos_id=1) == [1, 5]


def test_decoding_layout_keeps_values_parameters_and_optimizer():
    model = tiny_model()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    decoding_layout(model)
    decoding_layout(model)  # twice: no change
    for name, p in model.named_parameters():
        assert p is params[name] and torch.equal(p, before[name])
    widening = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features > m.in_features]
    assert widening and all(w.stride() == (1, w.shape[0]) for w in widening)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = prompts(72, 2, 8)
    logits, _ = model(tokens, targets=tokens)
    logits.sum().backward()
    optimizer.step()  # the optimizer still updates the model's own parameters
    assert not torch.equal(model.output.weight, before["tok_embeddings.weight"])  # (tied: named once)


# ----------------------------------------------------------------------------------------------
# Nucleus sampling


def nucleus(probs: torch.Tensor, p: float) -> set:
    """The smallest set of most likely tokens whose probability reaches p, computed independently."""
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += float(probs[i])
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p, temperature", [(0.5, 1.0), (0.9, 1.0), (0.95, 0.8), (0.3, 2.0)])
def test_top_p_never_samples_outside_the_nucleus(p, temperature):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    generator = torch.Generator().manual_seed(1)
    allowed = [nucleus(torch.softmax(row / temperature, -1), p) for row in logits]
    seen = [set() for _ in logits]
    for _ in range(5):  # 5 x 200 draws per row: each call samples a batch of 200 copies of every row
        tokens = sample_top_p(logits.repeat(200, 1), p, temperature, generator)
        assert tokens.shape == (800, 1)
        for i, token in enumerate(tokens[:, 0].tolist()):
            row = i % len(logits)
            assert token in allowed[row]
            seen[row].add(token)
    for row in range(len(logits)):  # it does sample within the nucleus, not just take the argmax
        assert len(seen[row]) > 1 or len(allowed[row]) == 1


def test_top_p_frequencies_follow_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = sample_top_p(logits.expand(4000, -1), 0.8, 1.0, generator)[:, 0]
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.04


def test_top_p_nucleus_stops_as_soon_as_p_is_reached():
    """The smallest set reaching p: the top token alone holds 0.5, so p = 0.5 samples only it."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).expand(200, -1)
    draws = sample_top_p(logits, 0.5, 1.0, torch.Generator().manual_seed(0))
    assert set(draws[:, 0].tolist()) == {0}


def test_top_p_near_zero_or_greedy_is_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_top_p(logits, 1e-9, 1.0, generator), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_top_p(logits, 0.0, 1.0, generator), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_top_p(logits, 0.9, 0.0, generator), logits.argmax(-1, keepdim=True))
    assert sample_top_p(logits[0], 1e-9).shape == (1,)
    with pytest.raises(ValueError):
        sample_top_p(logits, 1.5)


def test_fit_keeps_bos_when_it_trims_a_long_prompt():
    prompt = [1] + list(range(10, 200))
    room, n_new = fit_context(len(prompt), 10, 64)
    ids = keep_last(prompt, room, bos_id=1)
    assert len(ids) + n_new <= 64 and ids[0] == 1 and ids[1:] == prompt[len(prompt) - len(ids) + 1:]

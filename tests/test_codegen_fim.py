"""Tests for codegen/fim.py: the fill-in-the-middle (PSM) data transform."""
import random

import pytest

from codegen.fim import (FIM_END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, apply_fim, parse_psm,
                         psm_ids, split_fim, to_psm)

ALPHABET = "abc xyz\n\t()_:=é€ü中文🐍\u0301"  # ascii, accents, CJK, astral emoji, combining mark


def random_texts(rng, n=300):
    texts = ["", "a", "🐍", "def f():\n    return 1\n", "中文", "e\u0301"]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(n)]
    return texts


def test_sentinel_names():
    assert (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_END) == (
        "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_end>")


def test_split_fim_round_trip():
    rng = random.Random(0)
    for text in random_texts(rng):
        for _ in range(5):
            prefix, middle, suffix = split_fim(text, rng)
            assert prefix + middle + suffix == text


def test_split_fim_reaches_every_cut_including_the_ends():
    rng = random.Random(0)
    seen = {tuple(map(len, split_fim("abcd", rng))) for _ in range(2000)}
    assert seen == {(i, j - i, 4 - j) for i in range(5) for j in range(i, 5)}


def test_to_psm_layout():
    assert to_psm("A", "B", "C") == "<fim_prefix>A<fim_suffix>C<fim_middle>B<fim_end>"
    assert to_psm("", "", "") == "<fim_prefix><fim_suffix><fim_middle><fim_end>"


def test_parse_psm_round_trip():
    rng = random.Random(1)
    for text in random_texts(rng):
        parts = split_fim(text, rng)
        assert parse_psm(to_psm(*parts)) == parts


@pytest.mark.parametrize("bad", ["plain text", "<fim_prefix>a<fim_suffix>b<fim_end>",
                                 "<fim_prefix>a<fim_middle>b<fim_end>",
                                 "<fim_prefix>a<fim_suffix>b<fim_middle>c"])
def test_parse_psm_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_psm(bad)


SENTINEL_IDS = {FIM_PREFIX: 100, FIM_SUFFIX: 101, FIM_MIDDLE: 102, FIM_END: 103}


def test_psm_ids_layout():
    assert psm_ids([1, 2], [3], [4, 5, 6], SENTINEL_IDS) == [100, 1, 2, 101, 4, 5, 6, 102, 3, 103]
    assert psm_ids([], [], [], SENTINEL_IDS) == [100, 101, 102, 103]
    with pytest.raises(KeyError, match="fim_end"):
        psm_ids([1], [2], [3], {FIM_PREFIX: 0, FIM_SUFFIX: 1, FIM_MIDDLE: 2})


def test_psm_ids_matches_to_psm_under_a_char_tokenizer():
    def encode(s):  # characters -> code points, sentinel strings -> their ids
        ids, i = [], 0
        while i < len(s):
            tok = next((t for t in SENTINEL_IDS if s.startswith(t, i)), None)
            ids.append(SENTINEL_IDS[tok] if tok else ord(s[i]))
            i += len(tok) if tok else 1
        return ids

    rng = random.Random(2)
    for text in random_texts(rng, 50):
        p, m, s = split_fim(text, rng)
        assert psm_ids(encode(p), encode(m), encode(s), SENTINEL_IDS) == encode(to_psm(p, m, s))


def test_apply_fim_rate_zero_leaves_text_unchanged():
    rng = random.Random(3)
    for text in random_texts(rng):
        assert apply_fim(text, rng, fim_rate=0.0) == text


def test_apply_fim_rate_one_always_transforms():
    rng = random.Random(4)
    for text in random_texts(rng):
        out = apply_fim(text, rng, fim_rate=1.0)
        assert out.startswith(FIM_PREFIX) and out.endswith(FIM_END)
        assert "".join(parse_psm(out)) == text


def test_apply_fim_rate_is_respected_and_seeded():
    texts = ["some code here"] * 2000
    outs = [apply_fim(t, random.Random(5), 0.5) for t in texts[:1]]
    assert outs == [apply_fim(texts[0], random.Random(5), 0.5)]  # same seed, same result
    rng = random.Random(6)
    frac = sum(apply_fim(t, rng, 0.5) != t for t in texts) / len(texts)
    assert 0.45 < frac < 0.55


def test_apply_fim_skips_text_that_contains_a_sentinel():
    text = "s = '<fim_middle>'\n"
    assert apply_fim(text, random.Random(0), fim_rate=1.0) == text

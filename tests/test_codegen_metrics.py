"""Tests for codegen/metrics.py.

chrF and BLEU are checked against sacrebleu (a test-only reference; the tests that need it skip
when it is not installed). ROUGE-L and pass@k are checked against hand computations and closed
forms.
"""
import math
import random

import pytest

from codegen.metrics import (
    bleu, chrf, exact_match, pass_at_k, rouge_l, rouge_l_mean, sentence_chrf, syntax_valid,
    tokenize_13a,
)

TOL = 0.01  # agreement with sacrebleu, in score points on the 0-100 scale


def _sacrebleu():
    return pytest.importorskip(
        "sacrebleu", reason="sacrebleu (test-only reference for chrF/BLEU) is not installed")


# ------------------------------------------------------------------------------------------
# Corpora for the comparisons with sacrebleu
# ------------------------------------------------------------------------------------------
_CODE_ALPHABET = "abcdefxyz_0123456789 ()[]{}:.,=+-*/<>'\"#\n\t"
_CODE_WORDS = ["def", "return", "self", "x", "y", "i", "in", "for", "if", "else:", "range(n)",
               "print(x)", "=", "+=", "==", "None", "True", "len(xs)", "x.append(y)", "3.14",
               "1,000", "a-b", "2-3", "&amp;", "&lt;", "<skipped>", "x.", "y,", "(", ")"]


def _random_code(rng, n_words):
    return " ".join(rng.choice(_CODE_WORDS) for _ in range(n_words))


def _random_chars(rng, n_chars):
    return "".join(rng.choice(_CODE_ALPHABET) for _ in range(n_chars))


def _mutate(rng, text):
    """A hypothesis near the reference: drop, duplicate or swap some words."""
    words = text.split(" ")
    out = []
    for w in words:
        r = rng.random()
        if r < 0.15:
            continue
        out.append(w)
        if r > 0.9:
            out.append(rng.choice(_CODE_WORDS))
    return " ".join(out)


def _seeded_corpus(seed, size):
    rng = random.Random(seed)
    refs, hyps = [], []
    for _ in range(size):
        if rng.random() < 0.5:
            ref = _random_code(rng, rng.randint(1, 25))
            hyp = _mutate(rng, ref) if rng.random() < 0.7 else _random_code(rng, rng.randint(0, 25))
        else:
            ref = _random_chars(rng, rng.randint(1, 60))
            hyp = ref[: rng.randint(0, len(ref))] + _random_chars(rng, rng.randint(0, 10))
        refs.append(ref)
        hyps.append(hyp)
    return hyps, refs


PY_REF = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''
PY_HYP = '''def fib(n):
    a, b = 1, 1
    for i in range(n): a, b = b, a+b
    return a  # done!
'''

FIXED_CORPORA = {
    "identical_single": (["the cat sat on the mat"], ["the cat sat on the mat"]),
    "identical_multi": (["x = 1", "print(x)", "return x + y"], ["x = 1", "print(x)", "return x + y"]),
    "empty_hypothesis": ([""], ["def f(x): return x"]),
    "empty_reference": (["def f(x): return x"], [""]),
    "both_empty": ([""], [""]),
    "empty_among_others": (["", "return a + b", "x=1"], ["pass", "return a + b", "x = 1"]),
    "whitespace_only": (["   \n\t "], ["  "]),
    "much_shorter": (["def"], ["def foo(bar, baz):\n    return [b * 2 for b in bar if b not in baz]"]),
    "shorter_corpus": (["x", "for i in", "y"],
                       ["x = compute(a, b, c) + 1", "for i in range(len(items)): total += items[i]",
                        "y = {'k': [1, 2, 3], 'v': (4, 5)}"]),
    "shorter_brevity_penalty": (["def foo(bar, baz): return [b * 2"],
                                ["def foo(bar, baz):\n    return [b * 2 for b in bar if b not in baz]"]),
    "much_longer": (["return " + " + ".join(f"x{i}" for i in range(40))], ["return x0 + x1"]),
    "unicode": (["naïve café — 東京 🚀 def λ(x): return x²", "Ünïcödé straße"],
                ["naive café — 東京 🚀 def λ(y): return y²", "Unicode strasse"]),
    "python_punctuation": ([PY_HYP], [PY_REF]),
    "punctuation_heavy": (["d = {'a': [1, 2], **kw}; f(*args, **{'x': -1.5e-3})"],
                          ["d = {'a': [1, 2, 3], **kw}; g(*args, **{'x': -1.5e-3}) # ok?"]),
    "numbers_13a": (["pi = 3.14, n = 1,000; 2-3 x. y,z"], ["pi = 3.14 , n = 1,000 ; 2 - 3 x . y , z"]),
    "xml_entities": (["a &amp; b &lt; c &gt; d &quot;e&quot; <skipped> f-\ng"], ['a & b < c > d "e" fg']),
    "no_ngram_overlap": (["aaaa bbbb"], ["cccc dddd"]),
    "single_chars": (["a", "b", "c"], ["a", "c", "b"]),
    "trailing_hyphen_newline": (["total = a + b-\n", "c-\nd"], ["total = a + b", "cd"]),
    "trailing_spaces": (["x = 1   \n\n", "  y"], ["x = 1", "y  "]),
    "partial_matches": (["the quick brown fox", "jumps over the lazy dog"],
                        ["the quick red fox", "leaps over a lazy dog"]),
}


def _all_corpora():
    cases = [pytest.param(h, r, id=name) for name, (h, r) in FIXED_CORPORA.items()]
    for seed in range(12):
        size = 1 if seed < 4 else random.Random(seed).randint(2, 30)
        hyps, refs = _seeded_corpus(seed, size)
        cases.append(pytest.param(hyps, refs, id=f"random_seed{seed}_n{size}"))
    return cases


# ------------------------------------------------------------------------------------------
# chrF and BLEU vs sacrebleu
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hyps, refs", _all_corpora())
def test_chrf_matches_sacrebleu(hyps, refs):
    sacrebleu = _sacrebleu()
    expected = sacrebleu.metrics.CHRF().corpus_score(hyps, [refs]).score
    assert chrf(hyps, refs) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("hyps, refs", _all_corpora())
def test_chrf_eps_smoothing_matches_sacrebleu(hyps, refs):
    sacrebleu = _sacrebleu()
    expected = sacrebleu.metrics.CHRF(eps_smoothing=True).corpus_score(hyps, [refs]).score
    assert chrf(hyps, refs, eps_smoothing=True) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("hyps, refs", _all_corpora())
def test_bleu_matches_sacrebleu(hyps, refs):
    sacrebleu = _sacrebleu()
    expected = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs]).score
    assert bleu(hyps, refs) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("hyps, refs", _all_corpora())
def test_module_level_corpus_functions_agree(hyps, refs):
    sacrebleu = _sacrebleu()
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=TOL)
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=TOL)


def test_sentence_chrf_matches_sacrebleu():
    sacrebleu = _sacrebleu()
    rng = random.Random(1234)
    for _ in range(50):
        ref = _random_code(rng, rng.randint(1, 15))
        hyp = _mutate(rng, ref)
        expected = sacrebleu.metrics.CHRF().sentence_score(hyp, [ref]).score
        assert sentence_chrf(hyp, ref) == pytest.approx(expected, abs=TOL)


def test_corpus_chrf_is_not_mean_of_sentence_chrf():
    # Statistics are pooled before the F-score: a long good pair outweighs a short bad one.
    hyps, refs = ["abcdefghijklmnop", "x"], ["abcdefghijklmnop", "y"]
    # Pooled: order 1 has P = R = 16/17, orders 2-6 only count the first pair (P = R = 1).
    pooled = (16 / 17 + 5) / 6
    assert chrf(hyps, refs) == pytest.approx(100 * pooled)
    mean = (sentence_chrf(hyps[0], refs[0]) + sentence_chrf(hyps[1], refs[1])) / 2
    assert mean == pytest.approx(50.0)  # 100 and 0


def test_tokenize_13a_matches_sacrebleu():
    sacrebleu = _sacrebleu()
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    reference_tokenizer = Tokenizer13a()
    lines = [PY_REF, PY_HYP, "pi = 3.14, n = 1,000; 2-3 x. y,z", "a-b c'd e_f ~x `y` |z| ^w",
             "&amp;&lt;&gt;&quot; <skipped>", "end.", ".start", "9.", ".9", "1,a a,1", "x\ny-\nz"]
    rng = random.Random(7)
    lines += [_random_chars(rng, 80) for _ in range(200)]
    for line in lines:
        assert tokenize_13a(line) == reference_tokenizer(line), repr(line)


def test_perfect_and_zero_scores():
    assert chrf(["abc def"], ["abc def"]) == pytest.approx(100.0)
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    assert chrf([""], ["abc"]) == 0.0
    assert bleu([""], ["abc"]) == 0.0
    assert bleu(["a b c"], ["a b c"]) == 0.0  # no 4-grams: corpus BLEU (no effective order) is 0


# ------------------------------------------------------------------------------------------
# ROUGE-L against hand-computed LCS
# ------------------------------------------------------------------------------------------
def test_rouge_l_hand_computed():
    # hyp: the cat sat on mat       (5 tokens)
    # ref: the cat was on the mat   (6 tokens)
    # LCS: the cat on mat -> 4.  P = 4/5, R = 4/6, F1 = 2PR/(P+R) = 2*(16/30)/(44/30) = 32/44 = 8/11
    assert rouge_l("the cat sat on mat", "the cat was on the mat") == pytest.approx(8 / 11)

    # hyp: a b c d   ref: d c b a.   Any common subsequence has length 1 (order is reversed).
    # P = R = 1/4 -> F1 = 1/4
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)

    # hyp: return x + y     (4 tokens)
    # ref: return y + x     (4 tokens)
    # Length-2 common subsequences exist ("return x", "return +", "return y"); none of length 3:
    # after "return", hyp orders x < + < y while ref orders y < + < x, so any two of {x, +, y}
    # appear in opposite orders. LCS = 2, P = R = 2/4 -> F1 = 1/2
    assert rouge_l("return x + y", "return y + x") == pytest.approx(0.5)

    # hyp: x = f ( a )        (6 tokens)
    # ref: x = g ( a , b )    (8 tokens)
    # LCS: x = ( a ) -> 5.  P = 5/6, R = 5/8, F1 = 2*(25/48)/(5/6+5/8) = (50/48)/(35/24) = 5/7
    assert rouge_l("x = f ( a )", "x = g ( a , b )") == pytest.approx(5 / 7)

    # Repeated tokens: hyp "a a b" vs ref "a b a b"; LCS "a a b" -> 3. P = 1, R = 3/4,
    # F1 = 2*(3/4)/(7/4) = 6/7
    assert rouge_l("a a b", "a b a b") == pytest.approx(6 / 7)


def test_rouge_l_tokenizes_on_whitespace_only():
    # "f(x):" is one token, so these share nothing but "return".
    # hyp tokens: def f(x): return     ref tokens: def f(y): return
    # LCS: def return -> 2; P = R = 2/3 -> F1 = 2/3
    assert rouge_l("def f(x):\n    return", "def  f(y):\treturn") == pytest.approx(2 / 3)
    # Case and punctuation are kept: "Return" != "return".
    assert rouge_l("Return x", "return x") == pytest.approx(0.5)


def test_rouge_l_edges():
    assert rouge_l("same tokens here", "same  tokens\nhere") == pytest.approx(1.0)
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("a b", "") == 0.0
    assert rouge_l("", "") == 0.0
    assert rouge_l("a b", "c d") == 0.0
    assert rouge_l_mean(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        rouge_l_mean(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        rouge_l_mean([], [])


def test_rouge_l_against_brute_force_lcs():
    import itertools

    def brute_lcs(a, b):
        for size in range(min(len(a), len(b)), 0, -1):
            subs = {tuple(s) for s in itertools.combinations(a, size)}
            if any(tuple(s) in subs for s in itertools.combinations(b, size)):
                return size
        return 0

    rng = random.Random(3)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(1, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(1, 7))]
        lcs = brute_lcs(a, b)
        expected = 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))  # F1 = 2*LCS/(|a|+|b|)
        assert rouge_l(" ".join(a), " ".join(b)) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------
# pass@k
# ------------------------------------------------------------------------------------------
def test_pass_at_k_matches_closed_form_on_all_small_cases():
    for n in range(1, 11):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_known_values():
    for n in range(1, 21):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 = c / n
            assert pass_at_k(n, c, n) == (1.0 if c > 0 else 0.0)  # drawing everything
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 failures: any 5 draws include a pass
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10


def test_pass_at_k_is_stable_for_large_n():
    # The binomials here overflow a float, the product form does not.
    n, c, k = 2000, 3, 100
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integer arithmetic, then one division
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9)
    assert 0.0 <= pass_at_k(100000, 1, 50000) <= 1.0
    assert pass_at_k(100000, 1, 50000) == pytest.approx(0.5)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (-1, 0, 1), (5, -1, 1), (5, 6, 1), (5, 1, 0),
                                     (5, 1, 6), (5, 1, -2), (5.0, 1, 1), (5, 1, 1.5), (True, 1, 1)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------------
# exact match, syntax validity, argument checking
# ------------------------------------------------------------------------------------------
def test_exact_match():
    hyps = ["x = 1  \ny = 2\t\n\n", "  return x", "a", ""]
    refs = ["x = 1\ny = 2", "return x", "b", "   \n"]
    # 1: equal after stripping trailing whitespace; 2: leading indentation differs; 3: differs;
    # 4: both reduce to "" -> 2 of 4
    assert exact_match(hyps, refs) == pytest.approx(0.5)
    assert exact_match(["def f():\n    pass"], ["def f():   \n    pass   \n"]) == 1.0
    assert exact_match(["def f():\n pass"], ["def f():\n    pass"]) == 0.0


def test_syntax_valid():
    assert syntax_valid("def f(x):\n    return x + 1\n")
    assert syntax_valid("")
    assert syntax_valid("# just a comment")
    assert syntax_valid('s = "\\d"')  # invalid escape: a warning, not an error
    assert not syntax_valid("def f(x)\n    return x")
    assert not syntax_valid("return (")
    assert not syntax_valid("if x:\nprint(x)")
    assert not syntax_valid("x = 1\x00")
    assert not syntax_valid("(" * 1000 + ")" * 1000)  # too deeply nested for the parser
    assert not syntax_valid("-" * 200000 + "1")  # parser stack overflow (MemoryError on 3.11)
    assert not syntax_valid("a" + ".b" * 200000)  # RecursionError while building the AST


@pytest.mark.parametrize("fn", [chrf, bleu, exact_match, rouge_l_mean])
def test_corpus_argument_checks(fn):
    with pytest.raises(ValueError):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        fn(["a"], [])
    with pytest.raises(ValueError):
        fn([], [])
    with pytest.raises(TypeError):
        fn([None], ["a"])
    with pytest.raises(TypeError):
        fn(["a"], [b"a"])

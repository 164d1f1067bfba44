"""Metrics for scoring generated code against references. Standard library only.

    chrf / sentence_chrf   character n-gram F-score, identical to sacrebleu's default CHRF
    bleu                   corpus BLEU, identical to sacrebleu's default BLEU (13a tokenizer)
    rouge_l / rouge_l_mean ROUGE-L F1 over whitespace tokens
    exact_match            fraction of hypotheses equal to their reference (trailing whitespace ignored)
    pass_at_k              unbiased pass@k estimator from the Codex paper
    syntax_valid           does the string parse as Python?

Corpus metrics take two equally long, non-empty lists of strings, one reference per hypothesis;
a length mismatch or an empty corpus raises ValueError, a non-string raises TypeError.
Empty strings inside a corpus are fine: they simply contribute no n-grams.
"""
import ast
import math
import re
import warnings
from collections import Counter
from typing import List, Sequence

__all__ = [
    "chrf", "sentence_chrf", "bleu", "tokenize_13a", "rouge_l", "rouge_l_mean",
    "exact_match", "pass_at_k", "syntax_valid",
]


def _check_corpus(hyps: Sequence[str], refs: Sequence[str]) -> None:
    """One reference string per hypothesis string, and at least one pair."""
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references")
    if len(hyps) == 0:
        raise ValueError("empty corpus: need at least one hypothesis/reference pair")
    for name, seq in (("hypothesis", hyps), ("reference", refs)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise TypeError(f"{name} {i} is {type(s).__name__}, expected str")


# --------------------------------------------------------------------------------------------
# chrF (Popović 2015)
#
# Character n-grams of order 1..6 are taken from each string after deleting all whitespace.
# For every order n: precision P_n = matched / hypothesis n-grams, recall R_n = matched /
# reference n-grams, where "matched" is the clipped count sum_g min(hyp[g], ref[g]).
# Following sacrebleu's default (eps_smoothing=False, signature "eff:yes"), the precisions and
# recalls of the orders where both the hypothesis and the reference have n-grams are averaged,
# and the score is the F-beta of those averages, with beta = 2 (recall weighs twice precision):
#
#     chrF = 100 * (1 + beta^2) * P * R / (beta^2 * P + R)
#
# At corpus level the (hyp, ref, match) counts are summed over all sentences first, then the
# score is computed once. With eps_smoothing=True the F-score of every order is computed
# separately (a zero denominator contributes eps = 1e-16) and the six F-scores are averaged,
# as in chrF++.py, Moses and NLTK; sacrebleu offers that as CHRF(eps_smoothing=True).
# --------------------------------------------------------------------------------------------
CHRF_CHAR_ORDER = 6
CHRF_BETA = 2


def _chrf_statistics(hyp: str, ref: str) -> List[int]:
    """[hyp n-grams, ref n-grams, matched n-grams] for n = 1..6, flattened (18 integers)."""
    hyp = "".join(hyp.split())  # drop every whitespace character
    ref = "".join(ref.split())
    stats = []
    for n in range(1, CHRF_CHAR_ORDER + 1):
        hyp_ngrams = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        ref_ngrams = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        matched = sum(min(count, ref_ngrams[g]) for g, count in hyp_ngrams.items() if g in ref_ngrams)
        n_hyp = sum(hyp_ngrams.values())
        # As sacrebleu does: when the reference has no n-grams of this order, the hypothesis
        # n-grams are not counted either (this matters once counts are summed over a corpus).
        stats += [n_hyp if ref_ngrams else 0, sum(ref_ngrams.values()), matched]
    return stats


def _chrf_from_statistics(stats: Sequence[int], eps_smoothing: bool = False) -> float:
    eps = 1e-16
    factor = CHRF_BETA ** 2
    f_sum, prec_sum, rec_sum, effective_order = 0.0, 0.0, 0.0, 0
    for n in range(CHRF_CHAR_ORDER):
        n_hyp, n_ref, n_match = stats[3 * n: 3 * n + 3]
        prec = n_match / n_hyp if n_hyp > 0 else eps
        rec = n_match / n_ref if n_ref > 0 else eps
        denom = factor * prec + rec
        f_sum += (1 + factor) * prec * rec / denom if denom > 0 else eps
        if n_hyp > 0 and n_ref > 0:
            prec_sum += prec
            rec_sum += rec
            effective_order += 1
    if eps_smoothing:
        return 100 * f_sum / CHRF_CHAR_ORDER
    if effective_order == 0:
        return 0.0
    prec, rec = prec_sum / effective_order, rec_sum / effective_order
    if prec + rec == 0:
        return 0.0
    return 100 * (1 + factor) * prec * rec / (factor * prec + rec)


def chrf(hyps: Sequence[str], refs: Sequence[str], eps_smoothing: bool = False) -> float:
    """Corpus chrF on a 0-100 scale; equals sacrebleu.metrics.CHRF().corpus_score(hyps, [refs])."""
    _check_corpus(hyps, refs)
    totals = [0] * (3 * CHRF_CHAR_ORDER)
    for hyp, ref in zip(hyps, refs):
        totals = [t + s for t, s in zip(totals, _chrf_statistics(hyp, ref))]
    return _chrf_from_statistics(totals, eps_smoothing)


def sentence_chrf(hyp: str, ref: str, eps_smoothing: bool = False) -> float:
    """chrF of a single pair (a corpus of one), 0-100."""
    return chrf([hyp], [ref], eps_smoothing)


# --------------------------------------------------------------------------------------------
# BLEU (Papineni et al. 2002), as computed by sacrebleu with default settings.
#
# Both strings are right-stripped and tokenized with the 13a tokenizer (mteval-v13a.pl).
# For n = 1..4 the modified precision p_n = clipped matched n-grams / hypothesis n-grams is
# computed from counts summed over the whole corpus, and
#
#     BLEU = BP * exp(mean_n log p_n),   BP = 1 if c >= r else exp(1 - r / c)
#
# with c and r the total hypothesis and reference token counts (BP = 0 when c = 0).
# 'exp' smoothing (NIST, Chen & Cherry method 3): the k-th order with zero matches gets
# p_n = 1 / (2^k * hypothesis n-grams) instead of 0. With no match at all, or when some order
# has no hypothesis n-grams whatsoever, BLEU is 0.
# --------------------------------------------------------------------------------------------
BLEU_MAX_ORDER = 4

# 13a tokenization, applied after surrounding the line with spaces:
_13A_RULES = [
    # Split off ASCII punctuation and symbols, except apostrophe, comma, hyphen and period.
    # The ranges are {-~ = "{|}~", [-` = "[\]^_`", space-& = ' !"#$%&', (-+ = "()*+",
    # :-@ = ":;<=>?@", plus "/".
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    # Split off period and comma unless preceded by a digit ...
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    # ... and unless followed by a digit (so "3.14" and "1,000" stay whole).
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    # Split off a hyphen that follows a digit.
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> str:
    """sacrebleu's '13a' tokenization: tokens separated by single spaces."""
    line = line.replace("<skipped>", "")
    line = line.replace("-\n", "")  # rejoin words hyphenated across a line break
    line = line.replace("\n", " ")
    if "&" in line:  # undo the four XML escapes mteval knows
        line = line.replace("&quot;", '"')
        line = line.replace("&amp;", "&")
        line = line.replace("&lt;", "<")
        line = line.replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def _word_ngrams(tokens: List[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU on a 0-100 scale; equals sacrebleu.metrics.BLEU().corpus_score(hyps, [refs])."""
    _check_corpus(hyps, refs)
    hyp_len = ref_len = 0
    matched = [0] * BLEU_MAX_ORDER
    total = [0] * BLEU_MAX_ORDER
    for hyp, ref in zip(hyps, refs):
        hyp_tokens = tokenize_13a(hyp.rstrip()).split()
        ref_tokens = tokenize_13a(ref.rstrip()).split()
        hyp_len += len(hyp_tokens)
        ref_len += len(ref_tokens)
        ref_ngrams = _word_ngrams(ref_tokens, BLEU_MAX_ORDER)
        for gram, count in _word_ngrams(hyp_tokens, BLEU_MAX_ORDER).items():
            total[len(gram) - 1] += count
            matched[len(gram) - 1] += min(count, ref_ngrams[gram])

    if not any(matched) or not all(total):
        return 0.0
    brevity_penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    log_precisions = []
    smooth = 1.0
    for n in range(BLEU_MAX_ORDER):
        if matched[n] == 0:
            smooth *= 2
            precision = 100.0 / (smooth * total[n])
        else:
            precision = 100.0 * matched[n] / total[n]
        log_precisions.append(math.log(precision))
    return brevity_penalty * math.exp(sum(log_precisions) / BLEU_MAX_ORDER)


# --------------------------------------------------------------------------------------------
# ROUGE-L (Lin 2004): the longest common subsequence (LCS) of the two token sequences, not
# necessarily contiguous, measures in-order overlap. With P = LCS / len(hyp) and
# R = LCS / len(ref), ROUGE-L F1 = 2 P R / (P + R)   (beta = 1).
# --------------------------------------------------------------------------------------------
def _lcs_length(a: List[str], b: List[str]) -> int:
    """Classic dynamic programme, keeping one row: O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 in [0, 1] between two strings.

    Tokenization: str.split(), i.e. tokens are maximal runs of non-whitespace characters; case
    and punctuation are kept as they are ("f(x):" is one token). If either side has no tokens
    the score is 0.0.
    """
    if not isinstance(hyp, str) or not isinstance(ref, str):
        raise TypeError("rouge_l expects two strings")
    hyp_tokens, ref_tokens = hyp.split(), ref.split()
    if not hyp_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_length(hyp_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp_tokens), lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_l_mean(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean of the per-pair ROUGE-L F1 scores over a corpus, in [0, 1]."""
    _check_corpus(hyps, refs)
    return sum(rouge_l(h, r) for h, r in zip(hyps, refs)) / len(hyps)


# --------------------------------------------------------------------------------------------
# Exact match: the fraction of hypotheses identical to their reference once trailing
# whitespace is removed from every line (and trailing blank lines thereby disappear).
# Leading whitespace counts, since indentation is part of Python's syntax.
# --------------------------------------------------------------------------------------------
def _strip_trailing_whitespace(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip()


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction in [0, 1] of pairs that match exactly after stripping trailing whitespace per line."""
    _check_corpus(hyps, refs)
    hits = sum(_strip_trailing_whitespace(h) == _strip_trailing_whitespace(r) for h, r in zip(hyps, refs))
    return hits / len(hyps)


# --------------------------------------------------------------------------------------------
# pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): from n samples
# of which c pass the tests, the probability that at least one of k samples drawn without
# replacement passes is 1 - C(n-c, k) / C(n, k). The ratio of binomials is evaluated as the
# product  prod_{i=n-c+1}^{n} (1 - k / i),  which never forms the huge binomials themselves.
# --------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate in [0, 1] for n samples with c correct; needs 0 <= c <= n and 1 <= k <= n."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    fail_probability = 1.0
    for i in range(n - c + 1, n + 1):
        fail_probability *= 1.0 - k / i
    return 1.0 - fail_probability


# --------------------------------------------------------------------------------------------
# Syntax validity: whether the text parses as Python source for the running interpreter.
# --------------------------------------------------------------------------------------------
def syntax_valid(code: str) -> bool:
    """True when ast.parse accepts `code` (warnings such as invalid escape sequences are silenced)."""
    if not isinstance(code, str):
        raise TypeError(f"syntax_valid expects a str, got {type(code).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # ValueError: source contains null bytes; RecursionError/MemoryError: absurdly deep nesting.
        return False
    return True

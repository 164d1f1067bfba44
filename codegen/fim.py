"""Fill-in-the-middle (FIM) data transform, PSM order (Bavarian et al. 2022; Code Llama).

A document is cut at two random character positions into prefix / middle / suffix and rewritten as

    <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <fim_end>

so that a left-to-right model learns to produce the middle given both sides. At inference time the
prompt is everything up to and including <fim_middle>; generation stops at <fim_end>.

Only the sentinel *names* live here; their token ids are assigned where the vocabulary is extended,
and passed to psm_ids() as {FIM_PREFIX: id, FIM_SUFFIX: id, FIM_MIDDLE: id, FIM_END: id}.
Cut points are on str indices, i.e. Unicode code points, so a character is never split.
"""
import random

FIM_PREFIX = "<fim_prefix>"
FIM_SUFFIX = "<fim_suffix>"
FIM_MIDDLE = "<fim_middle>"
FIM_END = "<fim_end>"
SENTINELS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_END)


def split_fim(text: str, rng: random.Random):
    """(prefix, middle, suffix) with prefix + middle + suffix == text; cuts uniform in [0, len]."""
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:i], text[i:j], text[j:]


def to_psm(prefix: str, middle: str, suffix: str) -> str:
    return FIM_PREFIX + prefix + FIM_SUFFIX + suffix + FIM_MIDDLE + middle + FIM_END


def psm_ids(prefix_ids, middle_ids, suffix_ids, sentinel_ids: dict) -> list:
    """[PRE] prefix [SUF] suffix [MID] middle [END] as a list of token ids."""
    missing = [s for s in SENTINELS if s not in sentinel_ids]
    if missing:
        raise KeyError(f"sentinel_ids lacks {missing}; expected keys {list(SENTINELS)}")
    pre, suf, mid, end = (sentinel_ids[s] for s in SENTINELS)
    return [pre, *prefix_ids, suf, *suffix_ids, mid, *middle_ids, end]


def has_sentinel(text: str) -> bool:
    return any(s in text for s in SENTINELS)


def apply_fim(text: str, rng: random.Random, fim_rate: float = 0.5) -> str:
    """With probability fim_rate the PSM form of a random split of text, otherwise text itself.

    A text that already contains a sentinel string is returned unchanged (it could not be parsed
    back unambiguously). One rng.random() draw is made per call either way."""
    if rng.random() >= fim_rate or has_sentinel(text):
        return text
    return to_psm(*split_fim(text, rng))


def parse_psm(s: str):
    """Inverse of to_psm: (prefix, middle, suffix). Raises ValueError if s is not PSM-formatted."""
    if not (s.startswith(FIM_PREFIX) and s.endswith(FIM_END)):
        raise ValueError(f"not a PSM string: must start with {FIM_PREFIX} and end with {FIM_END}")
    body = s[len(FIM_PREFIX):len(s) - len(FIM_END)]
    prefix, sep1, rest = body.partition(FIM_SUFFIX)
    suffix, sep2, middle = rest.partition(FIM_MIDDLE)
    if not (sep1 and sep2):
        raise ValueError(f"not a PSM string: missing {FIM_SUFFIX} or {FIM_MIDDLE}")
    return prefix, middle, suffix

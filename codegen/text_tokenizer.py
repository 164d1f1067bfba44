"""Tokenizers behind one interface: SentencePiece tokenizer.model files (Llama 2, Code Llama,
TinyLlama) and Hugging Face tokenizer.json files (Llama 3, SmolLM: byte-level BPE).

    load_tokenizer(path, sentinels=None)   a SentencePiece .model file, a tokenizer.json, or a model folder
    tok.encode(s, bos, eos) -> ids         tok.decode(ids) -> str
    tok.bos_id  tok.eos_id  tok.eos_ids  tok.pad_id  tok.n_words  tok.sentinels  tok.infill_tokens()
    StreamDecoder(tok, prompt_ids)         push(id) -> the newly final text; flush() -> the rest

n_words counts the ids the tokenizer itself knows (its pieces and its own special tokens); FIM
sentinels added by codegen.infill get ids from n_words on. decode() drops those ids, the sentinels
and the special tokens (BOS, EOS, <|eot_id|>, ...), so it returns only text. encode() of plain text
never produces a special token: "<|eot_id|>" typed in a prompt is encoded as those characters, as
SentencePiece encodes "</s>".

eos_id is the token a tokenizer appends for eos=True; eos_ids is every token that ends generation
(Llama 3 ends a text with <|end_of_text|> and a chat turn with <|eot_id|>). A model folder's
tokenizer_config.json, special_tokens_map.json, generation_config.json and config.json name them
(bos_token / eos_token / pad_token, a string or {"content": ...}; *_token_id, an int or a list), in
that order of authority; without them the usual names are looked up. A byte-level BPE tokenizer has
no padding token: it pads with EOS, which is fine because padded positions are masked.

Code Llama's vocabulary has its own infilling pieces (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>); when they are
there they are the tokenizer's FIM sentinels, so such a model infills without new tokens.

The `tokenizers` package is imported only to read a tokenizer.json: the rest of the project runs
without it.
"""
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from codegen.fim import FIM_END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from tokenizer import Tokenizer, default_model_path
from utils import UsageError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in a model folder, the first one found is used
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")
# Code Llama's infilling pieces, by the FIM sentinel each stands for
INFILL_PIECES = {FIM_PREFIX: "▁<PRE>", FIM_SUFFIX: "▁<SUF>", FIM_MIDDLE: "▁<MID>", FIM_END: "▁<EOT>"}
# BPE tokenizers without config files: the usual names of their special tokens, and the special
# tokens that end a text or a turn (added to eos_ids when the vocabulary has them)
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>")
_END_NAMES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|im_end|>", "</s>")
ANCHOR_TOKENS = 8  # prompt tokens decoded with the new ones, so that their leading space survives decode


# ----------------------------------------------------------------------------------------------
# Special tokens named by a model folder's config files


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read it as JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_values(value) -> list:
    """A config entry as a list of token names (str) and ids (int): "<s>", {"content": "<s>"}, 1, [1, 2]."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _token_values(item)]
    return []


def read_special_tokens(folder) -> Dict[str, list]:
    """{"bos": [...], "eos": [...], "pad": [...]}: the token names and ids a model folder's config
    files give for each, most authoritative first. Missing files and keys are skipped."""
    found = {"bos": [], "eos": [], "pad": []}
    for name in CONFIG_FILES if folder is not None else ():
        config = _read_json(Path(folder) / name)
        for kind, values in found.items():
            values += _token_values(config.get(f"{kind}_token")) + _token_values(config.get(f"{kind}_token_id"))
    return found


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------------------------
# The interface, and what both backends share


class TextTokenizer:
    """What every backend provides: see the module docstring. A backend sets n_words and implements
    piece_id(), encode() and decode(), then calls _set_special_ids()."""

    n_words: int
    bos_id: int
    eos_id: int
    eos_ids: set
    pad_id: int
    sentinels: Dict[str, int]

    def piece_id(self, piece: str) -> Optional[int]:
        """The id of a piece or special token, or None when the vocabulary lacks it."""
        raise NotImplementedError

    def infill_tokens(self) -> Optional[Dict[str, int]]:
        """Code Llama's infilling ids as {FIM_PREFIX: id, FIM_SUFFIX: id, FIM_MIDDLE: id, FIM_END: id},
        or None when the vocabulary lacks any of its pieces."""
        ids = {name: self.piece_id(piece) for name, piece in INFILL_PIECES.items()}
        return None if None in ids.values() else ids

    def _ids(self, values: Iterable) -> List[int]:
        """The ids of token names / ids that the vocabulary has, in order, without repeats."""
        out = []
        for value in values:
            i = self.piece_id(value) if isinstance(value, str) else value
            if i is not None and 0 <= i < self.n_words and i not in out:
                out.append(i)
        return out

    def _set_special_ids(self, specials: dict, bos, eos, pad, sentinels, ends=()) -> None:
        """bos_id, eos_id, eos_ids, pad_id and sentinels: the configs' tokens first, then the backend's
        defaults (bos / eos / pad: names or ids, or lists of them); ends are extra stop tokens."""
        eos_ids = self._ids(specials["eos"] + _as_list(eos))
        if not eos_ids:
            raise UsageError(f"{self.source}: no end-of-text token found; "
                             "name it as eos_token in the folder's tokenizer_config.json")
        bos_ids = self._ids(specials["bos"] + _as_list(bos)) or eos_ids  # GPT-2 style: <|endoftext|> both ends
        self.bos_id, self.eos_id = bos_ids[0], eos_ids[0]
        self.eos_ids = set(eos_ids) | set(self._ids(ends))
        self.pad_id = (self._ids(specials["pad"] + _as_list(pad)) or eos_ids)[0]
        self.sentinels = dict(sentinels) if sentinels else (self.infill_tokens() or {})

    def _text_ids(self, ids) -> List[int]:
        """ids without those past the vocabulary and without the sentinels: what decode() keeps."""
        dropped = set(self.sentinels.values())
        return [int(t) for t in ids if int(t) < self.n_words and int(t) not in dropped]


class SentencePieceTokenizer(Tokenizer, TextTokenizer):
    """A SentencePiece .model file (Llama 2, Code Llama, TinyLlama): the course's tokenizer.Tokenizer,
    padding with <0x00>, plus sentinels. tokenizer_model None is the default tokenizer.model (or
    $MINILLAMA_TOKENIZER); folder is the model folder whose config files to read, if any."""

    def __init__(self, tokenizer_model: Optional[str] = None, sentinels: Optional[dict] = None, folder=None):
        try:
            super().__init__(None, tokenizer_model)
        except RuntimeError as e:  # not a SentencePiece model (Llama 3's tiktoken file, say)
            raise UsageError(f"{tokenizer_model}: not a SentencePiece model ({e})") from None
        self.source = str(tokenizer_model or "tokenizer.model")
        self._set_special_ids(read_special_tokens(folder), self.bos_id, self.eos_id, self.pad_id, sentinels)

    def piece_id(self, piece: str) -> Optional[int]:
        i = self.sp_model.piece_to_id(piece)  # an unknown piece gives <unk>'s id
        return i if self.sp_model.id_to_piece(i) == piece else None

    def decode(self, tokens: List[int]) -> str:
        return super().decode(self._text_ids(tokens))


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer.json (Llama 3, SmolLM: byte-level BPE), read with the `tokenizers`
    package. folder is the model folder whose config files name the special tokens, if any."""

    def __init__(self, path, sentinels: Optional[dict] = None, folder=None):
        try:
            from tokenizers import Tokenizer as HFTokenizerFile
        except ImportError:
            raise UsageError(f"{path}: reading a tokenizer.json needs the `tokenizers` package "
                             "(pip install tokenizers)") from None
        self.source = str(path)
        try:
            self._tk = HFTokenizerFile.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise UsageError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        self._tk.encode_special_tokens = True  # "<|eot_id|>" in a text is text, not the special token
        self.n_words = self._tk.get_vocab_size(with_added_tokens=True)
        special = [t.content for t in self._tk.get_added_tokens_decoder().values() if t.special]
        ends = [name for name in _END_NAMES if name in special]
        self._set_special_ids(read_special_tokens(folder), list(_BOS_NAMES), list(_EOS_NAMES), [], sentinels, ends)

    def piece_id(self, piece: str) -> Optional[int]:
        return self._tk.token_to_id(piece)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        ids = self._tk.encode(s, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, tokens: List[int]) -> str:
        return self._tk.decode(self._text_ids(tokens), skip_special_tokens=True)


def tokenizer_path(tokenizer=None, checkpoint=None) -> Path:
    """Where a model's tokenizer is: --tokenizer when given, else a Hugging Face checkpoint folder's
    own, else the default tokenizer.model (tokenizer.default_model_path)."""
    if tokenizer is not None:
        return Path(tokenizer)
    if checkpoint is not None and Path(checkpoint).is_dir():
        return Path(checkpoint)
    return default_model_path()


def load_tokenizer(path=None, sentinels: Optional[dict] = None) -> TextTokenizer:
    """The tokenizer at `path`: a SentencePiece .model file, a tokenizer.json, or a model folder
    (its tokenizer.model when it has one, else its tokenizer.json, with the special tokens its
    config files name); a file given on its own is read without config files. None is the default
    tokenizer.model. sentinels: FIM name -> id, as a checkpoint recorded them; without them a Code
    Llama vocabulary's infilling pieces are used."""
    if path is None:
        return SentencePieceTokenizer(None, sentinels)
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise UsageError(f"{path}: no tokenizer in this folder (looked for {' and '.join(TOKENIZER_FILES)})")
        folder, path = path, found[0]
    else:
        folder = None
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} not found")
        return HFTokenizer(path, sentinels, folder)
    return SentencePieceTokenizer(str(path), sentinels, folder)


# ----------------------------------------------------------------------------------------------
# Decoding a continuation, whole or as it is generated


def continuation_text(tokenizer, prompt_ids: List[int], new_ids: List[int]) -> str:
    """The text new_ids add after prompt_ids, as it appears after the prompt. The last few prompt
    tokens are decoded with the new ones and their text cut off again: SentencePiece drops the
    leading space of a text, which the first new token must keep."""
    anchor = list(prompt_ids[-ANCHOR_TOKENS:])
    base, text = tokenizer.decode(anchor), tokenizer.decode(anchor + list(new_ids))
    if text.startswith(base):
        return text[len(base):]
    # rare: the anchor's text changed (it ended in half a character): compare with the whole prompt
    base, text = tokenizer.decode(list(prompt_ids)), tokenizer.decode(list(prompt_ids) + list(new_ids))
    return text[len(os.path.commonprefix([base, text])):]


class StreamDecoder:
    """The continuation of prompt_ids, one token at a time: push(id) returns the text that became
    final with it, flush() what is left at the end, so that "".join(pushes) + flush() equals
    continuation_text(tokenizer, prompt_ids, pushed ids). A trailing U+FFFD is held back, as it may be
    half of a UTF-8 character whose other bytes are still to come.

    Each push decodes only the tokens since a recent point where the text ended with a whole
    character (a "mark"), so a long generation costs linear, not quadratic, time."""

    def __init__(self, tokenizer, prompt_ids: Iterable[int] = ()):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.ids: List[int] = []  # every token pushed
        self.text = ""  # what push() and flush() have returned
        self._mark = None  # (anchor ids, their text, tokens pushed then, the continuation then)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        whole = self._continuation()
        ready = whole.rstrip("\ufffd")
        if ready == whole:
            self._move_mark(whole)
        return self._emit(ready)

    def flush(self) -> str:
        return self._emit(self._continuation())

    def _emit(self, text: str) -> str:
        if not text.startswith(self.text):  # text cannot be taken back (never seen with these tokenizers)
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def _continuation(self) -> str:
        if self._mark is not None:
            anchor, anchor_text, n, before = self._mark
            text = self.tokenizer.decode(anchor + self.ids[n:])
            if text.startswith(anchor_text):
                return before + text[len(anchor_text):]
        return continuation_text(self.tokenizer, self.prompt_ids, self.ids)

    def _move_mark(self, whole: str) -> None:
        """After a token that ended on a whole character, every ANCHOR_TOKENS tokens or so: decode
        from its last few tokens on. Their text must end the continuation exactly (not start with
        half a character), so that the text of the tokens after them cannot depend on earlier ones."""
        since = len(self.ids) - (self._mark[2] if self._mark else 0)
        if since < 2 * ANCHOR_TOKENS:
            return
        anchor = self.ids[-ANCHOR_TOKENS:]
        text = self.tokenizer.decode(anchor)
        if text and not text.endswith("\ufffd") and whole.endswith(text):
            self._mark = (anchor, text, len(self.ids), whole)

"""Tests for codegen/text_tokenizer.py: the SentencePiece and tokenizer.json backends, reading a model
folder's special tokens, Code Llama's infilling pieces, and streaming decode."""
import io
import json
import random
import subprocess
import sys

import pytest

from codegen.common import CodeTokenizer, load_code_model
from codegen.fim import FIM_END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from codegen.text_tokenizer import (ANCHOR_TOKENS, HFTokenizer, SentencePieceTokenizer, StreamDecoder,
                                    continuation_text, load_tokenizer, read_special_tokens)
from conftest import ROOT, asset_path
from tokenizer import Tokenizer
from utils import UsageError

MIXED = (
    "def café(naïve, 数据):\n"
    '    """Return the crème brûlée 🍮 of 数据 — quickly, ça va?"""\n'
    "\tif   naïve:\t\treturn  数据  # tabs\tand   runs of spaces\n"
    "        return {'emoji': '👩\u200d💻🚀', 'ja': 'こんにちは世界', 'ñ': 'Ωμέγα'}\n"
    "\n\n    \n"
    "class  Zürich :  pass   # trailing   \n"
)
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def sp_path():
    return str(asset_path("tokenizer.model"))


def training_lines():
    """A few hundred lines of code and prose, without CJK or emoji: those stay byte tokens."""
    rng = random.Random(0)
    words = ["return", "self", "value", "data", "the", "model", "token", "café", "über", "naïve", "for", "in"]
    lines = []
    for i in range(300):
        w = rng.sample(words, 4)
        lines += [f"def {w[0]}_{i}({w[1]}, {w[2]}={i}):", f"    {w[3]} = {w[1]} + {w[2]} * {i}  # {w[0]} {w[1]}",
                  f"The {w[0]} and the {w[1]} went to the {w[2]} with {w[3]}."]
    return lines


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A small byte-level BPE tokenizer.json, trained here, with Llama 3's special tokens after its
    vocabulary, and a tokenizer_config.json naming BOS and EOS (as a string and as a dict)."""
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer.json backend needs `tokenizers`")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(training_lines(), trainer)
    tk.add_special_tokens(BPE_SPECIALS)
    folder = tmp_path_factory.mktemp("bpe")
    tk.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": True},
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def bpe(bpe_folder):
    return load_tokenizer(bpe_folder)


@pytest.fixture(scope="module")
def reference_bpe(bpe_folder):
    from tokenizers import Tokenizer as HFTokenizerFile

    return HFTokenizerFile.from_file(str(bpe_folder / "tokenizer.json"))


def tiny_sentencepiece(path, infill=True):
    """A tiny SentencePiece model written to path, with Code Llama's infilling pieces when infill."""
    import sentencepiece

    model = io.BytesIO()
    symbols = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"] if infill else []
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(training_lines()), model_writer=model,
                                             vocab_size=400, user_defined_symbols=symbols, byte_fallback=True,
                                             model_type="bpe", hard_vocab_limit=False, minloglevel=2,
                                             normalization_rule_name="identity", remove_extra_whitespaces=False)
    path.write_bytes(model.getvalue())
    return path


# ----------------------------------------------------------------------------------------------
# SentencePiece: exactly tokenizer.Tokenizer


def test_sentencepiece_backend_encodes_and_decodes_like_the_course_tokenizer(sp_path):
    ours, course = load_tokenizer(sp_path), Tokenizer(None, sp_path)
    assert isinstance(ours, SentencePieceTokenizer) and CodeTokenizer is SentencePieceTokenizer
    for bos in (False, True):
        for eos in (False, True):
            assert ours.encode(MIXED, bos, eos) == course.encode(MIXED, bos, eos)
    ids = course.encode(MIXED, True, True)
    assert ours.decode(ids) == course.decode(ids) == MIXED
    rng = random.Random(1)
    noise = [rng.randrange(32000) for _ in range(300)] + [0, 1, 2, 3, 500]
    assert ours.decode(noise) == course.decode(noise)
    assert (ours.n_words, ours.bos_id, ours.eos_id, ours.pad_id) == (32000, 1, 2, course.pad_id)
    assert ours.eos_ids == {2} and ours.sentinels == {} and ours.infill_tokens() is None


def test_code_tokenizer_keeps_its_sentinels_and_drops_them_in_decode(sp_path):
    sentinels = {FIM_PREFIX: 32000, FIM_SUFFIX: 32001, FIM_MIDDLE: 32002, FIM_END: 32003}
    tok = CodeTokenizer(sp_path, sentinels)
    ids = tok.encode(MIXED, bos=True, eos=False)
    assert tok.sentinels == sentinels and max(ids) < 32000
    assert tok.decode([32000] + ids[:5] + [32003] + ids[5:] + [32005]) == MIXED
    assert load_tokenizer(sp_path, sentinels).sentinels == sentinels


def test_a_folder_prefers_tokenizer_model_and_reads_its_configs(tmp_path, sp_path):
    (tmp_path / "tokenizer.model").write_bytes(open(sp_path, "rb").read())
    (tmp_path / "tokenizer.json").write_text("not read")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                                                "pad_token": None}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 13]}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode(MIXED, True, False) == Tokenizer(None, sp_path).encode(MIXED, True, False)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 2, 3, {2, 13})


def test_a_file_that_is_not_a_sentencepiece_model_is_a_usage_error(tmp_path):
    (tmp_path / "tokenizer.model").write_text("Zm9v 0\n")  # Llama 3's tiktoken format
    with pytest.raises(UsageError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.model")


# ----------------------------------------------------------------------------------------------
# tokenizer.json (byte-level BPE)


def test_bpe_backend_encodes_like_the_tokenizers_library(bpe, reference_bpe):
    assert isinstance(bpe, HFTokenizer)
    expected = reference_bpe.encode(MIXED, add_special_tokens=False).ids
    begin, end, eot = (reference_bpe.token_to_id(t) for t in BPE_SPECIALS)
    assert bpe.encode(MIXED, bos=False, eos=False) == expected
    assert bpe.encode(MIXED, bos=True, eos=True) == [begin] + expected + [end]
    assert bpe.n_words == reference_bpe.get_vocab_size(with_added_tokens=True) == eot + 1
    for line in training_lines()[:30] + ["", " ", "\t\t", "x" * 50]:
        assert bpe.encode(line, False, False) == reference_bpe.encode(line, add_special_tokens=False).ids


def test_bpe_backend_encodes_like_transformers(bpe, bpe_folder):
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError as e:
        pytest.skip(f"transformers does not import ({e}): nothing to compare with")
    reference = PreTrainedTokenizerFast(tokenizer_file=str(bpe_folder / "tokenizer.json"))
    assert bpe.encode(MIXED, False, False) == reference.encode(MIXED, add_special_tokens=False)


def test_bpe_special_ids_decode_and_round_trip(bpe, reference_bpe):
    begin, end, eot = (reference_bpe.token_to_id(t) for t in BPE_SPECIALS)
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (begin, end, end)  # no pad token: EOS pads
    assert {end, eot} <= bpe.eos_ids
    ids = bpe.encode(MIXED, bos=True, eos=True)
    assert bpe.decode(ids) == MIXED
    assert bpe.decode([eot] + ids + [bpe.n_words, bpe.n_words + 3]) == MIXED  # specials and sentinels dropped
    assert bpe.sentinels == {} and bpe.infill_tokens() is None
    assert eot not in bpe.encode("<|eot_id|>", False, False)  # a special token's name in a text is text
    assert bpe.decode(bpe.encode("<|eot_id|>", False, False)) == "<|eot_id|>"


def test_bpe_configs_generation_config_and_config_json(tmp_path, bpe_folder, reference_bpe):
    begin, end, eot = (reference_bpe.token_to_id(t) for t in BPE_SPECIALS)
    (tmp_path / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    bare = load_tokenizer(tmp_path / "tokenizer.json")  # no configs: the usual names
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (begin, end, end) and bare.eos_ids == {end, eot}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|eot_id|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": begin, "eos_token_id": [eot, 7]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "pad_token_id": None}))
    assert read_special_tokens(tmp_path) == {"bos": [begin], "eos": ["<|eot_id|>", eot, 7, 9], "pad": []}
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (begin, eot, eot)
    assert tok.eos_ids == {eot, 7, 9, end}


def test_a_folder_without_tokenizer_files_is_a_usage_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError) as error:
        load_tokenizer(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "tokenizer.model" in message and "tokenizer.json" in message


def test_tokenizer_json_without_the_tokenizers_package_is_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(UsageError, match="needs the `tokenizers` package"):
        load_tokenizer(tmp_path)


def test_the_sentencepiece_path_runs_without_the_tokenizers_package(sp_path):
    code = ("import sys; sys.modules['tokenizers'] = None; sys.path.insert(0, '.'); "
            "from codegen.common import load_code_model, CodeTokenizer; "
            f"print(CodeTokenizer({sp_path!r}).decode([1, 822]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "def\n", result.stderr


def test_load_code_model_takes_a_tokenizer_folder(tmp_path, bpe_folder):
    from helpers import save_stories_pt, tiny_model

    save_stories_pt(tiny_model(vocab_size=512), tmp_path / "tiny.pt")
    model, tok = load_code_model(tmp_path / "tiny.pt", "cpu", bpe_folder)
    assert isinstance(tok, HFTokenizer) and model.config.causal
    model, tok = load_code_model(tmp_path / "tiny.pt", "cpu", bpe_folder / "tokenizer.json")
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode(MIXED, True, True)) == MIXED


# ----------------------------------------------------------------------------------------------
# Code Llama's infilling pieces


def test_code_llama_infill_pieces_become_the_sentinels(tmp_path):
    tiny_sentencepiece(tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    expected = {name: tok.sp_model.piece_to_id(piece)
                for name, piece in [(FIM_PREFIX, "▁<PRE>"), (FIM_SUFFIX, "▁<SUF>"), (FIM_MIDDLE, "▁<MID>"),
                                    (FIM_END, "▁<EOT>")]}
    assert tok.infill_tokens() == expected and tok.sentinels == expected
    assert all(i < tok.n_words for i in expected.values())  # in the vocabulary: no new ids needed
    ids = tok.encode("def f(x):\n    return x\n", bos=True, eos=False)
    assert tok.decode([expected[FIM_PREFIX]] + ids + [expected[FIM_MIDDLE]]) == "def f(x):\n    return x\n"
    recorded = {FIM_PREFIX: 400, FIM_SUFFIX: 401, FIM_MIDDLE: 402, FIM_END: 403}
    assert load_tokenizer(tmp_path / "tokenizer.model", recorded).sentinels == recorded  # a checkpoint's win


def test_no_infill_pieces_no_infill_tokens(tmp_path):
    tok = load_tokenizer(tiny_sentencepiece(tmp_path / "plain.model", infill=False))
    assert tok.infill_tokens() is None and tok.sentinels == {}


# ----------------------------------------------------------------------------------------------
# Streaming decode


def stream(tok, prompt_ids, ids):
    decoder = StreamDecoder(tok, prompt_ids)
    pieces = [decoder.push(t) for t in ids]
    pieces.append(decoder.flush())
    return pieces


def check_stream(tok, prompt_ids, ids):
    """Streams ids; after each push the text so far is the whole decode less any trailing U+FFFD."""
    decoder = StreamDecoder(tok, prompt_ids)
    pieces = []
    for k, token in enumerate(ids):
        pieces.append(decoder.push(token))
        assert decoder.text == continuation_text(tok, prompt_ids, ids[: k + 1]).rstrip("\ufffd")
    pieces.append(decoder.flush())
    assert "".join(pieces) == continuation_text(tok, prompt_ids, ids)
    return pieces


@pytest.fixture(params=["sentencepiece", "bpe"])
def any_tok(request, sp_path):
    return load_tokenizer(sp_path) if request.param == "sentencepiece" else request.getfixturevalue("bpe")


def test_stream_of_the_mixed_sample_is_the_whole_decode(any_tok):
    prompt = any_tok.encode("# a prompt\n", bos=True, eos=False)
    ids = any_tok.encode(MIXED, bos=False, eos=False)
    pieces = check_stream(any_tok, prompt, ids)
    whole = continuation_text(any_tok, prompt, ids)
    assert whole == any_tok.decode(prompt + ids)[len(any_tok.decode(prompt)):]
    assert "数据" in whole and "👩\u200d💻🚀" in whole
    assert all("\ufffd" not in p for p in pieces)  # half characters were held back, never emitted
    assert len(ids) > len(MIXED.encode()) // 4  # the CJK and emoji went in as several byte tokens


def test_sentencepiece_stream_keeps_the_leading_space_of_the_continuation(sp_path):
    tok = load_tokenizer(sp_path)
    prompt, ids = tok.encode("x =", bos=True, eos=False), tok.encode("x = 数据 + 1", bos=True, eos=False)[3:]
    assert "".join(stream(tok, prompt, ids)) == tok.decode(prompt + ids)[len("x ="):]
    assert "".join(stream(tok, [tok.bos_id], tok.encode("def f", False, False))) == "def f"


def test_stream_of_random_tokens_is_the_whole_decode(any_tok):
    """Random ids, byte tokens among them, split characters anywhere; prompts ending in half a character."""
    rng = random.Random(3)
    vocab = any_tok.n_words
    byte_ids = [i for i in any_tok.encode("数据👩\u200d💻é", False, False)]
    for trial in range(40):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randrange(80))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(12))] + byte_ids[: rng.randrange(3)]
        check_stream(any_tok, prompt, ids)


def test_stream_without_a_prompt_in_linear_time(any_tok, monkeypatch):
    ids = any_tok.encode(MIXED * 3, bos=False, eos=True)
    lengths = []
    decode = any_tok.decode
    monkeypatch.setattr(any_tok, "decode", lambda t: lengths.append(len(t)) or decode(t))
    assert "".join(stream(any_tok, [], ids)) == decode(ids) == MIXED * 3
    assert len(ids) > 200 and max(lengths[-100:]) <= 4 * ANCHOR_TOKENS  # decodes a few recent tokens, not all

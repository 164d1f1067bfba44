import pytest

from conftest import asset_path
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tokenizer_model=str(asset_path("tokenizer.model")))


def test_special_ids(tok):
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.pad_id == tok.sp_model.piece_to_id("<0x00>") == 3  # the course's padding piece


def test_encode_decode(tok):
    ids = tok.encode("Hello world", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 2
    assert tok.decode(ids) == "Hello world"
    assert tok.encode("Hello world", bos=False, eos=False) == ids[1:-1]


def test_max_len_truncates_the_text_before_bos_and_eos(tok):
    """As the course's tokenizer: max_len counts the sentence's tokens; BOS and EOS are added after."""
    short = Tokenizer(max_len=3, tokenizer_model=str(asset_path("tokenizer.model")))
    text = tok.encode("one two three four five", bos=False, eos=False)
    assert len(text) > 3
    assert short.encode("one two three four five", bos=True, eos=True) == [tok.bos_id] + text[:3] + [tok.eos_id]
    assert short.encode("one two three four five", bos=False, eos=False) == text[:3]
    assert short.encode("one", bos=True, eos=False) == tok.encode("one", bos=True, eos=False)  # short: untouched


def test_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="setup.sh"):
        Tokenizer(tokenizer_model=str(tmp_path / "nope.model"))

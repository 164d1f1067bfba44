"""The Llama 2 SentencePiece tokenizer (32000 pieces), with the course's padding convention."""
import os
from pathlib import Path
from typing import List, Optional

from sentencepiece import SentencePieceProcessor

TOKENIZER_MODEL = Path(__file__).resolve().parent / "tokenizer.model"


def default_model_path() -> Path:
    """$MINILLAMA_TOKENIZER, else the tokenizer.model beside this file (where setup.sh puts it)."""
    return Path(os.environ.get("MINILLAMA_TOKENIZER") or TOKENIZER_MODEL)


class Tokenizer:
    def __init__(self, max_len: Optional[int] = None, tokenizer_model: Optional[str] = None):
        path = Path(tokenizer_model or default_model_path())
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} not found: run `bash setup.sh` to place it, "
                "or set MINILLAMA_TOKENIZER to a SentencePiece .model file"
            )
        self.sp_model = SentencePieceProcessor(model_file=str(path))
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        # Llama's tokenizer defines no padding piece (pad_id() is -1); like the course we pad with
        # the byte piece <0x00>, which never occurs in real text.
        self.pad_id = self.sp_model.piece_to_id("<0x00>")
        self.max_len = max_len  # encode() keeps at most this many tokens of the text (BOS/EOS not counted)

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        tokens = self.sp_model.encode(s)
        if self.max_len is not None:
            tokens = tokens[: self.max_len]  # the text's tokens, as the course does: BOS/EOS come on top
        if bos:
            tokens = [self.bos_id] + tokens
        if eos:
            tokens = tokens + [self.eos_id]
        return tokens

    def decode(self, tokens: List[int]) -> str:
        return self.sp_model.decode(tokens)

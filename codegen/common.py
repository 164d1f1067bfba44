"""What the code-generation modules share: loading a model with its tokenizer, and the device."""
from typing import List, Optional

from checkpoint import code_metadata, load_pretrained
from codegen.fim import SENTINELS
from tokenizer import Tokenizer
from utils import CheckpointError, pick_device, seed_everything


class CodeTokenizer(Tokenizer):
    """The Llama tokenizer plus optional fill-in-the-middle sentinels with ids after the base vocabulary.
    Sentinels are never produced by encode() of plain text; decode() drops them."""

    def __init__(self, tokenizer_model: Optional[str] = None, sentinels: Optional[dict] = None):
        super().__init__(None, tokenizer_model)
        self.sentinels = dict(sentinels or {})  # name -> id, e.g. {"<fim_prefix>": 32000, ...}

    def decode(self, tokens: List[int]) -> str:
        return super().decode([t for t in tokens if t < self.n_words])


def load_code_model(path, device="cpu", tokenizer_model: Optional[str] = None, **overrides):
    """(model, tokenizer) from a stories42M.pt-format checkpoint or a llama2.c .bin. Checkpoints
    written by codegen.train carry a "codegen" dict whose "sentinels" maps FIM names to ids.

    The model is always causal, whatever the checkpoint says: code models predict the next token,
    and a model that attends to later positions would see the token it is asked to predict (a
    plain stories42M.pt is otherwise loaded non-causal, as the course's classifiers use it)."""
    model = load_pretrained(path, **{**overrides, "causal": True}).to(device).eval()
    sentinels = code_metadata(path).get("sentinels", {})
    unknown = set(sentinels) - set(SENTINELS)
    if unknown:
        raise CheckpointError(f"{path}: unknown sentinel tokens {sorted(unknown)}")
    return model, CodeTokenizer(tokenizer_model, sentinels)



def start(args):
    """What every code option does first: seed every generator, pick the device, load the model
    (causal) and its tokenizer. Returns (device, model, tokenizer); a problem raises UsageError or
    FileNotFoundError, which codegen.cli reports as one `error:` line with exit status 2."""
    seed_everything(args.seed)
    device = pick_device(args.use_gpu)
    model, tokenizer = load_code_model(args.pretrained_model_path, device, args.tokenizer)
    return device, model, tokenizer

"""What the code-generation modules share: loading a model with its tokenizer, and the device."""
from typing import Optional

from checkpoint import code_metadata, load_pretrained
from codegen.fim import SENTINELS
from codegen.text_tokenizer import SentencePieceTokenizer, load_tokenizer, tokenizer_path
from quantize import quantize_model
from utils import DTYPES, CheckpointError, pick_device, seed_everything

# The Llama tokenizer (tokenizer.Tokenizer) plus optional fill-in-the-middle sentinels with ids after
# the base vocabulary: CodeTokenizer(tokenizer_model=None, sentinels=None). Sentinels are never
# produced by encode() of plain text; decode() drops them. See codegen.text_tokenizer.
CodeTokenizer = SentencePieceTokenizer


def load_code_model(path, device="cpu", tokenizer_model: Optional[str] = None, adapter=None, **overrides):
    """(model, tokenizer) from any checkpoint load_pretrained reads: stories42M.pt format, llama2.c
    .bin, a Hugging Face folder, with a LoRA adapter folded in if given (a PEFT folder or a
    best_adapter.pt: checkpoint.read_adapter). Checkpoints written by codegen.train carry a "codegen"
    dict whose "sentinels" maps FIM names to ids. tokenizer_model is a SentencePiece .model, a
    tokenizer.json or a model folder (load_tokenizer); None is a HF folder's own tokenizer, else the
    default tokenizer.model.

    The model is always causal, whatever the checkpoint says: code models predict the next token,
    and a model that attends to later positions would see the token it is asked to predict (a
    plain stories42M.pt is otherwise loaded non-causal, as the course's classifiers use it)."""
    model = load_pretrained(path, adapter=adapter, **{**overrides, "causal": True}).to(device).eval()
    sentinels = code_metadata(path).get("sentinels", {})
    unknown = set(sentinels) - set(SENTINELS)
    if unknown:
        raise CheckpointError(f"{path}: unknown sentinel tokens {sorted(unknown)}")
    tokenizer = load_tokenizer(tokenizer_path(tokenizer_model, path), sentinels)
    if model.config.vocab_size < tokenizer.n_words:   # would fail deep inside the embedding lookup
        raise CheckpointError(f"{path}: the checkpoint's vocabulary has {model.config.vocab_size} tokens, fewer than "
                              f"the tokenizer's {tokenizer.n_words}; pass the tokenizer it was trained with "
                              "(--tokenizer) or a checkpoint trained with this one")
    return model, tokenizer


def start(args):
    """What every code option does first: seed every generator, pick the device, load the model
    (causal) and its tokenizer. Returns (device, model, tokenizer); a problem raises UsageError or
    FileNotFoundError, which codegen.cli reports as one `error:` line with exit status 2."""
    seed_everything(args.seed)
    device = pick_device(args.use_gpu)
    model, tokenizer = load_code_model(args.pretrained_model_path, device, args.tokenizer, getattr(args, "adapter", None),
                                       dtype=weight_dtype(args))
    quantize_model(model, getattr(args, "quantize", "none"))  # --quantize: the linear layers in NF4 or int8
    return device, model, tokenizer


def weight_dtype(args):
    """--dtype as a torch dtype: what the weights are stored in (None: float32, the default)."""
    return DTYPES[getattr(args, "dtype", "float32")]

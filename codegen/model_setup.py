"""The model of a code-training run (codegen/train.py): loaded or rebuilt, what trains, the optimizer.

    model_settings(args)                 what fixes the trainable model (mode, LoRA, FIM, --quantize, --optim):
                                         kept in last.pt
    fresh_model(args, device, say)       the pretrained model and tokenizer (+ FIM sentinels if asked)
    resumed_model(state, args, device)   an empty model of last.pt's shape, and its tokenizer
    setup_trainable(model, settings, n)  quantize the base / freeze / inject LoRA -> the partly trained matrices
    trainable_parameters / parameter_counts
    make_optimizer(model, partial, args, device)   AdamW or AdamW8bit
    codegen_metadata(...)                the "codegen" dict of best.pt / last.pt (sentinels, settings)
"""
import torch
import torch.nn as nn

from codegen.common import load_code_model, weight_dtype
from codegen.text_tokenizer import load_tokenizer, tokenizer_path
from codegen.infill import add_fim_sentinels
from config import LlamaConfig
from llama import Llama
from lora import LoRALayer, expected_lora_parameters, inject_lora, mark_only_lora_trainable
from optimizer import AdamW, AdamW8bit
from quantize import KINDS, quantize_model, quantized_layers
from utils import UsageError

LORA_TARGETS = ("compute_query", "compute_key", "compute_value", "compute_output", "w1", "w2", "w3")
OPTIMIZERS = {"adamw": AdamW, "adamw8bit": AdamW8bit}


def _zero_rows_below(start: int):
    def hook(grad):
        grad = grad.clone()
        grad[:start] = 0
        return grad
    return hook


def setup_trainable(model, settings: dict, n_words: int):
    """Quantize the base (settings["quantize"]: QLoRA), freeze / inject LoRA as settings["mode"] says.
    Returns [(param, first trainable row)] of the matrices only partly trained: in LoRA mode with FIM, the
    sentinel rows of the embedding (and of the output matrix if untied) are trained too, because they
    start identical (the mean row), while a gradient hook keeps every original row frozen."""
    partial = []
    quantize_model(model, settings.get("quantize", "none"))  # first: LoRA then wraps the quantized layers
    if settings["mode"] == "lora":
        inject_lora(model, settings["lora_rank"], settings["lora_alpha"], settings["lora_dropout"],
                    settings["lora_targets"])
        mark_only_lora_trainable(model)
        if settings["fim"] and model.vocab_size > n_words:
            weights = [model.tok_embeddings.weight]
            if model.output.weight is not model.tok_embeddings.weight:
                weights.append(model.output.weight)
            for w in weights:
                w.requires_grad_(True)
                w.register_hook(_zero_rows_below(n_words))
                partial.append((w, n_words))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return partial


def trainable_parameters(model, partial) -> int:
    """Parameters the optimizer may change (tied weights once; frozen rows of partial matrices not)."""
    frozen_rows = {id(w): start * w.shape[1] for w, start in partial}
    return sum(p.numel() - frozen_rows.get(id(p), 0) for p in model.parameters() if p.requires_grad)


def make_optimizer(model, partial, args, device):
    """AdamW, or AdamW8bit with --optim adamw8bit; weight decay on matrices only (not on norm gains, nor on
    partly frozen matrices, whose frozen rows must not decay)."""
    partial_ids = {id(w) for w, _ in partial}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in partial_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optim = getattr(args, "optim", "adamw")
    options = {"foreach": device.type == "cuda"} if optim == "adamw" else {}
    return OPTIMIZERS[optim]([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **options)


def parameter_counts(model, partial, settings: dict) -> dict:
    """{"trainable", "total" (without the LoRA matrices; quantized weights counted), "lora_expected" (None
    unless LoRA)}."""
    total = sum(p.numel() for p in model.parameters()) - sum(
        m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALayer))
    total += sum(m.in_features * m.out_features for m in quantized_layers(model))
    lora_expected = (expected_lora_parameters(model.config, settings["lora_rank"], settings["lora_targets"])
                     if settings["mode"] == "lora" else None)
    return {"trainable": trainable_parameters(model, partial), "total": total, "lora_expected": lora_expected}


def codegen_metadata(settings: dict, tokenizer, n_trainable: int, base_checkpoint, fim_rate: float,
                     max_len: int, base_adapter=None) -> dict:
    """The "codegen" entry of the checkpoints: the sentinel ids (what load_code_model reads) and how it
    trained: from which base (and the adapter folded into it, if any)."""
    return {"sentinels": dict(tokenizer.sentinels), "mode": settings["mode"], "trainable_parameters": n_trainable,
            "base_checkpoint": str(base_checkpoint), "base_adapter": base_adapter, "fim_rate": float(fim_rate),
            "max_len": max_len, "quantize": settings.get("quantize", "none"),
            "lora": {k: settings[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
            if settings["mode"] == "lora" else None}


def model_settings(args) -> dict:
    """What fixes the trainable model (and the optimizer, whose state last.pt holds); a resumed run keeps
    last.pt's. A quantized base is frozen: only LoRA can train on it (QLoRA)."""
    quantize, optim = getattr(args, "quantize", "none"), getattr(args, "optim", "adamw")
    if quantize not in KINDS or optim not in OPTIMIZERS:
        raise UsageError(f"--quantize {quantize} / --optim {optim}: expected one of {KINDS} / {tuple(OPTIMIZERS)}")
    if quantize != "none" and args.mode != "lora":
        raise UsageError(f"--quantize {quantize} needs --mode lora (QLoRA): a quantized base is frozen, while "
                         f"--mode {args.mode} trains every weight in full precision; add --mode lora, or drop "
                         "--quantize")
    return {"mode": args.mode, "lora_rank": args.lora_rank, "lora_alpha": float(args.lora_alpha),
            "lora_dropout": float(args.lora_dropout), "lora_targets": list(args.lora_targets_list),
            "fim": args.fim_rate > 0, "quantize": quantize, "optim": optim}


def fresh_model(args, device, say):
    """The pretrained model (--pretrained-model-path, with --adapter folded in if given) and tokenizer,
    with the FIM sentinels added if --fim_rate > 0 and the checkpoint has none yet."""
    model, tokenizer = load_code_model(args.pretrained_model_path, "cpu", args.tokenizer, getattr(args, "adapter", None),
                                       dtype=weight_dtype(args))
    if model.config.max_seq_len < args.max_len:
        raise UsageError(f"{args.pretrained_model_path}: the model's max_seq_len={model.config.max_seq_len} is "
                         f"smaller than --max_len={args.max_len}; pass --max_len {model.config.max_seq_len} or less")
    if model.vocab_size < tokenizer.n_words:
        raise UsageError(f"{args.pretrained_model_path}: vocabulary of {model.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer.n_words} pieces: use the matching --tokenizer")
    if args.fim_rate > 0 and not tokenizer.sentinels:
        sentinels = add_fim_sentinels(model, tokenizer)
        say(f"added FIM sentinels {sentinels}: vocabulary {model.vocab_size}")
    return model.to(device), tokenizer


def resumed_model(state, args, device):
    """A model shaped as last.pt's (state: checkpoint.CodeTrainingState.load_last), weights still to load
    (after setup_trainable has quantized it and added its adapters), and the tokenizer with its sentinels.
    args.optim becomes last.pt's: its optimizer state fits no other."""
    args.optim = state.settings.get("optim", "adamw")
    config = LlamaConfig.from_model_args(state.model_args, causal=True)  # next-token training: see load_code_model
    model = Llama(config)
    if not state.tied:
        model.output.weight = nn.Parameter(torch.empty_like(model.output.weight))
    tokenizer = load_tokenizer(tokenizer_path(args.tokenizer, state.codegen.get("base_checkpoint")),
                               state.codegen["sentinels"])
    if config.max_seq_len < args.max_len:
        raise UsageError(f"last.pt: the model's max_seq_len={config.max_seq_len} is smaller than "
                         f"--max_len={args.max_len}; pass --max_len {config.max_seq_len} or less")
    return model.to(device), tokenizer


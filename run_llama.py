"""The assignment's command line: text generation, zero-shot prompting, fine-tuning and LoRA.

    python run_llama.py --option generate
    python run_llama.py --option prompt   --batch_size 10 --train data/sst-train.txt ... --dev_out sst-dev-prompting-output.txt ...
    python run_llama.py --option finetune --epochs 5 --lr 2e-5 --batch_size 80 ...
    python run_llama.py --option lora     --epochs 5 --lr 2e-5 --batch_size 80 --lora_rank 4 --lora_alpha 1.0 ...
    python run_llama.py --option export   --pretrained-model-path SRC --format {hf,peft,gguf,llama2c} --out DEST

Data lines are `label ||| sentence`; label-name files are JSON lists. Every output file has one
`predicted_label ||| sentence` line per input line, in input order.
"""
import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from classifier import POOLINGS, LlamaEmbeddingClassifier, LlamaZeroShotClassifier
from checkpoint import load_classifier, load_pretrained, save_classifier
from optimizer import AdamW
from tokenizer import Tokenizer
from utils import DTYPES, CheckpointError, DataError, UsageError, atomic_write_text, pick_device, seed_everything

GENERATE_PROMPT = ("Victor Frankenstein, a young scientist obsessed with uncovering the secrets of life, "
                   "succeeds in animating a creature assembled from")


CODEGEN_OPTIONS = ("codegen", "code_eval", "code_generate", "serve")

# Numeric flags with a limited range: name -> (whether a value is valid, the rule the message states).
VALUE_RULES = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1 (training saves the model of its best epoch)"),
    "lr": (lambda v: v > 0, "> 0"),
    "lora_rank": (lambda v: v >= 1, ">= 1"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "hidden_dropout_prob": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_sentence_len": (lambda v: v is None or v >= 1, ">= 1 (tokens kept of each sentence; BOS comes on top)"),
    "epsilon": (lambda v: 0 <= v < 1, "in [0, 1) (a probability floor)"),
}


# ----------------------------------------------------------------------------------------------
# Data

UNKNOWN_LABEL = -1  # the course's placeholder for test labels it does not publish


def read_text(path, what) -> str:
    """The text of a UTF-8 file, or a DataError naming the file (and the line of an undecodable byte)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found (run `bash setup.sh` to place data/)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} ({e.strerror}); pass the path of a file") from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of the text
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {data[e.start]:#04x}); "
                        "save the file as UTF-8") from None


def read_label_names(path) -> list:
    try:
        names = json.loads(read_text(path, "label-name file"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: expected a JSON list of label names, e.g. [\"bad\", \"good\"]")
    return names


def read_data(path, num_labels: int, unknown_ok=False) -> list:
    """[(label, sentence)] from `label ||| sentence` lines, checking every line. With unknown_ok,
    a file may label every line UNKNOWN_LABEL (placeholders: nothing to score against)."""
    lines = read_text(path, "data file").split("\n")
    if lines[-1] == "":  # the final newline ends the last line rather than starting another
        lines.pop()
    examples = [parse_line(path, lineno, line, num_labels, unknown_ok) for lineno, line in enumerate(lines, start=1)]
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    unknown = [lineno for lineno, (label, _) in enumerate(examples, start=1) if label == UNKNOWN_LABEL]
    if unknown and len(unknown) < len(examples):
        raise DataError(f"{path}:{unknown[0]}: label {UNKNOWN_LABEL} (unknown) in a file with known labels; "
                        f"use {UNKNOWN_LABEL} on every line or on none")
    return examples


def parse_line(path, lineno, line, num_labels, unknown_ok):
    """(label, sentence) of one `label ||| sentence` line, or a DataError naming path:lineno."""
    if not line.strip():
        raise DataError(f"{path}:{lineno}: blank line; every line must be `label ||| sentence` "
                        "(each gets one output line)")
    label, sep, sentence = line.partition(" ||| ")
    if not sep:
        raise DataError(f"{path}:{lineno}: expected `label ||| sentence`, got {line[:60]!r}")
    try:
        label = int(label.strip())
    except ValueError:
        raise DataError(f"{path}:{lineno}: label {label.strip()!r} is not an integer") from None
    if label == UNKNOWN_LABEL and not unknown_ok:
        raise DataError(f"{path}:{lineno}: label {UNKNOWN_LABEL} (unknown) is not allowed here: training needs "
                        f"known labels in --train and --dev ({UNKNOWN_LABEL} placeholders are fine in --test)")
    if not (0 <= label < num_labels or label == UNKNOWN_LABEL):
        raise DataError(f"{path}:{lineno}: label {label} is outside 0..{num_labels - 1}, "
                        f"but the label-name file lists {num_labels} labels")
    return label, sentence.strip()


def encode_all(examples, tokenizer, suffix=""):
    """[(label, token_ids, sentence)]; the suffix (the zero-shot prompt) is appended before encoding."""
    return [(label, tokenizer.encode(f"{sent} {suffix}" if suffix else sent, bos=True, eos=False), sent)
            for label, sent in examples]


def batches(data, batch_size, pad_id, shuffle=False, generator=None):
    """Yield (token_ids right-padded, lengths, labels, sentences) batches."""
    order = torch.randperm(len(data), generator=generator).tolist() if shuffle else list(range(len(data)))
    for start in range(0, len(order), batch_size):
        chunk = [data[i] for i in order[start : start + batch_size]]
        lengths = torch.tensor([len(ids) for _, ids, _ in chunk])
        token_ids = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
        for row, (_, ids, _) in enumerate(chunk):
            token_ids[row, : len(ids)] = torch.tensor(ids)
        labels = torch.tensor([label for label, _, _ in chunk])
        yield token_ids, lengths, labels, [sent for _, _, sent in chunk]


def zero_shot_suffix(label_names) -> str:
    """The course's prompt, e.g. "Is this movie bad or good? This movie is "."""
    if len(label_names) == 2:
        names = " or ".join(label_names)
    else:
        names = ", ".join(label_names[:-1]) + ", or " + label_names[-1]
    return f"Is this movie {names}? This movie is "


# ----------------------------------------------------------------------------------------------
# Evaluation and outputs


@torch.no_grad()
def model_eval(data, model, args, device, desc="eval"):
    """Accuracy (None when the labels are UNKNOWN_LABEL placeholders), predictions and sentences, in input order."""
    model.eval()
    preds, golds, sents = [], [], []
    n_batches = (len(data) + args.batch_size - 1) // args.batch_size
    for ids, lengths, labels, batch_sents in tqdm(batches(data, args.batch_size, args.pad_id), total=n_batches,
                                                  desc=desc, disable=args.quiet):
        with autocast(args, device):
            scores = model(ids.to(device), lengths.to(device))
        preds += scores.argmax(dim=-1).tolist()
        golds += labels.tolist()
        sents += batch_sents
    if golds[0] == UNKNOWN_LABEL:  # read_data allows placeholders only on every line of a file
        return None, preds, sents
    return sum(p == g for p, g in zip(preds, golds)) / len(golds), preds, sents


def accuracy_line(split, accuracy) -> str:
    if accuracy is None:
        return f"{split} acc :: unavailable (labels are {UNKNOWN_LABEL} placeholders)"
    return f"{split} acc :: {accuracy :.3f}"


def predictions_text(preds, sents) -> str:
    return "".join(f"{p} ||| {s}\n" for p, s in zip(preds, sents))


def evaluate_and_write(model, dev, test, args, device):
    """Evaluate dev and test, print accuracies in the course's format, then write both files."""
    dev_acc, dev_pred, dev_sents = model_eval(dev, model, args, device, "eval-dev")
    test_acc, test_pred, test_sents = model_eval(test, model, args, device, "eval-test")
    print(accuracy_line("dev", dev_acc))
    print(accuracy_line("test", test_acc))
    atomic_write_text(args.dev_out, predictions_text(dev_pred, dev_sents))
    atomic_write_text(args.test_out, predictions_text(test_pred, test_sents))
    print(f"wrote {args.dev_out} and {args.test_out}")
    return dev_acc, test_acc


# ----------------------------------------------------------------------------------------------
# The four options


def get_device(args):
    device = pick_device(args.use_gpu)
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(args, device):
    if args.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def prepare(model, args, device):
    """Move to the device and pick the attention kernel (PyTorch's fused one on GPU by default)."""
    use_sdpa = args.sdpa if args.sdpa is not None else device.type == "cuda"
    getattr(model, "llama", model).set_sdpa(use_sdpa)
    return model.to(device)


def model_overrides(args) -> dict:
    """--causal/--no-causal, when given, replace the checkpoint's own masking (load_pretrained)."""
    return {} if args.causal is None else {"causal": args.causal}


def check_vocab(llama, tokenizer, path):
    """A checkpoint trained with a smaller tokenizer would fail deep inside the embedding lookup."""
    if llama.config.vocab_size < tokenizer.n_words:
        raise CheckpointError(f"{path}: the checkpoint's vocabulary has {llama.config.vocab_size} tokens, fewer than "
                              f"the tokenizer's {tokenizer.n_words}; pass --pretrained-model-path to a checkpoint "
                              "trained with this tokenizer (e.g. stories42M.pt)")


def generation_tokenizer(args):
    """The course's tokenizer, or a Hugging Face folder's own (SentencePiece or tokenizer.json)."""
    if Path(args.pretrained_model_path).is_dir():
        from codegen.text_tokenizer import load_tokenizer  # only HF folders need it

        return load_tokenizer(args.pretrained_model_path)
    return Tokenizer(args.max_sentence_len)


def generate_sentences(args, device):
    tokenizer = generation_tokenizer(args)
    llama = load_pretrained(args.pretrained_model_path, dtype=DTYPES[args.dtype], adapter=args.adapter, **model_overrides(args))
    check_vocab(llama, tokenizer, args.pretrained_model_path)
    llama = prepare(llama, args, device).eval()
    prompt = torch.tensor([tokenizer.encode(GENERATE_PROMPT, bos=True, eos=False)], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for temperature, outfile in ((0.0, args.generated_sentence_low_temp_out), (1.0, args.generated_sentence_high_temp_out)):
        with autocast(args, device):
            out = llama.generate(prompt, 75, temperature=temperature, epsilon=args.epsilon,
                                 generator=generator, eos_id=tokenizer.eos_id)
        sentence = tokenizer.decode(out[0].tolist())
        print(f"Temperature is {temperature}\n{sentence}\n---------------")
        atomic_write_text(outfile, sentence)
        print(f"Wrote generated sentence to {outfile}.")


def test_with_prompting(args, device):
    tokenizer = Tokenizer(args.max_sentence_len)
    label_names = read_label_names(args.label_names)
    suffix = zero_shot_suffix(label_names)
    dev = encode_all(read_data(args.dev, len(label_names), unknown_ok=True), tokenizer, suffix)
    test = encode_all(read_data(args.test, len(label_names), unknown_ok=True), tokenizer, suffix)
    config = SimpleNamespace(pretrained_model_path=args.pretrained_model_path, num_labels=len(label_names),
                             pooling=args.pooling, causal=args.causal)
    model = LlamaZeroShotClassifier(config, tokenizer, label_names)
    check_vocab(model.llama, tokenizer, args.pretrained_model_path)
    model = prepare(model, args, device)
    return evaluate_and_write(model, dev, test, args, device)


def train(args, device):
    """Fine-tune (all weights, or LoRA adapters) and keep the checkpoint with the best dev accuracy."""
    tokenizer = Tokenizer(args.max_sentence_len)
    num_labels = len(read_label_names(args.label_names))
    train_data = encode_all(read_data(args.train, num_labels), tokenizer)
    dev = encode_all(read_data(args.dev, num_labels), tokenizer)
    test = encode_all(read_data(args.test, num_labels, unknown_ok=True), tokenizer)  # checked now, not after training
    config = SimpleNamespace(hidden_dropout_prob=args.hidden_dropout_prob, pretrained_model_path=args.pretrained_model_path,
                             num_labels=num_labels, option=args.option, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                             pooling=args.pooling, causal=args.causal)
    model = LlamaEmbeddingClassifier(config)
    check_vocab(model.llama, tokenizer, args.pretrained_model_path)
    model = prepare(model, args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}")
    optimizer = AdamW(trainable, lr=args.lr, foreach=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)
    best_dev_acc = -1.0
    for epoch in range(args.epochs):
        model.train()
        train_loss, n_batches = 0.0, 0
        for ids, lengths, labels, _ in tqdm(batches(train_data, args.batch_size, args.pad_id, True, generator),
                                            total=(len(train_data) + args.batch_size - 1) // args.batch_size,
                                            desc=f"train-{epoch}", disable=args.quiet):
            optimizer.zero_grad()
            with autocast(args, device):
                logits = model(ids.to(device), lengths.to(device))
            loss = F.nll_loss(logits, labels.to(device), reduction="sum") / args.batch_size
            loss.backward()
            optimizer.step()
            train_loss, n_batches = train_loss + loss.item(), n_batches + 1
        train_acc, *_ = model_eval(train_data, model, args, device, "eval-train")
        dev_acc, *_ = model_eval(dev, model, args, device, "eval-dev")
        if dev_acc > best_dev_acc:
            best_dev_acc = dev_acc
            save_classifier(model, config, args.filepath)
            print(f"save the model to {args.filepath}")
        print(f"epoch {epoch}: train loss :: {train_loss / n_batches :.3f}, train acc :: {train_acc :.3f}, dev acc :: {dev_acc :.3f}")
    return dev, test


def test(args, device, dev, test_data):
    model = load_classifier(args.filepath)
    print(f"load model from {args.filepath}")
    return evaluate_and_write(prepare(model, args, device), dev, test_data, args, device)


# ----------------------------------------------------------------------------------------------


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=str, default="data/cfimdb-train.txt")
    parser.add_argument("--dev", type=str, default="data/cfimdb-dev.txt")
    parser.add_argument("--test", type=str, default="data/cfimdb-test.txt")
    parser.add_argument("--label-names", type=str, default="data/cfimdb-label-mapping.json")
    parser.add_argument("--pretrained-model-path", type=str, default="stories42M.pt")
    parser.add_argument("--max_sentence_len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--option", type=str, default="generate",
                        choices=("generate", "prompt", "finetune", "lora", *CODEGEN_OPTIONS, "export"),
                        help="generate: continue a prompt; prompt: zero-shot classification; "
                             "finetune: train every weight; lora: train LoRA adapters; "
                             "codegen, code_eval, code_generate, serve: code generation (see codegen/cli.py); "
                             "export: the model in another tool's format (--option export --help)")
    parser.add_argument("--use_gpu", action="store_true")
    parser.add_argument("--generated_sentence_low_temp_out", type=str, default="generated-sentence-temp-0.txt")
    parser.add_argument("--generated_sentence_high_temp_out", type=str, default="generated-sentence-temp-1.txt")
    parser.add_argument("--dev_out", type=str, default="cfimdb-dev-prompting-output.txt")
    parser.add_argument("--test_out", type=str, default="cfimdb-test-prompting-output.txt")
    parser.add_argument("--batch_size", type=int, default=8, help="sst: 64, cfimdb: 8 fit a 12GB GPU")
    parser.add_argument("--hidden_dropout_prob", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--lora_rank", type=int, default=4)
    parser.add_argument("--lora_alpha", type=float, default=1.0)
    # additions (all optional)
    parser.add_argument("--epsilon", type=float, default=0.05,
                        help="epsilon-sampling threshold for generate (default 0.05, the course's)")
    parser.add_argument("--pooling", choices=POOLINGS, default="course",
                        help="course: what the course's classifiers compute (the batch's last position, pads "
                             "attended; the reference accuracies' setting); last_real: each sentence's last real "
                             "token, pads masked (results independent of the batch)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="causal attention mask on or off (default: the checkpoint's own; a plain "
                             "stories42M.pt is non-causal, as the course's reference computed it)")
    parser.add_argument("--filepath", type=str, default=None, help="where the best checkpoint goes "
                        "(default: <option>-<epochs>-<lr>.pt, as in the course)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (GPU)")
    parser.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=None,
                        help="fused attention kernel (default: on for GPU, off for CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="--option generate: the dtype the weights are stored in (default float32)")
    parser.add_argument("--adapter", default=None,
                        help="--option generate: a LoRA adapter applied to the model (a PEFT folder, or a LoRA code "
                             "training's best_adapter.pt)")
    args = parser.parse_args(argv)
    for name, (valid, rule) in VALUE_RULES.items():
        if not valid(getattr(args, name)):
            parser.error(f"--{name} must be {rule}, got {getattr(args, name)}")
    if args.dtype != "float32" and args.option != "generate":
        parser.error(f"--dtype {args.dtype} applies to --option generate (and the code options); the classifiers "
                     "train and evaluate in float32 (use --bf16 for bf16 autocast)")
    if args.adapter is not None and args.option != "generate":
        parser.error(f"--adapter applies to --option generate (and the code options), not --option {args.option}")
    args.filepath = args.filepath or f"{args.option}-{args.epochs}-{args.lr}.pt"
    return args


def requested_option(argv):
    """The --option value however it is spelled (`--option X`, `--option=X`), without mistaking
    another flag's value for it; None when absent or incomplete (get_args then reports it)."""
    peek = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    peek.add_argument("--option")
    try:
        return peek.parse_known_args(argv)[0].option
    except argparse.ArgumentError:
        return None


def check_output_names(args):
    """Warn about names the grader will not find; refuse paths that cannot be written, before any work."""
    kind = {"prompt": "prompting", "finetune": "finetuning", "lora": "lora"}[args.option]
    for split, out in (("dev", args.dev_out), ("test", args.test_out)):
        if Path(out).is_dir() or (Path(out).parent.exists() and not Path(out).parent.is_dir()):
            raise UsageError(f"--{split}_out {out}: cannot write a file there; pass a file path")
        if not out.endswith(f"{split}-{kind}-output.txt"):
            print(f"warning: --{split}_out {out} does not follow <dataset>-{split}-{kind}-output.txt", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# --option export: the model in another tool's format (checkpoint.py writes each)

EXPORT_FORMATS = ("hf", "peft", "gguf", "llama2c")
EXPORT_HELP = """Write SRC (any checkpoint --pretrained-model-path takes, with --adapter folded in) as
  hf       a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors, tokenizer files)
  peft     the LoRA adapter alone, as a PEFT folder: --adapter DIR_OR_FILE, or SRC a LoRA code training's
           best.pt, whose best_adapter.pt beside it is used; it applies to the hf export of the base
  gguf     one GGUF file for llama.cpp (--gguf_type; SentencePiece tokenizers)
  llama2c  the .bin file llama2.c's run.c reads
Models must be causal with RMSNorm (hf, gguf, llama2c). Nothing is replaced: --out must not exist (or be an
empty folder) unless --overwrite; what is written appears whole or not at all."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose bad flags raise UsageError: one `error:` line and exit 2, not the usage text."""

    def error(self, message):
        raise UsageError(message)


def export_args(argv):
    from checkpoint import GGUF_TYPES

    parser = _OneLineParser(prog="run_llama.py --option export", description=EXPORT_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--option", choices=("export",), required=True)
    parser.add_argument("--pretrained-model-path", default="stories42M.pt", help="SRC (default stories42M.pt)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("--out", required=True, help="the folder (hf, peft) or file (gguf, llama2c) to write")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter: a PEFT folder, or a best_adapter.pt")
    parser.add_argument("--tokenizer", default=None, help="default: a HF folder's own, else tokenizer.model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="hf / peft: the dtype of the written tensors; gguf: the default --gguf_type")
    parser.add_argument("--gguf_type", choices=GGUF_TYPES, default=None,
                        help="gguf: tensor type of the matrices (vectors stay f32); default from --dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.gguf_type is not None and args.format != "gguf":
        raise UsageError(f"--gguf_type applies to --format gguf, not --format {args.format}")
    if args.format == "llama2c" and args.dtype != "float32":
        raise UsageError(f"--dtype {args.dtype}: a llama2.c .bin holds float32 only")
    return args


def export_tokenizer(args, vocab_size: int):
    """The tokenizer in use (--tokenizer, a HF folder's own, else the default tokenizer.model) with the
    checkpoint's FIM sentinels, and where it was read from (its files are copied into a HF export)."""
    from checkpoint import code_metadata
    from codegen.text_tokenizer import load_tokenizer, tokenizer_path

    source = tokenizer_path(args.tokenizer, args.pretrained_model_path)
    tokenizer = load_tokenizer(source, code_metadata(args.pretrained_model_path).get("sentinels") or None)
    if tokenizer.n_words > vocab_size:
        raise UsageError(f"{source}: the tokenizer has {tokenizer.n_words} pieces, more than the model's {vocab_size} "
                         "embedding rows: pass the model's own --tokenizer")
    return tokenizer, source


def export_peft(args, dtype) -> None:
    """The adapter (--adapter, or the best_adapter.pt beside a LoRA code training's best.pt) as a PEFT folder."""
    from checkpoint import code_metadata, load_config, read_adapter, save_peft_adapter, training_adapter_path

    src = Path(args.pretrained_model_path)
    path = Path(args.adapter) if args.adapter else training_adapter_path(src)
    if args.adapter is None and not path.is_file():
        raise UsageError(f"--format peft: no --adapter, and no {path.name} beside {src} (a LoRA code training writes "
                         "one beside its best.pt)")
    config = load_config(src)
    adapter = read_adapter(path, config)
    best_step = None if args.adapter else code_metadata(src).get("step")
    if best_step is not None and adapter.step != best_step:
        raise CheckpointError(f"{path}: adapters of step {adapter.step}, but {src} is step {best_step} (an interrupted "
                              "save?): pass the matching --adapter")
    save_peft_adapter(adapter, config, args.out, dtype, args.overwrite)


def export(args) -> None:
    from checkpoint import check_exportable, check_out_path, save_gguf, save_hf_folder, save_llama2c_bin

    check_out_path(args.out, args.format in ("hf", "peft"), args.overwrite)
    dtype = DTYPES[args.dtype]
    if args.format == "peft":
        return export_peft(args, dtype)
    model = load_pretrained(args.pretrained_model_path, adapter=args.adapter).eval()
    if args.format == "llama2c":
        return save_llama2c_bin(model, args.out)
    check_exportable(model.config, args.format)
    tokenizer, source = export_tokenizer(args, model.config.vocab_size)
    if args.format == "hf":
        return save_hf_folder(model, args.out, tokenizer, source, dtype, args.overwrite)
    gguf_type = args.gguf_type or {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[args.dtype]
    return save_gguf(model, args.out, tokenizer, gguf_type, args.overwrite)


def export_main(argv) -> int:
    """--option export: every problem is one `error:` line and exit status 2, with nothing written."""
    try:
        args = export_args(argv)
        export(args)
    except (ValueError, FileNotFoundError) as e:  # UsageError, CheckpointError, save_llama2c_bin's refusals
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if requested_option(argv) in CODEGEN_OPTIONS:  # code generation has its own flags: see codegen/cli.py
        from codegen.cli import main as codegen_main

        return codegen_main(argv)
    if requested_option(argv) == "export":
        return export_main(argv)
    args = get_args(argv)
    seed_everything(args.seed)
    started = time.time()
    try:
        device = get_device(args)
        args.pad_id = Tokenizer().pad_id if args.option != "generate" else None
        if args.option == "generate":
            generate_sentences(args, device)
        else:
            check_output_names(args)
            if args.option == "prompt":
                with torch.no_grad():
                    test_with_prompting(args, device)
            else:
                dev, test_data = train(args, device)
                test(args, device, dev, test_data)
    except (UsageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

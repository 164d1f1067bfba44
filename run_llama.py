"""The assignment's command line: text generation, zero-shot prompting, fine-tuning and LoRA.

    python run_llama.py --option generate [--prompt TEXT --max_new_tokens 75]
    python run_llama.py --option prompt   --batch_size 10 --train data/sst-train.txt ... --dev_out sst-dev-prompting-output.txt ...
    python run_llama.py --option finetune --epochs 5 --lr 2e-5 --batch_size 80 ...
    python run_llama.py --option lora     --epochs 5 --lr 2e-5 --batch_size 80 --lora_rank 4 --lora_alpha 1.0 ...
    python run_llama.py --option predict  --classifier finetune-5-2e-05.pt --test FILE --test_out FILE
    python run_llama.py --option pretrain --out base.pt          (a model from scratch: --option pretrain --help)
    python run_llama.py --option export   --pretrained-model-path SRC --format {hf,peft,gguf,llama2c} --out DEST

Data lines are `label ||| sentence`; label-name files are JSON lists. Every output file has one
`predicted_label ||| sentence` line per input line, in input order. Sentences longer than the model's
context lose their last tokens (a warning says how many); the zero-shot prompt is kept.
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

import distributed
from classifier import POOLINGS, LlamaEmbeddingClassifier, LlamaZeroShotClassifier
from checkpoint import check_vocab, load_classifier, load_pretrained, save_classifier
from optimizer import AdamW, AdamW8bit
from quantize import KINDS, quantize_model
from tokenizer import Tokenizer
from training import CsvLog, log_path, plot_curves
from utils import DEVICES, DTYPES, CheckpointError, DataError, UsageError, atomic_write_text, pick_device, seed_everything

GENERATE_PROMPT = ("Victor Frankenstein, a young scientist obsessed with uncovering the secrets of life, "
                   "succeeds in animating a creature assembled from")


CODEGEN_OPTIONS = ("codegen", "code_eval", "code_generate", "serve")
ASSIGNMENT_OPTIONS = ("generate", "prompt", "finetune", "lora", "predict")  # this file's parser (get_args)
TRAINING_OPTIONS = ("finetune", "lora")  # these run under torchrun too (distributed.py)
DEFAULT_CHECKPOINT = "stories42M.pt"
DEFAULT_BATCH_SIZE = 8

# Numeric flags with a limited range: name -> (whether a value is valid, the rule the message states).
VALUE_RULES = {
    "batch_size": (lambda v: v is None or v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1 (training saves the model of its best epoch)"),
    "lr": (lambda v: v > 0, "> 0"),
    "lora_rank": (lambda v: v >= 1, ">= 1"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "hidden_dropout_prob": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_sentence_len": (lambda v: v is None or v >= 1, ">= 1 (tokens kept of each sentence; BOS comes on top)"),
    "epsilon": (lambda v: 0 <= v < 1, "in [0, 1) (a probability floor)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
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


def encode_all(examples, tokenizer, max_tokens: int, suffix="", path=None):
    """[(label, token_ids, sentence)]; the suffix (the zero-shot prompt) is appended before encoding.
    An example longer than max_tokens (the model's context; BOS and prompt included) keeps its first
    tokens and the whole prompt; a warning naming `path` counts them."""
    tail = tokenizer.encode(suffix, bos=False, eos=False) if suffix else []
    encoded, cut = [], 0
    for label, sent in examples:
        ids = tokenizer.encode(f"{sent} {suffix}" if suffix else sent, bos=True, eos=False)
        if len(ids) > max_tokens:
            ids, cut = ids[: max(1, max_tokens - len(tail))] + tail[: max_tokens - 1], cut + 1
        encoded.append((label, ids, sent))
    if cut and distributed.is_main():
        print(f"warning: {path}: {cut} of {len(examples)} sentences are longer than the model's context of {max_tokens} "
              f"tokens{' with the prompt' if suffix else ''}: each keeps its first tokens"
              f"{' and the prompt' if suffix else ''} (--max_sentence_len sets a shorter limit)", file=sys.stderr)
    return encoded


def context_tokens(model) -> int:
    """The most tokens of one example (BOS and prompt included) the classifier can read: the model's
    context, less the label tokens that zero-shot `last_real` scoring writes after the example."""
    if isinstance(model, LlamaZeroShotClassifier) and model.pooling == "last_real":
        return model.llama.config.max_seq_len - (max(len(ids) for ids in model.label_name_ids) - 1)
    return model.llama.config.max_seq_len


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


def rank_rows(batch) -> tuple:
    """(token_ids, lengths, labels, rows) of this rank's rows of a global batch (under torchrun a batch holds
    --batch_size x world sentences, drawn as one process with that batch size draws them; in one process, all
    of it): distributed.shard's contiguous share, possibly none, still padded to the whole batch's width, as
    the course's pooling reads the batch's last position. rows: their places in the batch."""
    token_ids, lengths, labels, _ = batch
    rows = distributed.shard(range(len(labels)))
    part = slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)
    return token_ids[part], lengths[part], labels[part], rows


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
    """Accuracy (None when the labels are UNKNOWN_LABEL placeholders), predictions and sentences, in input order.
    Under torchrun each rank scores its rows of every global batch and the predictions are gathered: every
    rank returns what one process with a batch of --batch_size x world would."""
    model.eval()
    size = args.batch_size * distributed.world_size()
    found = []  # (place in data, prediction) of this rank's sentences
    for k, batch in enumerate(tqdm(batches(data, size, args.pad_id), total=(len(data) + size - 1) // size, desc=desc,
                                   disable=args.quiet)):
        ids, lengths, _, rows = rank_rows(batch)
        if rows:
            with autocast(args, device):
                scores = model(ids.to(device), lengths.to(device))
            found += zip([k * size + row for row in rows], scores.argmax(dim=-1).tolist())
    preds = [pred for _, pred in sorted(distributed.gather(found))]
    golds, sents = [label for label, _, _ in data], [sent for _, _, sent in data]
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
    """Evaluate dev and test, print accuracies in the course's format, then write both files (rank 0)."""
    dev_acc, dev_pred, dev_sents = model_eval(dev, model, args, device, "eval-dev")
    test_acc, test_pred, test_sents = model_eval(test, model, args, device, "eval-test")
    say(accuracy_line("dev", dev_acc))
    say(accuracy_line("test", test_acc))
    if distributed.is_main():
        atomic_write_text(args.dev_out, predictions_text(dev_pred, dev_sents))
        atomic_write_text(args.test_out, predictions_text(test_pred, test_sents))
    say(f"wrote {args.dev_out} and {args.test_out}")
    return dev_acc, test_acc


def say(*args, **kwargs) -> None:
    """print, by rank 0 alone under torchrun (every rank runs the same lines)."""
    if distributed.is_main():
        print(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# The options


def get_device(args):
    """--device / --use_gpu's device; for finetune and lora under torchrun this rank's, in the process group
    (distributed.setup)."""
    device = pick_device(args.device, args.use_gpu)
    if args.option in TRAINING_OPTIONS:
        device = distributed.setup(device.type, args.dist_timeout)
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


VOCAB_FIX = "pass --pretrained-model-path to a checkpoint trained with this tokenizer (e.g. stories42M.pt, or one " \
            "--option pretrain wrote), or set MINILLAMA_TOKENIZER to the tokenizer it was trained with"


def generation_tokenizer(args):
    """The course's tokenizer, or a Hugging Face folder's own (SentencePiece or tokenizer.json)."""
    if Path(args.pretrained_model_path).is_dir():
        from codegen.text_tokenizer import load_tokenizer  # only HF folders need it

        return load_tokenizer(args.pretrained_model_path)
    return Tokenizer(args.max_sentence_len)


def check_generation_fits(n_prompt: int, args, max_seq_len: int) -> None:
    """The prompt and the new tokens must fit the model's context (positions past it have no meaning)."""
    if n_prompt + args.max_new_tokens <= max_seq_len:
        return
    fixes = [f"--max_new_tokens {max_seq_len - n_prompt}"] if n_prompt < max_seq_len else []
    if args.max_new_tokens < max_seq_len - 1:
        fixes.append(f"--max_sentence_len {max_seq_len - 1 - args.max_new_tokens} (keeps the prompt's first tokens)")
    raise UsageError(f"the prompt ({n_prompt} tokens with BOS) and --max_new_tokens {args.max_new_tokens} do not fit "
                     f"the model's context of {max_seq_len} tokens; pass " + " or ".join(fixes or ["a shorter --prompt"]))


def generate_sentences(args, device):
    tokenizer = generation_tokenizer(args)
    llama = load_pretrained(args.pretrained_model_path, dtype=DTYPES[args.dtype], adapter=args.adapter, **model_overrides(args))
    check_vocab(llama, tokenizer, args.pretrained_model_path, VOCAB_FIX)
    prompt_ids = tokenizer.encode(args.prompt, bos=True, eos=False)
    check_generation_fits(len(prompt_ids), args, llama.config.max_seq_len)
    llama = prepare(llama, args, device).eval()
    prompt = torch.tensor([prompt_ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for temperature, outfile in ((0.0, args.generated_sentence_low_temp_out), (1.0, args.generated_sentence_high_temp_out)):
        with autocast(args, device):
            out = llama.generate(prompt, args.max_new_tokens, temperature=temperature, epsilon=args.epsilon,
                                 generator=generator, eos_id=tokenizer.eos_id)
        sentence = tokenizer.decode(out[0].tolist())
        print(f"Temperature is {temperature}\n{sentence}\n---------------")
        atomic_write_text(outfile, sentence)
        print(f"Wrote generated sentence to {outfile}.")


def test_with_prompting(args, device):
    tokenizer = Tokenizer(args.max_sentence_len)
    label_names = read_label_names(args.label_names)
    dev = read_data(args.dev, len(label_names), unknown_ok=True)
    test = read_data(args.test, len(label_names), unknown_ok=True)
    config = SimpleNamespace(pretrained_model_path=args.pretrained_model_path, num_labels=len(label_names),
                             pooling=args.pooling, causal=args.causal)
    model = LlamaZeroShotClassifier(config, tokenizer, label_names)
    check_vocab(model.llama, tokenizer, args.pretrained_model_path, VOCAB_FIX)
    suffix, context = zero_shot_suffix(label_names), context_tokens(model)
    dev = encode_all(dev, tokenizer, context, suffix, args.dev)
    test = encode_all(test, tokenizer, context, suffix, args.test)
    return evaluate_and_write(prepare(model, args, device), dev, test, args, device)


CLASSIFIER_LOG = ("epoch", "step", "lr", "train_loss", "train_acc", "dev_acc", "elapsed")


def train(args, device):
    """Fine-tune (all weights, or LoRA adapters) and keep the checkpoint with the best dev accuracy;
    each epoch is a row of NAME-log.csv beside the checkpoint NAME.pt (and its plot, NAME-log.png).
    Under torchrun the ranks train as one process with a batch of --batch_size x world (distributed.py)."""
    tokenizer = Tokenizer(args.max_sentence_len)
    num_labels = len(read_label_names(args.label_names))
    train_data, dev = read_data(args.train, num_labels), read_data(args.dev, num_labels)
    test = read_data(args.test, num_labels, unknown_ok=True)  # checked now, not after training
    config = SimpleNamespace(hidden_dropout_prob=args.hidden_dropout_prob, pretrained_model_path=args.pretrained_model_path,
                             num_labels=num_labels, option=args.option, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                             pooling=args.pooling, causal=args.causal, batch_size=args.batch_size,
                             max_sentence_len=args.max_sentence_len, quantize=args.quantize)
    model = LlamaEmbeddingClassifier(config)
    check_vocab(model.llama, tokenizer, args.pretrained_model_path, VOCAB_FIX)
    quantize_model(model.llama, args.quantize)  # QLoRA: the frozen backbone in NF4 (or int8), the head in fp32
    context = context_tokens(model)
    train_data, dev, test = (encode_all(data, tokenizer, context, path=path) for data, path in
                             ((train_data, args.train), (dev, args.dev), (test, args.test)))
    model = prepare(model, args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}")
    optimizer = (AdamW8bit(trainable, lr=args.lr) if args.optim == "adamw8bit"
                 else AdamW(trainable, lr=args.lr, foreach=device.type == "cuda"))
    par = distributed.Parallel(model, optimizer, args.fsdp)
    distributed.seed_ranks(args.seed)  # each rank its own dropout masks
    world = distributed.world_size()
    say(f"effective batch {args.batch_size * world} sentences per step (--batch_size {args.batch_size} x {world} "
        f"rank(s)); {par.describe()}"
        + (" (--fsdp ignored: not launched by torchrun)" if args.fsdp and world == 1 else ""))
    generator = torch.Generator().manual_seed(args.seed)
    log = CsvLog(log_path(args.filepath, ".csv"), CLASSIFIER_LOG) if distributed.is_main() else None
    started, best_dev_acc = time.time(), -1.0
    steps_per_epoch = (len(train_data) + args.batch_size * world - 1) // (args.batch_size * world)
    for epoch in range(args.epochs):
        train_loss = train_epoch(par, train_data, generator, args, device, epoch)
        with par.local() as local:
            train_acc, *_ = model_eval(train_data, local, args, device, "eval-train")
            dev_acc, *_ = model_eval(dev, local, args, device, "eval-dev")
        if log is not None:
            log.write(epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch, lr=args.lr, train_loss=train_loss,
                      train_acc=train_acc, dev_acc=dev_acc, elapsed=time.time() - started)
        if dev_acc > best_dev_acc:  # the same decision on every rank: the predictions are gathered
            best_dev_acc = dev_acc
            with par.full() as (whole, _):  # every rank takes part (FSDP2 gathers the shards); rank 0 saves
                if whole is not None:
                    save_classifier(whole, config, args.filepath)
            say(f"save the model to {args.filepath}")
        say(f"epoch {epoch}: train loss :: {train_loss :.3f}, train acc :: {train_acc :.3f}, dev acc :: {dev_acc :.3f}")
    if log is not None:
        plot = plot_curves(log.path, log_path(args.filepath, ".png"),
                           [("loss", ["train_loss"]), ("accuracy", ["train_acc", "dev_acc"])], x="epoch")
        print(f"wrote {log.path}" + (f" and {plot}" if plot else " (no plot: matplotlib is not installed)"))
    return dev, test


def train_epoch(par, data, generator, args, device, epoch) -> float:
    """One epoch of steps, in a fresh shuffle of the data; returns the mean of the steps' losses (all ranks').

    The course's loss of a step is the summed negative log-likelihood of its sentences over --batch_size.
    Under torchrun a step's global batch of size = --batch_size x world sentences is split among the ranks,
    and DDP (or FSDP2) averages their gradients: a rank backpropagates its summed loss x world / size, so the
    step's gradient is the summed loss of the whole global batch over size, exactly one process's."""
    world = distributed.world_size()
    size = args.batch_size * world
    par.model.train()
    total, steps = 0.0, 0
    for batch in tqdm(batches(data, size, args.pad_id, True, generator), total=(len(data) + size - 1) // size,
                      desc=f"train-{epoch}", disable=args.quiet):
        ids, lengths, labels, rows = rank_rows(batch)
        if not rows:  # a last global batch smaller than the world: a row of padding, which carries no loss
            # but runs the forward and backward that every rank takes part in
            ids, lengths = torch.full_like(batch[0][:1], args.pad_id), torch.ones(1, dtype=torch.long)
        par.optimizer.zero_grad()
        with autocast(args, device):
            logits = par.model(ids.to(device), lengths.to(device))
        loss_sum = F.nll_loss(logits[: len(rows)], labels.to(device), reduction="sum")
        (loss_sum * world / size).backward()
        par.finish_gradients()
        par.optimizer.step()
        total, steps = total + (loss_sum / size).item(), steps + 1
    return distributed.all_reduce([total])[0] / steps


def test(args, device, dev, test_data):
    """The best classifier, reloaded from its file, on dev and test, in batches of --batch_size x world (as the
    ranks evaluated it). Under torchrun the ranks leave the process group first and rank 0 alone evaluates
    (the file it saved may be on its machine only); the others return None."""
    world, main_rank = distributed.world_size(), distributed.is_main()
    distributed.teardown()
    if not main_rank:
        return None
    args = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size * world})
    model, _ = load_classifier(args.filepath)
    say(f"load model from {args.filepath}")
    return evaluate_and_write(prepare(model, args, device), dev, test_data, args, device)


def predict(args, device):
    """--option predict: a classifier that --option finetune / lora saved, on --test, written to --test_out in
    the training options' format; the batch size and sentence length it was trained with, unless given."""
    if args.classifier is None or args.test_out is None:
        raise UsageError("--option predict needs --classifier CKPT (a finetune-*.pt or lora-*.pt that --option "
                         "finetune / lora saved) and --test_out FILE")
    model, settings = load_classifier(args.classifier, args.pretrained_model_path)
    for name in ("batch_size", "max_sentence_len"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(settings, name, None))
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    tokenizer = Tokenizer(args.max_sentence_len)
    backbone = args.classifier if settings.option == "finetune" else settings.pretrained_model_path  # see load_classifier
    check_vocab(model.llama, tokenizer, backbone, VOCAB_FIX)
    test = encode_all(read_data(args.test, model.num_labels, unknown_ok=True), tokenizer, context_tokens(model),
                      path=args.test)
    accuracy, preds, sents = model_eval(test, prepare(model, args, device), args, device, "predict")
    print(accuracy_line("test", accuracy))
    atomic_write_text(args.test_out, predictions_text(preds, sents))
    print(f"wrote {args.test_out}")


# ----------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every flag's default after its help (a None default is explained in
    the help text itself)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


TOP_LEVEL_EPILOG = """other options have flags of their own; each lists them:
  python run_llama.py --option pretrain --help        train a model from scratch on text (pretrain.py)
  python run_llama.py --option export --help          the model in another tool's format
  python run_llama.py --option codegen --help         (and code_eval, code_generate, serve: codegen/)"""


def build_parser() -> argparse.ArgumentParser:
    """The flags of the assignment's options (ASSIGNMENT_OPTIONS); every option accepts all of them."""
    parser = argparse.ArgumentParser(description=__doc__, epilog=TOP_LEVEL_EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--option", type=str, default="generate",
                        choices=(*ASSIGNMENT_OPTIONS, "pretrain", *CODEGEN_OPTIONS, "export"),
                        help="generate: continue a prompt; prompt: zero-shot classification; "
                             "finetune: train every weight; lora: train LoRA adapters; predict: a saved classifier "
                             "on --test; pretrain, export and the code options (codegen, code_eval, code_generate, "
                             "serve): see `--option X --help`")
    parser.add_argument("--train", type=str, default="data/cfimdb-train.txt", help="training data (finetune, lora)")
    parser.add_argument("--dev", type=str, default="data/cfimdb-dev.txt", help="dev data, scored every epoch")
    parser.add_argument("--test", type=str, default="data/cfimdb-test.txt",
                        help="test data (-1 labels on every line: predictions without accuracy)")
    parser.add_argument("--label-names", type=str, default="data/cfimdb-label-mapping.json",
                        help="a JSON list of the label names")
    parser.add_argument("--pretrained-model-path", type=str, default=None,
                        help=f"the model: a stories42M.pt-format .pt, a llama2.c .bin or a Hugging Face folder "
                             f"(generate); default: {DEFAULT_CHECKPOINT}, and for predict the one the classifier "
                             "was trained on")
    parser.add_argument("--max_sentence_len", type=int, default=None,
                        help="keep only the first N tokens of each sentence (and of the prompt); default: no limit "
                             "but the model's context (predict: the classifier's own)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--use_gpu", action="store_true", help="the course's name for --device cuda")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="cpu, cuda, mps, or auto (CUDA, else MPS, else the CPU); default: cpu, as the course "
                             "(cuda with --use_gpu)")
    parser.add_argument("--generated_sentence_low_temp_out", type=str, default="generated-sentence-temp-0.txt",
                        help="generate: the temperature-0 continuation")
    parser.add_argument("--generated_sentence_high_temp_out", type=str, default="generated-sentence-temp-1.txt",
                        help="generate: the temperature-1 continuation")
    parser.add_argument("--dev_out", type=str, default="cfimdb-dev-prompting-output.txt",
                        help="the dev predictions (prompt, finetune, lora)")
    parser.add_argument("--test_out", type=str, default=None,
                        help="the test predictions; default: cfimdb-test-prompting-output.txt (predict: required)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"sentences per batch; default: {DEFAULT_BATCH_SIZE} (predict: the classifier's own); "
                             "sst: 64, cfimdb: 8 fit a 12GB GPU")
    parser.add_argument("--hidden_dropout_prob", type=float, default=0.3, help="dropout before the classifier head")
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate (finetune, lora)")
    parser.add_argument("--lora_rank", type=int, default=4, help="LoRA rank (lora)")
    parser.add_argument("--lora_alpha", type=float, default=1.0, help="LoRA scale alpha (the update is alpha / rank * BA)")
    parser.add_argument("--quantize", choices=KINDS, default="none",
                        help="lora only: hold the frozen backbone's linear layers in NF4 (QLoRA) or int8 (quantize.py)")
    parser.add_argument("--optim", choices=("adamw", "adamw8bit"), default="adamw",
                        help="finetune/lora: the course's AdamW, or AdamW8bit (moments in 8 bits, optimizer.py)")
    # additions (all optional)
    parser.add_argument("--prompt", default=GENERATE_PROMPT, help="generate: the text to continue (the course's)")
    parser.add_argument("--max_new_tokens", type=int, default=75, help="generate: tokens to generate")
    parser.add_argument("--epsilon", type=float, default=0.05,
                        help="generate: epsilon-sampling threshold at temperature 1 (the course's)")
    parser.add_argument("--classifier", default=None,
                        help="predict: a classifier that finetune / lora saved (their --filepath); no default: required there")
    parser.add_argument("--pooling", choices=POOLINGS, default="course",
                        help="course: what the course's classifiers compute (the batch's last position, pads "
                             "attended; the reference accuracies' setting); last_real: each sentence's last real "
                             "token, pads masked (results independent of the batch)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="causal attention mask on or off; default: the checkpoint's own (a plain "
                             "stories42M.pt is non-causal, as the course's reference computed it)")
    parser.add_argument("--filepath", type=str, default=None, help="where the best checkpoint goes "
                        "(finetune, lora); default: <option>-<epochs>-<lr>.pt, as in the course; its log: "
                        "<name>-log.csv beside it")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (GPU)")
    parser.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=None,
                        help="fused attention kernel; default: on for GPU, off for CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="generate: the dtype the weights are stored in")
    parser.add_argument("--adapter", default=None,
                        help="generate: a LoRA adapter applied to the model (a PEFT folder, or a LoRA code "
                             "training's best_adapter.pt); default: none")
    distributed.add_arguments(parser.add_argument_group("finetune and lora under torchrun (see distributed.py)"))
    return parser


def get_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, (valid, rule) in VALUE_RULES.items():
        if not valid(getattr(args, name)):
            parser.error(f"--{name} must be {rule}, got {getattr(args, name)}")
    if args.dtype != "float32" and args.option != "generate":
        parser.error(f"--dtype {args.dtype} applies to --option generate (and the code options); the classifiers "
                     "train and evaluate in float32 (use --bf16 for bf16 autocast)")
    if args.adapter is not None and args.option != "generate":
        parser.error(f"--adapter applies to --option generate (and the code options), not --option {args.option}")
    if args.quantize != "none" and args.option != "lora":
        parser.error(f"--quantize {args.quantize} applies to --option lora (QLoRA: a frozen, quantized backbone); "
                     f"--option {args.option} trains or uses every weight in full precision")
    if args.optim != "adamw" and args.option not in ("finetune", "lora"):
        parser.error(f"--optim applies to --option finetune and lora, not --option {args.option}")
    if args.optim == "adamw8bit" and args.fsdp:
        parser.error("--fsdp with --optim adamw8bit: the 8-bit optimizer quantizes whole tensors in blocks, not "
                     "FSDP2's shards; use DDP (drop --fsdp) or --optim adamw")
    if args.option != "predict":  # predict takes these from the classifier (see predict)
        args.pretrained_model_path = args.pretrained_model_path or DEFAULT_CHECKPOINT
        args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
        args.test_out = args.test_out or "cfimdb-test-prompting-output.txt"
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
    kind = {"prompt": "prompting", "finetune": "finetuning", "lora": "lora", "predict": None}[args.option]
    outputs = (("test", args.test_out),) if kind is None else (("dev", args.dev_out), ("test", args.test_out))
    for split, out in outputs:
        if out is None:
            continue
        if Path(out).is_dir() or (Path(out).parent.exists() and not Path(out).parent.is_dir()):
            raise UsageError(f"--{split}_out {out}: cannot write a file there; pass a file path")
        if kind is not None and not out.endswith(f"{split}-{kind}-output.txt") and distributed.is_main():
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


def export_parser() -> argparse.ArgumentParser:
    from checkpoint import GGUF_TYPES

    parser = _OneLineParser(prog="run_llama.py --option export", description=EXPORT_HELP, formatter_class=HelpFormatter)
    parser.add_argument("--option", choices=("export",), required=True, help="write a model in another format")
    parser.add_argument("--pretrained-model-path", default=DEFAULT_CHECKPOINT, help="SRC")
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="what to write (see above)")
    parser.add_argument("--out", required=True, help="the folder (hf, peft) or file (gguf, llama2c) to write")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter: a PEFT folder, or a best_adapter.pt; default: none")
    parser.add_argument("--tokenizer", default=None, help="default: a HF folder's own, else tokenizer.model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="hf / peft: the dtype of the written tensors; gguf: the default --gguf_type")
    parser.add_argument("--gguf_type", choices=GGUF_TYPES, default=None,
                        help="gguf: tensor type of the matrices (vectors stay f32); default: from --dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def export_args(argv):
    args = export_parser().parse_args(argv)
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


def pretrain_parser() -> argparse.ArgumentParser:
    import pretrain

    parser = _OneLineParser(prog="run_llama.py --option pretrain", description=pretrain.__doc__,
                            formatter_class=HelpFormatter)
    parser.add_argument("--option", choices=("pretrain",), required=True, help="train a model from scratch")
    pretrain.add_arguments(parser)
    return parser


def pretrain_main(argv) -> int:
    """--option pretrain (pretrain.py): every problem is one `error:` line and exit status 2."""
    import pretrain

    args = pretrain_parser().parse_args(argv)
    return reported(lambda: pretrain.train(args), args)


def reported(work, args) -> int:
    """work()'s exit status; a UsageError or FileNotFoundError is one `error:` line and exit status 2, a rank
    lost under torchrun exit status 1 (lost_rank). The process group, if any, is torn down either way."""
    try:
        status = work()
    except (UsageError, FileNotFoundError) as e:  # DataError, CheckpointError, DeviceError are UsageErrors
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown(wait=False)
        return 2
    except RuntimeError as e:
        return lost_rank(e, args)
    distributed.teardown()
    return status


def lost_rank(error: RuntimeError, args) -> int:
    """Under torchrun, a collective that failed because another rank died or hung: one `error:` line and exit
    status 1 (distributed.failure); any other RuntimeError is raised again (a bug keeps its traceback)."""
    message = distributed.failure(error, getattr(args, "dist_timeout", distributed.DEFAULT_TIMEOUT_S))
    distributed.teardown(wait=False)
    if message is None:
        raise error
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if requested_option(argv) in CODEGEN_OPTIONS:  # code generation has its own flags: see codegen/cli.py
        from codegen.cli import main as codegen_main

        return codegen_main(argv)
    if requested_option(argv) == "export":
        return export_main(argv)
    if requested_option(argv) == "pretrain":
        return pretrain_main(argv)
    args = get_args(argv)
    seed_everything(args.seed)
    return reported(lambda: run_option(args), args)


def run_option(args) -> int:
    """The assignment's options (generate, prompt, finetune, lora, predict)."""
    started = time.time()
    device = get_device(args)
    main_rank = distributed.is_main()  # under torchrun rank 0 alone prints and shows progress
    args.quiet = args.quiet or not main_rank
    args.pad_id = Tokenizer().pad_id if args.option != "generate" else None
    if args.option == "generate":
        generate_sentences(args, device)
    elif args.option == "predict":
        check_output_names(args)
        predict(args, device)
    else:
        check_output_names(args)
        if args.option == "prompt":
            with torch.no_grad():
                test_with_prompting(args, device)
        else:
            dev, test_data = train(args, device)
            test(args, device, dev, test_data)
    if main_rank:
        print(f"done in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

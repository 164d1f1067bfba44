"""The assignment's command line: text generation, zero-shot prompting, fine-tuning and LoRA.

    python run_llama.py --option generate
    python run_llama.py --option prompt   --batch_size 10 --train data/sst-train.txt ... --dev_out sst-dev-prompting-output.txt ...
    python run_llama.py --option finetune --epochs 5 --lr 2e-5 --batch_size 80 ...
    python run_llama.py --option lora     --epochs 5 --lr 2e-5 --batch_size 80 --lora_rank 4 --lora_alpha 1.0 ...

Data lines are `label ||| sentence`; label-name files are JSON lists. Every output file has one
`predicted_label ||| sentence` line per input line, in input order.
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from classifier import LlamaEmbeddingClassifier, LlamaZeroShotClassifier
from llama import CheckpointError, load_pretrained
from optimizer import AdamW
from tokenizer import Tokenizer
from utils import DeviceError, atomic_save, atomic_write_text, pick_device, seed_everything

GENERATE_PROMPT = ("Victor Frankenstein, a young scientist obsessed with uncovering the secrets of life, "
                   "succeeds in animating a creature assembled from")


CODEGEN_OPTIONS = ("codegen", "code_eval", "code_generate", "serve")


class UsageError(Exception):
    """A problem the user can fix; main() prints the message and exits with status 2."""


class DataError(UsageError):
    """Bad input data; the message names the file and line."""


# ----------------------------------------------------------------------------------------------
# Data


def read_label_names(path) -> list:
    try:
        names = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: label-name file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: expected a JSON list of label names, e.g. [\"bad\", \"good\"]")
    return names


def read_data(path, num_labels: int) -> list:
    """[(label, sentence)] from `label ||| sentence` lines, checking every line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found (run `bash setup.sh` to place data/)") from None
    examples = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, sep, sentence = line.partition(" ||| ")
        if not sep:
            raise DataError(f"{path}:{lineno}: expected `label ||| sentence`, got {line[:60]!r}")
        try:
            label = int(label.strip())
        except ValueError:
            raise DataError(f"{path}:{lineno}: label {label.strip()!r} is not an integer") from None
        if not 0 <= label < num_labels:
            raise DataError(f"{path}:{lineno}: label {label} is outside 0..{num_labels - 1}, "
                            f"but the label-name file lists {num_labels} labels")
        examples.append((label, sentence.strip()))
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


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
    """Accuracy, macro-F1, predictions and sentences, in input order."""
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
    accuracy = sum(p == g for p, g in zip(preds, golds)) / len(golds)
    return accuracy, macro_f1(golds, preds), preds, sents


def macro_f1(golds, preds) -> float:
    scores = []
    for label in sorted(set(golds) | set(preds)):
        tp = sum(g == p == label for g, p in zip(golds, preds))
        fp = sum(p == label != g for g, p in zip(golds, preds))
        fn = sum(g == label != p for g, p in zip(golds, preds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def predictions_text(preds, sents) -> str:
    return "".join(f"{p} ||| {s}\n" for p, s in zip(preds, sents))


def evaluate_and_write(model, dev, test, args, device):
    """Evaluate dev and test, print accuracies in the course's format, then write both files."""
    dev_acc, _, dev_pred, dev_sents = model_eval(dev, model, args, device, "eval-dev")
    test_acc, _, test_pred, test_sents = model_eval(test, model, args, device, "eval-test")
    print(f"dev acc :: {dev_acc :.3f}")
    print(f"test acc :: {test_acc :.3f}")
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


def generate_sentences(args, device):
    llama = prepare(load_pretrained(args.pretrained_model_path), args, device).eval()
    tokenizer = Tokenizer(args.max_sentence_len)
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
    dev = encode_all(read_data(args.dev, len(label_names)), tokenizer, suffix)
    test = encode_all(read_data(args.test, len(label_names)), tokenizer, suffix)
    config = SimpleNamespace(pretrained_model_path=args.pretrained_model_path, num_labels=len(label_names))
    model = prepare(LlamaZeroShotClassifier(config, tokenizer, label_names), args, device)
    return evaluate_and_write(model, dev, test, args, device)


def train(args, device):
    """Fine-tune (all weights, or LoRA adapters) and keep the checkpoint with the best dev accuracy."""
    tokenizer = Tokenizer(args.max_sentence_len)
    num_labels = len(read_label_names(args.label_names))
    train_data = encode_all(read_data(args.train, num_labels), tokenizer)
    dev = encode_all(read_data(args.dev, num_labels), tokenizer)
    test = encode_all(read_data(args.test, num_labels), tokenizer)  # checked now, not after training
    config = SimpleNamespace(hidden_dropout_prob=args.hidden_dropout_prob, pretrained_model_path=args.pretrained_model_path,
                             num_labels=num_labels, option=args.option, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    model = prepare(LlamaEmbeddingClassifier(config), args, device)
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
            save_model(model, config, args)
        print(f"epoch {epoch}: train loss :: {train_loss / n_batches :.3f}, train acc :: {train_acc :.3f}, dev acc :: {dev_acc :.3f}")
    return dev, test


def save_model(model, config, args):
    """Atomically save what evaluation needs: LoRA runs keep only the trainable tensors."""
    state = model.state_dict()
    if args.option == "lora":
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    atomic_save({"model": state, "model_config": vars(config), "args": vars(args)}, args.filepath)
    print(f"save the model to {args.filepath}")


def test(args, device, dev, test_data):
    saved = torch.load(args.filepath, map_location="cpu", weights_only=True)
    config = SimpleNamespace(**saved["model_config"])
    model = LlamaEmbeddingClassifier(config)
    if args.option == "lora":  # the frozen weights came from the pretrained checkpoint; the rest must all load
        result = model.load_state_dict(saved["model"], strict=False)
        missing = {name for name, p in model.named_parameters() if p.requires_grad} & set(result.missing_keys)
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{args.filepath}: adapters do not fit the model: missing {sorted(missing)}, "
                                  f"unexpected {result.unexpected_keys}")
    else:
        model.load_state_dict(saved["model"])
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
                        choices=("generate", "prompt", "finetune", "lora", *CODEGEN_OPTIONS),
                        help="generate: continue a prompt; prompt: zero-shot classification; "
                             "finetune: train every weight; lora: train LoRA adapters; "
                             "codegen, code_eval, code_generate, serve: code generation (see codegen/cli.py)")
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
    parser.add_argument("--epsilon", type=float, default=3e-4, help="epsilon-sampling threshold for generate")
    parser.add_argument("--filepath", type=str, default=None, help="where the best checkpoint goes "
                        "(default: <option>-<epochs>-<lr>.pt, as in the course)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (GPU)")
    parser.add_argument("--sdpa", action=argparse.BooleanOptionalAction, default=None,
                        help="fused attention kernel (default: on for GPU, off for CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.epochs < 0:
        parser.error("--batch_size must be >= 1 and --epochs >= 0")
    args.filepath = args.filepath or f"{args.option}-{args.epochs}-{args.lr}.pt"
    return args


def check_output_names(args):
    kind = {"prompt": "prompting", "finetune": "finetuning", "lora": "lora"}[args.option]
    for split, out in (("dev", args.dev_out), ("test", args.test_out)):
        if not out.endswith(f"{split}-{kind}-output.txt"):
            print(f"warning: --{split}_out {out} does not follow <dataset>-{split}-{kind}-output.txt", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if set(argv) & set(CODEGEN_OPTIONS):  # code generation has its own flags: see codegen/cli.py
        from codegen.cli import main as codegen_main

        return codegen_main(argv)
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
    except (UsageError, DeviceError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

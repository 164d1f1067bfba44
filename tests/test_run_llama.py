"""run_llama.py end to end through the real command line, on a tiny synthetic checkpoint in
stories42M.pt format, the first lines of the real data, and an easy synthetic sentiment task."""
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from config import LlamaConfig
from conftest import ROOT, asset_path
from helpers import lively_model, save_stories_pt, tiny_model
from llama import Llama

OUTPUT_LINE = r"^\d+ \|\|\| "


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with tiny.pt, data/ (64-line slices of SST and CFIMDB) and an easy synthetic task."""
    tokenizer = asset_path("tokenizer.model")
    data_dir = asset_path("data/sst-train.txt").parent
    work = tmp_path_factory.mktemp("run_llama")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=8, max_seq_len=512))
    save_stories_pt(model, work / "tiny.pt")
    # generation gets livelier weights: at the training init an untrained model repeats one token,
    # and temperature-1 samples would agree with or without seeding
    save_stories_pt(lively_model(vocab_size=32000, dim=32, max_seq_len=512), work / "lively.pt")
    (work / "data").mkdir()
    for name in ("sst", "cfimdb"):
        for split in ("train", "dev", "test"):
            lines = (data_dir / f"{name}-{split}.txt").read_text().splitlines(keepends=True)[:64]
            (work / "data" / f"{name}-{split}.txt").write_text("".join(lines))
        (work / "data" / f"{name}-label-mapping.json").write_text((data_dir / f"{name}-label-mapping.json").read_text())
    rng = random.Random(0)
    filler = "the a movie film plot actor story scene was is really quite so very and but".split()
    words = {0: ["awful", "terrible", "boring"], 1: ["great", "wonderful", "charming"]}
    for split, n in (("train", 96), ("dev", 40), ("test", 40)):
        lines = []
        for _ in range(n):
            label = rng.randrange(2)
            lines.append(f"{label} ||| {' '.join(rng.choices(filler, k=rng.randint(2, 8)))} {rng.choice(words[label])}\n")
        (work / "data" / f"easy-{split}.txt").write_text("".join(lines))
    (work / "data" / "easy-label-mapping.json").write_text(json.dumps(["bad", "good"]))
    env = {**os.environ, "MINILLAMA_TOKENIZER": str(tokenizer)}
    return work, env


def run(workdir, *args, base="tiny.pt"):
    """run_llama.py in the work directory, on the model `base` unless args say otherwise (None: no model given)."""
    work, env = workdir
    started = time.time()
    model = ["--pretrained-model-path", base] if base else []
    result = subprocess.run([sys.executable, str(ROOT / "run_llama.py"), *model, "--quiet", *args],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    print(f"run_llama {' '.join(args[:2])}: {time.time() - started:.1f}s")
    return result


def data_args(name, kind):
    return ["--train", f"data/{name}-train.txt", "--dev", f"data/{name}-dev.txt", "--test", f"data/{name}-test.txt",
            "--label-names", f"data/{name}-label-mapping.json",
            "--dev_out", f"{name}-dev-{kind}-output.txt", "--test_out", f"{name}-test-{kind}-output.txt"]


def check_outputs(work, name, kind):
    """Each output has one `label ||| sentence` line per input line, in input order."""
    for split in ("dev", "test"):
        inputs = (work / "data" / f"{name}-{split}.txt").read_text().splitlines()
        outputs = (work / f"{name}-{split}-{kind}-output.txt").read_text().splitlines()
        assert len(outputs) == len(inputs)
        for out, line in zip(outputs, inputs):
            label, sep, sentence = out.partition(" ||| ")
            assert sep and label.isdigit() and sentence == line.partition(" ||| ")[2].strip()


def accuracy(stdout, split):
    return float(next(line for line in stdout.splitlines() if line.startswith(f"{split} acc ::")).split("::")[1])


def test_generate(workdir):
    result = run(workdir, "--option", "generate")
    assert result.returncode == 0, result.stderr
    work = workdir[0]
    for temp in (0, 1):
        text = (work / f"generated-sentence-temp-{temp}.txt").read_text()
        assert text.startswith("Victor Frankenstein, a young scientist") and len(text) > 150
    assert "Temperature is 0.0" in result.stdout and "Temperature is 1.0" in result.stdout


def test_generate_is_reproducible_with_seed(workdir):
    work = workdir[0]
    texts = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        # epsilon below the course's 0.05: this random model has no second token that likely
        result = run(workdir, "--option", "generate", "--pretrained-model-path", "lively.pt", "--seed", seed,
                     "--epsilon", "0.001", "--generated_sentence_high_temp_out", f"{name}.txt")
        assert result.returncode == 0, result.stderr
        texts[name] = (work / f"{name}.txt").read_text()
    assert texts["a"] == texts["b"] and texts["a"] != texts["c"]


@pytest.mark.parametrize("name", ["sst", "cfimdb"])
def test_prompt(workdir, name):
    result = run(workdir, "--option", "prompt", "--batch_size", "10", *data_args(name, "prompting"))
    assert result.returncode == 0, result.stderr
    assert 0.0 <= accuracy(result.stdout, "dev") <= 1.0 and "test acc ::" in result.stdout
    check_outputs(workdir[0], name, "prompting")


@pytest.mark.parametrize("option,kind,lr", [("finetune", "finetuning", "1e-3"), ("lora", "lora", "1e-2")])
def test_training_beats_chance_on_easy_task(workdir, option, kind, lr):
    result = run(workdir, "--option", option, "--epochs", "4", "--lr", lr, "--batch_size", "8",
                 "--hidden_dropout_prob", "0.0", "--filepath", f"{option}.pt", *data_args("easy", kind))
    assert result.returncode == 0, result.stderr
    assert "epoch 3: train loss ::" in result.stdout
    assert accuracy(result.stdout, "dev") >= 0.8, result.stdout
    check_outputs(workdir[0], "easy", kind)
    saved = torch.load(workdir[0] / f"{option}.pt", weights_only=True)
    if option == "lora":  # adapters and head only
        assert all("lora_" in k or k.startswith("classifier_head") for k in saved["model"])
    assert saved["model_args"]["causal"] is False  # tiny.pt is a plain stories42M-format file: course semantics


def test_pooling_and_causal_flags_reach_the_model_and_the_checkpoint(workdir):
    for args, causal in ((["--pooling", "last_real", "--causal"], True), (["--no-causal"], False)):
        result = run(workdir, "--option", "finetune", "--epochs", "1", "--batch_size", "16", "--filepath", "flags.pt",
                     *args, *data_args("easy", "finetuning"))
        assert result.returncode == 0, result.stderr
        saved = torch.load(workdir[0] / "flags.pt", weights_only=True)
        assert saved["model_args"]["causal"] is causal and saved["model_config"]["causal"] is causal
        assert saved["model_config"]["pooling"] == ("last_real" if causal else "course")
        check_outputs(workdir[0], "easy", "finetuning")


def test_finetune_on_real_data_slice(workdir):
    result = run(workdir, "--option", "finetune", "--epochs", "1", "--batch_size", "16", *data_args("sst", "finetuning"))
    assert result.returncode == 0, result.stderr
    check_outputs(workdir[0], "sst", "finetuning")


def bad_run(workdir, tmp_name, content, flag="--dev"):
    work = workdir[0]
    if isinstance(content, bytes):
        (work / "data" / tmp_name).write_bytes(content)
    elif content is not None:  # None: the path is already there (e.g. a directory)
        (work / "data" / tmp_name).write_text(content)
    args = data_args("easy", "prompting")
    args[args.index(flag) + 1] = f"data/{tmp_name}"
    args[args.index("--dev_out") + 1] = "bad-dev-prompting-output.txt"
    args[args.index("--test_out") + 1] = "bad-test-prompting-output.txt"
    result = run(workdir, "--option", "prompt", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert not (work / "bad-dev-prompting-output.txt").exists() and not (work / "bad-test-prompting-output.txt").exists()
    return result.stderr


@pytest.mark.parametrize("content,message", [
    ("1 ||| fine\nno separator here\n", "bad.txt:2: expected `label ||| sentence`"),
    ("1 ||| fine\nx ||| what\n", "bad.txt:2: label 'x' is not an integer"),
    ("1 ||| fine\n0 ||| ok\n7 ||| seven\n", "bad.txt:3: label 7 is outside 0..1"),
    ("", "bad.txt: no examples (empty file)"),
    ("1 ||| fine\n\n0 ||| ok\n", "bad.txt:2: blank line"),
    (b"1 ||| fine\n0 ||| na\xefve\n", "bad.txt:2: not UTF-8 text (byte 0xef)"),
    ("1 ||| fine\n-1 ||| unknown\n", "bad.txt:2: label -1 (unknown) in a file with known labels"),
])
def test_bad_data_lines(workdir, content, message):
    assert message in bad_run(workdir, "bad.txt", content)


def test_data_path_is_a_directory(workdir):
    (workdir[0] / "data" / "adir").mkdir(exist_ok=True)
    assert "adir: cannot read the data file (Is a directory)" in bad_run(workdir, "adir", None)


def test_label_mapping_disagreeing_with_data(workdir):
    stderr = bad_run(workdir, "three.json", json.dumps(["only-one"]), flag="--label-names")
    assert "label 1 is outside 0..0" in stderr and "easy-dev.txt" in stderr


def test_missing_checkpoint(workdir):
    work, env = workdir
    result = subprocess.run([sys.executable, str(ROOT / "run_llama.py"), "--option", "generate"],
                            cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "stories42M.pt not found" in result.stderr and "--pretrained-model-path" in result.stderr
    assert "Traceback" not in result.stderr


def test_finetune_is_reproducible_with_seed(workdir):
    work = workdir[0]
    outputs = []
    for _ in range(2):
        result = run(workdir, "--option", "finetune", "--epochs", "1", "--lr", "1e-3", "--seed", "7",
                     "--filepath", "repro.pt", *data_args("easy", "finetuning"))
        assert result.returncode == 0, result.stderr
        outputs.append((result.stdout.split("trainable")[1], (work / "easy-dev-finetuning-output.txt").read_text(),
                        torch.load(work / "repro.pt", weights_only=True)["model"]["classifier_head.weight"]))
    (log_a, dev_a, head_a), (log_b, dev_b, head_b) = outputs
    assert dev_a == dev_b and torch.equal(head_a, head_b)
    assert log_a.split("done in")[0] == log_b.split("done in")[0]  # same losses and accuracies


@pytest.mark.parametrize("option,kind", [("prompt", "prompting"), ("finetune", "finetuning")])
def test_unknown_test_labels_give_predictions_but_no_accuracy(workdir, option, kind):
    """The course's cfimdb-test.txt labels every line -1: predictions are written, accuracy is not scored."""
    work = workdir[0]
    lines = (work / "data" / "easy-test.txt").read_text().splitlines()
    (work / "data" / "unlabelled-test.txt").write_text("".join(f"-1 ||| {line.partition(' ||| ')[2]}\n" for line in lines))
    args = data_args("easy", kind)
    args[args.index("--test") + 1] = "data/unlabelled-test.txt"
    result = run(workdir, "--option", option, "--epochs", "1", "--filepath", "unlabelled.pt", *args)
    assert result.returncode == 0, result.stderr
    assert "test acc :: unavailable (labels are -1 placeholders)" in result.stdout
    assert 0.0 <= accuracy(result.stdout, "dev") <= 1.0
    outputs = (work / f"easy-test-{kind}-output.txt").read_text().splitlines()
    assert len(outputs) == len(lines) and all(out.split(" ||| ")[0] in ("0", "1") for out in outputs)


@pytest.mark.parametrize("option", ["generate", "prompt"])
def test_checkpoint_vocab_smaller_than_tokenizer(workdir, option):
    work = workdir[0]
    save_stories_pt(tiny_model(vocab_size=512), work / "small-vocab.pt")
    args = data_args("easy", "prompting")[:8] + ["--dev_out", "sv-dev-prompting-output.txt",
                                                 "--test_out", "sv-test-prompting-output.txt"]
    result = run(workdir, "--option", option, "--pretrained-model-path", "small-vocab.pt",
                 "--generated_sentence_low_temp_out", "sv-0.txt", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "small-vocab.pt" in result.stderr and "512" in result.stderr and "32000" in result.stderr
    assert not any((work / name).exists() for name in ("sv-0.txt", "sv-dev-prompting-output.txt"))


def test_training_keeps_the_first_of_equally_good_epochs(workdir, monkeypatch):
    """Best dev accuracy strictly improves to replace the checkpoint: ties keep the earlier epoch."""
    import run_llama

    work, env = workdir
    monkeypatch.chdir(work)
    monkeypatch.setenv("MINILLAMA_TOKENIZER", env["MINILLAMA_TOKENIZER"])
    accuracies = iter([0.9, 0.5, 0.9, 0.5, 0.9, 0.5])  # (train, dev) per epoch: dev ties at 0.5
    monkeypatch.setattr(run_llama, "model_eval", lambda data, *a, **k: (next(accuracies), [], []))
    saved = []
    monkeypatch.setattr(run_llama, "save_classifier", lambda model, config, path: saved.append(1))
    args = run_llama.get_args(["--option", "finetune", "--epochs", "3", "--batch_size", "16", "--quiet",
                               "--pretrained-model-path", "tiny.pt", *data_args("easy", "finetuning")])
    args.pad_id = 0
    run_llama.train(args, torch.device("cpu"))
    assert len(saved) == 1


def test_zero_shot_suffix_is_the_courses_prompt():
    from run_llama import zero_shot_suffix

    assert zero_shot_suffix(["bad", "good"]) == "Is this movie bad or good? This movie is "
    assert zero_shot_suffix(["terrible", "bad", "okay", "good", "great"]) == \
        "Is this movie terrible, bad, okay, good, or great? This movie is "


def test_batches_pad_with_the_pad_id_on_the_right():
    from run_llama import batches

    data = [(0, [1, 5, 6], "a"), (1, [1, 7], "b")]
    ids, lengths, labels, sents = next(batches(data, 2, pad_id=9))
    assert ids.tolist() == [[1, 5, 6], [1, 7, 9]] and lengths.tolist() == [3, 2]
    assert labels.tolist() == [0, 1] and sents == ["a", "b"]


@pytest.mark.parametrize("option,kind,lr", [("finetune", "finetuning", "1e-3"), ("lora", "lora", "1e-2")])
def test_predict_reloads_a_saved_classifier(workdir, option, kind, lr):
    """--option predict writes what the training run wrote for the same test file (the classifier keeps its
    batch size, on which the course's pooling depends); a fine-tuned classifier needs no other file, a LoRA
    one its base model (--pretrained-model-path when it has moved). Training also wrote its log."""
    work = workdir[0]
    (work / "moved-base.pt").write_bytes((work / "tiny.pt").read_bytes())
    result = run(workdir, "--option", option, "--pretrained-model-path", "moved-base.pt", "--epochs", "2", "--lr", lr,
                 "--batch_size", "16", "--filepath", f"saved-{option}.pt", *data_args("easy", kind))
    assert result.returncode == 0, result.stderr
    expected = (work / f"easy-test-{kind}-output.txt").read_text()
    log = (work / f"saved-{option}-log.csv").read_text().splitlines()
    assert log[0] == "epoch,step,lr,train_loss,train_acc,dev_acc,elapsed" and [r.split(",")[:2] for r in log[1:]] == \
        [["1", "6"], ["2", "12"]]  # 96 training sentences in batches of 16
    (work / "moved-base.pt").unlink()
    predict = ["--option", "predict", "--classifier", f"saved-{option}.pt", "--test", "data/easy-test.txt",
               "--test_out", f"predicted-{option}.txt"]
    if option == "lora":
        result = run(workdir, *predict[:-2], "--test_out", "never.txt", base=None)
        assert result.returncode == 2 and "moved-base.pt not found" in result.stderr
        assert "--pretrained-model-path" in result.stderr and not (work / "never.txt").exists()
        result = run(workdir, *predict, "--pretrained-model-path", "tiny.pt", base=None)
    else:
        result = run(workdir, *predict, base=None)
    assert result.returncode == 0, result.stderr
    assert (work / f"predicted-{option}.txt").read_text() == expected
    assert "test acc ::" in result.stdout


def test_predict_needs_a_classifier(workdir):
    work = workdir[0]
    for args, message in ((["--test_out", "p.txt"], "--option predict needs --classifier CKPT"),
                          (["--classifier", "tiny.pt", "--test_out", "p.txt"], "tiny.pt: not a classifier checkpoint")):
        result = run(workdir, "--option", "predict", "--test", "data/easy-test.txt", *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (work / "p.txt").exists()


@pytest.fixture(scope="module")
def short_context(workdir):
    """A model whose context (16 tokens) is shorter than most CFIMDB reviews."""
    save_stories_pt(tiny_model(vocab_size=32000, max_seq_len=16), workdir[0] / "short.pt")
    return "short.pt"


@pytest.mark.parametrize("option,kind,pooling", [("prompt", "prompting", "course"), ("prompt", "prompting", "last_real"),
                                                 ("finetune", "finetuning", "course")])
def test_sentences_longer_than_the_context_are_cut_to_fit(workdir, short_context, option, kind, pooling):
    result = run(workdir, "--option", option, "--pretrained-model-path", short_context, "--epochs", "1",
                 "--pooling", pooling, *data_args("cfimdb", kind))
    assert result.returncode == 0, result.stderr
    n = len((workdir[0] / "data" / "cfimdb-dev.txt").read_text().splitlines())
    warning = [line for line in result.stderr.splitlines() if "data/cfimdb-dev.txt" in line]
    assert len(warning) == 1 and f"of {n} sentences are longer than the model's context" in warning[0]
    check_outputs(workdir[0], "cfimdb", kind)


def test_generate_takes_a_prompt_and_a_number_of_tokens(workdir):
    from tokenizer import Tokenizer

    work = workdir[0]
    result = run(workdir, "--option", "generate", "--pretrained-model-path", "lively.pt", "--prompt", "Once upon a time",
                 "--max_new_tokens", "7", "--generated_sentence_low_temp_out", "p0.txt",
                 "--generated_sentence_high_temp_out", "p1.txt", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer(tokenizer_model=workdir[1]["MINILLAMA_TOKENIZER"])
    for name in ("p0.txt", "p1.txt"):
        text = (work / name).read_text()
        assert text.startswith("Once upon a time")
        assert len(tokenizer.encode(text, bos=False, eos=False)) <= len(tokenizer.encode("Once upon a time", False, False)) + 7


def test_generation_longer_than_the_context_is_refused(workdir, short_context):
    result = run(workdir, "--option", "generate", "--pretrained-model-path", short_context, "--prompt", "Hello there",
                 "--max_new_tokens", "20", "--generated_sentence_low_temp_out", "long-0.txt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "context of 16 tokens" in result.stderr and "--max_new_tokens" in result.stderr
    assert not (workdir[0] / "long-0.txt").exists()


@pytest.mark.parametrize("args,message", [
    (["--use_gpu", "--device", "cpu"], "--use_gpu means --device cuda"),
    (["--device", "mps"], "MPS backend is not available"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_unavailable_or_conflicting_devices_are_refused(workdir, args, message):
    if "cuda" in args and torch.cuda.is_available() or "mps" in args and torch.backends.mps.is_available():
        pytest.skip("the device is available here")
    result = run(workdir, "--option", "generate", *args, "--generated_sentence_low_temp_out", "dev-0.txt")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (workdir[0] / "dev-0.txt").exists()


@pytest.mark.parametrize("option", ["finetune", "lora", "predict"])
def test_checkpoint_vocab_smaller_than_tokenizer_in_training_and_predict(workdir, option):
    work = workdir[0]
    save_stories_pt(tiny_model(vocab_size=512), work / "small-vocab.pt")
    if option == "predict":  # a LoRA classifier of the right shape, onto the small-vocabulary base
        trained = run(workdir, "--option", "lora", "--epochs", "1", "--filepath", "sv-lora.pt", *data_args("easy", "lora"))
        assert trained.returncode == 0, trained.stderr
        args = ["--classifier", "sv-lora.pt", "--test", "data/easy-test.txt", "--test_out", "sv-test-out.txt"]
    else:
        args = ["--filepath", "sv.pt", *data_args("easy", "finetuning")[:8], "--dev_out", "sv-dev-finetuning-output.txt",
                "--test_out", "sv-test-out.txt"]
    result = run(workdir, "--option", option, "--pretrained-model-path", "small-vocab.pt", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "small-vocab.pt" in result.stderr and "512" in result.stderr and "32000" in result.stderr
    assert not any((work / name).exists() for name in ("sv.pt", "sv-test-out.txt", "sv-dev-finetuning-output.txt"))


def test_qlora_with_8bit_adamw_trains_and_its_classifier_reloads(workdir):
    """--option lora --quantize nf4 --optim adamw8bit (QLoRA, issue 15): the backbone's linear layers are
    NF4 while training, the easy task is learned, and predict rebuilds the same quantized backbone (the
    adapters were trained on it) to write the same predictions. --quantize on other options is refused."""
    work = workdir[0]
    result = run(workdir, "--option", "lora", "--quantize", "nf4", "--optim", "adamw8bit", "--epochs", "4",
                 "--lr", "1e-2", "--batch_size", "8", "--hidden_dropout_prob", "0.0", "--filepath", "qlora.pt",
                 *data_args("easy", "qlora"))
    assert result.returncode == 0, result.stderr
    assert accuracy(result.stdout, "dev") >= 0.8, result.stdout
    saved = torch.load(work / "qlora.pt", weights_only=False)
    assert saved["model_config"]["quantize"] == "nf4"
    assert not any("compute_query.base.weight" in k for k in saved["model"])   # adapters and head only
    predicted = run(workdir, "--option", "predict", "--classifier", "qlora.pt", "--test", "data/easy-test.txt",
                    "--test_out", "qlora-predicted.txt", base=None)
    assert predicted.returncode == 0, predicted.stderr
    assert (work / "qlora-predicted.txt").read_text() == (work / "easy-test-qlora-output.txt").read_text()
    refused = run(workdir, "--option", "finetune", "--quantize", "nf4", *data_args("easy", "never"))
    assert refused.returncode == 2 and "--quantize nf4 applies to --option lora" in refused.stderr
    assert not (work / "easy-test-never-output.txt").exists()

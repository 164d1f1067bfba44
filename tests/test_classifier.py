"""Classifiers: the course mode computes what the course's code computes (checked against an independent
re-implementation); last_real reads each sentence's last real token, so its batch never changes its result."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from classifier import LlamaEmbeddingClassifier, LlamaZeroShotClassifier
from course_reference import course_embedding_classifier, course_forward, course_zero_shot
from helpers import save_stories_pt, tiny_model


class FakeTokenizer:
    pad_id = 0

    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, s, bos, eos):
        return [self.vocab[w] for w in s.split()]


@pytest.fixture
def checkpoint(tmp_path):
    save_stories_pt(tiny_model(), tmp_path / "tiny.pt")
    return tmp_path / "tiny.pt"


def padded(rows, pad=0):
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


ROWS = [[1, 5, 9], [1, 7, 8, 9, 10, 11, 12], [1, 4], [1, 30, 31, 32, 33]]


def classifier_config(checkpoint, **overrides):
    config = dict(pretrained_model_path=checkpoint, num_labels=3, option="finetune", hidden_dropout_prob=0.3,
                  lora_rank=4, lora_alpha=1.0, pooling="course", causal=None)
    return SimpleNamespace(**{**config, **overrides})


def reference_forward(checkpoint):
    saved = torch.load(checkpoint, weights_only=True)
    return lambda tokens: course_forward(saved["model"], saved["model_args"], tokens)


def test_course_embedding_classifier_equals_the_course_code(checkpoint):
    model = LlamaEmbeddingClassifier(classifier_config(checkpoint)).eval()
    ids, lengths = padded(ROWS, pad=3)
    with torch.no_grad():
        ours = model(ids, lengths)
        head = model.classifier_head
        theirs = course_embedding_classifier(reference_forward(checkpoint), ids, head.weight, head.bias)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # the course's hidden[:, -1] reads padding (attended by every position): a short row's result
    # depends on its batch
    assert not torch.allclose(ours[0], model(torch.tensor([ROWS[0]]))[0], atol=1e-3)


def test_course_zero_shot_equals_the_course_code(checkpoint):
    tokenizer = FakeTokenizer({"bad": 20, "good": 21, "very": 22, "nice": 23})
    labels = ["bad", "good", "very nice"]
    model = LlamaZeroShotClassifier(classifier_config(checkpoint), tokenizer, labels).eval()
    ids, lengths = padded(ROWS, pad=3)
    with torch.no_grad():
        ours = model(ids, lengths)
        theirs = course_zero_shot(reference_forward(checkpoint), ids, [[20], [21], [22, 23]])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("causal", [False, True])
def test_last_real_embedding_classifier_is_independent_of_batch(checkpoint, causal):
    model = LlamaEmbeddingClassifier(classifier_config(checkpoint, pooling="last_real", causal=causal)).eval()
    assert model.llama.config.causal is causal
    ids, lengths = padded(ROWS)
    batch = model(ids, lengths)
    for i, row in enumerate(ROWS):
        alone = model(torch.tensor([row]))
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=0)


def test_embedding_classifier_applies_dropout_in_training_only(checkpoint):
    model = LlamaEmbeddingClassifier(classifier_config(checkpoint, hidden_dropout_prob=0.9))
    ids, lengths = padded(ROWS)
    model.llama.eval()  # the backbone's own dropout is 0 here; only the head's is under test
    torch.manual_seed(0)
    first = model(ids, lengths)
    torch.manual_seed(1)
    assert not torch.allclose(first, model(ids, lengths))  # train mode: dropout on the last hidden state
    model.eval()
    torch.testing.assert_close(model(ids, lengths), model(ids, lengths), atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_last_real_zero_shot_scores_label_continuations(checkpoint, causal):
    tokenizer = FakeTokenizer({"bad": 20, "good": 21, "very": 22, "nice": 23})
    labels = ["bad", "good", "very nice"]
    config = classifier_config(checkpoint, pooling="last_real", causal=causal)
    model = LlamaZeroShotClassifier(config, tokenizer, labels).eval()
    ids, lengths = padded(ROWS)
    with torch.no_grad():
        scores = model(ids, lengths)
        for i, row in enumerate(ROWS):
            # reference: each label token's log-probability after the prompt and the label's earlier
            # tokens, one unpadded sequence at a time
            for j, label_ids in enumerate([[20], [21], [22, 23]]):
                expected = 0.0
                for k, token in enumerate(label_ids):
                    logits, _ = model.llama(torch.tensor([row + label_ids[:k]]))
                    expected += F.log_softmax(logits[0, -1], dim=-1)[token]
                torch.testing.assert_close(scores[i, j], expected, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_zero_shot_without_lengths_reads_the_last_position(checkpoint):
    tokenizer = FakeTokenizer({"bad": 20, "good": 21})
    model = LlamaZeroShotClassifier(classifier_config(checkpoint, num_labels=2, pooling="last_real"), tokenizer,
                                    ["bad", "good"]).eval()
    ids = torch.tensor([[1, 5, 9, 12], [1, 7, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, torch.full((2,), 4)), atol=0, rtol=0)
        assert not torch.allclose(model(ids), model(ids, torch.full((2,), 3)))  # the position matters


def test_lora_option_trains_only_adapters_and_head(checkpoint):
    config = classifier_config(checkpoint, num_labels=2, option="lora", hidden_dropout_prob=0.0, lora_rank=2)
    model = LlamaEmbeddingClassifier(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier_head") for n in trainable)
    assert any(n.startswith("classifier_head") for n in trainable)


@pytest.mark.parametrize("option", ["finetune", "lora"])
def test_a_saved_classifier_loads_back_to_the_same_scores(checkpoint, tmp_path, option):
    """save_classifier / load_classifier round trip; a fine-tuned classifier is rebuilt from its own file (its
    backbone's shape from the saved model_args), a LoRA one needs its base checkpoint (or a replacement path)."""
    from checkpoint import load_classifier, save_classifier
    from utils import CheckpointError

    config = SimpleNamespace(hidden_dropout_prob=0.0, pretrained_model_path=str(checkpoint), num_labels=3,
                             option=option, lora_rank=2, lora_alpha=1.0, pooling="last_real", causal=None, batch_size=4)
    model = LlamaEmbeddingClassifier(config)
    with torch.no_grad():  # trained-looking weights: every tensor the file must carry moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_classifier(model, config, tmp_path / "clf.pt")
    ids, lengths = padded(ROWS)
    expected = model.eval()(ids, lengths)
    moved = tmp_path / "moved.pt"
    checkpoint.rename(moved)
    if option == "lora":
        with pytest.raises(FileNotFoundError, match="tiny.pt not found"):
            load_classifier(tmp_path / "clf.pt")
        loaded, settings = load_classifier(tmp_path / "clf.pt", pretrained_model_path=moved)
    else:
        loaded, settings = load_classifier(tmp_path / "clf.pt")
    assert settings.batch_size == 4 and settings.option == option
    torch.testing.assert_close(loaded.eval()(ids, lengths), expected, rtol=0, atol=0)
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="other.pt"):
        load_classifier(tmp_path / "other.pt")

"""Classifiers read the last real token, so batch composition never changes a sentence's result."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from classifier import LlamaEmbeddingClassifier, LlamaZeroShotClassifier
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


def test_embedding_classifier_is_independent_of_batch(checkpoint):
    config = SimpleNamespace(pretrained_model_path=checkpoint, num_labels=3, option="finetune",
                             hidden_dropout_prob=0.3, lora_rank=4, lora_alpha=1.0)
    model = LlamaEmbeddingClassifier(config).eval()
    ids, lengths = padded(ROWS)
    batch = model(ids, lengths)
    for i, row in enumerate(ROWS):
        alone = model(torch.tensor([row]))
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=0)
    # the course's hidden[:, -1] would have read padding: it differs for the short rows
    _, hidden = model.llama(ids)
    course = F.log_softmax(model.classifier_head(hidden[:, -1]), dim=-1)
    assert not torch.allclose(course[0], batch[0], atol=1e-3)


def test_embedding_classifier_applies_dropout_in_training_only(checkpoint):
    config = SimpleNamespace(pretrained_model_path=checkpoint, num_labels=3, option="finetune",
                             hidden_dropout_prob=0.9, lora_rank=4, lora_alpha=1.0)
    model = LlamaEmbeddingClassifier(config)
    ids, lengths = padded(ROWS)
    model.llama.eval()  # the backbone's own dropout is 0 here; only the head's is under test
    torch.manual_seed(0)
    first = model(ids, lengths)
    torch.manual_seed(1)
    assert not torch.allclose(first, model(ids, lengths))  # train mode: dropout on the last hidden state
    model.eval()
    torch.testing.assert_close(model(ids, lengths), model(ids, lengths), atol=0, rtol=0)


def test_zero_shot_scores_label_continuations(checkpoint):
    torch.manual_seed(0)
    tokenizer = FakeTokenizer({"bad": 20, "good": 21, "very": 22, "nice": 23})
    labels = ["bad", "good", "very nice"]
    model = LlamaZeroShotClassifier(SimpleNamespace(pretrained_model_path=checkpoint, num_labels=3), tokenizer, labels).eval()
    ids, lengths = padded(ROWS)
    with torch.no_grad():
        scores = model(ids, lengths)
        for i, row in enumerate(ROWS):
            # reference: the log-probability of each label's tokens after the prompt, one sequence at a time
            for j, label_ids in enumerate([[20], [21], [22, 23]]):
                seq = torch.tensor([row + label_ids])
                logits, _ = model.llama(seq, targets=seq)
                logp = F.log_softmax(logits[0], dim=-1)
                expected = sum(logp[len(row) - 1 + k, t] for k, t in enumerate(label_ids))
                torch.testing.assert_close(scores[i, j], expected, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())


def test_zero_shot_without_lengths_reads_the_last_position(checkpoint):
    tokenizer = FakeTokenizer({"bad": 20, "good": 21})
    model = LlamaZeroShotClassifier(SimpleNamespace(pretrained_model_path=checkpoint, num_labels=2), tokenizer,
                                    ["bad", "good"]).eval()
    ids = torch.tensor([[1, 5, 9, 12], [1, 7, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, torch.full((2,), 4)), atol=0, rtol=0)
        assert not torch.allclose(model(ids), model(ids, torch.full((2,), 3)))  # the position matters


def test_lora_option_trains_only_adapters_and_head(checkpoint):
    config = SimpleNamespace(pretrained_model_path=checkpoint, num_labels=2, option="lora",
                             hidden_dropout_prob=0.0, lora_rank=2, lora_alpha=1.0)
    model = LlamaEmbeddingClassifier(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier_head") for n in trainable)
    assert any(n.startswith("classifier_head") for n in trainable)

"""Sentence classifiers on top of a pretrained Llama, in two pooling modes.

Batches are right-padded to their longest sentence with the tokenizer's pad piece.

pooling="course" (the default) computes what the course's given code computes, so accuracies are
comparable with its reference numbers: the model runs over the padded batch (pads attended, as the
course's model attends to every position), the zero-shot classifier sums each label's token
log-probabilities at the last position of the batch, and the embedding classifier reads
`hidden[:, -1]`. For every sentence but the longest, that position is padding.

pooling="last_real" reads each sentence's last real token and masks the pads, so a sentence's result
does not depend on what else is in its batch, and scores a multi-token label token after token.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import Llama, load_pretrained

POOLINGS = ("course", "last_real")


def load_backbone(config, backbone=None):
    """The pretrained Llama; config.causal (when set and not None) overrides the checkpoint's masking.
    With `backbone` (a LlamaConfig) a freshly initialised Llama of that shape instead, for weights that
    are loaded next (a saved fine-tuned classifier holds them all)."""
    if backbone is not None:
        return Llama(backbone)
    causal = getattr(config, "causal", None)
    return load_pretrained(config.pretrained_model_path, **({} if causal is None else {"causal": causal}))


def real_tokens(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) True on each row's first lengths[row] positions."""
    return torch.arange(input_ids.shape[1], device=input_ids.device) < lengths.to(input_ids.device)[:, None]


def last_real(hidden: torch.Tensor, lengths) -> torch.Tensor:
    """hidden (batch, seqlen, dim) -> (batch, dim) at position lengths - 1 of each row."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.to(hidden.device) - 1]


class LlamaZeroShotClassifier(nn.Module):
    """Scores each label name by how likely the model finds it as the continuation of the prompt.
    No parameters are trained."""

    def __init__(self, config, tokenizer, label_names):
        super().__init__()
        self.num_labels = config.num_labels
        self.pooling = getattr(config, "pooling", "course")
        self.llama = load_backbone(config)
        for param in self.llama.parameters():
            param.requires_grad = False
        assert len(label_names) == self.num_labels
        self.tokenizer = tokenizer
        self.label_name_ids = [tokenizer.encode(label, bos=False, eos=False) for label in label_names]

    def forward(self, input_ids, lengths=None):
        """Returns (batch, num_labels) scores (log-probabilities); lengths (batch,) counts real tokens."""
        if self.pooling == "course" or lengths is None:
            return self.course_scores(input_ids)
        return self.sequential_scores(input_ids, lengths)

    def course_scores(self, input_ids):
        """The course's score: log p(token | batch) summed over the label's tokens, all read at the
        batch's last position (for single-token label names, the label's log-probability)."""
        logits, _ = self.llama(input_ids)  # (batch, 1, vocab): the last position only
        log_probs = F.log_softmax(logits[:, -1].float(), dim=-1)
        return torch.stack([log_probs[:, ids].sum(dim=-1) for ids in self.label_name_ids], dim=1)

    def sequential_scores(self, input_ids, lengths):
        """log p(label tokens | sentence + prompt), one token after another, each row alone: the
        label is written after the row's real tokens and every later position is masked."""
        lengths = lengths.to(input_ids.device)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        longest = max(len(ids) for ids in self.label_name_ids)
        extended = F.pad(input_ids, (0, longest - 1), value=self.tokenizer.pad_id)
        log_probs = {}  # label prefix -> (batch, vocab) log-probabilities of the next token

        def next_token_log_probs(prefix):
            if prefix not in log_probs:
                for j, token in enumerate(prefix):
                    extended[rows, lengths + j] = token
                n = lengths + len(prefix)
                _, hidden = self.llama(extended, key_valid=real_tokens(extended, n))
                log_probs[prefix] = F.log_softmax(self.llama.output(last_real(hidden, n)).float(), dim=-1)
            return log_probs[prefix]

        scores = [sum(next_token_log_probs(tuple(ids[:j]))[:, token] for j, token in enumerate(ids))
                  for ids in self.label_name_ids]
        return torch.stack(scores, dim=1)


class LlamaEmbeddingClassifier(nn.Module):
    """A final hidden state -> dropout -> linear -> log-softmax over labels; which hidden state
    depends on config.pooling (see the module docstring).

    config.option: "finetune" trains every weight; "lora" freezes the Llama and trains LoRA
    adapters (config.lora_rank, config.lora_alpha) on the query and value projections. `backbone`
    (a LlamaConfig): start from a fresh Llama of that shape, not the pretrained checkpoint (load_backbone)."""

    def __init__(self, config, backbone=None):
        super().__init__()
        self.num_labels = config.num_labels
        self.pooling = getattr(config, "pooling", "course")
        self.llama = load_backbone(config, backbone)
        for param in self.llama.parameters():
            param.requires_grad = config.option == "finetune"
        if config.option == "lora":
            from lora import inject_lora

            inject_lora(self.llama, rank=config.lora_rank, alpha=config.lora_alpha)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier_head = nn.Linear(self.llama.config.dim, self.num_labels)

    def forward(self, input_ids, lengths=None):
        if self.pooling == "course" or lengths is None:
            _, hidden = self.llama(input_ids)
            pooled = hidden[:, -1]
        else:
            _, hidden = self.llama(input_ids, key_valid=real_tokens(input_ids, lengths))
            pooled = last_real(hidden, lengths)
        logits = self.classifier_head(self.dropout(pooled))
        return F.log_softmax(logits.float(), dim=-1)

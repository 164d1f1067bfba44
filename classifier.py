"""Sentence classifiers on top of a pretrained Llama.

Batches are right-padded, so the course's `hidden[:, -1]` reads padding for every sentence but the
longest. Both classifiers take `lengths` and read each sentence's last *real* token instead; with
a causal model that makes a sentence's result independent of what else is in its batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import load_pretrained


def last_real(hidden: torch.Tensor, lengths) -> torch.Tensor:
    """hidden (batch, seqlen, dim) -> (batch, dim) at position lengths - 1 of each row."""
    if lengths is None:
        return hidden[:, -1]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.to(hidden.device) - 1]


class LlamaZeroShotClassifier(nn.Module):
    """Scores each label name by its log-probability as the continuation of the prompt:
    log p(label tokens | sentence + prompt suffix). No parameters are trained."""

    def __init__(self, config, tokenizer, label_names):
        super().__init__()
        self.num_labels = config.num_labels
        self.llama = load_pretrained(config.pretrained_model_path)
        for param in self.llama.parameters():
            param.requires_grad = False
        assert len(label_names) == self.num_labels
        self.tokenizer = tokenizer
        self.label_name_ids = [tokenizer.encode(label, bos=False, eos=False) for label in label_names]

    def forward(self, input_ids, lengths=None):
        """Returns (batch, num_labels) log-probabilities of each label's tokens."""
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        _, hidden = self.llama(input_ids)
        first = F.log_softmax(self.llama.output(last_real(hidden, lengths)).float(), dim=-1)
        scores = []
        for ids in self.label_name_ids:
            score = first[:, ids[0]]
            if len(ids) > 1:
                score = score + self._rest_log_prob(input_ids, lengths, ids)
            scores.append(score)
        return torch.stack(scores, dim=1)

    def _rest_log_prob(self, input_ids, lengths, ids):
        """log p(ids[1:] | prompt, ids[0]) for multi-token labels: append the label to each row
        (right after its real tokens) and read the predictions at the appended positions."""
        batch, seqlen = input_ids.shape
        extended = F.pad(input_ids, (0, len(ids) - 1), value=self.tokenizer.pad_id)
        rows = torch.arange(batch, device=input_ids.device)
        for j, token in enumerate(ids[:-1]):
            extended[rows, lengths + j] = token
        _, hidden = self.llama(extended)
        total = torch.zeros(batch, device=input_ids.device)
        for j, token in enumerate(ids[1:]):
            logits = self.llama.output(hidden[rows, lengths + j]).float()
            total += F.log_softmax(logits, dim=-1)[:, token]
        return total


class LlamaEmbeddingClassifier(nn.Module):
    """The last real token's final hidden state -> dropout -> linear -> log-softmax over labels.

    config.option: "finetune" trains every weight; "lora" freezes the Llama and trains LoRA
    adapters (config.lora_rank, config.lora_alpha) on the query and value projections."""

    def __init__(self, config):
        super().__init__()
        self.num_labels = config.num_labels
        self.llama = load_pretrained(config.pretrained_model_path)
        for param in self.llama.parameters():
            param.requires_grad = config.option == "finetune"
        if config.option == "lora":
            from lora import inject_lora

            inject_lora(self.llama, rank=config.lora_rank, alpha=config.lora_alpha)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier_head = nn.Linear(self.llama.config.dim, self.num_labels)

    def forward(self, input_ids, lengths=None):
        _, hidden = self.llama(input_ids)
        logits = self.classifier_head(self.dropout(last_real(hidden, lengths)))
        return F.log_softmax(logits.float(), dim=-1)

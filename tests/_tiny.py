"""Tiny Hugging Face style models and data for trainer tests: a few thousand parameters, torch.nn only.

Both models have a dropout layer, so a resumed run matches an uninterrupted one only if the RNG state
is restored. `nan_after` makes the loss NaN from the given training forward call on, to test divergence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, TensorSplits

VOCAB = 24


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyClassifier(nn.Module):
    """Mean-pooled embeddings -> dropout -> linear head."""

    def __init__(self, num_labels: int = 3, dim: int = 16, dropout: float = 0.1, nan_after: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_labels)
        self.nan_after, self.calls = nan_after, 0

    def forward(self, input_ids, attention_mask=None, labels=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = (self.embed(input_ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        logits = self.head(self.dropout(h))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(self._poison(loss), logits)

    def _poison(self, loss):
        if self.training and loss is not None:
            self.calls += 1
            if self.nan_after is not None and self.calls >= self.nan_after:
                return loss * float("nan")
        return loss


class TinyCausalLM(TinyClassifier):
    """Embedding -> dropout -> MLP -> vocabulary logits at each position; loss shifted as HF does."""

    def __init__(self, dim: int = 16, dropout: float = 0.1, nan_after: int | None = None):
        super().__init__(num_labels=VOCAB, dim=dim, dropout=dropout, nan_after=nan_after)
        self.hidden = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.hidden(self.dropout(self.embed(input_ids)))))
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, VOCAB)
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return Output(self._poison(loss), logits)


def classification_data(n_train: int = 48, n_val: int = 16, n_test: int = 16, seq: int = 6,
                        seed: int = 0, flip_validation: bool = False) -> TensorSplits:
    """Label = which of tokens 1, 2, 3 appears most often: learnable by mean pooling."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int, flip: bool = False) -> dict:
        ids = torch.randint(1, 4, (n, seq), generator=g)
        ids[:, -2:] = torch.randint(4, VOCAB, (n, 2), generator=g)  # noise tokens
        labels = torch.stack([(ids == t).sum(1) for t in (1, 2, 3)], 1).argmax(1)
        if flip:
            labels = (labels + 1) % 3
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return TensorSplits(CLASSIFICATION, split(n_train), split(n_val, flip_validation), split(n_test),
                        labels=["one", "two", "three"])


def causal_lm_data(n_train: int = 32, n_val: int = 8, n_test: int = 8, seq: int = 8, seed: int = 0) -> TensorSplits:
    """Counting sequences (t, t+1, ...) mod VOCAB, right-padded at random lengths (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> dict:
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        ids = (start + torch.arange(seq)) % VOCAB
        lengths = torch.randint(3, seq + 1, (n,), generator=g)
        mask = (torch.arange(seq) < lengths.unsqueeze(1)).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return TensorSplits(CAUSAL_LM, split(n_train), split(n_val), split(n_test))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

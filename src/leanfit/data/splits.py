"""The data objects that travel between data loading, the trainer and the report.

`TextDataset` holds raw text splits; `TensorSplits` holds them tokenised. Both are plain data, so a
later step (trainer, report, cache) needs nothing but these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)


@dataclass
class TextDataset:
    """Raw splits. Classification rows are (text, label index); causal-LM rows are plain texts."""

    name: str
    task: str
    train: list
    validation: list
    test: list
    labels: list[str] | None = None  # class names, index = label id (classification only)
    info: dict = field(default_factory=dict)  # seed, sizes, source: written into reports

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


@dataclass
class TensorSplits:
    """Tokenised splits: each split is a dict with equal-length `input_ids`, `attention_mask`, `labels`.

    Classification: `labels` has shape (N,). Causal LM: `labels` equals `input_ids` (shape (N, T)),
    with -100 where there is padding; the model shifts them.
    """

    task: str
    train: dict[str, torch.Tensor]
    validation: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    labels: list[str] | None = None
    info: dict = field(default_factory=dict)

    def split(self, name: str) -> dict[str, torch.Tensor]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

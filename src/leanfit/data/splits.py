"""The data objects that travel between data loading, the trainer and the report.

`TextDataset` holds raw text splits (`data.images.ImageDataset` raw images); `TensorSplits` holds
them as model inputs. All are plain data, so a later step (trainer, report, cache) needs nothing
but these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)  # of text data (the user's own files)
IMAGE_CLASSIFICATION = "image-classification"
# The keys of a split that a model takes as inputs (besides `labels`): text or images.
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values")


def rows(split: dict[str, torch.Tensor]) -> int:
    """Number of rows in a split of model inputs (0 when it has none)."""
    key = next((k for k in ("input_ids", "pixel_values") if k in split), None)
    return 0 if key is None else len(split[key])


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
    """Model-input splits: each split is a dict with equal-length `input_ids`, `attention_mask`,
    `labels` (text) or `pixel_values`, `labels` (images).

    Classification: `labels` has shape (N,). Causal LM: `labels` equals `input_ids` (shape (N, T)),
    with -100 where there is padding; the model shifts them. `task` is the training objective, so
    image classification travels as CLASSIFICATION: one label per row, scored by accuracy.
    """

    task: str
    train: dict[str, torch.Tensor]
    validation: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    labels: list[str] | None = None
    info: dict = field(default_factory=dict)

    def split(self, name: str) -> dict[str, torch.Tensor]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

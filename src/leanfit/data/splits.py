"""The data objects that travel between data loading, the trainer and the report.

`TextDataset` holds raw text splits (`data.images.ImageDataset` raw images); `TensorSplits` holds
them as model inputs. All are plain data, so a later step (trainer, report, cache) needs nothing
but these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanfit.errors import ConfigError, DataError

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

    def __post_init__(self) -> None:
        # Hand-built splits are checked here, cheaply (shapes, dtypes, one pass over the labels), so a
        # mistake reads as one sentence now rather than as an IndexError deep inside training.
        if self.task not in TASKS:
            raise ConfigError(f"Unknown task {self.task!r}; use {CLASSIFICATION!r} (text or images) or {CAUSAL_LM!r}.")
        for name in ("train", "validation", "test"):
            self._check_split(name, getattr(self, name))

    def _check_split(self, name: str, split) -> None:
        tensors = isinstance(split, dict) and all(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in split.values())
        if not tensors:
            raise DataError(f"The {name} split must be a dict of tensors with one row per example (input_ids, "
                            "attention_mask, labels or pixel_values, labels); build it with leanfit.data.encode.")
        if "labels" not in split or not any(key in split for key in INPUT_KEYS):
            raise DataError(f"The {name} split has keys {sorted(split)} but needs 'labels' and 'input_ids' or "
                            "'pixel_values'; add the missing tensors (leanfit.data.encode makes all of them).")
        counts = {key: len(value) for key, value in split.items()}
        if len(set(counts.values())) > 1:
            rows_per_key = ", ".join(f"{key} {n}" for key, n in counts.items())
            raise DataError(f"The {name} split's tensors have different numbers of rows ({rows_per_key}); "
                            "give every tensor one row per example.")
        labels = split["labels"]
        for key in ("input_ids", "labels"):
            dtype = split[key].dtype if key in split else torch.long
            if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise DataError(f"The {name} split's {key} are {dtype}; they must be integer ids (use .long()).")
        if self.task == CAUSAL_LM:
            if "input_ids" in split and labels.shape != split["input_ids"].shape:
                raise DataError(f"The {name} split's labels have shape {tuple(labels.shape)} but input_ids "
                                f"{tuple(split['input_ids'].shape)}; causal-LM labels are the input_ids, -100 at "
                                "padding.")
            return
        if labels.dim() != 1:
            raise DataError(f"The {name} split's labels have shape {tuple(labels.shape)}; classification needs one "
                            "class index per row, shape (rows,).")
        high = len(self.labels) if self.labels is not None else None
        bad = (labels < 0) if high is None else (labels < 0) | (labels >= high)
        if bad.any():
            row = int(bad.nonzero()[0])
            allowed = f"in [0, {high}), one per name in labels" if high is not None else "of at least 0"
            raise DataError(f"The {name} split's row {row} has label {int(labels[row])}; classification labels "
                            f"must be class indices {allowed}.")

    def split(self, name: str) -> dict[str, torch.Tensor]:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

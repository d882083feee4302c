"""Evaluation (accuracy for classification, perplexity for causal LM) and the JSON-lines metrics log.

Losses are computed from the logits rather than taken from the model's `.loss`, so a split's loss is
the exact example-weighted (classification) or token-weighted (causal LM) mean over the whole split,
whatever the batch size and however the model averages inside a batch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, INPUT_KEYS, rows
from leanfit.errors import ConfigError, DataError
from leanfit.io import atomic_write_bytes

IGNORE_INDEX = -100
MODEL_INPUTS = (*INPUT_KEYS, "labels")


def batch_at(split: dict[str, torch.Tensor], index: torch.Tensor, device: torch.device) -> dict:
    """The rows `index` of a split, as the keyword arguments a Hugging Face style model takes."""
    return {k: split[k][index].to(device, non_blocking=True) for k in MODEL_INPUTS if k in split}


def split_size(split: dict[str, torch.Tensor]) -> int:
    return rows(split)


def evaluate_split(
    model: torch.nn.Module, split: dict[str, torch.Tensor], task: str, batch_size: int, on_batch=None
) -> dict[str, float]:
    """Metrics of `model` on one split: classification -> accuracy, loss; causal LM -> loss, perplexity.

    Runs in eval mode under `torch.inference_mode`, then puts the model back in the mode it was in.
    `on_batch(index)`, if given, is told the rows of each batch before its forward pass (prefix cache).
    """
    if task not in (CLASSIFICATION, CAUSAL_LM):
        raise ConfigError(f"task {task!r} is unknown; use {CLASSIFICATION!r} or {CAUSAL_LM!r}.")
    n = split_size(split)
    if n == 0:
        raise DataError("the split to evaluate has no rows; give it some data or skip its evaluation.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count, correct = 0.0, 0, 0
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                index = torch.arange(start, min(start + batch_size, n))
                batch = batch_at(split, index, device)
                if on_batch is not None:
                    on_batch(index)
                out = model(**batch)
                labels = batch["labels"]
                if task == CLASSIFICATION:
                    logits = out.logits.float()
                    nll_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                    correct += (logits.argmax(-1) == labels).sum().item()
                    count += len(labels)
                    continue
                # predict token t+1 from tokens <= t, as Hugging Face causal-LM heads do
                labels = labels[:, 1:]
                labelled = (labels != IGNORE_INDEX).sum().item()
                if out.logits is None:  # the loss fused with the output layer (lm_loss.py): its mean
                    nll_sum += out.loss.item() * labelled
                else:
                    logits = out.logits[:, :-1].float()
                    nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="sum").item()
                count += labelled
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the split to evaluate has no labelled tokens; check its labels (-100 marks padding).")
    loss = nll_sum / count
    if task == CLASSIFICATION:
        return {"accuracy": correct / count, "loss": loss}
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


class MetricsLog:
    """Appends one JSON record per line: {"step", "epoch" (1-based), "kind", "values"}.

    On resume, records past the checkpoint's step are dropped first (they came from the part of the
    run that was lost), so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike | None, resume_step: int | None = None):
        self.path = Path(path) if path is not None else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = b""
        if resume_step is not None and self.path.exists():
            lines = self.path.read_bytes().splitlines(keepends=True)
            kept = b"".join(line for line in lines if _step_of(line) is not None
                            and _step_of(line) <= resume_step)
        atomic_write_bytes(self.path, kept)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _step_of(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash

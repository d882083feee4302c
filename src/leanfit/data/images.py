"""Labelled images: raw splits, a deterministic stratified split, and pixels as model inputs.

Splits are class-interleaved: each class is shuffled with the seed, then the classes are taken in
turn (0, 1, ..., 9, 0, 1, ...), so every prefix of a split is itself stratified and "the first N
rows" (`max_train_rows`, `max_eval_rows`, `head`) is a stratified subset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from leanfit.data.splits import CLASSIFICATION, IMAGE_CLASSIFICATION, TensorSplits
from leanfit.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")


@dataclass
class ImageDataset:
    """Raw splits, each {"images": uint8 (N, H, W) or (N, C, H, W), "labels": int64 (N,)}."""

    name: str
    train: dict[str, torch.Tensor]
    validation: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    labels: list[str]  # class names, index = label id
    info: dict = field(default_factory=dict)  # seed, sizes, source: written into reports
    task: str = IMAGE_CLASSIFICATION

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)["labels"]) for name in SPLITS}

    def head(self, train: int | None = None, evaluation: int | None = None) -> "ImageDataset":
        """The first `train` training rows and `evaluation` validation and test rows (None: all): a
        stratified subset, since splits are class-interleaved."""
        def first(split: dict, n: int | None) -> dict:
            return split if not n else {k: v[:n] for k, v in split.items()}

        subset = replace(self, train=first(self.train, train), validation=first(self.validation, evaluation),
                         test=first(self.test, evaluation), info=dict(self.info))
        subset.info["sizes"] = subset.sizes()
        return subset

    def only(self, split: str, rows: int | None = None) -> "ImageDataset":
        """The first `rows` rows of `split` (None: all), and one row of each other split: enough for a
        trainer that expects every split, without resizing tens of thousands of unused images."""
        sizes = {name: (rows if name == split else 1) for name in SPLITS}
        subset = replace(self, **{name: {k: v[: sizes[name]] for k, v in getattr(self, name).items()} for name in SPLITS},
                         info=dict(self.info))
        subset.info["sizes"] = subset.sizes()
        return subset


def drop_duplicate_images(images: torch.Tensor, labels: torch.Tensor,
                          seen: set[bytes] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the first of byte-identical images, and none already in `seen` (e.g. the training
    images, so a test image seen in training cannot flatter the score); returns (images, labels, dropped).
    `seen` is extended with the images kept."""
    seen = set() if seen is None else seen
    keep = []
    for i, key in enumerate(row.tobytes() for row in images.reshape(len(images), -1).numpy()):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    index = torch.tensor(keep, dtype=torch.long)
    return images[index], labels[index], len(images) - len(keep)


def class_interleaved(labels: torch.Tensor, seed: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The rows `index` (default: all) reordered: each class shuffled with `seed`, then the classes
    taken in turn, so that every prefix holds each class within one row of its share."""
    index = torch.arange(len(labels)) if index is None else index
    generator = torch.Generator().manual_seed(seed)
    groups, turns = [], []
    for rank, label in enumerate(torch.unique(labels[index]).tolist()):  # classes in sorted order
        members = index[labels[index] == label]
        groups.append(members[torch.randperm(len(members), generator=generator)])
        # Row j of class `rank` comes at turn j, after the rows of lower classes at that turn.
        turns.append(torch.arange(len(members)) * (1 << 20) + rank)
    if not groups:
        return index[:0]
    return torch.cat(groups)[torch.argsort(torch.cat(turns))]


def split_stratified(labels: torch.Tensor, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) row indices with `held_out` of each class held out (largest remainder, so the
    total is exact), both class-interleaved."""
    if not 0 < held_out < 1:
        raise ConfigError(f"The held-out share must be in (0, 1), got {held_out}; pick a fraction such as 0.1.")
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    members = {c: torch.nonzero(labels == c).flatten() for c in classes}
    exact = {c: held_out * len(m) for c, m in members.items()}
    share = {c: int(x) for c, x in exact.items()}
    missing = round(held_out * len(labels)) - sum(share.values())
    for c in sorted(classes, key=lambda c: (share[c] - exact[c], c))[:missing]:
        share[c] += 1
    kept, held = [], []
    for c in classes:
        shuffled = members[c][torch.randperm(len(members[c]), generator=generator)]
        held.append(shuffled[: share[c]])
        kept.append(shuffled[share[c]:])
    return (class_interleaved(labels, seed, torch.cat(kept)),
            class_interleaved(labels, seed + 1, torch.cat(held)))


@dataclass(frozen=True)
class ImageProcessor:
    """uint8 images -> `pixel_values` (N, channels, size, size), float32: scaled to [0, 1], resized
    bilinearly (antialiased when shrinking), gray repeated to `channels`, then (x - mean) / std per
    channel. It plays the tokenizer's part for image models (`zoo.model` returns one)."""

    size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channels: int = 3
    name_or_path: str = ""
    batch: int = 1024  # images resized at once, to bound the float copies

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise ConfigError(f"Image size must be a positive number of pixels, got {self.size}.")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"mean and std need one value per channel ({self.channels}).")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)  # (N, H, W) gray
        if images.dim() != 4 or images.shape[1] not in (1, self.channels):
            raise DataError(f"Images must be (N, H, W) or (N, C, H, W) with C in (1, {self.channels}), "
                            f"got shape {tuple(images.shape)}.")
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        out = torch.empty(len(images), self.channels, self.size, self.size)
        for start in range(0, len(images), self.batch):
            x = images[start: start + self.batch].float() / 255.0
            if tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=True)
            out[start: start + self.batch] = (x.expand(-1, self.channels, -1, -1) - mean) / std
        return out


def encode_images(dataset: ImageDataset, processor: ImageProcessor) -> TensorSplits:
    """Every split as {"pixel_values", "labels"}; the trainer sees a classification task."""
    if not isinstance(processor, ImageProcessor):
        raise ConfigError("Image data needs an image model's processor; load an image model "
                          "(e.g. efficientnet-lite0) for this data set.")
    splits = {name: {"pixel_values": processor(getattr(dataset, name)["images"]),
                     "labels": getattr(dataset, name)["labels"].long()} for name in SPLITS}
    info = dict(dataset.info, image_size=processor.size, mean=list(processor.mean), std=list(processor.std))
    return TensorSplits(task=CLASSIFICATION, labels=dataset.labels, info=info, **splits)

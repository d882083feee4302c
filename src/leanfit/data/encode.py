"""Raw text splits -> token tensors (`TensorSplits`), the only form the trainer consumes (image
data sets -> pixel values, through `data.images`).

Classification pads every text to `max_length` so batches stack without a collator. Causal LM
concatenates the documents (EOS between them) and cuts fixed blocks, so no token is padding and
`labels` can simply equal `input_ids`.
"""

from __future__ import annotations

from numbers import Integral

import torch

from leanfit.data.images import ImageDataset, encode_images
from leanfit.data.splits import CAUSAL_LM, CLASSIFICATION, IMAGE_CLASSIFICATION, TensorSplits, TextDataset
from leanfit.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")


def encode(dataset: TextDataset | ImageDataset, tokenizer, max_length: int = 128) -> TensorSplits:
    """Tokenise every split of `dataset`; a tokenizer without a pad token gets its EOS as pad (kept set).

    An image data set takes its model's image processor in place of the tokenizer (max_length unused).
    """
    if not isinstance(dataset, (TextDataset, ImageDataset)):
        raise ConfigError(f"encode takes a data set, got {type(dataset).__name__}; pass the TextDataset of "
                          "leanfit.zoo.dataset(name) or leanfit.data.from_files(path).")
    if dataset.task == IMAGE_CLASSIFICATION:
        return encode_images(dataset, tokenizer)
    if dataset.task not in (CLASSIFICATION, CAUSAL_LM):
        raise ConfigError(f"Unknown task {dataset.task!r}; use {CLASSIFICATION!r} or {CAUSAL_LM!r}.")
    if not _whole(max_length) or max_length < 2:
        raise ConfigError(f"max_length must be a whole number of at least 2 tokens, got {max_length!r}; "
                          "fix the argument.")
    max_length = int(max_length)  # e.g. a numpy integer
    # No check against the model's positions: a tokenizer's model_max_length is often a huge sentinel.
    if not hasattr(tokenizer, "pad_token") or not callable(tokenizer):
        raise ConfigError(f"encode needs the model's tokenizer, got {type(tokenizer).__name__}; pass the tokenizer "
                          "that leanfit.zoo.model returns (or AutoTokenizer.from_pretrained).")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
        tokenizer.pad_token = tokenizer.eos_token
    for name in SPLITS:
        _check_rows(dataset, name)
    if dataset.task == CLASSIFICATION:
        splits = {name: _encode_labelled(getattr(dataset, name), tokenizer, max_length) for name in SPLITS}
    else:
        splits = {name: _encode_blocks(getattr(dataset, name), tokenizer, max_length) for name in SPLITS}
        if len(splits["train"]["input_ids"]) == 0:
            raise DataError(
                f"The train split of {dataset.name} has fewer than max_length={max_length} tokens; "
                "add text or lower max_length."
            )
    info = dict(dataset.info, max_length=max_length, tokenizer=getattr(tokenizer, "name_or_path", ""))
    return TensorSplits(task=dataset.task, labels=dataset.labels, info=info, **splits)


def _whole(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_rows(dataset: TextDataset, name: str) -> None:
    """Refuse a row the tokenizer or torch would reject with a raw error, or (a float label) silently
    truncate. Row numbers are list indices, as in `dataset.train[3]`."""
    rows = getattr(dataset, name)
    if not isinstance(rows, (list, tuple)):
        raise DataError(f"The {name} split is a {type(rows).__name__}, not a list of rows; give each split as a list.")
    n_labels = len(dataset.labels) if dataset.labels is not None else None
    for i, row in enumerate(rows):
        if dataset.task == CAUSAL_LM:
            if not isinstance(row, str):
                raise DataError(f"The {name} split's row {i} is {row!r:.60}, not a string; causal-LM rows are "
                                "plain texts.")
            continue
        if not isinstance(row, (tuple, list)) or len(row) != 2:
            raise DataError(f"The {name} split's row {i} is {row!r:.60}, not a (text, label) pair; give each "
                            "classification row as (text, label index).")
        text, label = row
        if not isinstance(text, str):
            raise DataError(f"The {name} split's row {i} has text {text!r:.60} ({type(text).__name__}), not a "
                            "string; give each row's text as a str.")
        if not _whole(label) or label < 0 or (n_labels is not None and label >= n_labels):
            allowed = f"in [0, {n_labels}) indexing dataset.labels" if n_labels is not None else "of at least 0"
            raise DataError(f"The {name} split's row {i} has label {label!r:.60}; labels must be whole numbers "
                            f"{allowed}, so map each label to its class index.")


def _encode_labelled(rows: list, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    if not rows:
        return _empty((0, max_length), labels_shape=(0,))
    texts, labels = zip(*rows)
    batch = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {
        "input_ids": batch["input_ids"].long(),
        "attention_mask": batch["attention_mask"].long(),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _encode_blocks(texts: list[str], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Documents joined by EOS (SEP for encoders), cut into `max_length` blocks; the tail is dropped."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if separator is None:
        raise ConfigError("The tokenizer has no EOS or SEP token to separate documents; set tokenizer.eos_token.")
    stream: list[int] = []
    if texts:
        for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
            stream += ids
            stream.append(separator)
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        return _empty((0, max_length), labels_shape=(0, max_length))
    input_ids = torch.tensor(stream[: n_blocks * max_length], dtype=torch.long).view(n_blocks, max_length)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def _empty(shape: tuple, labels_shape: tuple) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.zeros(shape, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "labels": torch.zeros(labels_shape, dtype=torch.long),
    }

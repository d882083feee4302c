"""Mixed-adapter batches: every row gets its own adapter's output, equal to running it alone."""

import pytest
import torch
from transformers import BertConfig, BertModel

import leanfit as lf
from leanfit.core.batching import RowPlan, forward_mixed
from leanfit.errors import AdapterError
from _nets import perturb, tiny_net, tokens


def three_adapters(model, targets="all-linear"):
    lf.adapt(model, lf.LoRA(rank=2), targets=targets, name="a", train_modules=[])
    perturb(model, seed=1)
    lf.adapt(model, lf.LoRA(rank=4, alpha=4), targets=targets, name="b", train_modules=[])
    perturb(model, seed=2)
    lf.adapt(model, lf.IA3(), targets=targets, name="c", train_modules=[])
    perturb(model, seed=3)
    return model


def alone(model, rows: torch.Tensor, name):
    if name is None:
        lf.deactivate(model)
    else:
        lf.activate(model, name)
    return model(rows)


def test_row_plan_groups_rows_into_contiguous_segments():
    plan = RowPlan.of(["b", None, "a", "b", None, "a"])
    assert plan.order.tolist() == [1, 4, 2, 5, 0, 3]
    assert plan.segments == ((None, 0, 2), ("a", 2, 4), ("b", 4, 6))


def test_mixed_batch_equals_each_adapter_alone():
    model = three_adapters(tiny_net())
    model.eval()
    x = tokens(batch=7)
    names = ["a", None, "b", "a", "c", "b", None]
    with torch.inference_mode():
        mixed = forward_mixed(model, {"input_ids": x}, names)
        for i, name in enumerate(names):
            assert torch.allclose(mixed[i], alone(model, x[i:i + 1], name)[0], atol=1e-5), (i, name)


def test_mixed_batch_on_a_transformer_with_different_ranks_and_methods():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64))
    three_adapters(model, targets=["query", "value", "dense"])
    model.eval()
    ids = torch.randint(1, 100, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    names = ["c", "a", None, "b", "a"]
    with torch.inference_mode():
        mixed = forward_mixed(model, {"input_ids": ids, "attention_mask": mask}, names).last_hidden_state
        for i, name in enumerate(names):
            lf.activate(model, name) if name else lf.deactivate(model)
            own = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).last_hidden_state
            assert torch.allclose(mixed[i], own[0], atol=1e-5), (i, name)


def test_unknown_or_merged_adapters_are_refused():
    model = three_adapters(tiny_net())
    with pytest.raises(AdapterError, match="Unknown adapter 'zz'"):
        forward_mixed(model, {"input_ids": tokens()}, ["a", "zz", None, "b"])
    lf.activate(model, "a")
    lf.merge(model, "a")
    with pytest.raises(AdapterError, match="unmerge"):
        forward_mixed(model, {"input_ids": tokens()}, ["a", "b", None, "b"])
    lf.unmerge(model, "a")
    forward_mixed(model, {"input_ids": tokens()}, ["a", "b", None, "b"])
    assert all(h.row_segments is None for h in lf.core.inject.hosts(model).values())

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
    assert all(h.row_plan is None for h in lf.core.inject.hosts(model).values())


# -- the batched kernels (core/segments.py): every mode against each adapter's own offline forward --

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from leanfit.core.batching import HotAdapter, merged_adapters, mixed_batch  # noqa: E402
from leanfit.core.inject import hosts  # noqa: E402
from leanfit.core.model import adapter_modules  # noqa: E402
from leanfit.errors import UnknownAdapterError  # noqa: E402

METHODS = {"a": lf.LoRA(rank=2), "b": lf.LoRA(rank=4, alpha=4), "c": lf.IA3(), "d": lf.SSF(), "e": lf.BitFit(),
           "f": lf.LoRA(rank=3, init="pissa"), "g": lf.DyLoRA(rank=4), "h": lf.LoRASB(rank=2),
           "i": lf.Bottleneck(size=4)}  # i has no batched form: the per-segment fallback


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64))
    for seed, (name, config) in enumerate(METHODS.items()):
        lf.adapt(model, config, targets=["query", "value", "dense"], name=name, train_modules=[])
        perturb(model, seed=seed + 1)
    return model.eval()  # after adapting: new adapter modules start in training mode


def kernel_modes(model):
    return {h._rows.low.mode for h in hosts(model).values() if h._rows is not None and h._rows.low is not None}


CASES = {  # names per row -> the low-rank kernel modes they must exercise
    "single": (["a"] * 5, {"single"}),
    "single-pissa": (["f"] * 3, {"single"}),
    "equal": (["b", "b", "a", "a", "h", "h"], {"equal"}),
    "equal-after-base-rows": ([None, "g", "g", None, "a", "a"], {"equal"}),
    "gather": (["c", "a", None, "b", "a", "i", "d", "e", "f", "g", "h", "b", "a"], {"gather"}),
    "scales-only": (["c", "d", "e", None, "c"], set()),
}


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "base-layer-first"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_kernel_mode_equals_each_adapter_alone(bert, case, hooked):
    names, modes = CASES[case]
    g = torch.Generator().manual_seed(len(names))
    ids = torch.randint(1, 100, (len(names), 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    # A forward hook on a base layer makes the host call it and add the deltas afterwards.
    handles = [h.base_layer.register_forward_hook(lambda *a: None) for h in hosts(bert).values()] if hooked else []
    try:
        with torch.inference_mode():
            with mixed_batch(bert, names) as run:
                mixed = run({"input_ids": ids, "attention_mask": mask})
                assert kernel_modes(bert) == modes
            for i, name in enumerate(names):
                lf.activate(bert, name) if name else lf.deactivate(bert)
                own = bert(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1])
                assert (mixed.last_hidden_state[i] - own.last_hidden_state[0]).abs().max() <= 1e-5, (i, name)
                assert (mixed.pooler_output[i] - own.pooler_output[0]).abs().max() <= 1e-5, (i, name)
    finally:
        for handle in handles:
            handle.remove()
    assert all(h.row_plan is None and h._rows is None for h in hosts(bert).values())


@pytest.mark.parametrize("rows, tokens, merges", [(8, 16, True), (2, 1, False)], ids=["many-tokens", "decode-step"])
def test_one_adapter_forms_its_weight_for_many_tokens_only_and_equals_it_alone(bert, monkeypatch, rows, tokens, merges):
    from leanfit.core.segments import LowRankRows
    formed = []
    merged_weight = LowRankRows.merged_weight
    monkeypatch.setattr(LowRankRows, "merged_weight", lambda self, base: formed.append(base) or merged_weight(self, base))
    ids = torch.randint(1, 100, (rows, tokens), generator=torch.Generator().manual_seed(5))
    weights = {n: p.detach().clone() for n, p in bert.named_parameters()}
    with torch.inference_mode():
        mixed = forward_mixed(bert, {"input_ids": ids}, ["b"] * rows).last_hidden_state
        lf.activate(bert, "b")
        own = bert(input_ids=ids).last_hidden_state
    assert bool(formed) == merges
    assert (mixed - own).abs().max() <= 1e-5
    assert all(torch.equal(p, weights[n]) for n, p in bert.named_parameters())  # the shared base is never written


def test_with_grad_enabled_the_per_segment_path_gives_the_same_rows_and_gradients(bert):
    names = ["a", "c", None, "i", "a"]
    ids = torch.randint(1, 100, (5, 6), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast = forward_mixed(bert, {"input_ids": ids}, names).last_hidden_state
    lf.set_trainable(bert, "a")
    slow = forward_mixed(bert, {"input_ids": ids}, names).last_hidden_state
    assert (fast - slow).abs().max() <= 1e-5
    slow[0].sum().backward()
    grads = [p.grad for p in adapter_modules(bert, "a")["encoder.layer.0.attention.self.query"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    lf.set_trainable(bert, None)
    bert.zero_grad(set_to_none=True)


def test_a_hot_adapter_is_merged_used_alone_and_restored_bit_for_bit(bert):
    originals = {n: p.detach().clone() for n, p in bert.named_parameters()}
    ids = torch.randint(1, 100, (4, 7), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        lf.activate(bert, "b")
        alone = bert(input_ids=ids).last_hidden_state
        hot = HotAdapter(bert, after=2)
        assert hot.prepare(["b"] * 4) is None  # first batch of "b": not yet hot
        assert hot.prepare(["b"] * 4) == "b" and merged_adapters(bert) == {"b"}
        merged = forward_mixed(bert, {"input_ids": ids}, ["b"] * 4).last_hidden_state
        assert (merged - alone).abs().max() <= 1e-5
        with pytest.raises(AdapterError, match="merged"):
            forward_mixed(bert, {"input_ids": ids}, ["b", "b", None, "b"])
        for _ in range(10):  # many merge/unmerge cycles leave the base weights exactly as they were
            assert hot.prepare(["a", "b"]) is None and not merged_adapters(bert)
            assert hot.prepare(["a"], forwards=8) == "a"  # a generation merges at once
        hot.prepare([None])
    assert all(torch.equal(p, originals[n]) for n, p in bert.named_parameters())


def test_an_adapter_that_cannot_merge_stays_unmerged_and_still_serves(bert):
    hot = HotAdapter(bert, after=1)
    with torch.inference_mode():
        assert hot.prepare(["i"] * 2) is None and "i" in hot.unmergeable  # bottleneck: not a weight update
        forward_mixed(bert, {"input_ids": tokens_bert()}, ["i", "i"])


def tokens_bert():
    return torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(5))


def test_adapters_with_trained_heads_cannot_share_a_batch_and_unknown_names_are_404_errors():
    model = tiny_net()
    lf.adapt(model, lf.LoRA(rank=2), targets=["query"], name="head", train_modules=["classifier"])
    lf.adapt(model, lf.LoRA(rank=2), targets=["query"], name="plain", train_modules=[])
    model.eval()
    with torch.inference_mode():
        with pytest.raises(AdapterError, match="trained modules"):
            forward_mixed(model, {"input_ids": tokens()}, ["head", "plain", "head", "plain"])
        with pytest.raises(AdapterError, match="trained modules"):
            forward_mixed(model, {"input_ids": tokens()}, ["head", None, None, None])
        forward_mixed(model, {"input_ids": tokens()}, ["head"] * 4)
        with pytest.raises(UnknownAdapterError, match="'zz'"):
            forward_mixed(model, {"input_ids": tokens()}, ["zz"] * 4)


class Flattening(torch.nn.Module):
    """A model that folds the batch into the token axis before its linear layer."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.proj(h.view(-1, 8)).view(*input_ids.shape, 8)


def test_a_layer_that_does_not_see_the_batch_first_is_refused_rather_than_mixed_up():
    torch.manual_seed(0)
    model = Flattening()
    lf.adapt(model, lf.LoRA(rank=2), targets=["proj"], name="a", train_modules=[])
    with torch.inference_mode(), pytest.raises(AdapterError, match="first axis"):
        forward_mixed(model, {"input_ids": tokens()}, ["a", None, "a", None])


def test_a_kv_cache_stays_in_the_callers_row_order_across_generation_steps():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    lf.adapt(model, lf.LoRA(rank=4), targets=["q_proj", "v_proj", "down_proj"], name="a", train_modules=[])
    perturb(model, seed=1, scale=0.3)
    lf.adapt(model, lf.IA3(), targets="all-linear", name="b", train_modules=[])
    perturb(model, seed=2, scale=0.3)
    model.eval()
    names = ["b", None, "a", "b", "a"]  # not sorted: inputs, logits and the cache are reordered each step
    prompts = torch.randint(0, 60, (5, 6), generator=torch.Generator().manual_seed(7))
    steps = 6
    with torch.inference_mode():
        ids, cache, mixed = prompts, None, []
        with mixed_batch(model, names) as run:
            for _ in range(steps):
                out = run({"input_ids": ids, "past_key_values": cache, "use_cache": True})
                cache, ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                mixed.append(ids[:, 0])
        mixed = torch.stack(mixed, 1)
        for i, name in enumerate(names):
            lf.activate(model, name) if name else lf.deactivate(model)
            seq = prompts[i:i + 1]
            for _ in range(steps):  # no cache, the whole sequence every step
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
            assert seq[0, 6:].tolist() == mixed[i].tolist(), (i, name)
    assert len(set(map(tuple, mixed.tolist()))) > 2  # the adapters make a difference


def test_conv_and_embedding_layers_mix_per_channel_scales_and_per_segment_deltas():
    model = tiny_net()
    for seed, (name, config) in enumerate({"lora": lf.LoRA(rank=2), "ia3": lf.IA3(), "ssf": lf.SSF()}.items()):
        lf.adapt(model, config, targets=["embed", "conv", "query"], name=name, train_modules=[])
        perturb(model, seed=seed + 1)
    model.eval()
    x = tokens(batch=6)
    names = ["ssf", "lora", None, "ia3", "lora", "ssf"]
    with torch.inference_mode():
        mixed = forward_mixed(model, {"input_ids": x}, names)
        for i, name in enumerate(names):
            assert (mixed[i] - alone(model, x[i:i + 1], name)[0]).abs().max() <= 1e-5, (i, name)


def test_the_stacked_factor_bank_is_reused_and_never_stale():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    for seed, name in enumerate("abc"):
        lf.adapt(model, lf.LoRA(rank=2 + seed), targets=["query", "dense"], name=name, train_modules=[])
        perturb(model, seed=seed + 1)
    model.eval()
    ids = torch.randint(1, 100, (6, 5), generator=torch.Generator().manual_seed(9))
    host = hosts(model)["encoder.layer.0.attention.self.query"]

    def check(names):
        with torch.inference_mode():
            mixed = forward_mixed(model, {"input_ids": ids}, names).last_hidden_state
            for i, name in enumerate(names):
                lf.activate(model, name)
                assert (mixed[i] - model(input_ids=ids[i:i + 1]).last_hidden_state[0]).abs().max() <= 1e-5, (i, name)

    check(["a", "b", "c", "a", "b", "c"])
    bank = host._bank
    assert bank is not None and set(bank.index) == {"a", "b", "c"}
    check(["c", "c", "a", "a", "a", "c"])  # another plan, same adapters: the same bank, gathered
    assert host._bank is bank
    with torch.no_grad():  # an in-place change (e.g. a training step) must not leave stale factors
        lf.core.model.adapter_modules(model, "b")["encoder.layer.0.attention.self.query"].lora_B.mul_(-3)
    check(["b", "a", "b", "a", "c", "c"])
    assert host._bank is not bank
    bank = host._bank
    with torch.no_grad():  # the bank holds the base layer's bias too (the up-projection writes it)
        host.base_layer.bias.add_(0.5)
    check(["a", "b", "c", "c", "b", "a"])
    assert host._bank is not bank
    lf.delete(model, "c")  # the same name back with another rank, maybe at the same address
    lf.adapt(model, lf.LoRA(rank=5), targets=["query", "dense"], name="c", train_modules=[])
    perturb(model, seed=7)
    model.eval()
    check(["c", "a", "b", "c", "a", "b"])
    assert host._bank.ranks["c"] == 5


def test_a_banked_form_is_taken_anew_after_an_attribute_change_or_a_swapped_tensor():
    """Mixed batches reuse each adapter's stacked form while its form_stamp holds; a DyLoRA rank set,
    a parameter's `.data` swapped, or a train/eval round trip must each show in the next batch."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    lf.adapt(model, lf.DyLoRA(rank=4, min_rank=1), targets=["query"], name="d", train_modules=[])
    lf.adapt(model, lf.LoRA(rank=2), targets=["query"], name="l", train_modules=[])
    perturb(model, seed=5)
    model.eval()
    ids = torch.randint(1, 100, (4, 5), generator=torch.Generator().manual_seed(3))
    host = hosts(model)["encoder.layer.0.attention.self.query"]
    dyn, low = host.adapters["d"], host.adapters["l"]

    def check():
        names = ["d", "l", "l", "d"]
        with torch.inference_mode():
            mixed = forward_mixed(model, {"input_ids": ids}, names).last_hidden_state
            for i, name in enumerate(names):
                lf.activate(model, name)
                assert (mixed[i] - model(input_ids=ids[i:i + 1]).last_hidden_state[0]).abs().max() <= 1e-5, (i, name)

    check()
    stamp = dyn.form_stamp()
    assert stamp is not None and dyn.form_stamp() == stamp  # nothing changed: the banked form is reused
    dyn.set_rank(2)  # an attribute: the form narrows to rank 2
    assert dyn.form_stamp() != stamp
    check()
    with torch.no_grad():
        low.lora_B.data = low.lora_B.data * -2  # a swapped tensor, no version bump on the parameter
    check()
    model.train()
    model.eval()
    check()


def test_form_stamp_is_none_where_a_submodule_holds_tensors():
    model = tiny_net()
    lf.adapt(model, lf.LoRA(rank=2), targets="all-linear", name="a")
    module = next(iter(adapter_modules(model, "a").values()))
    assert module.form_stamp() is not None
    module.extra = torch.nn.Linear(2, 2)
    assert module.form_stamp() is None

"""The adapter engine on tiny random models: injection, trainability, activation, merge, unwrap."""

import copy

import pytest
import torch
from torch import nn

import leanfit as lf
from leanfit.core.hosts import AdapterHost
from leanfit.errors import AdapterError, ConfigError, TargetError, UnknownAdapterError, UnknownMethodError
from _nets import perturb, tiny_net, tokens

MERGEABLE = {
    "lora": lf.LoRA(rank=2), "lora-rslora": lf.LoRA(rank=2, use_rslora=True),
    "lora-gaussian": lf.LoRA(rank=2, init="gaussian"), "dylora": lf.DyLoRA(rank=4),
    "ia3": lf.IA3(), "ssf": lf.SSF(), "bitfit": lf.BitFit(),
}
ALL_KINDS = (nn.Linear, nn.Conv2d, nn.Embedding)


def test_targets_by_name_regex_type_and_exclude():
    m = tiny_net()
    assert lf.find_targets(m, "all-linear") == ["block.query", "block.value"]  # head left out
    assert lf.find_targets(m, ["query"]) == ["block.query"]
    assert lf.find_targets(m, r"block\.(query|value)") == ["block.query", "block.value"]
    assert lf.find_targets(m, nn.Conv2d) == ["conv"]
    assert lf.find_targets(m, ALL_KINDS, exclude=["classifier", "conv"]) == ["embed", "block.query", "block.value"]
    with pytest.raises(TargetError, match="matched no"):
        lf.find_targets(m, ["nope"])
    with pytest.raises(TargetError, match="regular expression"):
        lf.find_targets(m, "(")



def test_targets_that_select_only_the_trained_head_are_refused():
    m = tiny_net()
    with pytest.raises(TargetError, match="select only classifier, which is trained in full as a head"):
        lf.adapt(m, lf.LoRA(rank=2), targets=["classifier"])  # else an adapter of no layer, a probe in disguise
    assert not lf.adapters(m)
    lf.adapt(m, lf.LoRA(rank=2), targets=["classifier"], train_modules=[])  # the head adapted, if asked


@pytest.mark.parametrize("key", sorted(MERGEABLE))
def test_fresh_adapter_leaves_model_unchanged(key):
    m = tiny_net()
    x = tokens()
    before = m(x)
    lf.adapt(m, MERGEABLE[key], targets=ALL_KINDS, exclude=["classifier"])
    assert torch.equal(m(x), before)


def test_adapters_follow_the_model_mode():
    m = tiny_net().eval()
    lf.adapt(m, lf.LoRA(rank=2, dropout=0.5), targets="all-linear")
    assert not any(module.training for module in m.modules())  # no dropout switched on behind the user's back
    m.train()
    lf.adapt(m, lf.LoRA(rank=2), targets=["value"], name="second")
    assert all(module.training for module in m.modules())


def test_pissa_init_leaves_model_unchanged_and_starts_on_principal_factors():
    m = tiny_net()
    x = tokens()
    before = m(x)
    lf.adapt(m, lf.LoRA(rank=2, init="pissa"), targets=["query"])
    assert torch.allclose(m(x), before, atol=1e-5)
    lora = m.block["query"].adapters["default"]
    w = m.block["query"].base_layer.weight
    u, s, vh = torch.linalg.svd(w)
    top2 = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose(lora.scaling * lora.lora_B @ lora.lora_A, top2, atol=1e-5)


@pytest.mark.parametrize("key", sorted(MERGEABLE))
def test_merge_and_unmerge_are_exact(key):
    m = tiny_net()
    x = tokens()
    original = copy.deepcopy(m.state_dict())
    needs_bias = key in ("bitfit", "ssf")  # their shift merges into a bias
    lf.adapt(m, MERGEABLE[key], targets=["conv", "query"] if needs_bias else ALL_KINDS,
             exclude=["classifier"], name="a")
    perturb(m)
    m.eval()
    unmerged = m(x)
    lf.merge(m, "a")
    assert torch.allclose(m(x), unmerged, atol=1e-5)
    lf.unmerge(m, "a")
    assert torch.allclose(m(x), unmerged, atol=1e-5)
    lf.unwrap(m)
    for k, v in m.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.allclose(v, original[k], atol=1e-6), k


TWO_OF_A_KIND = {**MERGEABLE, "hut": lf.HUT(rank=2), "hydra": lf.Hydra(rank=2)}


@pytest.mark.parametrize("key", sorted(TWO_OF_A_KIND))
def test_two_adapters_add_up_the_same_merged_half_merged_or_not(key):
    """Activating adapters sums their updates; merging them, one or both, must give the same model.
    IA3, SSF, HUT and Hydra read the base weight or output: without care, merging the second on top
    of the first multiplied the two."""
    m = tiny_net().eval()
    x = tokens()
    targets = ["query"] if key in ("hut", "hydra") else ["conv", "query"]
    for seed, name in enumerate(("a", "b")):
        lf.adapt(m, TWO_OF_A_KIND[key], targets=targets, exclude=["classifier"], name=name)
        perturb(m, seed=seed, scale=0.3)  # the adapter just added is the trainable one
    lf.activate(m, "a", "b")
    both = m(x)
    assert not torch.allclose(both, lf.unwrap(copy.deepcopy(m))(x), atol=1e-3)  # they do something
    lf.merge(m, "a")  # a in the weight, b still computed beside it
    assert torch.allclose(m(x), both, atol=1e-5)
    lf.merge(m, "b")
    assert torch.allclose(m(x), both, atol=1e-5)
    lf.unmerge(m, "a")
    lf.unmerge(m, "b")
    assert torch.allclose(m(x), both, atol=1e-5)


def test_a_series_adapter_beside_a_merged_one_reads_the_unmerged_output():
    m = tiny_net().eval()
    x = tokens()
    lf.adapt(m, lf.IA3(), targets=["query"], name="a")
    perturb(m, scale=0.3)
    lf.adapt(m, lf.Bottleneck(size=4), targets=["query"], name="b")
    perturb(m, seed=1, scale=0.3)
    lf.activate(m, "a", "b")
    both = m(x)
    lf.merge(m, "a")
    assert torch.allclose(m(x), both, atol=1e-5)


def test_merge_that_cannot_happen_changes_nothing():
    m = tiny_net()
    x = tokens()
    lf.adapt(m, lf.BitFit(), targets="all-linear", name="b")  # block.value has no bias
    perturb(m)
    out = m(x)
    weights = copy.deepcopy(m.state_dict())
    with pytest.raises(ConfigError, match="without a bias"):
        lf.merge(m, "b")
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())
    assert torch.equal(m(x), out)


def test_only_adapter_and_head_parameters_train():
    m = tiny_net()
    lf.adapt(m, lf.LoRA(rank=2), targets="all-linear", name="a")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"block.query.adapters.a.lora_A", "block.query.adapters.a.lora_B",
                         "block.value.adapters.a.lora_A", "block.value.adapters.a.lora_B",
                         "classifier.weight", "classifier.bias"}
    n_train, n_all = lf.trainable_parameters(m)
    assert n_train == sum(m.get_parameter(n).numel() for n in trainable) and n_all > n_train


def test_unwrap_restores_same_modules_and_bit_identical_outputs():
    m = tiny_net()
    x = tokens()
    layers = {n: mod for n, mod in m.named_modules()}
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    before = m(x)
    lf.adapt(m, lf.LoRA(rank=2), targets=ALL_KINDS, exclude=["classifier"], name="a", train_modules=[])
    perturb(m)
    lf.adapt(m, lf.IA3(), targets="all-linear", name="b", train_modules=[])
    perturb(m)
    lf.activate(m, "a", "b")
    assert not torch.equal(m(x), before)
    lf.unwrap(m)
    assert {n: mod for n, mod in m.named_modules()}.keys() == layers.keys()
    assert all(mod is layers[n] for n, mod in m.named_modules())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert torch.equal(m(x), before)
    assert not any(isinstance(mod, AdapterHost) for mod in m.modules())


def test_several_adapters_activate_deactivate_delete():
    m = tiny_net()
    x = tokens()
    base = m(x)
    lf.adapt(m, lf.LoRA(rank=2), targets="all-linear", name="a", train_modules=[])
    perturb(m, seed=3)
    out_a = m(x)
    lf.adapt(m, lf.LoRA(rank=4), targets=["value"], name="b", train_modules=[])
    assert lf.active(m) == ["b"] and torch.equal(m(x), base)  # b is zero-init and acts alone
    perturb(m, seed=4)
    out_b = m(x)
    lf.activate(m, "a")
    assert torch.equal(m(x), out_a)
    lf.activate(m, "a", "b")
    assert not torch.allclose(m(x), out_a) and not torch.allclose(m(x), out_b)
    lf.deactivate(m)
    assert torch.equal(m(x), base)
    lf.activate(m, "b")
    lf.delete(m, "a")
    assert torch.equal(m(x), out_b)
    assert not isinstance(m.block["query"], AdapterHost)  # host with no adapter left is removed
    with pytest.raises(UnknownAdapterError, match="Unknown adapter 'a'"):
        lf.activate(m, "a")
    with pytest.raises(AdapterError, match="already exists"):
        lf.adapt(m, lf.LoRA(), targets=["value"], name="b")


def test_bottleneck_series_and_parallel_train_and_refuse_merge():
    for placement in ("series", "parallel"):
        m = tiny_net()
        x = tokens()
        before = m(x)
        lf.adapt(m, lf.Bottleneck(size=4, placement=placement), targets="all-linear", name="ad")
        assert torch.equal(m(x), before)  # up-projection starts at zero
        loss = m(x).pow(2).mean()
        loss.backward()
        assert m.block["query"].adapters["ad"].up.weight.grad.abs().sum() > 0
        with pytest.raises(AdapterError, match="cannot be merged"):
            lf.merge(m, "ad")


def test_bottleneck_series_reads_output_parallel_reads_input():
    layer = nn.Linear(3, 5)
    series = lf.methods.module_class("bottleneck")(layer, lf.Bottleneck(size=2))
    parallel = lf.methods.module_class("bottleneck")(layer, lf.Bottleneck(size=2, placement="parallel"))
    assert series.down.in_features == 5 and parallel.down.in_features == 3


def test_dylora_any_rank_usable_and_truncates():
    m = tiny_net()
    x = tokens()
    lf.adapt(m, lf.DyLoRA(rank=4), targets=["query"], name="d", train_modules=[])
    perturb(m)
    m.eval()
    host = m.block["query"]
    lora = host.adapters["d"]
    outs = {}
    for r in (1, 2, 4):
        lf.set_rank(m, r)
        outs[r] = m(x)
        expected = lora.lora_B[:, :r] @ lora.lora_A[:r] * (lora.config.alpha / r)
        assert torch.allclose(lora.delta_weight(host.base_layer)[0], expected)
    assert not torch.allclose(outs[1], outs[4])
    with pytest.raises(ConfigError, match="outside"):
        lf.set_rank(m, 5)


def test_dylora_training_samples_ranks_from_the_global_generator():
    layer = nn.Linear(4, 4)
    d = lf.methods.module_class("dylora")(layer, lf.DyLoRA(rank=4))
    d.train()
    torch.manual_seed(0)
    seen = {d.factors()[0].shape[0] for _ in range(50)}
    assert seen == {1, 2, 3, 4}
    torch.manual_seed(0)
    again = {d.factors()[0].shape[0] for _ in range(50)}
    assert again == seen


def test_lora_sb_trains_only_the_core_and_calibrates_from_gradient():
    m = tiny_net()
    x = tokens()
    before = m(x)
    lf.adapt(m, lf.LoRASB(rank=2), targets="all-linear", name="sb", train_modules=[])
    assert torch.equal(m(x), before)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"block.query.adapters.sb.lora_R", "block.value.adapters.sb.lora_R"}

    class WithLoss(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, input_ids, labels):
            return type("Out", (), {"loss": nn.functional.cross_entropy(self.net(input_ids), labels)})

    wrapped = WithLoss(m)
    wrapped.__dict__["leanfit_adapters"] = m.__dict__["leanfit_adapters"]
    batch = {"input_ids": x, "labels": torch.tensor([0, 1, 2, 0])}
    weight = m.block["value"].base_layer.weight.clone()
    assert lf.calibrate(wrapped, batch, "sb") == 2
    assert torch.equal(m.block["value"].base_layer.weight, weight)
    assert not m.block["value"].base_layer.weight.requires_grad
    # the frozen factors now span the gradient's principal subspace
    m.block["value"].base_layer.weight.requires_grad_(True)
    loss = nn.functional.cross_entropy(m(x), batch["labels"])
    grad = torch.autograd.grad(loss, m.block["value"].base_layer.weight)[0]
    sb = m.block["value"].adapters["sb"]
    u = torch.linalg.svd(-grad)[0][:, :2]
    assert torch.allclose((sb.lora_B.T @ u).abs().sum(0), torch.ones(2), atol=1e-4)


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ConfigError, match="rank must be a positive"):
        lf.LoRA(rank=0)
    with pytest.raises(ConfigError, match="Unknown LoRA init"):
        lf.LoRA(init="svd")
    with pytest.raises(ConfigError, match="has no option ranks"):
        lf.LoRA().replace(ranks=3)
    with pytest.raises(UnknownMethodError, match="Unknown method 'lorax'.*lora"):
        lf.config_from_dict({"method": "lorax"})
    with pytest.raises(ConfigError, match="cannot adapt a Conv2d"):
        lf.adapt(tiny_net(), lf.LoRASB(), targets=nn.Conv2d)  # a Linear-only method


def test_host_exposes_base_layer_attributes():
    m = tiny_net()
    lf.adapt(m, lf.LoRA(rank=2), targets=["query"])
    host = m.block["query"]
    assert host.weight is host.base_layer.weight and host.in_features == 32


def test_config_round_trips_through_dict():
    for cfg in [lf.LoRA(rank=3, alpha=6, use_rslora=True), lf.DyLoRA(rank=4, min_rank=2), lf.Bottleneck(size=7),
                lf.IA3(), lf.LoRASB(rank=2, init="gradient")]:
        assert lf.config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["x.y", "", 3])
def test_a_bad_adapter_name_is_refused_before_any_layer_is_wrapped(name):
    m = tiny_net()
    keys = list(m.state_dict())
    with pytest.raises(ConfigError, match="adapter name must be a non-empty string without '.'"):
        lf.adapt(m, lf.LoRA(rank=2), targets="all-linear", name=name)
    assert list(m.state_dict()) == keys  # no layer left wrapped (its weight renamed base_layer.weight)


@pytest.mark.parametrize("call, error, message", [
    (lambda m: lf.adapt(m, lf.LoRA(rank=2), targets=5), TargetError, "not a kind leanfit reads"),
    (lambda m: lf.adapt(m, lf.LoRA(rank=2), targets=None), TargetError, "not a kind leanfit reads"),
    (lambda m: lf.adapt(m, lf.LoRA, targets="all-linear"), ConfigError, "not the class LoRA"),
    (lambda m: lf.adapt("model", lf.LoRA(rank=2)), ConfigError, "torch.nn.Module to adapt, got str"),
    (lambda m: lf.set_rank(m, 1, name="zz"), UnknownAdapterError, "Unknown adapter 'zz'"),
    (lambda m: lf.deactivate(m, "zz"), UnknownAdapterError, "Unknown adapter 'zz'"),
])
def test_wrong_arguments_get_one_sentence(call, error, message):
    m = tiny_net()
    with pytest.raises(error, match=message):
        call(m)


def test_train_modules_given_as_one_name_is_that_module():
    m = tiny_net()
    lf.adapt(m, lf.LoRA(rank=2), targets=["query"], train_modules="classifier")
    assert lf.adapters(m)["default"].train_modules == ["classifier"]


def test_active_adapters_say_what_acts():
    m = tiny_net().eval()
    lf.adapt(m, lf.LoRA(rank=2), targets=["query"], name="a", train_modules=[])
    perturb(m)
    lf.adapt(m, lf.LoRA(rank=2), targets=["query"], name="b", train_modules=[])
    perturb(m, seed=3)
    x = tokens()
    lf.activate(m, "a")
    once = m(x)
    lf.activate(m, "a", "a")  # once, not twice
    assert lf.active(m) == ["a"] and torch.equal(m(x), once)
    lf.activate(m, "b")
    lf.merge(m, "a")  # merged, it acts: active() says so
    assert sorted(lf.active(m)) == ["a", "b"]
    with pytest.raises(AdapterError, match="'a' is merged into the base weights"):
        lf.deactivate(m, "a")
    lf.unmerge(m, "a")
    lf.deactivate(m, "a")
    assert lf.active(m) == ["b"]


def test_set_rank_that_one_adapter_cannot_take_changes_none():
    m = tiny_net().eval()
    lf.adapt(m, lf.DyLoRA(rank=4), targets=["query"], name="a", train_modules=[])
    perturb(m)
    lf.adapt(m, lf.DyLoRA(rank=2), targets=["value"], name="b", train_modules=[])
    perturb(m, seed=3)
    lf.activate(m, "a", "b")
    x = tokens()
    out = m(x)
    with pytest.raises(ConfigError, match="outside this DyLoRA adapter's range 1..2"):
        lf.set_rank(m, 3)  # a takes 3, b does not: neither changes
    assert torch.equal(m(x), out)

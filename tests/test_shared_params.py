"""Parameters shared by every layer of one adapter (Compacter's slow matrices, MoS's shard pools):
one object, counted once, trained by every layer, saved and loaded once, freed with the adapter."""

import copy
import gc
import json
import weakref

import pytest
import torch
from torch import nn

import leanfit as lf
from leanfit.core.artifact import SHARED_PREFIX, adapter_tensors
from leanfit.core.batching import forward_mixed
from leanfit.core.model import adapter_modules, shared_module
from leanfit.errors import ConfigError
from leanfit.methods.bone import Bone
from leanfit.methods.compacter import Compacter
from leanfit.methods.mos import MoS
from _nets import perturb, tiny_net, tokens

SHARING = {"compacter": Compacter(size=8), "phm-adapter": Compacter(size=8, phm_rank=None),
           "mos": MoS(rank=4, private_rank=1, public_shards=3)}


def adapted(config, name="a", seed=0):
    m = tiny_net(seed)
    lf.adapt(m, config, targets="all-linear", name=name, train_modules=[])
    return m


def shared_of_each_layer(model, name="a"):
    return [module.shared for module in adapter_modules(model, name).values()]


class Blocks(nn.Module):
    """L transformer-like blocks, each with two d x d projections that adapters follow (as after
    attention and after the feed-forward layer in the Compacter paper)."""

    def __init__(self, layers=3, d=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attn_out": nn.Linear(d, d), "ffn_out": nn.Linear(d, d)})
                                    for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = torch.relu(block["ffn_out"](torch.relu(block["attn_out"](x))))
        return x


@pytest.mark.parametrize("key", sorted(SHARING))
def test_one_shared_object_appears_once_in_parameters_and_artifact(tmp_path, key):
    m = adapted(SHARING[key])
    shared = shared_of_each_layer(m)
    assert len(shared) == 2 and all(s is shared[0] for s in shared) and shared[0] is shared_module(m, "a")
    ids = [id(p) for p in m.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids))  # an optimizer over them gets each tensor once
    everywhere = [id(p) for _, p in m.named_parameters(remove_duplicate=False)]
    for p in shared[0].parameters():
        assert p.requires_grad and ids.count(id(p)) == 1 and everywhere.count(id(p)) == 2
    own = sum(p.numel() for module in adapter_modules(m, "a").values()
              for n, p in module.named_parameters() if not n.startswith("shared."))
    assert lf.trainable_parameters(m)[0] == own + sum(p.numel() for p in shared[0].parameters())
    lf.save(m, tmp_path / "ad")
    keys = list(json.loads((tmp_path / "ad" / "adapter.json").read_text())["targets"])
    saved = adapter_tensors(m, "a")
    assert not any(".shared." in k for k in saved)
    assert sorted(k for k in saved if k.startswith(SHARED_PREFIX + ".")) == \
        sorted(f"{SHARED_PREFIX}.{k}" for k in shared[0].state_dict())
    assert keys == ["block.query", "block.value"]


@pytest.mark.parametrize("key", sorted(SHARING))
def test_gradients_of_every_layer_accumulate_into_the_shared_tensor(key):
    tied = Blocks(layers=2)  # four layers of one size, so every layer draws on every MoS pool
    lf.adapt(tied, SHARING[key], targets="all-linear", name="a", train_modules=[])
    perturb(tied)  # zero-initialised factors would give zero gradients
    untied = copy.deepcopy(tied)
    copied = shared_of_each_layer(untied)
    assert all(s is copied[0] for s in copied) and copied[0] is not shared_module(tied, "a")  # deepcopy keeps the tie
    for module in adapter_modules(untied, "a").values():
        module.shared = copy.deepcopy(module.shared)  # same values, one copy per layer
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tied(x), untied(x))
    tied(x).pow(2).mean().backward()
    untied(x).pow(2).mean().backward()
    for name, p in shared_module(tied, "a").named_parameters():
        per_layer = [dict(s.named_parameters())[name].grad for s in shared_of_each_layer(untied)]
        assert all(g is not None and g.abs().sum() > 0 for g in per_layer)  # every layer contributes
        assert torch.allclose(p.grad, sum(per_layer), atol=1e-6)
        assert not any(torch.allclose(p.grad, g, atol=1e-6) for g in per_layer)


@pytest.mark.parametrize("key", sorted(SHARING))
def test_save_load_round_trip_is_bit_exact_and_stays_shared(tmp_path, key):
    m = adapted(SHARING[key])
    perturb(m)
    m.eval()
    lf.save(m, tmp_path / "ad")
    fresh = tiny_net()
    lf.load(fresh, tmp_path / "ad")
    fresh.eval()
    x = tokens()
    assert torch.equal(fresh(x), m(x))
    before, after = adapter_tensors(m, "a"), adapter_tensors(fresh, "a")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    shared = shared_of_each_layer(fresh)
    assert shared[0] is shared[1] and shared[0] is not shared_module(m, "a")


def test_a_missing_or_unexpected_shared_tensor_is_refused(tmp_path):
    import safetensors.torch

    m = adapted(SHARING["compacter"])
    lf.save(m, tmp_path / "ad")
    manifest = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    manifest["method"]["share"] = False  # the tensors hold a shared rule, the config says per layer
    (tmp_path / "ad" / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(lf.errors.ArtifactError, match="does not fit layer"):
        lf.load(tiny_net(), tmp_path / "ad")
    tensors = safetensors.torch.load_file(tmp_path / "ad" / "adapter.safetensors")
    assert f"{SHARED_PREFIX}.phm_rule" in tensors


def test_compacter_count_is_the_papers_formula_plus_biases():
    L, d, k, n = 3, 16, 8, 4
    m = Blocks(L, d)
    lf.adapt(m, Compacter(size=k, n=n, phm_rank=1), targets="all-linear", name="a", train_modules=[])
    # Karimi Mahabadi et al. (2021): 4 L (k + d) + n^3 for two rank-one Compacter layers per block;
    # each adapter also has biases of size k (down) and d (up).
    assert lf.trainable_parameters(m)[0] == 4 * L * (k + d) + n ** 3 + 2 * L * (k + d)
    unshared = Blocks(L, d)
    lf.adapt(unshared, Compacter(size=k, n=n, phm_rank=1, share=False), targets="all-linear", name="a",
             train_modules=[])
    assert lf.trainable_parameters(unshared)[0] == lf.trainable_parameters(m)[0] + (2 * L - 1) * n ** 3


def test_mos_pools_are_global_balanced_and_route_each_layer_apart():
    L, d, pr, ps, l, r = 3, 16, 1, 3, 2, 4
    m = Blocks(L, d)
    config = MoS(rank=r, private_rank=pr, public_shards=ps, shards_per_vector=l, seed=5)
    lf.adapt(m, config, targets="all-linear", name="a", train_modules=[])
    pools = shared_module(m, "a").pools
    # one pool per factor and shard length, public_shards shards for each of the 2L layers using it
    assert {k: tuple(p.shape) for k, p in pools.items()} == {"A8": (ps * 2 * L, d // l), "B8": (ps * 2 * L, d // l)}
    assert lf.trainable_parameters(m)[0] == sum((d + d) * (pr + ps / l) for _ in range(2 * L))
    layers = list(adapter_modules(m, "a").values())
    for factor in ("A", "B"):
        index = [getattr(a, f"mos_index_{factor}") for a in layers]
        assert all(i.shape == ((r - pr) * l,) for i in index)
        uses = torch.bincount(torch.cat(index), minlength=ps * 2 * L)
        assert uses.max() - uses.min() <= 1  # every shard of the pool drawn about equally often
        assert len({tuple(i.tolist()) for i in index}) == len(index)  # equal-sized layers, own routes
    again = Blocks(L, d)
    lf.adapt(again, config, targets="all-linear", name="a", train_modules=[])
    assert all(torch.equal(a.mos_index_A, b.mos_index_A) for a, b in zip(layers, adapter_modules(again, "a").values()))


def test_mos_with_shared_pools_merges_exactly_and_batches_as_a_lora():
    m = adapted(SHARING["mos"])
    original = {k: v.clone() for k, v in m.state_dict().items() if "base_layer" in k}
    perturb(m)
    m.eval()
    x = tokens()
    unmerged = m(x)
    lf.merge(m, "a")
    assert torch.allclose(m(x), unmerged, atol=1e-5)
    lf.unmerge(m, "a")
    assert torch.allclose(m(x), unmerged, atol=1e-5)
    for k, v in original.items():
        assert torch.allclose(m.state_dict()[k], v, atol=1e-6), k
    host = m.block["value"]
    form, h = host.adapters["a"].batched_form(host.base_layer), torch.randn(3, 16)
    assert torch.allclose(form.scale * (h @ form.down.T) @ form.up.T,
                          host.adapters["a"].delta(h, host.base_layer(h), host.base_layer), atol=1e-6)


def test_deleting_the_adapter_frees_its_shared_parameters_and_spares_others():
    m = adapted(SHARING["compacter"], name="a")
    lf.adapt(m, Compacter(size=8), targets="all-linear", name="b", train_modules=[])
    a, b = shared_module(m, "a"), shared_module(m, "b")
    assert a is not b
    lf.set_trainable(m, "b")
    assert not a["phm_rule"].requires_grad and b["phm_rule"].requires_grad
    ref = weakref.ref(a)
    del a
    lf.delete(m, "a")
    gc.collect()
    assert ref() is None
    assert shared_module(m, "b") is b and b["phm_rule"].requires_grad


def test_to_moves_the_shared_tensor_once_and_keeps_it_shared():
    m = adapted(SHARING["mos"]).to(torch.float64)
    shared = shared_of_each_layer(m)
    assert shared[0] is shared[1]
    assert all(p.dtype == torch.float64 for p in shared[0].parameters())
    m(tokens())  # dtypes agree everywhere


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_moves_the_shared_tensor_and_keeps_it_shared():
    m = adapted(SHARING["compacter"])
    perturb(m)
    x = tokens()
    expected = m(x)
    m = m.to("cuda")
    shared = shared_of_each_layer(m)
    assert shared[0] is shared[1] and shared[0]["phm_rule"].is_cuda
    assert torch.allclose(m(x.cuda()).cpu(), expected, atol=1e-5)


def test_mixed_batch_rows_use_each_adapters_own_shared_parameters():
    m = adapted(SHARING["mos"], name="a")
    lf.adapt(m, MoS(rank=4, private_rank=1, public_shards=3, seed=3), targets="all-linear", name="b",
             train_modules=[])
    perturb(m)  # only b is trainable now; give a's zero-initialised factors values too
    lf.set_trainable(m, "a")
    perturb(m, seed=9)
    m.eval()
    x = tokens(batch=6)
    rows = ["a", None, "b", "b", "a", None]
    mixed = forward_mixed(m, {"input_ids": x}, rows)
    for name in ("a", "b", None):
        lf.activate(m, *([name] if name else []))
        alone = m(x)
        for i, r in enumerate(rows):
            if r == name:
                assert torch.allclose(mixed[i], alone[i], atol=1e-5)


def test_a_layer_built_alone_shares_with_itself():
    base = nn.Linear(8, 8)
    for config in (Compacter(size=4), MoS(rank=4, private_rank=1, public_shards=2)):
        module = lf.methods.module_class(config.method)(base, config)
        assert module.shared is not None
        assert module.cost().params == sum(p.numel() for n, p in module.named_parameters()
                                           if not n.startswith("shared."))


def test_adapt_that_fails_on_a_later_layer_leaves_the_model_untouched():
    m = tiny_net()
    before = m(tokens())
    with pytest.raises(ConfigError, match="exceeds this layer's in_features=16"):
        lf.adapt(m, Bone(rank=20), targets="all-linear", name="a")  # fits query (32), not value (16)
    assert not lf.core.inject.hosts(m) and lf.core.adapters(m) == {}
    assert torch.equal(m(tokens()), before)
    with pytest.raises(ConfigError, match="n=3 must divide"):
        lf.adapt(m, Compacter(n=3, size=6), targets="all-linear", name="a")
    assert not lf.core.inject.hosts(m)


@pytest.mark.parametrize("key", sorted(SHARING))
def test_a_layer_kind_the_method_refuses_is_named_before_anything_is_shared(key):
    with pytest.raises(ConfigError, match="cannot adapt a Embedding layer"):
        lf.adapt(tiny_net(), SHARING[key], targets=["embed", "query"], name="a")


CONV = {"compacter": Compacter(size=4, n=2), "mos": MoS(rank=4, private_rank=1, public_shards=3, shards_per_vector=1)}


@pytest.mark.parametrize("key", sorted(CONV))
def test_conv_layers_share_too_start_unchanged_train_and_round_trip(tmp_path, key):
    x = tokens()
    before = tiny_net()(x)
    m = tiny_net()
    lf.adapt(m, CONV[key], targets=["conv", "query"], name="a", train_modules=[])  # a 3x3 Conv2d and a Linear
    assert torch.equal(m(x), before)
    perturb(m)
    m.eval()
    changed = m(x)
    assert not torch.allclose(changed, before, atol=1e-4)
    assert m.conv.adapters["a"].shared is m.block["query"].adapters["a"].shared
    lf.save(m, tmp_path / "ad")
    fresh = tiny_net()
    lf.load(fresh, tmp_path / "ad")
    fresh.eval()
    assert torch.equal(fresh(x), changed)
    if key == "mos":  # a convolution pair, merged as one kernel
        lf.merge(m, "a")
        assert torch.allclose(m(x), changed, atol=1e-5)


def test_compacter_parallel_needs_a_pointwise_conv():
    with pytest.raises(ConfigError, match="needs a pointwise one"):
        lf.adapt(tiny_net(), Compacter(size=4, n=2, placement="parallel"), targets=["conv"], name="a")
    pointwise = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 5, 5)
    before = pointwise(x)
    lf.adapt(pointwise, Compacter(size=4, n=2, placement="parallel"), targets=nn.Conv2d, name="a", train_modules=[])
    assert torch.equal(pointwise(x), before)
    perturb(pointwise)
    assert pointwise(x).shape == before.shape and not torch.allclose(pointwise(x), before, atol=1e-4)

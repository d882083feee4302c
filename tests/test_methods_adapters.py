"""Compacter, Hydra, Bone and MoS on tiny models: start unchanged, train, merge, save/load, count, refuse."""

import copy

import pytest
import torch
from torch import nn

import leanfit as lf
from leanfit.errors import AdapterError, ConfigError
from leanfit.methods.bone import Bone
from leanfit.methods.compacter import Compacter, PHMLinear
from leanfit.methods.hydra import Hydra
from leanfit.methods.mos import MoS
from _nets import perturb, tiny_net, tokens

# tiny_net's linear targets: block.query (in 32, out 16, bias) and block.value (in 16, out 16, no bias)
LAYERS = [(32, 16), (16, 16)]
MERGEABLE = {"hydra": Hydra(rank=2), "bone": Bone(rank=4), "bone-remainder": Bone(rank=5),
             "mos": MoS(rank=4, private_rank=1, public_shards=3), "mos-private": MoS(rank=2, private_rank=2),
             "mos-unshared": MoS(rank=4, private_rank=1, public_shards=3, share=False)}
UNMERGEABLE = {"compacter": Compacter(size=8), "compacter-parallel": Compacter(size=8, placement="parallel"),
               "phm-adapter": Compacter(size=8, phm_rank=None), "compacter-unshared": Compacter(size=8, share=False)}
ALL = {**MERGEABLE, **UNMERGEABLE}


def adapted(config, seed=0):
    m = tiny_net(seed)
    lf.adapt(m, config, targets="all-linear", name="a", train_modules=[])
    return m


def adapter_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)


@pytest.mark.parametrize("key", sorted(ALL))
def test_fresh_adapter_leaves_model_unchanged_and_training_changes_it(key):
    x = tokens()
    before = tiny_net()(x)
    m = adapted(ALL[key])
    assert torch.equal(m(x), before)
    perturb(m)
    assert not torch.allclose(m(x), before, atol=1e-4)
    m(x).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad and p.numel())


@pytest.mark.parametrize("key", sorted(MERGEABLE))
def test_merge_equals_unmerged_and_unmerge_restores(key):
    m = adapted(MERGEABLE[key])
    original = copy.deepcopy(m.state_dict())
    perturb(m)
    m.eval()
    x = tokens()
    unmerged = m(x)
    lf.merge(m, "a")
    assert torch.allclose(m(x), unmerged, atol=1e-5)
    lf.unmerge(m, "a")
    assert torch.allclose(m(x), unmerged, atol=1e-5)
    for k, v in m.state_dict().items():
        if "base_layer" in k:
            assert torch.allclose(v, original[k], atol=1e-6), k


@pytest.mark.parametrize("key", sorted(UNMERGEABLE))
def test_compacter_refuses_merge(key):
    m = adapted(UNMERGEABLE[key])
    with pytest.raises(AdapterError, match="cannot be merged"):
        lf.merge(m, "a")


@pytest.mark.parametrize("key", sorted(ALL))
def test_save_load_round_trip_gives_same_outputs(tmp_path, key):
    m = adapted(ALL[key])
    perturb(m)
    m.eval()
    x = tokens()
    lf.save(m, tmp_path / "ad")
    fresh = tiny_net()
    assert lf.load(fresh, tmp_path / "ad") == "a"
    fresh.eval()
    assert torch.equal(fresh(x), m(x))
    assert lf.config_from_dict(ALL[key].to_dict()) == ALL[key]


def test_mos_per_layer_pools_route_by_seed_and_layer_size_and_save_the_index(tmp_path):
    config = MoS(rank=4, private_rank=1, public_shards=3, seed=7, share=False)
    m, again = adapted(config), adapted(config)
    query, value = m.block["query"].adapters["a"], m.block["value"].adapters["a"]
    assert torch.equal(query.mos_index_A, again.block["query"].adapters["a"].mos_index_A)
    assert query.mos_index_A.shape == (6,) and set(query.mos_index_A.tolist()) == {0, 1, 2}  # every shard used
    assert not torch.equal(query.mos_index_A, value.mos_index_A)  # another layer size, another route
    other = adapted(config.replace(seed=8)).block["query"].adapters["a"]
    assert not torch.equal(torch.cat([query.mos_index_A, query.mos_index_B]),
                           torch.cat([other.mos_index_A, other.mos_index_B]))
    perturb(m)
    query.mos_index_B.copy_(query.mos_index_B.flip(0))  # a saved index wins over the seed
    lf.save(m, tmp_path / "ad")
    fresh = tiny_net()
    lf.load(fresh, tmp_path / "ad")
    assert torch.equal(fresh.block["query"].adapters["a"].mos_index_B, query.mos_index_B)
    a, b = query.factors()
    assert a.shape == (4, 32) and b.shape == (16, 4)
    assert torch.equal(a[1, 16:], query.mos_A_public[query.mos_index_A[1]])  # rank vector 1, shard 2


def test_parameter_counts_follow_the_papers():
    def count(config):
        return adapter_params(adapted(config))

    r = 2
    assert count(Hydra(rank=r)) == sum(r * (i + 3 * o) for i, o in LAYERS)
    assert count(Bone(rank=5)) == sum(5 * o for _, o in LAYERS)
    pr, ps, l = 1, 3, 2
    assert count(MoS(rank=4, private_rank=pr, public_shards=ps, shards_per_vector=l)) == sum(
        (i + o) * (pr + ps / l) for i, o in LAYERS)
    assert count(MoS(rank=2, private_rank=2)) == sum((i + o) * 2 for i, o in LAYERS)
    assert count(MoS(rank=4, private_rank=pr, public_shards=ps, shards_per_vector=l, share=False)) == sum(
        (i + o) * (pr + ps / l) for i, o in LAYERS)
    n, k, pr = 4, 8, 1
    for placement in ("series", "parallel"):
        reads = [o if placement == "series" else i for i, o in LAYERS]
        # the slow matrices: n^3 once for the whole adapter (share=True, the paper), or once per layer
        for share, slow in ((True, n ** 3), (False, len(LAYERS) * n ** 3)):
            expected = slow + sum(pr * (d + k) + pr * (k + o) + k + o for d, (_, o) in zip(reads, LAYERS))
            assert count(Compacter(size=k, n=n, phm_rank=pr, placement=placement, share=share)) == expected
            expected = slow + sum((d * k + k * o) // n + k + o for d, (_, o) in zip(reads, LAYERS))
            assert count(Compacter(size=k, n=n, phm_rank=None, placement=placement, share=share)) == expected


@pytest.mark.parametrize("rank", [None, 2])
def test_phm_weight_is_a_sum_of_kronecker_products(rank):
    layer = PHMLinear(12, 8, 4, rank, zero=False, factory={})
    slow = torch.randn(4, 4, 4)
    fast = layer.phm_B if rank is None else layer.phm_s @ layer.phm_t
    expected = sum(torch.kron(slow[i], fast[i]) for i in range(4))
    assert layer.weight(slow).shape == (8, 12)
    assert torch.allclose(layer.weight(slow), expected, atol=1e-6)
    x = torch.randn(3, 12)
    assert torch.allclose(layer(x, slow), x @ expected.T + layer.bias, atol=1e-5)


def test_hydra_merges_the_sequential_branch_through_the_base_weight():
    base = nn.Linear(6, 5)
    h = lf.methods.module_class("hydra")(base, Hydra(rank=2, alpha=4))
    perturb(h)
    d_w, d_b = h.delta_weight(base)
    s = 2.0
    assert torch.allclose(d_w, s * (h.hydra_B_p @ h.hydra_A_p + h.hydra_B_s @ h.hydra_A_s @ base.weight))
    assert torch.allclose(d_b, s * h.hydra_B_s @ h.hydra_A_s @ base.bias)


def test_bone_matches_peft():
    from peft import MissConfig, inject_adapter_in_model  # PEFT's Bone, renamed MiSS in 0.21

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(12, 10), nn.Linear(10, 6, bias=False)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    ours = Net()
    theirs = copy.deepcopy(ours)
    for rank in (3, 4):  # both divide 12 but leave a remainder on 10 (exercises the padding)
        lf.adapt(ours, Bone(rank=rank), targets=["up", "down"], name=f"r{rank}", train_modules=[])
        perturb(ours, seed=rank)
        peft_model = inject_adapter_in_model(MissConfig(r=rank, target_modules=["up", "down"]),
                                             copy.deepcopy(theirs))
        x = torch.randn(5, 12)
        with torch.no_grad():
            for name in ("up", "down"):
                getattr(peft_model, name).miss_block["default"].copy_(
                    getattr(ours, name).adapters[f"r{rank}"].bone_block)
                w = getattr(peft_model, name).base_layer.weight
                peft_delta = getattr(peft_model, name).get_delta_weight_miss("default", w.clone()) - w
                host = getattr(ours, name)
                ours_delta = host.adapters[f"r{rank}"].delta_weight(host.base_layer)[0]
                assert (ours_delta - peft_delta).abs().max() <= 1e-5
            assert (ours(x) - peft_model(x)).abs().max() <= 1e-5
        lf.delete(ours, f"r{rank}")


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ConfigError, match="Hydra rank must be a positive"):
        Hydra(rank=0)
    with pytest.raises(ConfigError, match="Bone rank .* must be a positive"):
        Bone(rank=0)
    with pytest.raises(ConfigError, match="exceeds this layer's in_features=16"):
        adapted(Bone(rank=20))
    with pytest.raises(ConfigError, match="private_rank must be between 0 and rank=4"):
        MoS(rank=4, private_rank=5)
    with pytest.raises(ConfigError, match="public_shards >= 1"):
        MoS(rank=4, private_rank=1, public_shards=0)
    with pytest.raises(ConfigError, match="shards_per_vector=3 must divide .*in_features=32"):
        adapted(MoS(shards_per_vector=3))
    with pytest.raises(ConfigError, match="size must be a positive multiple of n=4"):
        Compacter(size=6)
    with pytest.raises(ConfigError, match="phm_rank must be a positive integer or None"):
        Compacter(phm_rank=0)
    with pytest.raises(ConfigError, match="n=3 must divide .* 16 features"):
        adapted(Compacter(n=3, size=6))
    with pytest.raises(ConfigError, match="Unknown placement"):
        Compacter(placement="side")
    with pytest.raises(ConfigError, match="cannot adapt a Conv2d"):
        lf.adapt(tiny_net(), Hydra(), targets=nn.Conv2d)

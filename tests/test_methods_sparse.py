"""Sparse and spectral methods (S2FT, PaCA, SFT, WHT, HUT) and the fast Walsh-Hadamard transform."""

import copy

import pytest
import torch
from torch import nn

import leanfit as lf
import leanfit.methods.sparse as sparse
import leanfit.methods.spectral as spectral
from leanfit.errors import ConfigError
from _nets import perturb, tiny_net, tokens

CONFIGS = {
    "s2ft": sparse.S2FT(k=4),
    "s2ft-norm-columns": sparse.S2FT(fraction=0.25, select="norm", axis="columns"),
    "paca": sparse.PaCA(rank=4),
    "sft": sparse.SFT(density=0.1),
    "wht": spectral.WHT(n_coeffs=40),
    "wht-both-magnitude": spectral.WHT(n_coeffs=40, select="magnitude", sides="both", scale=2.0),
    "hut": spectral.HUT(rank=2),
}
SHAPES = {"block.query": (16, 32), "block.value": (16, 16)}  # (out, in) of the targets
EXPECTED_PARAMS = {  # per target layer, from the config
    "s2ft": lambda o, i: 4 * i,
    "s2ft-norm-columns": lambda o, i: round(0.25 * i) * o,
    "paca": lambda o, i: 4 * o,
    "sft": lambda o, i: round(0.1 * o * i),
    "wht": lambda o, i: 40,
    "wht-both-magnitude": lambda o, i: 40,
    "hut": lambda o, i: 2 * (o + i),
}


def adapted(key, seed=0):
    m = tiny_net(seed)
    lf.adapt(m, CONFIGS[key], targets="all-linear", name="a", train_modules=[])
    return m


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def dense_hadamard(n):
    try:
        from scipy.linalg import hadamard
    except ImportError:
        return sylvester(n)
    return torch.tensor(hadamard(n), dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_fwht_equals_dense_hadamard_and_is_its_own_inverse(n):
    x = torch.randn(3, n, 5, dtype=torch.float64)
    h = dense_hadamard(n)
    assert torch.equal(h, sylvester(n))
    expected = torch.einsum("ij,bjk->bik", h, x)
    assert torch.allclose(spectral.fwht(x, dim=1), expected)
    assert torch.allclose(spectral.fwht(spectral.fwht(x, dim=1), dim=1), n * x)
    assert torch.allclose(spectral.fwht(x, dim=1, normalized=True), expected / n ** 0.5)
    once = spectral.fwht(x, dim=1, normalized=True)
    assert torch.allclose(spectral.fwht(once, dim=1, normalized=True), x)


def test_fwht_passes_gradients_and_refuses_other_lengths():
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: spectral.fwht(t, normalized=True), (x,))
    with pytest.raises(ValueError, match="power-of-two"):
        spectral.fwht(torch.randn(6))


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_fresh_adapter_leaves_model_unchanged_and_perturbed_one_changes_it(key):
    m = tiny_net()
    x = tokens()
    before = m(x)
    lf.adapt(m, CONFIGS[key], targets="all-linear", name="a", train_modules=[])
    assert torch.equal(m(x), before)
    perturb(m)  # trainable values only; the chosen indices are buffers
    assert not torch.allclose(m(x), before, atol=1e-4)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_merge_equals_unmerged_and_unwrap_restores(key):
    original = copy.deepcopy(tiny_net(0).state_dict())
    m = adapted(key)
    x = tokens()
    perturb(m)
    m.eval()
    unmerged = m(x)
    lf.merge(m, "a")
    assert (m(x) - unmerged).abs().max() <= 1e-5
    lf.unmerge(m, "a")
    assert (m(x) - unmerged).abs().max() <= 1e-5
    lf.unwrap(m)
    assert m.state_dict().keys() == original.keys()
    for k, v in m.state_dict().items():
        assert torch.allclose(v, original[k], atol=1e-6), k


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_save_load_round_trip_keeps_values_and_indices(tmp_path, key):
    m = adapted(key)
    perturb(m)
    if key == "sft":  # move the indices away from where a fresh init puts them
        sparse.regrow_all(m, "a", 0.5, torch.Generator().manual_seed(7))
        perturb(m, seed=8)
    m.eval()
    x = tokens()
    out = m(x)
    lf.save(m, tmp_path / "ad")
    fresh = tiny_net(0)
    lf.load(fresh, tmp_path / "ad")
    fresh.eval()
    assert torch.equal(fresh(x), out)
    for host, module in lf.core.model.adapter_modules(m, "a").items():
        loaded = lf.core.model.adapter_modules(fresh, "a")[host]
        for name, buf in module.named_buffers():
            assert torch.equal(getattr(loaded, name), buf), (host, name)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_parameter_counts_match_the_config(key):
    m = adapted(key)
    modules = lf.core.model.adapter_modules(m, "a")
    for host, (o, i) in SHAPES.items():
        assert sum(p.numel() for p in modules[host].parameters()) == EXPECTED_PARAMS[key](o, i), host
    assert lf.trainable_parameters(m)[0] == sum(EXPECTED_PARAMS[key](o, i) for o, i in SHAPES.values())


def test_s2ft_gradient_reaches_only_its_rows():
    m = adapted("s2ft")
    perturb(m)
    m(tokens()).pow(2).mean().backward()
    for name, p in m.named_parameters():
        if name.endswith("delta_rows"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    s2ft = m.block["value"].adapters["a"]
    out = s2ft.delta(torch.randn(3, 16), None, m.block["value"].base_layer)
    others = torch.ones(16, dtype=torch.bool)
    others[s2ft.channels] = False
    assert torch.equal(out[:, others], torch.zeros(3, int(others.sum())))


def test_s2ft_norm_picks_largest_rows_and_paca_columns_are_distinct():
    layer = nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1.0, 7.0)[:, None] ** 2)
    s2ft = lf.methods.module_class("s2ft")(layer, sparse.S2FT(k=2, select="norm"))
    assert s2ft.channels.tolist() == [4, 5]
    paca = lf.methods.module_class("paca")(layer, sparse.PaCA(rank=5))
    assert paca.columns.unique().numel() == 5 and paca.columns.max() < 8


def test_sft_regrowth_keeps_budget_never_duplicates_and_moves_indices():
    m = adapted("sft")
    perturb(m)
    sft = m.block["query"].adapters["a"]
    k = sft.indices.numel()
    before_idx, before_val = sft.indices.clone(), sft.values.detach().clone()
    values_param = sft.values
    changed = sparse.regrow_all(m, "a", 0.25, torch.Generator().manual_seed(3))
    assert set(changed) == {"block.query", "block.value"}
    slots = changed["block.query"]
    assert slots.numel() == round(0.25 * k)
    assert sft.indices.numel() == k and sft.indices.unique().numel() == k
    assert sft.values is values_param  # optimizers keep their reference
    assert not torch.equal(sft.indices, before_idx)
    assert not set(sft.indices[slots].tolist()) & set(before_idx.tolist())  # regrown where unused
    assert torch.equal(sft.values[slots].detach(), torch.zeros(slots.numel()))
    kept = torch.ones(k, dtype=torch.bool)
    kept[slots] = False
    assert torch.equal(sft.values[kept].detach(), before_val[kept])
    assert before_val[slots].abs().max() <= before_val[kept].abs().min()  # the smallest were dropped


def test_sft_regrowth_follows_the_gradient():
    layer = nn.Linear(8, 4)
    sft = lf.methods.module_class("sft")(layer, sparse.SFT(density=0.25))
    with torch.no_grad():
        sft.values.copy_(torch.arange(1.0, 9.0))
    grad = torch.zeros(4, 8)
    free = [i for i in range(32) if i not in set(sft.indices.tolist())]
    grad.view(-1)[free[3]], grad.view(-1)[free[5]] = 5.0, -7.0
    grad.view(-1)[sft.indices[0]] = 100.0  # already used: must not be picked again
    slots = sft.drop_and_regrow(grad, fraction=0.25)
    assert sorted(sft.indices[slots].tolist()) == sorted([free[3], free[5]])
    assert sft.indices.unique().numel() == 8
    with pytest.raises(ConfigError, match="fraction"):
        sft.drop_and_regrow(fraction=0.0)


@pytest.mark.parametrize("sides,target", [("in", "value"), ("both", "query")])
def test_wht_full_magnitude_budget_reconstructs_the_weight(sides, target):
    layer = tiny_net().block[target]
    o, i = layer.weight.shape
    wht = lf.methods.module_class("wht")(layer, spectral.WHT(n_coeffs=o * i, select="magnitude", sides=sides))
    with torch.no_grad():
        wht.values.copy_(wht._transform(layer.weight).flatten()[wht.positions])
    assert torch.allclose(wht.delta_weight(layer)[0], layer.weight, atol=1e-5)
    x = torch.randn(5, i)
    assert torch.allclose(wht.delta(x, None, layer), x @ layer.weight.T, atol=1e-5)


def test_hut_update_is_tied_to_the_weight():
    m = adapted("hut")
    perturb(m)
    host = m.block["value"]
    hut = host.adapters["a"]
    expected = host.base_layer.weight * (hut.hut_B @ hut.hut_A) * (hut.config.alpha / hut.config.rank)
    assert torch.allclose(hut.delta_weight(host.base_layer)[0], expected)


def test_configs_round_trip_through_dict():
    for cfg in CONFIGS.values():
        assert lf.config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("make,match", [
    (lambda: sparse.S2FT(fraction=0.0), "fraction must be in"),
    (lambda: sparse.S2FT(fraction=1.5), "fraction must be in"),
    (lambda: sparse.S2FT(k=0), "k must be a positive"),
    (lambda: sparse.S2FT(select="grad"), "Unknown S2FT select"),
    (lambda: sparse.S2FT(axis="heads"), "Unknown S2FT axis"),
    (lambda: sparse.SFT(density=0.0), "density must be in"),
    (lambda: sparse.SFT(density=1.01), "density must be in"),
    (lambda: sparse.PaCA(rank=0), "rank must be a positive"),
    (lambda: spectral.WHT(n_coeffs=0), "n_coeffs must be a positive"),
    (lambda: spectral.WHT(select="top"), "Unknown WHT select"),
    (lambda: spectral.WHT(sides="out"), "Unknown WHT sides"),
    (lambda: spectral.HUT(rank=0), "rank must be a positive"),
])
def test_bad_options_say_what_is_wrong(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize("cfg,match", [
    (sparse.S2FT(k=17), "exceeds the 16 rows"),
    (sparse.S2FT(k=17, axis="columns"), "exceeds the 16 columns"),
    (sparse.PaCA(rank=17), "exceeds the 16 input columns"),
    (spectral.WHT(n_coeffs=257), "exceeds the 256 coefficients"),
    (spectral.WHT(n_coeffs=257, sides="both"), "exceeds the 256 coefficients"),
])
def test_dims_that_do_not_fit_are_refused(cfg, match):
    with pytest.raises(ConfigError, match=match):
        lf.adapt(tiny_net(), cfg, targets=["value"])


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_linear_only(key):
    with pytest.raises(ConfigError, match="cannot adapt a Conv2d"):
        lf.adapt(tiny_net(), CONFIGS[key], targets=nn.Conv2d)


def test_trainer_regrows_sft_positions_on_schedule():
    from _tiny import classification_data

    from leanfit.train import Trainer

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()

        def forward(self, input_ids, attention_mask=None, labels=None):
            logits = self.net(input_ids)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            return type("Out", (), {"loss": loss, "logits": logits})

    model = Wrapped()
    lf.adapt(model, lf.SFT(density=0.2, regrow_every=3, regrow_fraction=0.25), targets="all-linear", name="s")
    sft = model.net.block["query"].adapters["s"]
    before = sft.indices.clone()
    Trainer(model, classification_data(n_train=48), epochs=1, batch_size=8, lr=1e-2, progress=False).fit()
    after = sft.indices
    assert after.numel() == before.numel() and after.unique().numel() == after.numel()
    assert not torch.equal(after, before)  # rounds at steps 3 (6 is the last step: no round)
    moved = (after != before).sum().item()
    assert 0 < moved <= round(0.25 * before.numel())

"""AdaLoRA and IncreLoRA: equal to PEFT's AdaLoRA, budgets reached by the trainer alone, growth that
leaves outputs unchanged, exact merge, save/load and resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanfit as lf
from leanfit.core.model import adapter_modules
from leanfit.errors import ConfigError
from leanfit.methods.adaptive import AdaLoRA, AdaLoRAController, IncreLoRA, IncreLoRAController
from leanfit.train import Trainer
from _tiny import VOCAB, Output, classification_data, trainable_state

FAST = dict(batch_size=8, lr=1e-2, progress=False)
LAYERS = r"layers\.\d"


class Attention(nn.Module):
    """Two Linears named as PEFT's AdaLoRA targets them, and a frozen head."""

    def __init__(self, dim=8):
        super().__init__()
        self.query, self.value, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x, labels=None):
        logits = self.out(torch.tanh(self.query(x)) * self.value(x))
        return Output(None if labels is None else F.cross_entropy(logits, labels), logits)


class Stack(nn.Module):
    """Hugging Face style classifier: mean-pooled embeddings -> three Linears -> head."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Tanh(),
                                    nn.Linear(dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.layers(self.embed(input_ids).float().mean(1)))
        return Output(None if labels is None else F.cross_entropy(logits, labels), logits)


def stack(seed=0):
    torch.manual_seed(seed)
    return Stack()


def peft_pair(**schedule):
    """PEFT's AdaLoRA and leanfit's on copies of one model, with equal (random) factors."""
    peft = pytest.importorskip("peft")
    kw = dict(init_r=4, target_r=2, lora_alpha=8.0, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
              **{"total_step": 16, "tinit": 2, "tfinal": 4, "deltaT": 2, **schedule})
    torch.manual_seed(0)
    ours = Attention()
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft.AdaLoraConfig(target_modules=["query", "value"], **kw))
    lf.adapt(ours, AdaLoRA(init_rank=4, target_rank=2, alpha=8.0, tinit=kw["tinit"], tfinal=kw["tfinal"],
                           delta_t=kw["deltaT"]), targets=["query", "value"])
    mods = adapter_modules(ours, "default")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, ours_layer in mods.items():
            layer = theirs.base_model.model.get_submodule(name)
            for key in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, key)["default"]
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                getattr(ours_layer, key).copy_(p)
    return theirs, ours, mods


def max_diff(a, b):
    return (a - b).abs().max().item()


# -- AdaLoRA ----------------------------------------------------------------------------------------

def test_adalora_equals_peft_outputs_with_equal_weights_masked_and_merged():
    theirs, ours, mods = peft_pair()
    x = torch.randn(5, 8)
    assert max_diff(theirs(x).logits, ours(x).logits) <= 1e-5
    with torch.no_grad():  # drop triplets identically: PEFT zeroes E, leanfit masks it
        for name, rows in {"query": [0, 2], "value": [1]}.items():
            theirs.base_model.model.get_submodule(name).lora_E["default"][rows] = 0.0
            mods[name].rank_mask[rows] = 0.0
    assert {n: m.rank for n, m in mods.items()} == {"query": 2, "value": 3}
    assert max_diff(theirs(x).logits, ours(x).logits) <= 1e-5
    unmerged = ours(x).logits
    theirs.base_model.merge_adapter()
    lf.merge(ours, "default")
    assert max_diff(ours(x).logits, unmerged) <= 1e-5
    assert max_diff(theirs(x).logits, ours(x).logits) <= 1e-5


def test_adalora_training_follows_peft_rank_allocator_step_by_step():
    steps = 16
    theirs, ours, mods = peft_pair(total_step=steps)
    controller = AdaLoRAController(mods, steps)
    allocator = theirs.base_model.rankallocator
    assert [controller.budget(s) for s in range(steps)] == [allocator.budget_schedule(s)[0] for s in range(steps)]
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        theirs.base_model(x, labels=y).loss.backward()  # PEFT adds the orthogonal penalty to the loss
        ours(x, labels=y).loss.backward()
        controller.after_backward(step)  # leanfit adds its gradient
        for name, m in mods.items():
            layer = theirs.base_model.model.get_submodule(name)
            for key in ("lora_A", "lora_B"):
                assert max_diff(getattr(layer, key)["default"].grad, getattr(m, key).grad) <= 1e-5, (step, key)
            # Past the final allocation PEFT's masked E still get a gradient it then discards; ours get none.
            assert max_diff(layer.lora_E["default"].grad * m.rank_mask, m.lora_E.grad) <= 1e-5, step
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_ours.step()
        controller.after_step(step, opt_ours)
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
    pattern = theirs.peft_config["default"].rank_pattern
    assert {n: controller.keep[n].tolist() for n in mods} == {n: pattern[f"{n}.lora_E.default"] for n in mods}
    assert sum(controller.final_ranks().values()) == 2 * 2
    x = torch.randn(5, 8)
    assert max_diff(theirs(x).logits, ours(x).logits) <= 1e-5


def test_trainer_brings_adalora_to_its_budget_and_save_load_keeps_the_masks(tmp_path):
    model = stack()
    lf.adapt(model, AdaLoRA(init_rank=6, target_rank=2), targets=LAYERS, train_modules=["head"])
    trainer = Trainer(model, classification_data(), epochs=10, **FAST)  # 60 steps, all inside fit()
    trainer.fit()
    (controller,) = trainer.controllers
    ranks = controller.final_ranks()
    mods = adapter_modules(model, "default")
    assert sum(ranks.values()) == 2 * 3 and ranks == {h: m.rank for h, m in mods.items()}
    assert len(set(ranks.values())) > 1, ranks  # not a uniform allocation
    assert all(torch.all(m.lora_E[m.rank_mask == 0] == 0) for m in mods.values())

    batch = classification_data().test
    model.eval()
    before = model(batch["input_ids"]).logits
    lf.save(model, tmp_path / "ada")
    fresh = stack()
    lf.load(fresh, tmp_path / "ada")
    fresh.eval()
    assert torch.equal(fresh(batch["input_ids"]).logits, before)
    assert {h: m.rank for h, m in adapter_modules(fresh, "default").items()} == ranks


class Crash(Exception):
    pass


ADA = AdaLoRA(init_rank=4, target_rank=2, delta_t=1)
INCRE = IncreLoRA(init_rank=1, max_rank=4, target_rank=3, grow_every=2)


# AdaLoRA: inside the budget phase, after the final mask (step 24); IncreLoRA: while growing.
@pytest.mark.parametrize("config, crash_step", [(ADA, 14), (ADA, 28), (INCRE, 10)])
def test_resume_is_bit_identical(tmp_path, config, crash_step):
    def run(**kw):
        model = stack()
        lf.adapt(model, config, targets=LAYERS)
        return model, Trainer(model, classification_data(), epochs=5, checkpoint_every=2, **FAST, **kw)

    reference, trainer = run()
    trainer.fit()

    def crash(trainer, step):
        if step == crash_step:
            raise Crash

    with pytest.raises(Crash):
        run(checkpoint_dir=str(tmp_path), on_step=crash)[1].fit()
    resumed, trainer = run(checkpoint_dir=str(tmp_path), resume=True)
    trainer.fit()
    ref_state, new_state = adapter_state(reference), adapter_state(resumed)
    assert ref_state.keys() == new_state.keys() and all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


def adapter_state(model):
    """Trainable weights and the masks (buffers) of every layer."""
    return {**trainable_state(model), **{n: b for n, b in model.named_buffers()}}


# -- IncreLoRA --------------------------------------------------------------------------------------

def test_trainer_grows_increlora_from_init_rank_to_its_budget():
    model = stack()
    lf.adapt(model, IncreLoRA(init_rank=1, max_rank=4, target_rank=2, grow_every=3), targets=LAYERS,
             train_modules=["head"])
    mods = adapter_modules(model, "default")
    assert {m.rank for m in mods.values()} == {1}
    trainer = Trainer(model, classification_data(), epochs=10, **FAST)
    trainer.fit()
    (controller,) = trainer.controllers
    ranks = controller.final_ranks()
    assert sum(ranks.values()) == 2 * 3 and max(ranks.values()) <= 4
    assert len(set(ranks.values())) > 1, ranks  # not a uniform allocation
    assert all(not m.tracking and m.reserve.sum() == 0 for m in mods.values())


@pytest.mark.parametrize("advance", [True, False])
def test_increlora_growth_leaves_outputs_unchanged(advance):
    model = stack()
    lf.adapt(model, IncreLoRA(init_rank=1, max_rank=4, target_rank=3, grow_every=2, grow_by=1,
                              advance_learning=advance), targets=LAYERS)
    mods = adapter_modules(model, "default")
    steps = 20
    controller = IncreLoRAController(mods, steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = classification_data().train
    grown = []
    for step in range(steps):
        model.train()
        model(**{k: v[step % 6 * 8:][:8] for k, v in data.items()}).loss.backward()
        controller.after_backward(step)
        opt.step()
        model.eval()
        with torch.no_grad():
            before, rank = model(data["input_ids"]).logits, controller.total_rank()
            controller.after_step(step, opt)
            after = model(data["input_ids"]).logits
        opt.zero_grad()
        if controller.total_rank() > rank:
            grown.append(step)
            if controller.total_rank() < controller.budget:  # reaching it drops the reserves (E = 1e-5)
                assert torch.equal(before, after), step
            assert max_diff(before, after) <= 1e-5
    assert len(grown) >= 3 and controller.total_rank() == 3 * 3


@pytest.mark.parametrize("config", [AdaLoRA(init_rank=4, target_rank=2), IncreLoRA(init_rank=2, max_rank=4)])
def test_merge_and_unmerge_are_exact(config):
    model = stack()
    lf.adapt(model, config, targets=LAYERS, name="a")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in adapter_modules(model, "a").values():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if isinstance(config, AdaLoRA):
                m.rank_mask[1] = 0.0
            else:
                m.grow(1)
    model.eval()
    x = classification_data().test["input_ids"]
    unmerged = model(x).logits
    lf.merge(model, "a")
    assert max_diff(model(x).logits, unmerged) <= 1e-5
    lf.unmerge(model, "a")
    assert max_diff(model(x).logits, unmerged) <= 1e-5


def test_configs_are_checked_and_round_trip_by_name():
    with pytest.raises(ConfigError, match="target_rank <= init_rank"):
        AdaLoRA(init_rank=4, target_rank=5)
    with pytest.raises(ConfigError, match="target_rank <= max_rank"):
        IncreLoRA(max_rank=4, target_rank=6)
    with pytest.raises(ConfigError, match="beta1"):
        AdaLoRA(beta1=1.0)
    for config in (AdaLoRA(init_rank=6, target_rank=3), IncreLoRA(max_rank=6)):
        assert lf.config_from_dict(config.to_dict()) == config

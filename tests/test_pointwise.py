"""Linear-only methods on pointwise (1x1) convolutions (methods/pointwise.py): the same math as on the
equivalent Linear layer, merging, saving and loading, and a clear refusal of other convolutions."""

import pytest
import torch
from torch import nn

import leanfit as lf
from leanfit.errors import ConfigError
from leanfit.methods import method_names, module_class
from leanfit.methods.base import CONV2D, LINEAR
from _nets import perturb

LINEAR_ONLY = [m for m in method_names()
               if CONV2D not in module_class(m).capabilities.layer_kinds
               and LINEAR in module_class(m).capabilities.layer_kinds]
# Small enough for 8- and 16-channel layers.
OPTIONS = {"bone": {"rank": 4}, "hut": {"rank": 2}, "paca": {"rank": 2}, "s2ft": {"fraction": 0.25}, "hydra": {"rank": 2},
           "adalora": {"init_rank": 4, "target_rank": 2}, "lora-sb": {"rank": 2},
           "increlora": {"init_rank": 1, "target_rank": 2, "max_rank": 4}, "wht": {"n_coeffs": 8}, "sft": {"density": 0.1}}


def config(method):
    return lf.config_from_dict({"method": method, **OPTIONS.get(method, {})})


class TinyCNN(nn.Module):
    """A 3x3 stem, two pointwise convolutions (one without bias), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = self.project(torch.relu(self.expand(h)))
        return self.classifier(h.mean((2, 3)))


def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN()


def images(seed=1):
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))


def test_the_methods_exist():
    assert {"adalora", "bone", "hydra", "s2ft", "sft", "paca", "hut", "wht"} <= set(LINEAR_ONLY)


@pytest.mark.parametrize("method", LINEAR_ONLY)
def test_update_on_a_pointwise_conv_equals_the_update_on_its_linear_twin(method):
    conv = tiny_cnn().expand
    linear = nn.Linear(8, 16)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.view(16, 8))
        linear.bias.copy_(conv.bias)
    on_conv, on_linear = nn.Sequential(conv), nn.Sequential(linear)
    lf.adapt(on_conv, config(method), targets=["0"])
    lf.adapt(on_linear, config(method), targets=["0"])
    perturb(on_conv)
    inner = on_conv[0].adapters["default"].method_module
    on_linear[0].adapters["default"].load_state_dict(inner.state_dict())
    on_conv.eval(), on_linear.eval()
    x = images()[:, :1].expand(2, 8, 5, 5).contiguous() + torch.randn(2, 8, 5, 5)
    expected = on_linear(x.movedim(1, -1)).movedim(-1, 1)
    assert torch.allclose(on_conv(x), expected, atol=1e-5)
    assert not torch.allclose(expected, conv(x), atol=1e-4)  # the perturbed adapter does change the output


@pytest.mark.parametrize("method", LINEAR_ONLY)
def test_trains_merges_saves_and_loads_on_a_cnn(method, tmp_path):
    m, x = tiny_cnn(), images()
    before = m(x)
    lf.adapt(m, config(method), targets="all-linear", name="a")
    assert lf.find_targets(m, "all-linear") == ["expand", "project"]
    m.train()
    m(x).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad)
    perturb(m)
    m.eval()
    adapted = m(x)
    assert not torch.allclose(adapted, before, atol=1e-4)
    lf.save(m, tmp_path / "ad")
    fresh = tiny_cnn()
    assert lf.load(fresh, tmp_path / "ad") == "a"
    fresh.eval()
    assert torch.allclose(fresh(x), adapted, atol=1e-6)
    if module_class(method).capabilities.mergeable:
        lf.merge(m, "a")
        assert torch.allclose(m(x), adapted, atol=1e-5)
        lf.unmerge(m, "a")
        assert torch.allclose(m(x), adapted, atol=1e-5)


def test_other_convolutions_are_refused_with_what_is_accepted():
    m = tiny_cnn()
    with pytest.raises(ConfigError, match=r"pointwise \(1x1, stride 1\) conv2d"):
        lf.adapt(m, config("bone"), targets=["stem"])


def test_controllers_drive_the_wrapped_modules():
    from leanfit.methods.adaptive import AdaLoRAModule
    from leanfit.train.controllers import build_controllers
    m = tiny_cnn()
    lf.adapt(m, config("adalora"), targets="all-linear")
    [controller] = build_controllers(m, total_steps=10)
    assert sorted(controller.modules) == ["expand", "project"]
    assert all(isinstance(module, AdaLoRAModule) for module in controller.modules.values())

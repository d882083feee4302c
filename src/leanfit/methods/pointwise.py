"""Linear-only methods on pointwise (1x1) convolutions.

A 1x1 convolution with stride 1 and one group is a linear layer applied at every pixel: y[:, :, i, j] =
W x[:, :, i, j] + b, with W its (out, in, 1, 1) weight seen as (out, in). So any method whose math is
written for a Linear layer (AdaLoRA, Bone, Hydra, S2FT, PaCA, SFT, HUT, WHT, ...) adapts one exactly:
the wrapper below hands it a Linear view of the convolution, moves the channel axis last for its
delta and back again, and reshapes its weight update to the kernel's layout for merging. This is how
those methods reach the pointwise convolutions that carry most of a CNN's weights (EfficientNet's
expand/project layers, MobileNet's pointwise halves).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import CONV2D, LINEAR, SHARED, AdapterModule, layer_kind


def is_pointwise(base: nn.Module) -> bool:
    """A Conv2d that is a per-pixel linear map: 1x1 kernel, stride 1, one group, no padding."""
    return (layer_kind(base) == CONV2D and tuple(base.kernel_size) == (1, 1) and tuple(base.stride) == (1, 1)
            and base.groups == 1 and base.padding in ((0, 0), "valid", "same"))


def linear_view(conv: nn.Conv2d) -> nn.Linear:
    """A Linear layer over the convolution's own weight and bias (views, not copies), built per call
    so it always sees the convolution's current tensors (after .to(), merging, loading)."""
    view = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(view)
    view.in_features, view.out_features = conv.in_channels, conv.out_channels
    view.weight = conv.weight.view(conv.out_channels, conv.in_channels)  # a plain attribute, not a Parameter
    view.bias = None if conv.bias is None else conv.bias.view(-1)
    return view


def needs_wrapper(method: type[AdapterModule], base: nn.Module) -> bool:
    kinds = method.capabilities.layer_kinds
    return CONV2D not in kinds and LINEAR in kinds and is_pointwise(base)


def build(method: type[AdapterModule], base: nn.Module, config, **extra) -> AdapterModule:
    """The method's module for `base`, through the wrapper where `base` is a pointwise convolution
    that the method, being linear-only, cannot take itself."""
    if needs_wrapper(method, base):
        return PointwiseConv(method, base, config, **extra)
    return method(base, config, **extra)


class PointwiseConv(AdapterModule):
    """A linear-only method on a pointwise convolution: delta(x) = movedim(inner.delta(movedim(x, 1, -1)),
    -1, 1); delta_weight = inner's (out x in) update reshaped to (out, in, 1, 1). Its parameters live in
    `inner` (state-dict keys `inner.*`); controllers and the PEFT export reach them via `method_module`."""

    def __init__(self, method: type[AdapterModule], base: nn.Module, config, shared: nn.Module | None = None):
        nn.Module.__init__(self)
        self.config, self.kind = config, CONV2D
        self.capabilities = method.capabilities  # mergeable / mixed_batch as the method's own
        self.controller_class = method.controller_class
        extra = {} if shared is None else {SHARED: shared}
        self.inner = method(linear_view(base), config, **extra)

    @property
    def method_module(self) -> AdapterModule:
        return self.inner

    @property
    def reads_base(self) -> bool:
        return self.inner.reads_base

    def delta(self, x, base_out, base):
        out = self.inner.delta(x.movedim(1, -1), base_out.movedim(1, -1), linear_view(base))
        return out.movedim(-1, 1)

    def delta_weight(self, base):
        d_weight, d_bias = self.inner.delta_weight(linear_view(base))
        return (None if d_weight is None else d_weight.reshape(base.weight.shape)), d_bias

    def extra_repr(self) -> str:
        return f"{self.config.method} on a pointwise convolution"

"""Bottleneck adapters: a small down-project / nonlinearity / up-project block, series or parallel.

On a Conv2d the projections are convolutions: series reads the output channels with 1x1 convs;
parallel reads the input through a down-projection with the base's own kernel, stride and padding
(so its output lines up with the base's), then a 1x1 up-projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import (tensor_kwargs, CONV2D, LINEAR, AdapterModule, Capabilities, MethodConfig, conv_with,
                   out_features)
from .registry import register

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
PLACEMENTS = ("series", "parallel")


@dataclass
class Bottleneck(MethodConfig):
    """Config of a bottleneck adapter of width `size`, placed in series (after the layer) or in
    parallel (beside it)."""

    method = "bottleneck"
    size: int = 64
    placement: str = "series"
    activation: str = "relu"
    scaling: float = 1.0

    def validate(self) -> None:
        if int(self.size) < 1:
            raise ConfigError(f"Bottleneck size must be a positive integer, got {self.size}.")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"Unknown placement '{self.placement}'; choose 'series' or 'parallel'.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"Unknown activation '{self.activation}'; choose one of: {', '.join(ACTIVATIONS)}.")


@register
class BottleneckModule(AdapterModule):
    """Series adapters: Parameter-Efficient Transfer Learning for NLP (Houlsby et al., 2019);
    parallel adapters: Towards a Unified View of Parameter-Efficient Transfer Learning (He et al., 2022).

    series:   h = y + s * U f(D y),  y = W x  (the adapter reads the layer's output)
    parallel: h = y + s * U f(D x)             (the adapter reads the layer's input)
    with D (size x d) and U (d_out x size); U starts at zero, so the model starts unchanged.
    Not mergeable: f is nonlinear.
    """

    config_class = Bottleneck
    capabilities = Capabilities(mergeable=False, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR, CONV2D))

    @property
    def reads_base(self) -> bool:  # a series adapter reads the layer's output
        return self.config.placement == "series"

    def __init__(self, base: nn.Module, config: Bottleneck):
        super().__init__(base, config)
        series = config.placement == "series"
        if self.kind == CONV2D and not series and base.groups != 1:
            raise ConfigError(f"A parallel bottleneck cannot read a grouped (e.g. depthwise) convolution's input "
                              f"(groups={base.groups}); use placement='series' or leave those layers out.")
        if series:
            reads = out_features(base)
        else:  # a conv's down-projection is a kernel over all input channels, flattened like its weight
            reads = base.weight[0].numel() if self.kind == CONV2D else base.in_features
        factory = tensor_kwargs(base)
        self.down = nn.Linear(reads, config.size, **factory)
        self.up = nn.Linear(config.size, out_features(base), **factory)
        self.act = ACTIVATIONS[config.activation]()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        series = self.config.placement == "series"
        if self.kind == LINEAR:
            return self.up(self.act(self.down(base_out if series else x))) * self.config.scaling
        if series:
            h = F.conv2d(base_out, self.down.weight[:, :, None, None], self.down.bias)
        else:
            h = conv_with(base, x, self.down.weight.view(-1, *base.weight.shape[1:]), self.down.bias)
        return F.conv2d(self.act(h), self.up.weight[:, :, None, None], self.up.bias) * self.config.scaling

"""Bottleneck adapters: a small down-project / nonlinearity / up-project block, series or parallel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import tensor_kwargs, LINEAR, AdapterModule, Capabilities, MethodConfig
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
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: Bottleneck):
        super().__init__(base, config)
        reads = base.out_features if config.placement == "series" else base.in_features
        factory = tensor_kwargs(base)
        self.down = nn.Linear(reads, config.size, **factory)
        self.up = nn.Linear(config.size, base.out_features, **factory)
        self.act = ACTIVATIONS[config.activation]()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        source = base_out if self.config.placement == "series" else x
        return self.up(self.act(self.down(source))) * self.config.scaling

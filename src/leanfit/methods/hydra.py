"""Hydra: a LoRA with a parallel and a sequential low-rank branch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import tensor_kwargs, LINEAR, AdapterModule, Capabilities, MethodConfig
from .registry import register


@dataclass
class Hydra(MethodConfig):
    """Config of Hydra: both branches have rank `rank`; `alpha / rank` scales the update."""

    method = "hydra"
    rank: int = 8
    alpha: float = 16.0

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"Hydra rank must be a positive integer, got {self.rank}.")

    def scaling(self) -> float:
        return self.alpha / self.rank


@register
class HydraModule(AdapterModule):
    """Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning (Kim et al., 2024).

    h = y + s * (B_p A_p x + B_s A_s y),  y = W x + b,  s = alpha / r
    with the parallel branch A_p (r x in), B_p (out x r) reading the layer's input and the
    sequential branch A_s (r x out), B_s (out x r) reading the layer's output (so it adapts the
    pretrained features W x). A's start Kaiming-uniform and B's at zero, so the model starts
    unchanged. The update is linear in x, so it merges exactly:
    delta W = s (B_p A_p + B_s A_s W),  delta b = s B_s A_s b.
    Parameters per layer: r (in + out) + 2 r out = r (in + 3 out).
    """

    config_class = Hydra
    reads_base = True  # its sequential branch reads the base output
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: Hydra):
        super().__init__(base, config)
        r, n_in, n_out = config.rank, base.in_features, base.out_features
        factory = tensor_kwargs(base)
        self.hydra_A_p = nn.Parameter(torch.empty(r, n_in, **factory))
        self.hydra_B_p = nn.Parameter(torch.zeros(n_out, r, **factory))
        self.hydra_A_s = nn.Parameter(torch.empty(r, n_out, **factory))
        self.hydra_B_s = nn.Parameter(torch.zeros(n_out, r, **factory))
        nn.init.kaiming_uniform_(self.hydra_A_p, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.hydra_A_s, a=math.sqrt(5))
        self.scaling = config.scaling()

    def delta(self, x, base_out, base):
        parallel = F.linear(F.linear(x, self.hydra_A_p), self.hydra_B_p)
        sequential = F.linear(F.linear(base_out, self.hydra_A_s), self.hydra_B_s)
        return (parallel + sequential) * self.scaling

    def delta_weight(self, base):
        seq = self.hydra_B_s @ self.hydra_A_s
        d_weight = (self.hydra_B_p @ self.hydra_A_p + seq @ base.weight) * self.scaling
        d_bias = None if base.bias is None else (seq @ base.bias) * self.scaling
        return d_weight, d_bias

"""Bone: one block of size rank x out, repeated across the input columns of the weight.

The same update as PEFT's default Bone (`BoneConfig`, init_weights=True), which PEFT 0.21 carries
on as MiSS (`MissConfig`, init_weights=True; its `miss_block` is our `bone_block`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import LINEAR, AdapterModule, Capabilities, MethodConfig
from .registry import register


@dataclass
class Bone(MethodConfig):
    """Config of Bone: `rank` is the block size r (r x out trained parameters per layer)."""

    method = "bone"
    rank: int = 64

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"Bone rank (block size) must be a positive integer, got {self.rank}.")


@register
class BoneModule(AdapterModule):
    """Bone: Block-Affine Adaptation of Large Language Models (Kang, 2024).

    h = W x + b + delta W x,  delta W = [B^T B^T ... B^T][:, :in]
    with the block B (r x out) trained and zero at start: every r-column slice of W gets the same
    update B^T (the last slice, when r does not divide `in`, its first columns). In forward this is
    (sum_j x_j) B, where x_j are the r-sized chunks of x (zero-padded at the end), so the cost is one
    r x out product. Linear in x, so it merges exactly. Parameters per layer: r * out.
    This is PEFT's default ("bone") variant; the "bat" variant, which multiplies blocks of W by B,
    is not implemented.
    """

    config_class = Bone
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: Bone):
        super().__init__(base, config)
        if config.rank > base.in_features:
            raise ConfigError(
                f"Bone rank {config.rank} exceeds this layer's in_features={base.in_features}; "
                "choose a rank at most the smallest adapted layer's input size.")
        self.bone_block = nn.Parameter(torch.zeros(config.rank, base.out_features,
                                                   device=base.weight.device, dtype=base.weight.dtype))

    def delta(self, x, base_out, base):
        r = self.bone_block.shape[0]
        pad = -x.shape[-1] % r
        if pad:
            x = F.pad(x, (0, pad))
        chunks = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(-2)
        return chunks @ self.bone_block

    def delta_weight(self, base):
        r, n_in = self.bone_block.shape[0], base.in_features
        return self.bone_block.T.repeat(1, -(-n_in // r))[:, :n_in], None

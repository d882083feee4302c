"""Methods that rescale or shift a layer's output channels: IA3, SSF, BitFit.

Each is a per-output-channel vector, so it works on Linear, Conv2d and Embedding layers alike, and
merges into the weight (row scaling) and bias exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import (CONV2D, EMBEDDING, LINEAR, AdapterModule, Capabilities, ChannelAffine, MethodConfig,
                   channel_view, out_features)
from .registry import register

ALL_KINDS = (LINEAR, CONV2D, EMBEDDING)


def _row_scaled(base: nn.Module, factor: torch.Tensor) -> torch.Tensor:
    """W scaled per output channel by `factor` (the channel axis is 1 for embeddings)."""
    w = base.weight
    if isinstance(base, nn.Embedding):
        return w * factor[None, :]
    return w * factor.view(-1, *([1] * (w.dim() - 1)))


def _vector(base: nn.Module, value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((out_features(base),), value, device=base.weight.device,
                                   dtype=base.weight.dtype))


def _base_bias(base: nn.Module, method: str) -> torch.Tensor:
    bias = getattr(base, "bias", None)
    if bias is None:
        raise ConfigError(
            f"Cannot merge {method} into a {type(base).__name__} without a bias; keep it unmerged.")
    return bias


@dataclass
class IA3(MethodConfig):
    """Config of IA3 (no options: one learned vector per adapted layer)."""

    method = "ia3"


@register
class IA3Module(AdapterModule):
    """IA3: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning
    (Liu et al., 2022).

    h = l ⊙ (W x + b), with the vector l initialised to ones; the delta is (l - 1) ⊙ (W x + b).
    Merged: W' = diag(l) W, b' = l ⊙ b.
    """

    config_class = IA3
    reads_base = True  # scales the base output
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=ALL_KINDS)

    def __init__(self, base: nn.Module, config: IA3):
        super().__init__(base, config)
        self.ia3_l = _vector(base, 1.0)

    def delta(self, x, base_out, base):
        return base_out * channel_view(self.ia3_l - 1, base, base_out)

    def delta_weight(self, base):
        factor = self.ia3_l - 1
        bias = getattr(base, "bias", None)
        return _row_scaled(base, factor), None if bias is None else bias * factor

    def batched_form(self, base):
        return ChannelAffine(scale=self.ia3_l - 1)


@dataclass
class SSF(MethodConfig):
    """Config of SSF (no options: a scale and a shift vector per adapted layer)."""

    method = "ssf"


@register
class SSFModule(AdapterModule):
    """SSF: Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning
    (Lian et al., 2022).

    h = gamma ⊙ (W x + b) + beta, gamma = 1 and beta = 0 at start.
    Merged: W' = diag(gamma) W, b' = gamma ⊙ b + beta (needs a bias to merge beta into).
    """

    config_class = SSF
    reads_base = True  # scales the base output
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=ALL_KINDS)

    def __init__(self, base: nn.Module, config: SSF):
        super().__init__(base, config)
        self.ssf_scale = _vector(base, 1.0)
        self.ssf_shift = _vector(base, 0.0)

    def delta(self, x, base_out, base):
        return (base_out * channel_view(self.ssf_scale - 1, base, base_out)
                + channel_view(self.ssf_shift, base, base_out))

    def delta_weight(self, base):
        factor = self.ssf_scale - 1
        return _row_scaled(base, factor), _base_bias(base, "SSF") * factor + self.ssf_shift

    def batched_form(self, base):
        return ChannelAffine(scale=self.ssf_scale - 1, shift=self.ssf_shift)


@dataclass
class BitFit(MethodConfig):
    """Config of BitFit (no options: one bias vector per adapted layer)."""

    method = "bitfit"


@register
class BitFitModule(AdapterModule):
    """BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models
    (Ben Zaken et al., 2022).

    h = W x + (b + delta_b): only the bias moves. The trained offset delta_b (zero at start) is kept
    beside the frozen bias, so layers without a bias gain one and unwrapping stays exact.
    Merged: b' = b + delta_b.
    """

    config_class = BitFit
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=ALL_KINDS)

    def __init__(self, base: nn.Module, config: BitFit):
        super().__init__(base, config)
        self.bias_delta = _vector(base, 0.0)

    def delta(self, x, base_out, base):
        return channel_view(self.bias_delta, base, base_out).expand_as(base_out)

    def delta_weight(self, base):
        _base_bias(base, "BitFit")
        return None, self.bias_delta

    def batched_form(self, base):
        return ChannelAffine(shift=self.bias_delta)

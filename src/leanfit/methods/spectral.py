"""Methods whose update lives in a transformed or weight-tied space: Walsh-Hadamard adapters, HUT.

`fwht` is a fast Walsh-Hadamard transform (O(n log n) butterflies, no dense Hadamard matrix), in
Sylvester (natural) order: fwht(x) = H_n x with H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import tensor_kwargs, LINEAR, AdapterModule, Capabilities, MethodConfig
from .registry import register

WHT_SELECT = ("random", "magnitude")
WHT_SIDES = ("in", "both")


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def fwht(x: torch.Tensor, dim: int = -1, normalized: bool = False) -> torch.Tensor:
    """H x along `dim` (length a power of two); `normalized` divides by sqrt(n), making H orthonormal
    and its own inverse. Unnormalised, fwht(fwht(x)) = n x. Built from reshapes and stacks, so
    autograd flows through it."""
    x = x.movedim(dim, -1)
    lead, n = x.shape[:-1], x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    x = x.reshape(*lead, n)
    if normalized:
        x = x / math.sqrt(n)
    return x.movedim(-1, dim)


@dataclass
class WHT(MethodConfig):
    """Config of the Walsh-Hadamard adapter: `n_coeffs` trainable coefficients per layer at positions
    chosen by `select` ('random' with `seed`, or 'magnitude' of the base weight's transform);
    `sides`: 'in' (QWHA's Delta W = F H^-1) or 'both' (2-D transform, Delta W = H_out C H_in)."""

    method = "wht"
    n_coeffs: int = 1000
    scale: float = 1.0
    select: str = "random"
    sides: str = "in"
    seed: int = 0

    def validate(self) -> None:
        if int(self.n_coeffs) < 1:
            raise ConfigError(f"WHT n_coeffs must be a positive integer, got {self.n_coeffs}.")
        if self.select not in WHT_SELECT:
            raise ConfigError(f"Unknown WHT select '{self.select}'; choose one of: {', '.join(WHT_SELECT)}.")
        if self.sides not in WHT_SIDES:
            raise ConfigError(f"Unknown WHT sides '{self.sides}'; choose one of: {', '.join(WHT_SIDES)}.")


@register
class WHTModule(AdapterModule):
    """QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning on Large
    Language Models (Jeon et al., 2025).

    sides='in' (the paper's form): h = W x + s * F H^-1 x, i.e. Delta W = s * F H^-1, with H the
    orthonormal Walsh-Hadamard matrix of the (zero-padded) input size (H^-1 = H) and F (out x n_in)
    sparse: `n_coeffs` trainable values (zero at start) at fixed positions.
    sides='both': Delta W = s * crop(H_out C H_in), a 2-D transform with padded output size too.
    x is transformed with `fwht` in O(n log n); F is materialised dense per forward (out x n_in).
    Positions: seeded random, or the largest |coefficients| of W's own transform (W H, or
    H_out W H_in). Not implemented: the paper's per-channel budget allocation (AdaAlloc), value
    refinement from the quantisation error, and quantisation itself.
    """

    config_class = WHT
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: WHT):
        super().__init__(base, config)
        self.n_in = next_power_of_two(base.in_features)
        self.n_out = next_power_of_two(base.out_features) if config.sides == "both" else base.out_features
        grid = self.n_out * self.n_in
        if config.n_coeffs > grid:
            raise ConfigError(
                f"WHT n_coeffs={config.n_coeffs} exceeds the {grid} coefficients of a "
                f"{base.out_features}x{base.in_features} layer; lower n_coeffs or narrow the targets.")
        factory = tensor_kwargs(base)
        if config.select == "random":
            g = torch.Generator().manual_seed(config.seed)
            positions = torch.randperm(grid, generator=g)[:config.n_coeffs]
        else:
            positions = self._transform(base.weight.detach().float()).abs().flatten().topk(config.n_coeffs).indices
        self.register_buffer("positions", positions.sort().values.to(base.weight.device))
        self.values = nn.Parameter(torch.zeros(config.n_coeffs, **factory))

    def _transform(self, w: torch.Tensor) -> torch.Tensor:
        """W's coefficients in this adapter's domain: W H_in (padded), or H_out W H_in."""
        w = F.pad(w, (0, self.n_in - w.shape[1], 0, self.n_out - w.shape[0]))
        c = fwht(w, dim=1, normalized=True)
        return fwht(c, dim=0, normalized=True) if self.config.sides == "both" else c

    def coefficients(self) -> torch.Tensor:
        """The dense coefficient matrix (n_out x n_in), zero outside the trained positions."""
        flat = self.values.new_zeros(self.n_out * self.n_in)
        return flat.scatter(0, self.positions, self.values).view(self.n_out, self.n_in)

    def delta(self, x, base_out, base):
        xh = fwht(F.pad(x, (0, self.n_in - x.shape[-1])), normalized=True)
        y = F.linear(xh, self.coefficients())
        if self.config.sides == "both":
            y = fwht(y, normalized=True)[..., :base.out_features]
        return y * self.config.scale

    def delta_weight(self, base):
        d = fwht(self.coefficients(), dim=1, normalized=True)  # C H_in (H symmetric)
        if self.config.sides == "both":
            d = fwht(d, dim=0, normalized=True)
        return d[:base.out_features, :base.in_features] * self.config.scale, None


@dataclass
class HUT(MethodConfig):
    """Config of HUT: rank of the multiplicative low-rank factor and its scale alpha / rank."""

    method = "hut"
    rank: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"HUT rank must be a positive integer, got {self.rank}.")


@register
class HUTModule(AdapterModule):
    """HUT: A More Computation Efficient Fine-Tuning Method With Hadamard Updated Transformation
    (Zhang, Zhou and Chen, 2024).

    The paper's "updated transformation" builds the new weight from the old one with an element-wise
    (Hadamard) product with a low-rank matrix, W' = W ⊙ M. We implement it as
        W' = W + Delta W,   Delta W = (alpha / r) * W ⊙ (B A),
    i.e. M = 1 + (alpha / r) B A, with A (r x in, Kaiming) and B (out x r, zero) trained, so the model
    starts unchanged and the update stays tied to the pretrained weight's structure (zero where W is
    zero). This additive reading is ours; it spans the same W ⊙ (rank <= r+1) family as W ⊙ M.
    Forward: h = W x + F.linear(x, Delta W), with Delta W materialised per forward.
    """

    config_class = HUT
    reads_base = True  # scales the base weight
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: HUT):
        super().__init__(base, config)
        factory = tensor_kwargs(base)
        self.hut_A = nn.Parameter(torch.empty(config.rank, base.in_features, **factory))
        self.hut_B = nn.Parameter(torch.zeros(base.out_features, config.rank, **factory))
        nn.init.kaiming_uniform_(self.hut_A, a=math.sqrt(5))
        self.scaling = config.alpha / config.rank

    def _delta(self, base: nn.Module) -> torch.Tensor:
        return base.weight * (self.hut_B @ self.hut_A) * self.scaling

    def delta(self, x, base_out, base):
        return F.linear(x, self._delta(base))

    def delta_weight(self, base):
        return self._delta(base), None

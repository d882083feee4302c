"""Compacter and PHM-adapter: bottleneck adapters whose projections are sums of Kronecker products."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .adapters import ACTIVATIONS, PLACEMENTS
from .base import (tensor_kwargs, in_features, layer_kind, out_features, CONV2D, LINEAR, AdapterModule, Capabilities,
                   MethodConfig)
from .registry import register


@dataclass
class Compacter(MethodConfig):
    """Config of Compacter: a bottleneck of width `size` with PHM projections of `n` Kronecker
    terms; `phm_rank` is the rank of each fast matrix B_i (None: full B_i, the PHM-adapter)."""

    method = "compacter"
    size: int = 64
    n: int = 4
    phm_rank: int | None = 1
    placement: str = "series"
    activation: str = "gelu"
    scaling: float = 1.0
    share: bool = True  # one set of slow matrices A_i for every layer of the adapter, as in the paper

    def validate(self) -> None:
        if int(self.n) < 1:
            raise ConfigError(f"Compacter n (number of Kronecker terms) must be a positive integer, got {self.n}.")
        if int(self.size) < 1 or self.size % self.n:
            raise ConfigError(f"Compacter size must be a positive multiple of n={self.n}, got {self.size}.")
        if self.phm_rank is not None and int(self.phm_rank) < 1:
            raise ConfigError(
                f"Compacter phm_rank must be a positive integer or None (full PHM-adapter), got {self.phm_rank}.")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"Unknown placement '{self.placement}'; choose 'series' or 'parallel'.")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"Unknown activation '{self.activation}'; choose one of: {', '.join(ACTIVATIONS)}.")


def _xavier_(t: torch.Tensor) -> torch.Tensor:
    """Xavier-uniform init of each matrix in a stack (n, rows, cols), in place."""
    bound = (6.0 / (t.shape[-2] + t.shape[-1])) ** 0.5
    return nn.init.uniform_(t, -bound, bound)


class PHMLinear(nn.Module):
    """y = W x + b with W (out x in) = sum_i A_i ⊗ B_i; A (n, n, n) is given by the owner (slow
    matrices), B_i (out/n x in/n) is s_i t_i^T of rank `rank`, or full when `rank` is None."""

    def __init__(self, n_in: int, n_out: int, n: int, rank: int | None, zero: bool, factory: dict):
        super().__init__()
        p, q = n_out // n, n_in // n
        if rank is None:
            self.phm_B = nn.Parameter(torch.zeros(n, p, q, **factory))
            if not zero:
                _xavier_(self.phm_B)
        else:  # s_i (p x rank) and t_i (rank x q); t starts at zero for a zero projection
            self.phm_s = _xavier_(nn.Parameter(torch.empty(n, p, rank, **factory)))
            self.phm_t = nn.Parameter(torch.zeros(n, rank, q, **factory))
            if not zero:
                _xavier_(self.phm_t)
        self.bias = nn.Parameter(torch.zeros(n_out, **factory))

    def weight(self, slow: torch.Tensor) -> torch.Tensor:
        fast = self.phm_B if hasattr(self, "phm_B") else self.phm_s @ self.phm_t  # (n, p, q)
        n, p, q = fast.shape
        # sum_i kron(A_i, B_i): entry [(a, c), (b, e)] = sum_i A_i[a, b] B_i[c, e]
        return torch.einsum("iab,ice->acbe", slow, fast).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(slow), self.bias)


@register
class CompacterModule(AdapterModule):
    """Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (Karimi Mahabadi et al., 2021).

    series:   h = y + s * U f(D y),  y = W x + b  (reads the layer's output, like `bottleneck`)
    parallel: h = y + s * U f(D x)
    where D (size x d) and U (out x size) are PHM layers, D = sum_{i=1..n} A_i ⊗ B_i^D and
    U = sum_i A_i ⊗ B_i^U, with "slow" A_i (n x n) and "fast" B_i = s_i t_i^T of rank `phm_rank`
    (full B_i with phm_rank=None: the PHM-adapter). U starts at zero (t_i^U = 0), so the model
    starts unchanged; not mergeable, f is nonlinear. Every dimension must be divisible by n. On a
    Conv2d the adapter acts on the channels at each position (series: on any convolution's output;
    parallel: on a pointwise one's input).

    Sharing: with `share=True` (the default, as in the paper) the slow A_i are one (n, n, n) tensor
    shared by the D and U of every adapted layer (n^3 parameters in all), held by the engine as the
    adapter's shared module; `share=False` gives each layer its own A_i, shared by its D and U only.
    Parameters (d read, out written by layer j; L layers; biases included):
    n^3 + sum_j [phm_rank (d_j + size) + phm_rank (size + out_j) + size + out_j]   (Compacter)
    n^3 + sum_j [(d_j size + size out_j) / n + size + out_j]                         (PHM-adapter)
    with n^3 counted once per layer instead of once in all when share=False. The paper's count,
    4 L (k + d) + n^3, is this one for rank-one B_i, two adapters per block, no biases.
    """

    config_class = Compacter
    capabilities = Capabilities(mergeable=False, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR, CONV2D))

    @property
    def reads_base(self) -> bool:  # a series adapter reads the layer's output
        return self.config.placement == "series"

    @classmethod
    def shared_parameters(cls, config: Compacter, bases: dict[str, nn.Module]) -> nn.Module | None:
        if not config.share:
            return None
        for base in bases.values():
            _check_sizes(base, config)
        factory = tensor_kwargs(next(iter(bases.values())))
        return nn.ParameterDict({"phm_rule": _slow_matrices(config.n, factory)})

    def __init__(self, base: nn.Module, config: Compacter, shared: nn.Module | None = None):
        _check_sizes(base, config)
        if config.share and shared is None:  # a layer built on its own shares with itself only
            shared = self.shared_parameters(config, {"": base})
        super().__init__(base, config, shared)
        factory = tensor_kwargs(base)
        if not config.share:
            self.phm_rule = _slow_matrices(config.n, factory)
        self.down = PHMLinear(_reads(base, config), config.size, config.n, config.phm_rank, zero=False, factory=factory)
        self.up = PHMLinear(config.size, out_features(base), config.n, config.phm_rank, zero=True, factory=factory)
        self.act = ACTIVATIONS[config.activation]()

    def slow(self) -> torch.Tensor:
        """The slow matrices A_i (n, n, n) this layer uses: the adapter's shared ones or its own."""
        return self.shared["phm_rule"] if self.config.share else self.phm_rule

    def delta(self, x, base_out, base):
        source = base_out if self.config.placement == "series" else x
        if self.kind == CONV2D:  # channels last, so the PHM layers act at each position
            source = source.movedim(1, -1)
        slow = self.slow()
        out = self.up(self.act(self.down(source, slow)), slow) * self.config.scaling
        return out.movedim(-1, 1) if self.kind == CONV2D else out


def _slow_matrices(n: int, factory: dict) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, n, n, **factory) / n)  # std 1/n


def _reads(base: nn.Module, config: Compacter) -> int:
    return out_features(base) if config.placement == "series" else in_features(base)


def _check_sizes(base: nn.Module, config: Compacter) -> None:
    kind = layer_kind(base)
    if kind not in CompacterModule.capabilities.layer_kinds:
        return  # AdapterModule.__init__ refuses it, naming the layer kinds Compacter accepts
    pointwise = kind == LINEAR or (tuple(base.kernel_size) == (1, 1) and tuple(base.stride) == (1, 1)
                                   and base.groups == 1)
    if config.placement == "parallel" and not pointwise:
        raise ConfigError("Compacter placement='parallel' reads the layer's input, so on a Conv2d it needs a "
                          "pointwise one (1x1, stride 1, one group); use placement='series' or narrow the targets.")
    n, reads, writes = config.n, _reads(base, config), out_features(base)
    for side, dim in (("reads", reads), ("writes", writes)):
        if dim % n:
            raise ConfigError(
                f"Compacter n={n} must divide the layer sizes, but this layer {side} {dim} features "
                f"(in_features={in_features(base)}, out_features={writes}); choose n dividing {dim}.")

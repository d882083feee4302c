"""Compacter and PHM-adapter: bottleneck adapters whose projections are sums of Kronecker products."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .adapters import ACTIVATIONS, PLACEMENTS
from .base import tensor_kwargs, LINEAR, AdapterModule, Capabilities, MethodConfig
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
    shared_slow: bool = False

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
        if self.shared_slow:
            raise ConfigError(
                "Compacter shared_slow=True needs the engine to share parameters across layers, which "
                "it cannot do yet; use shared_slow=False (slow matrices per layer).")


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
    starts unchanged; not mergeable, f is nonlinear. Every dimension must be divisible by n.

    Sharing: the paper shares the slow A_i across all adapter layers of the model (n^3 parameters in
    all). A module here cannot see its siblings, so each layer owns its A_i, shared only by its
    own D and U; `shared_slow=True` (the paper's sharing) needs engine support and is refused
    until the engine ties parameters across layers. Parameters per layer (d read, out written):
    n^3 + phm_rank (d + size) + phm_rank (size + out) + size + out  (Compacter)
    n^3 + (d size + size out) / n + size + out                      (PHM-adapter)
    """

    config_class = Compacter
    capabilities = Capabilities(mergeable=False, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: Compacter):
        super().__init__(base, config)
        n = config.n
        reads = base.out_features if config.placement == "series" else base.in_features
        for side, dim in (("reads", reads), ("writes", base.out_features)):
            if dim % n:
                raise ConfigError(
                    f"Compacter n={n} must divide the layer sizes, but this layer {side} {dim} features "
                    f"(in_features={base.in_features}, out_features={base.out_features}); choose n dividing {dim}.")
        factory = tensor_kwargs(base)
        self.phm_rule = nn.Parameter(torch.randn(n, n, n, **factory) / n)  # slow A_i, std 1/n
        self.down = PHMLinear(reads, config.size, n, config.phm_rank, zero=False, factory=factory)
        self.up = PHMLinear(config.size, base.out_features, n, config.phm_rank, zero=True, factory=factory)
        self.act = ACTIVATIONS[config.activation]()

    def delta(self, x, base_out, base):
        source = base_out if self.config.placement == "series" else x
        hidden = self.act(self.down(source, self.phm_rule))
        return self.up(hidden, self.phm_rule) * self.config.scaling

"""MoS: LoRA factors assembled from shards drawn out of small pools."""

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
class MoS(MethodConfig):
    """Config of MoS. `rank` rows of A (columns of B), each cut into `shards_per_vector` shards;
    the first `private_rank` rows own private shards, the others draw from a pool of
    `public_shards` shards per factor with a fixed random index seeded by `seed`."""

    method = "mos"
    rank: int = 8
    alpha: float = 16.0
    shards_per_vector: int = 2
    private_rank: int = 2
    public_shards: int = 6
    seed: int = 0

    def validate(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"MoS rank must be a positive integer, got {self.rank}.")
        if int(self.shards_per_vector) < 1:
            raise ConfigError(f"MoS shards_per_vector must be a positive integer, got {self.shards_per_vector}.")
        if not 0 <= int(self.private_rank) <= int(self.rank):
            raise ConfigError(f"MoS private_rank must be between 0 and rank={self.rank}, got {self.private_rank}.")
        if self.private_rank < self.rank and int(self.public_shards) < 1:
            raise ConfigError(
                f"MoS needs public_shards >= 1 to fill its {self.rank - self.private_rank} shared rank "
                f"vectors, got {self.public_shards}; raise public_shards or set private_rank=rank.")

    def scaling(self) -> float:
        return self.alpha / self.rank


def _route(pool: int, slots: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed random index of `slots` shards into a pool; every shard used (near) equally often."""
    return torch.randperm(max(pool, slots), generator=generator)[:slots] % pool


@register
class MoSModule(AdapterModule):
    """MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards
    (Wang et al., 2024).

    h = W x + b + s B A x,  s = alpha / r,  A = concat(shards), B^T = concat(shards)
    Each of the r rows of A (in) and of B^T (out) is the concatenation of l shards
    (vector sharding). The first `private_rank` rows use private shards (shard privatization); the
    other (r - private_rank) * l shard slots of each factor are filled from a pool of `public_shards`
    shards by a fixed random index (subset selection), drawn separately for A and B (pair
    dissociation). A's shards start Kaiming-uniform as in LoRA and B's at zero. Merges as
    delta W = s B A. Parameters per layer: (in + out) (private_rank + public_shards / l)
    (no pool, so (in + out) r, when private_rank = r).

    Limitation: in the paper the public pools are global, shared by every adapted layer; a module
    here cannot see its siblings, so each layer has its own pool and sharing happens only between
    the shard slots of one layer (the saving over LoRA is smaller). Cross-layer pools need engine
    support. The index is drawn from a torch.Generator seeded with `seed` plus an offset from the
    layer's (in, out) sizes, so layers of equal size share a routing pattern (not parameters);
    it is a buffer, so it is saved with the adapter and a loaded adapter uses the saved index.
    """

    config_class = MoS
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR,))

    def __init__(self, base: nn.Module, config: MoS):
        super().__init__(base, config)
        n_in, n_out, l = base.in_features, base.out_features, config.shards_per_vector
        if n_in % l or n_out % l:
            raise ConfigError(
                f"MoS shards_per_vector={l} must divide the layer sizes, but this layer is "
                f"in_features={n_in}, out_features={n_out}; choose a divisor of both.")
        private, public = config.private_rank * l, (config.rank - config.private_rank) * l
        pool = config.public_shards if public else 0
        factory = tensor_kwargs(base)
        self.mos_A_private = nn.Parameter(torch.empty(private, n_in // l, **factory))
        self.mos_A_public = nn.Parameter(torch.empty(pool, n_in // l, **factory))
        self.mos_B_private = nn.Parameter(torch.zeros(private, n_out // l, **factory))
        self.mos_B_public = nn.Parameter(torch.zeros(pool, n_out // l, **factory))
        bound = 1.0 / math.sqrt(n_in)  # LoRA's kaiming_uniform_(a=sqrt(5)) bound on an r x in A
        nn.init.uniform_(self.mos_A_private, -bound, bound)
        nn.init.uniform_(self.mos_A_public, -bound, bound)
        g = torch.Generator().manual_seed(config.seed + 1_000_003 * n_in + n_out)
        index_a, index_b = _route(max(pool, 1), public, g), _route(max(pool, 1), public, g)
        self.register_buffer("mos_index_A", index_a.to(base.weight.device))
        self.register_buffer("mos_index_B", index_b.to(base.weight.device))
        self.scaling = config.scaling()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r x in) and B (out x r), assembled from the shards."""
        r = self.config.rank
        a = torch.cat([self.mos_A_private, self.mos_A_public[self.mos_index_A]]).reshape(r, -1)
        b = torch.cat([self.mos_B_private, self.mos_B_public[self.mos_index_B]]).reshape(r, -1)
        return a, b.T

    def delta(self, x, base_out, base):
        a, b = self.factors()
        return F.linear(F.linear(x, a), b) * self.scaling

    def delta_weight(self, base):
        a, b = self.factors()
        return (b @ a) * self.scaling, None

"""MoS: LoRA factors assembled from shards drawn out of pools shared by every layer of the adapter."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import (tensor_kwargs, layer_kind, out_features, CONV2D, LINEAR, AdapterModule, Capabilities, LowRank,
                   MethodConfig)
from .lora import _as_base_layout, _low_rank_delta
from .registry import register


@dataclass
class MoS(MethodConfig):
    """Config of MoS. `rank` rows of A (columns of B), each cut into `shards_per_vector` shards;
    the first `private_rank` rows own private shards, the others draw from public pools holding
    `public_shards` shards per factor for each layer that draws from them, by a fixed random index
    seeded by `seed`. `share=True` (the paper's global pools): one pool per factor and shard length
    for all layers of the adapter; `share=False`: a pool per layer."""

    method = "mos"
    rank: int = 8
    alpha: float = 16.0
    shards_per_vector: int = 2
    private_rank: int = 2
    public_shards: int = 6
    seed: int = 0
    share: bool = True

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

    def public_slots(self) -> int:
        """Shard slots per factor of one layer that are filled from a public pool."""
        return (self.rank - self.private_rank) * self.shards_per_vector


def _route(pool: int, slots: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed random index of `slots` shards into a pool; every shard used (near) equally often."""
    return torch.randperm(max(pool, slots), generator=generator)[:slots] % pool


def _init_pool(pool: torch.Tensor, factor: str, n_in: int) -> torch.Tensor:
    """A's shards Kaiming-uniform as LoRA's A (bound 1/sqrt(in) on an r x in matrix); B's zero."""
    if factor == "A":
        bound = 1.0 / math.sqrt(n_in)
        nn.init.uniform_(pool, -bound, bound)
    return pool


class ShardPools(nn.Module):
    """The public shard pools of one MoS adapter, shared by all its layers: one pool per factor
    (A and B apart: pair dissociation) and shard length, holding `public_shards` shards for each
    layer that draws from it. The layers' indices are consecutive slices of a sequence of random
    permutations of the pool, dealt in model order, so every shard is used by (near) equally many
    slots and a layer's index depends only on the seed and the layers before it."""

    def __init__(self, config: MoS, bases: dict[str, nn.Module]):
        super().__init__()
        l, slots = config.shards_per_vector, config.public_slots()
        keys = {id(b): (f"A{_sizes(b)[0] // l}", f"B{_sizes(b)[1] // l}") for b in bases.values()}
        users = Counter(k for pair in keys.values() for k in pair)
        factory = tensor_kwargs(next(iter(bases.values())))
        generator = torch.Generator().manual_seed(config.seed)
        self.pools = nn.ParameterDict()
        deals = {}
        for key, count in sorted(users.items()):
            size, length = config.public_shards * count, int(key[1:])
            self.pools[key] = nn.Parameter(_init_pool(torch.zeros(size, length, **factory), key[0], length * l))
            deal = torch.cat([torch.randperm(size, generator=generator) for _ in range(-(-count * slots // size))])
            deals[key] = iter(deal[: count * slots].split(slots))
        # Each layer's (A index, B index), taken by the layer's constructor; not state (the layers
        # keep their index as a buffer, so a loaded adapter uses the saved one).
        self._routes = {layer: (next(deals[a]), next(deals[b])) for layer, (a, b) in keys.items()}

    def pool(self, factor: str, length: int) -> torch.Tensor:
        return self.pools[f"{factor}{length}"]

    def route(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) pool indices dealt to layer `base`."""
        return self._routes.pop(id(base))


@register
class MoSModule(AdapterModule):
    """MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards
    (Wang et al., 2024).

    h = W x + b + s B A x,  s = alpha / r,  A = concat(shards), B^T = concat(shards)
    Each of the r rows of A (in) and of B^T (out) is the concatenation of l shards
    (vector sharding). The first `private_rank` rows use private shards (shard privatization); the
    other (r - private_rank) * l shard slots of each factor are filled from a public pool by a
    fixed random index (subset selection), A and B from separate pools (pair dissociation). With
    `share=True` (the paper's inter-layer sharing, the default) the pools are global: one per
    factor and shard length for all layers of the adapter (ShardPools, the adapter's shared
    module), each layer with its own index into them; `share=False` gives each layer its own pools.
    A's shards start Kaiming-uniform as in LoRA and B's at zero. Merges as delta W = s B A. On an
    (ungrouped) Conv2d, A is r x (in kh kw) and B out x r, applied as LoRA's convolution pair.
    Parameters, either way: sum over layers of (in + out) (private_rank + public_shards / l)
    ((in + out) r per layer when private_rank = r: plain LoRA with sharded vectors).

    The index is a buffer, so it is saved with the adapter and a loaded adapter uses the saved one.
    With share=False it is drawn from a torch.Generator seeded with `seed` plus an offset from the
    layer's (in, out) sizes, so layers of equal size share a routing pattern (not parameters).
    """

    config_class = MoS
    capabilities = Capabilities(mergeable=True, mixed_batch=True, elastic_rank=False,
                                layer_kinds=(LINEAR, CONV2D))

    @classmethod
    def shared_parameters(cls, config: MoS, bases: dict[str, nn.Module]) -> nn.Module | None:
        if not config.share or config.private_rank == config.rank:
            return None  # nothing public to share
        if any(layer_kind(b) not in cls.capabilities.layer_kinds for b in bases.values()):
            return None  # AdapterModule.__init__ refuses the layer, naming the kinds MoS accepts
        for base in bases.values():
            _check_sizes(base, config)
        return ShardPools(config, bases)

    def __init__(self, base: nn.Module, config: MoS, shared: nn.Module | None = None):
        _check_sizes(base, config)
        if shared is None and config.share and config.private_rank < config.rank:
            shared = self.shared_parameters(config, {"": base})  # a layer on its own: its own pools
        super().__init__(base, config, shared)
        (n_in, n_out), l = _sizes(base), config.shards_per_vector
        private, public = config.private_rank * l, config.public_slots()
        factory = tensor_kwargs(base)
        self.mos_A_private = nn.Parameter(_init_pool(torch.zeros(private, n_in // l, **factory), "A", n_in))
        self.mos_B_private = nn.Parameter(torch.zeros(private, n_out // l, **factory))
        if shared is not None:
            index_a, index_b = shared.route(base)
        else:
            pool = config.public_shards if public else 0
            self.mos_A_public = nn.Parameter(_init_pool(torch.zeros(pool, n_in // l, **factory), "A", n_in))
            self.mos_B_public = nn.Parameter(torch.zeros(pool, n_out // l, **factory))
            g = torch.Generator().manual_seed(config.seed + 1_000_003 * n_in + n_out)
            index_a, index_b = _route(max(pool, 1), public, g), _route(max(pool, 1), public, g)
        self.register_buffer("mos_index_A", index_a.to(base.weight.device))
        self.register_buffer("mos_index_B", index_b.to(base.weight.device))
        self.scaling = config.scaling()

    def public_pools(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools this layer's public slots index: the adapter's global ones or its own."""
        if hasattr(self, "mos_A_public"):
            return self.mos_A_public, self.mos_B_public
        return (self.shared.pool("A", self.mos_A_private.shape[1]),
                self.shared.pool("B", self.mos_B_private.shape[1]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r x in, in = in_channels kh kw for a Conv2d) and B (out x r), assembled from the shards."""
        r = self.config.rank
        pool_a, pool_b = self.public_pools()
        a = torch.cat([self.mos_A_private, pool_a[self.mos_index_A]]).reshape(r, -1)
        b = torch.cat([self.mos_B_private, pool_b[self.mos_index_B]]).reshape(r, -1)
        return a, b.T

    def delta(self, x, base_out, base):
        a, b = self.factors()
        return _low_rank_delta(x, a, b, base, self.kind, self.scaling)

    def delta_weight(self, base):
        a, b = self.factors()
        return _as_base_layout((b @ a) * self.scaling, base), None

    def batched_form(self, base):
        if self.kind != LINEAR:
            return None
        a, b = self.factors()  # a plain LoRA once assembled, so it batches with the LoRA family
        return LowRank(a, b, self.scaling)


def _sizes(base: nn.Module) -> tuple[int, int]:
    """(length of a row of A, of a column of B): a Conv2d's rows span in_channels x kh x kw."""
    n_in = base.weight[0].numel() if layer_kind(base) == CONV2D else base.in_features
    return n_in, out_features(base)


def _check_sizes(base: nn.Module, config: MoS) -> None:
    if layer_kind(base) not in MoSModule.capabilities.layer_kinds:
        return  # AdapterModule.__init__ refuses it, naming the layer kinds MoS accepts
    if layer_kind(base) == CONV2D and base.groups != 1:
        raise ConfigError("MoS on grouped (e.g. depthwise) convolutions is not supported; exclude those layers.")
    (n_in, n_out), l = _sizes(base), config.shards_per_vector
    if n_in % l or n_out % l:
        raise ConfigError(
            f"MoS shards_per_vector={l} must divide the layer sizes, but this layer is "
            f"in_features={n_in}, out_features={n_out}; choose a divisor of both.")

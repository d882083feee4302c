"""What every adaptation method is: a config dataclass and a small module that owns its math.

A method module sits inside a host (core/hosts.py) next to a frozen base layer and contributes
`delta(x, base_out)`, which the host adds to the base layer's output. Methods whose update is a
weight also give `delta_weight(base)`, so the host can merge and unmerge exactly. Nothing here walks
a model or touches files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError

LINEAR, CONV2D, EMBEDDING = "linear", "conv2d", "embedding"
ADAMW_STATE_PER_PARAM = 2  # exp_avg and exp_avg_sq


def layer_kind(module: nn.Module) -> str | None:
    """The kind of base layer a method can attach to, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d):
        return CONV2D
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return None


def out_features(base: nn.Module) -> int:
    """Size of the channel/feature axis the base layer produces."""
    kind = layer_kind(base)
    if kind == LINEAR:
        return base.out_features
    if kind == CONV2D:
        return base.out_channels
    return base.embedding_dim


def in_features(base: nn.Module) -> int:
    kind = layer_kind(base)
    if kind == LINEAR:
        return base.in_features
    if kind == CONV2D:
        return base.in_channels
    return base.num_embeddings


def tensor_kwargs(base: nn.Module) -> dict:
    """Device and dtype of the base weight, so adapter tensors live beside it."""
    return {"device": base.weight.device, "dtype": base.weight.dtype}


def channel_view(vector: torch.Tensor, base: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Shape a per-output-channel vector so it broadcasts against the base layer's output."""
    if layer_kind(base) == CONV2D:
        return vector.view(1, -1, *([1] * (out.dim() - 2)))
    return vector


@dataclass(frozen=True)
class Capabilities:
    mergeable: bool  # has delta_weight: merge/unmerge exactly into the base weight
    mixed_batch: bool  # rows of one batch may use different adapters of this method
    elastic_rank: bool  # any rank <= r usable after training (DyLoRA)
    layer_kinds: tuple[str, ...]


@dataclass(frozen=True)
class Cost:
    """What one adapted layer costs; inputs of the budget planner (per token where it says so)."""

    params: int
    optimizer_bytes: int
    activation_bytes_per_token: int
    extra_flops_per_token: int


@dataclass
class MethodConfig:
    """Base of method configs. `method` is the registry name; fields are the method's options."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def replace(self, **changes) -> "MethodConfig":
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ConfigError(
                f"Method '{self.method}' has no option {', '.join(unknown)}; valid options are: "
                f"{', '.join(sorted(valid))}."
            )
        return type(self)(**{**asdict(self), **changes})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError on values that cannot work; subclasses extend."""


class AdapterModule(nn.Module):
    """One adapter attached to one base layer. Subclasses set the class attributes below."""

    config_class: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities]
    # A training-time controller over all layers of one adapter (train/controllers.py), or None.
    controller_class: ClassVar[type | None] = None

    def __init__(self, base: nn.Module, config: MethodConfig):
        super().__init__()
        kind = layer_kind(base)
        if kind not in self.capabilities.layer_kinds:
            raise ConfigError(
                f"Method '{config.method}' cannot adapt a {type(base).__name__} layer; it accepts "
                f"{', '.join(self.capabilities.layer_kinds)} layers: narrow the targets."
            )
        self.config = config
        self.kind = kind

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """This adapter's additive contribution to the base layer's output."""
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight delta, bias delta) in the base layer's layout, for merging."""
        raise NotImplementedError(f"method '{self.config.method}' cannot be merged")

    def cost(self, tokens: int = 1) -> Cost:
        params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return Cost(params, params * 4 * (ADAMW_STATE_PER_PARAM + 1), 0, 2 * params * tokens)

"""Where a network's transformer blocks are, which of them train, and layer-selection policies.

Generic over Hugging Face models and plain modules: the blocks are the longest `nn.ModuleList`
whose children share one class (`bert.encoder.layer`, `model.layers`, ...; in a CNN its stack of
residual blocks, e.g. EfficientNet's 16 MBConv blocks `efficientnet._blocks`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError


def transformer_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """(name of the block list, its blocks), or None when the model has no repeated blocks."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, list(module))
    return best


def replace_forward(module: nn.Module, forward) -> None:
    """Run `forward` in place of the module's own (hooks still fire) until `restore_forward`."""
    module.forward = forward


def restore_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


def forward_replaced(module: nn.Module) -> bool:
    return "forward" in module.__dict__


class Switch:
    """Something the trainer attaches to a model while it runs and detaches after: `attach`,
    `detach`, or `with switch.applied():`."""

    def attach(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    @contextmanager
    def applied(self):
        self.attach()
        try:
            yield
        finally:
            self.detach()


class ForwardRewrite(Switch):
    """An exact rewrite of one module's forward that the trainer attaches while it runs (the final
    block cut, the fused LM loss)."""

    @property
    def module(self) -> nn.Module:
        """The module whose forward is rewritten."""
        raise NotImplementedError

    def forward(self):
        """The forward to run in place of the module's own."""
        raise NotImplementedError

    def attach(self) -> None:
        replace_forward(self.module, self.forward())

    def detach(self) -> None:
        restore_forward(self.module)


def lowest_trainable_block(model: nn.Module) -> int | None:
    """Index of the lowest block holding a trainable parameter (None: no block trains)."""
    found = transformer_blocks(model)
    if found is None:
        return None
    for i, block in enumerate(found[1]):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return None


def below_top_k(model: nn.Module, k: int) -> str:
    """A regular expression matching every layer inside the blocks below the top `k`, for
    `exclude=` (the layer-selection policy "train the top-k blocks")."""
    found = transformer_blocks(model)
    if found is None:
        raise ConfigError("This model has no stack of repeated blocks, so 'train the top-k layers' cannot apply.")
    name, blocks = found
    if not 1 <= k <= len(blocks):
        raise ConfigError(f"train_layers must be between 1 and {len(blocks)} (the model's blocks), got {k}.")
    lower = "|".join(str(i) for i in range(len(blocks) - k))
    return rf"{re.escape(name)}\.(?:{lower})\..*" if lower else r"(?!)"


class LISA:
    """LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning
    (Pan et al., 2024), applied to adapters: every `period` optimizer steps, only `layers` blocks,
    drawn uniformly at random, keep their trainable parameters trainable; parameters outside the
    blocks (heads) always train. Frozen blocks get no gradient, so AdamW leaves them untouched and the
    backward pass stops at the lowest sampled block.

    The draw for period p comes from a generator seeded with (seed, p), so a resumed run samples the
    same blocks as an uninterrupted one.
    """

    def __init__(self, model: nn.Module, layers: int, period: int, seed: int = 0):
        found = transformer_blocks(model)
        if found is None:
            raise ConfigError("LISA needs a model with a stack of repeated blocks.")
        self.blocks = found[1]
        if not 1 <= layers <= len(self.blocks):
            raise ConfigError(f"LISA layers must be between 1 and {len(self.blocks)}, got {layers}.")
        if period < 1:
            raise ConfigError(f"LISA period must be at least 1 step, got {period}.")
        self.layers, self.period, self.seed = layers, period, seed
        # The parameters the policy may switch: those trainable when it starts.
        self.owned = [[p for p in b.parameters() if p.requires_grad] for b in self.blocks]
        self.active: list[int] = []

    def sample(self, period_index: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + period_index)
        chosen = torch.randperm(len(self.blocks), generator=generator)[: self.layers].sort().values.tolist()
        # A parameter shared across blocks (Compacter's rule matrices, MoS's pools) trains when any
        # chosen block uses it, whatever order the blocks are visited in.
        keep = {id(p) for i in chosen for p in self.owned[i]}
        for params in self.owned:
            for p in params:
                p.requires_grad_(id(p) in keep)
        self.active = chosen
        return chosen

    def before_step(self, step: int) -> None:
        """Call before optimizer step `step` (0-based); resamples at each period's start."""
        if step % self.period == 0 or not self.active:
            self.sample(step // self.period)

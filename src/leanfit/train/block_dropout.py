"""Turn the base model's dropout off inside the transformer blocks while the trainer runs.

A policy, not an identity: dropout regularises, so turning it off changes training (its accuracy cost
is measured in docs/lean-training.md). What it saves on a CPU: dropout masks cost about as much as a
block's attention, and PyTorch's CPU attention with dropout falls back from the fused kernel to the
unfused one (about 2.6x the time, forward and backward, at MiniLM's shapes). The adapters' own
dropout (LoRA's `dropout=`) and the head's stay.
"""

from __future__ import annotations

from torch import nn

from ..methods.base import AdapterModule
from .layers import Switch, transformer_blocks


def _base_dropouts(module: nn.Module) -> list[nn.Dropout]:
    """The nn.Dropout modules under `module` that are not part of an adapter."""
    if isinstance(module, AdapterModule):
        return []
    if isinstance(module, nn.Dropout):
        return [module]
    return [d for child in module.children() for d in _base_dropouts(child)]


class BlockDropoutOff(Switch):
    """Sets p = 0 on the blocks' own dropout modules while attached (attention modules read `p`
    themselves, so switching the Dropout module to eval mode alone would miss them)."""

    def __init__(self, model: nn.Module):
        found = transformer_blocks(model)
        self.modules = [d for block in found[1] for d in _base_dropouts(block)] if found else []
        self.saved: list[float] = []

    def attach(self) -> None:
        self.saved = [d.p for d in self.modules]
        for d in self.modules:
            d.p = 0.0

    def detach(self) -> None:
        for d, p in zip(self.modules, self.saved):
            d.p = p

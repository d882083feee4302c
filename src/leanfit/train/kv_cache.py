"""Turn off a Hugging Face decoder's key/value cache while the trainer runs it.

With `config.use_cache` (the default of every decoder), each forward keeps every layer's keys and
values for a generation that never comes: on SmolLM2-135M, building the prefix cache of 64 rows
held 250 MB of them, and a training step keeps them for its frozen blocks. The trainer's forwards
never read them, so the flag is off while it trains and evaluates, and comes back after.
"""

from __future__ import annotations

from torch import nn

from .layers import Switch


class NoKVCache(Switch):
    """`config.use_cache = False` between `attach` and `detach` (nested pairs restore in order)."""

    def __init__(self, config):
        self.config = config
        self._saved: list = []

    @staticmethod
    def plan(model: nn.Module) -> "NoKVCache | None":
        config = getattr(model, "config", None)
        return NoKVCache(config) if getattr(config, "use_cache", False) else None

    def attach(self) -> None:
        self._saved.append(self.config.use_cache)
        self.config.use_cache = False

    def detach(self) -> None:
        self.config.use_cache = self._saved.pop()

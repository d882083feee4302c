"""A host wraps one frozen base layer and holds any number of named adapters beside it.

The base layer stays inside the host untouched (PEFT's `base_layer` idea), so injection is uniform
and unwrapping gives back the very same module. Forward paths:
- unmerged: h = base(x) + sum of delta(x, base(x)) over the active, unmerged adapters;
- merged: an adapter's delta_weight was added into the base weight and it is skipped in forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from ..methods.base import AdapterModule


class AdapterHost(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        # Set only inside core.batching.row_plan: (adapter or None, start, end) row ranges.
        self.row_segments: tuple | None = None
        # Deltas added at merge time, kept so that unmerge subtracts exactly what merge added.
        self._merged: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    # -- attributes of the base layer that model code reads (weight, in_features, ...) --
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    # -- adapters --
    def add(self, name: str, adapter: AdapterModule) -> None:
        if name in self.adapters:
            raise AdapterError(f"Adapter '{name}' already exists here; delete it first or pick another name.")
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self._merged:
            self.unmerge(name)
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.row_segments is not None:
            return self._forward_segments(x, out)
        pending = [n for n in self.active if n not in self._merged]
        if not pending:
            return out
        base_out = out
        for name in pending:
            out = out + self.adapters[name].delta(x, base_out, self.base_layer)
        return out

    def _forward_segments(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each contiguous row range gets its own adapter's delta (rows were sorted by adapter)."""
        segments = [(n, s, e) for n, s, e in self.row_segments if n is not None and n in self.adapters]
        if not segments:
            return out
        if len(segments) == 1 and segments[0][1] == 0 and segments[0][2] == len(out):
            name = segments[0][0]  # one adapter for the whole batch: the plain path
            return out + self.adapters[name].delta(x, out, self.base_layer)
        result = out.clone()
        for name, start, end in segments:
            result[start:end] += self.adapters[name].delta(x[start:end], out[start:end], self.base_layer)
        return result

    # -- merging --
    @torch.no_grad()
    def merge_delta(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What merging adapter `name` would add to (weight, bias); raises if it cannot merge."""
        adapter = self.adapters[name]
        if not adapter.capabilities.mergeable:
            raise AdapterError(
                f"Adapter '{name}' ({adapter.config.method}) cannot be merged: its update is not a weight.")
        d_weight, d_bias = adapter.delta_weight(self.base_layer)
        return (None if d_weight is None else d_weight.detach().clone(),
                None if d_bias is None else d_bias.detach().clone())

    @torch.no_grad()
    def merge(self, name: str, delta=None) -> None:
        if name in self._merged:
            return
        d_weight, d_bias = delta if delta is not None else self.merge_delta(name)
        if d_weight is not None:
            self.base_layer.weight.add_(d_weight)
        if d_bias is not None:
            self.base_layer.bias.add_(d_bias)
        self._merged[name] = (d_weight, d_bias)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        d_weight, d_bias = self._merged.pop(name, (None, None))
        if d_weight is not None:
            self.base_layer.weight.sub_(d_weight)
        if d_bias is not None:
            self.base_layer.bias.sub_(d_bias)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"

"""A host wraps one frozen base layer and holds any number of named adapters beside it.

The base layer stays inside the host untouched (PEFT's `base_layer` idea), so injection is uniform
and unwrapping gives back the very same module. Forward paths:
- unmerged: h = base(x) + sum of delta(x, base(x)) over the active, unmerged adapters;
- merged: an adapter's delta_weight was added into the base weight and it is skipped in forward;
  an adapter that reads the base (IA3 scales its output) sees the base without the merged deltas,
  so adapters add up the same whether merged or not (merging IA3 twice would otherwise multiply);
- mixed rows: under a row plan (core/batching.py) each row gets its own adapter (core/segments.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterError
from ..methods.base import AdapterModule
from .segments import HostRows, LowRankBank


class AdapterHost(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        # Set only inside core.batching.mixed_batch: the RowPlan of the batch, and what this host
        # built for it (once, reused by every forward under the plan, e.g. each generation step).
        self.row_plan = None
        self._rows: HostRows | None = None
        self._segments: list = []  # the plan's (adapter, start, end) that this host holds
        self._bank: LowRankBank | None = None  # resident low-rank factors, stacked (core/segments.py)
        # Deltas added at merge time, kept so that unmerge subtracts exactly what merge added, or
        # the original tensors where the merge asked for a bit-exact restore (hot adapters).
        self._merged: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._originals: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

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
        self._bank = None

    def remove(self, name: str) -> None:
        if name in self._merged:
            self.unmerge(name)
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]
        self._bank = None

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def set_row_plan(self, plan, build: bool = False) -> None:
        """Enter (a RowPlan) or leave (None) a mixed batch; what was built for a plan is dropped.

        `build`: make the plan's HostRows now rather than at the first forward. Built between a
        forward's large GEMMs, with the caches full of activations, the same Python work took
        about 3x longer (MiniLM, 64 adapters: 36 ms against 13 ms a forward)."""
        self.row_plan, self._rows, self._segments = plan, None, []
        if plan is not None:
            self._segments = [(n, s, e) for n, s, e in plan.segments
                              if n is not None and n in self.adapters and n not in self._merged]
            if build and self._segments:
                self._build_rows()

    def _build_rows(self) -> HostRows:
        self._rows = HostRows(self.adapters, self._segments, self.row_plan.n_rows, self.base_layer, self._bank)
        self._bank = self._rows.bank
        return self._rows

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_plan is not None:
            return self._forward_rows(x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        pending = [n for n in self.active if n not in self._merged]
        if not pending:
            return out
        base_out, unmerged = out, None
        for name in pending:
            adapter, base, seen = self.adapters[name], self.base_layer, base_out
            if adapter.reads_base and self._merged:  # the base as it was before the merges
                if unmerged is None:
                    layer = self.unmerged_base()
                    unmerged = (layer, layer(x, *args, **kwargs))
                base, seen = unmerged
            # in the base's dtype, as PEFT does: under autocast a float32 delta (IA3's l ⊙ h) would
            # otherwise turn the rest of the block float32, slower and with twice the saved bytes
            out = out + adapter.delta(x, seen, base).to(base_out.dtype)
        return out

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row gets its own adapter's delta. A merged adapter is already in the weight (the
        plan then uses it alone, which core.batching checks), so it is skipped here."""
        plan, mine = self.row_plan, self._segments
        if not mine:
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] != plan.n_rows:
            raise AdapterError(
                f"An adapted layer received {x.shape[0]} rows in a mixed batch of {plan.n_rows}; mixed batches "
                "need the batch on the first axis of every adapted layer's input: leave this layer out of "
                "the targets.")
        if torch.is_grad_enabled() or args or kwargs:
            return self._forward_segments(x, self.base_layer(x, *args, **kwargs), mine)
        rows = self._rows if self._rows is not None else self._build_rows()
        return rows.forward(self.base_layer, x)

    def _forward_segments(self, x: torch.Tensor, out: torch.Tensor, segments) -> torch.Tensor:
        """The autograd-safe path: each contiguous row range adds its adapter's delta."""
        result = out.clone()
        for name, start, end in segments:
            result[start:end] = result[start:end] + self.adapters[name].delta(
                x[start:end], out[start:end], self.base_layer)
        return result

    # -- merging --
    def unmerged_base(self) -> nn.Module:
        """The base layer without the merged adapters' deltas: a shallow copy holding new weight and
        bias tensors (the originals where a merge kept them), the base layer itself if none is merged."""
        if not self._merged:
            return self.base_layer
        layer = copy.copy(self.base_layer)
        layer._parameters = dict(self.base_layer._parameters)
        for i, key in enumerate(("weight", "bias")):
            tensor = layer._parameters.get(key)
            if tensor is None:
                continue
            originals = [o[i] for o in self._originals.values() if o[i] is not None]
            deltas = [d[i] for d in self._merged.values() if d[i] is not None]
            if originals:  # kept by a merge for a bit-exact restore
                layer._parameters[key] = originals[0]
            elif deltas:
                layer._parameters[key] = tensor.detach() - sum(deltas)
        return layer

    @torch.no_grad()
    def merge_delta(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What merging adapter `name` would add to (weight, bias); raises if it cannot merge."""
        adapter = self.adapters[name]
        if not adapter.capabilities.mergeable:
            raise AdapterError(
                f"Adapter '{name}' ({adapter.config.method}) cannot be merged: its update is not a weight.")
        d_weight, d_bias = adapter.delta_weight(self.unmerged_base() if adapter.reads_base else self.base_layer)
        return (None if d_weight is None else d_weight.detach().clone(),
                None if d_bias is None else d_bias.detach().clone())

    @torch.no_grad()
    def merge(self, name: str, delta=None, keep_original: bool = False) -> None:
        """Add the adapter's delta into the base weight. keep_original: also keep a copy of the
        weight and bias, so unmerge restores them bit for bit (subtracting the delta is exact only
        to float rounding, which adds up over many merge/unmerge cycles of a long-running server)."""
        if name in self._merged:
            return
        if self._originals or (keep_original and self._merged):
            raise AdapterError(f"Adapter '{name}' cannot be merged with a restore copy on top of another merged "
                               f"adapter ({', '.join(self._merged)}); unmerge that one first.")
        d_weight, d_bias = delta if delta is not None else self.merge_delta(name)
        bias = getattr(self.base_layer, "bias", None)
        if keep_original:
            self._originals[name] = (self.base_layer.weight.detach().clone() if d_weight is not None else None,
                                     bias.detach().clone() if d_bias is not None else None)
        if d_weight is not None:
            self.base_layer.weight.add_(d_weight)
        if d_bias is not None:
            self.base_layer.bias.add_(d_bias)
        self._merged[name] = (d_weight, d_bias)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        d_weight, d_bias = self._merged.pop(name, (None, None))
        w0, b0 = self._originals.pop(name, (None, None))
        for tensor, delta, original in ((self.base_layer.weight, d_weight, w0),
                                        (getattr(self.base_layer, "bias", None), d_bias, b0)):
            if original is not None:
                tensor.copy_(original)
            elif delta is not None:
                tensor.sub_(delta)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"

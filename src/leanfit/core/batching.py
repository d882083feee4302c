"""Mixed-adapter batches: each row names its adapter (or none), in one forward pass.

The rows are sorted by adapter once per batch (`RowPlan`), so every adapted layer sees contiguous
row ranges; each host builds what it needs for the plan once (core/segments.py: stacked low-rank
factors, per-row scales) and reuses it for every forward under the plan, e.g. all steps of a
generation. Outputs are put back in the caller's row order. The adapter a row uses travels with the
row, never as "the active adapter" of the model.

A KV cache (a transformers `Cache`, or legacy tuples) is kept in the caller's row order too: when the
rows are not already sorted, the cache is reordered in place before the forward and back after it.
Callers that generate (serve/generation.py) sort their rows once, so nothing is ever reordered.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError, UnknownAdapterError
from .inject import hosts
from .model import adapters


@dataclass(frozen=True)
class RowPlan:
    """Rows grouped by adapter: `order` sorts the caller's rows; `segments` are (adapter, start, end)
    ranges in the sorted order; None is the base model."""

    order: torch.Tensor
    segments: tuple[tuple[str | None, int, int], ...]

    @staticmethod
    def of(names: Sequence[str | None]) -> "RowPlan":
        keys = sorted(range(len(names)), key=lambda i: ("" if names[i] is None else "\0" + names[i], i))
        segments, start = [], 0
        for i in range(1, len(keys) + 1):
            if i == len(keys) or names[keys[i]] != names[keys[start]]:
                segments.append((names[keys[start]], start, i))
                start = i
        return RowPlan(torch.tensor(keys, dtype=torch.long), tuple(segments))

    @property
    def n_rows(self) -> int:
        return len(self.order)

    @property
    def is_sorted(self) -> bool:
        return bool(torch.equal(self.order, torch.arange(len(self.order))))

    @property
    def names(self) -> list[str | None]:
        return [n for n, _, _ in self.segments]


def merged_adapters(model: nn.Module) -> set[str]:
    return {a for h in hosts(model).values() for a in h.merged}


def check_plan(model: nn.Module, plan: RowPlan) -> None:
    """Refuse a plan the model cannot run row by row: unknown adapters, an adapter merged into the
    shared weights while other rows need them bare, or adapters with their own trained heads
    (train_modules are whole modules that every row shares) beside other rows."""
    known = adapters(model)
    for name in plan.names:
        if name is not None and name not in known:
            raise UnknownAdapterError(f"Unknown adapter '{name}'; loaded adapters are: {', '.join(known) or 'none'}.")
    merged = merged_adapters(model)
    if merged and merged != set(plan.names):
        raise AdapterError(f"Adapters {sorted(merged)} are merged into the base weights, which every row shares; "
                           "unmerge them before a batch that uses other adapters or the base model.")
    with_heads = [n for n in plan.names if n is not None and known[n].train_modules]
    if with_heads and len(plan.names) > 1:
        raise AdapterError(f"Adapters {with_heads} carry trained modules {known[with_heads[0]].train_modules} that "
                           "every row of a batch shares; run their rows in batches of their own.")


class MixedBatch:
    """Runs `model(**batch)` with row i on adapter `row_adapters[i]`, for as many forwards as the
    caller likes (the hosts keep what they built for the plan until the block ends)."""

    def __init__(self, model: nn.Module, plan: RowPlan):
        self.model, self.plan = model, plan
        self.inverse = torch.empty_like(plan.order)
        self.inverse[plan.order] = torch.arange(plan.n_rows)
        self.identity = plan.is_sorted

    def __call__(self, batch: dict):
        if self.identity:
            return self.model(**batch)
        n, order = self.plan.n_rows, self.plan.order
        caches = [v for v in batch.values() if hasattr(v, "reorder_cache")]
        for cache in caches:
            cache.reorder_cache(order)
        try:
            out = self.model(**{k: _reorder(v, order, n) for k, v in batch.items()})
        finally:
            for cache in caches:
                cache.reorder_cache(self.inverse)
        returned = getattr(out, "past_key_values", None) if hasattr(out, "keys") else None
        if returned is not None and hasattr(returned, "reorder_cache") and all(returned is not c for c in caches):
            returned.reorder_cache(self.inverse)
        return _reorder(out, self.inverse, n)


@contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str | None]):
    """`with mixed_batch(model, names) as run: out = run(batch)`; see MixedBatch."""
    plan = RowPlan.of(row_adapters)
    check_plan(model, plan)
    every = list(hosts(model).values())
    for host in every:  # built now where no gradient will flow (HostRows serve inference only)
        host.set_row_plan(plan, build=not torch.is_grad_enabled())
    try:
        yield MixedBatch(model, plan)
    finally:
        for host in every:
            host.set_row_plan(None)


def forward_mixed(model: nn.Module, batch: dict, row_adapters: Sequence[str | None]):
    """`model(**batch)` where row i uses adapter `row_adapters[i]` (None: the base model).

    Tensors in `batch` and in the output whose first dimension is the batch are reordered; other
    outputs (e.g. a scalar loss) are returned as computed."""
    with mixed_batch(model, row_adapters) as run:
        return run(batch)


def _reorder(value, index: torch.Tensor, n: int):
    """`value` with its batch axis (tensors whose first dimension is n, inside dicts and tuples) indexed."""
    if torch.is_tensor(value):
        return value[index] if value.dim() > 0 and value.shape[0] == n else value
    if hasattr(value, "keys") and hasattr(value, "__setitem__"):  # Hugging Face ModelOutput (a dict)
        for key in list(value.keys()):
            if not hasattr(value[key], "reorder_cache"):
                value[key] = _reorder(value[key], index, n)
        return value
    if isinstance(value, tuple):
        return type(value)(*(_reorder(v, index, n) for v in value)) if hasattr(value, "_fields") else \
            tuple(_reorder(v, index, n) for v in value)
    if isinstance(value, list):
        return [_reorder(v, index, n) for v in value]
    return value


class HotAdapter:
    """Keeps the adapter of single-adapter batches merged into the base weights while it stays hot.

    A batch of one adapter runs at the base model's cost once that adapter is merged, which pays when
    it serves several forwards in a row: every step of a generation, or `after` batches in a row.
    Merges keep the original weights (one copy of the adapted layers' weights while merged), so
    unmerging restores them bit for bit however often it happens. Call `prepare` before each batch:
    it unmerges whatever the batch cannot share."""

    def __init__(self, model: nn.Module, after: int = 2):
        self.model, self.after = model, after
        self.last: str | None = None
        self.streak = 0
        self.unmergeable: set[str] = set()

    def prepare(self, row_adapters: Sequence[str | None], forwards: int = 1) -> str | None:
        """Merge or unmerge for a batch with these rows; returns the adapter merged now, if any."""
        names = set(row_adapters)
        only = next(iter(names)) if len(names) == 1 else None
        merged = merged_adapters(self.model)
        if merged and merged != {only}:
            self.release()
            merged = set()
        self.streak = self.streak + 1 if only is not None and only == self.last else 1
        self.last = only
        hot = forwards > 1 or self.streak >= self.after
        if only is not None and not merged and hot and only not in self.unmergeable:
            self._merge(only)
        return next(iter(merged_adapters(self.model)), None)

    def release(self) -> None:
        for host in hosts(self.model).values():
            for name in host.merged:
                host.unmerge(name)

    def _merge(self, name: str) -> None:
        todo = [h for h in hosts(self.model).values() if name in h.adapters]
        done = []
        try:
            deltas = [h.merge_delta(name) for h in todo]
            for host, delta in zip(todo, deltas):
                host.merge(name, delta, keep_original=True)
                done.append(host)
        except Exception:  # not mergeable (e.g. an int8 base): it stays unmerged, and is not tried again
            for host in done:
                host.unmerge(name)
            self.unmergeable.add(name)

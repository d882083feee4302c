"""Mixed-adapter batches: each row names its adapter (or none), in one forward pass.

The rows are sorted by adapter once per batch, so every adapted layer works on contiguous row
ranges (views, no gather) and adds each adapter's delta to its own range; the outputs are put back in
the caller's row order at the end. The adapter a row uses travels with the row, never as "the active
adapter" of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterError
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


@contextmanager
def row_plan(model: nn.Module, plan: RowPlan):
    """Inside the block, every host adds per-segment deltas instead of the active adapters'."""
    known = adapters(model)
    for name, _, _ in plan.segments:
        if name is not None and name not in known:
            raise AdapterError(f"Unknown adapter '{name}'; loaded adapters are: {', '.join(known) or 'none'}.")
    every = list(hosts(model).values())
    merged = sorted({a for h in every for a in h.merged})
    if merged:
        raise AdapterError(f"Adapters {merged} are merged into the base weights; unmerge them before mixed batches.")
    for host in every:
        host.row_segments = plan.segments
    try:
        yield
    finally:
        for host in every:
            host.row_segments = None


def forward_mixed(model: nn.Module, batch: dict[str, torch.Tensor], row_adapters: Sequence[str | None]):
    """`model(**batch)` where row i uses adapter `row_adapters[i]` (None: the base model).

    Tensors in `batch` and in the output whose first dimension is the batch are reordered; other
    outputs (e.g. a scalar loss) are returned as computed."""
    n = len(row_adapters)
    plan = RowPlan.of(row_adapters)
    sorted_batch = {k: v[plan.order] if torch.is_tensor(v) and v.shape[:1] == (n,) else v for k, v in batch.items()}
    with row_plan(model, plan):
        out = model(**sorted_batch)
    inverse = torch.empty_like(plan.order)
    inverse[plan.order] = torch.arange(n)
    return _reorder(out, inverse, n)


def _reorder(out, inverse: torch.Tensor, n: int):
    if torch.is_tensor(out):
        return out[inverse] if out.shape[:1] == (n,) else out
    if hasattr(out, "keys"):  # Hugging Face ModelOutput (a dict)
        for key in list(out.keys()):
            out[key] = _reorder(out[key], inverse, n)
        return out
    if isinstance(out, tuple):
        return type(out)(_reorder(o, inverse, n) for o in out)
    return out

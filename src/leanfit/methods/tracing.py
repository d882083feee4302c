"""What an adapter's delta costs, found by running it on the meta device: shapes only, no compute.

Used by `AdapterModule.cost` (the budget planner's input) so that every method, present and future,
declares its costs without a hand-written formula: FLOPs (torch's FlopCounterMode), bytes its ops
read and write (a dispatch mode summing each non-view op's tensor arguments and results), and the
tensors autograd keeps for backward (saved-tensor hooks).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .base import CONV2D, EMBEDDING, layer_kind


class _Traffic(TorchDispatchMode):
    """Counts the ops (kernels) that run and sums the bytes each reads and writes (views move nothing)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.ops += 1
        return out


def on_meta(modules: list[nn.Module]) -> list[nn.Module]:
    """Copies of `modules` whose parameters and buffers live on the meta device (shared ones stay shared)."""
    memo = {}
    for module in modules:
        for p in module.parameters():
            memo.setdefault(id(p), nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad))
        for b in module.buffers():
            memo.setdefault(id(b), b.detach().to("meta"))
    return copy.deepcopy(modules, memo)


def trace_delta(adapter: nn.Module, base: nn.Module, tokens: int) -> dict:
    """The delta's work over `tokens` tokens, with the host's addition to the base output (input
    gradients flowing, as inside trained blocks): forward and backward FLOPs, bytes moved and ops
    run, the bytes the forward keeps for backward besides its input, and whether it keeps its input."""
    from torch.utils.flop_counter import FlopCounterMode
    adapter, base = on_meta([adapter, base])
    adapter.train()
    kind = layer_kind(base)
    if kind == EMBEDDING:
        x = torch.zeros(tokens, dtype=torch.long, device="meta")
    elif kind == CONV2D:
        side = max(1, math.isqrt(tokens - 1) + 1)
        x = torch.empty(1, base.in_channels, side, side, device="meta", requires_grad=True)
    else:
        x = torch.empty(tokens, base.in_features, device="meta", requires_grad=True)
    owned = {id(t) for m in (adapter, base) for t in [*m.parameters(), *m.buffers()]}
    roots: dict[int, torch.Tensor] = {}

    def pack(t):
        root = t
        while root._base is not None:
            root = root._base
        roots.setdefault(id(root), root)
        return t

    with torch.no_grad():
        base_out = base(x)
    base_out.requires_grad_(x.requires_grad)  # in a trained block the base output carries a graph
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as flops, \
            _Traffic() as traffic:
        out = base_out + adapter.delta(x, base_out, base)  # as the host adds it
    forward = {"forward_flops": flops.get_total_flops(), "forward_bytes": traffic.bytes, "forward_ops": traffic.ops}
    kept = [t for i, t in roots.items() if i not in owned and t is not x]
    inputs = [t for t in (x, *adapter.parameters()) if t.requires_grad]
    backward = {"backward_flops": 0, "backward_bytes": 0, "backward_ops": 0}
    if out.requires_grad and inputs:
        with FlopCounterMode(display=False) as flops, _Traffic() as traffic:
            torch.autograd.grad(out, inputs, torch.empty_like(out), allow_unused=True)
        backward = {"backward_flops": flops.get_total_flops(), "backward_bytes": traffic.bytes,
                    "backward_ops": traffic.ops}
    return {**forward, **backward, "saved_bytes": sum(t.numel() * t.element_size() for t in kept),
            "saves_input": id(x) in roots}

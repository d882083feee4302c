"""Cached frozen prefix: compute the output of everything below the lowest trainable block once
per row, then train (and evaluate) from that cache, running only the blocks above it.

When it is correct (the rule, checked by `PrefixCache.plan`):
- every block below the boundary k, and every module that runs before block k, has no trainable
  parameter (so its output cannot change during training);
- those modules run in eval mode, with and without the cache (so dropout below k is off: a policy
  choice, "frozen layers are feature extractors"), and are deterministic;
- the rows are the same (the cache is keyed by row index into the same tokenised splits).
Then replaying the cache gives the same activations to block k as running the prefix, and the
losses are the same (tested). Everything else the model computes from its inputs (attention
masks, position ids, rotary embeddings) still runs, so the replay needs no architecture code.

Mechanics: the "entry" module whose output feeds block 0 (e.g. `bert.embeddings`,
`model.embed_tokens`) has its forward replaced by one that returns the cached rows, and blocks
0..k-1 have theirs replaced by a pass-through. The trainer tells the cache which rows come next (`select`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.splits import INPUT_KEYS, rows
from .layers import forward_replaced, lowest_trainable_block, replace_forward, restore_forward, transformer_blocks

MEMORY_LIMIT_BYTES = 2 << 30  # above this a split's cache goes to a memory-mapped file


class _Stop(Exception):
    """Raised from a hook to cut a forward pass once the prefix output is captured."""


@dataclass
class CachePlan:
    boundary: int  # first block that runs
    blocks: list[nn.Module]
    entry: nn.Module  # its output is block 0's input
    prefix: list[nn.Module]  # modules that run before block `boundary`: kept in eval mode


def _batch(split: dict, index: torch.Tensor, device) -> dict:
    return {k: split[k][index].to(device) for k in INPUT_KEYS if k in split}


def _execution_order(model: nn.Module, sample: dict, stop_at: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """Modules that finish before `stop_at` starts, in order, and the one whose output is its input."""
    finished: list[tuple[nn.Module, int]] = []
    entry = {}

    def record(module, args, output):
        if isinstance(output, torch.Tensor):
            finished.append((module, id(output)))
        else:
            finished.append((module, -1))

    def stop(module, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        entry["module"] = next((m for m, out in reversed(finished) if out == id(hidden)), None)
        raise _Stop

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    handles.append(stop_at.register_forward_pre_hook(stop, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(**sample)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [m for m, _ in finished], entry.get("module")


class PrefixCache:
    def __init__(self, model: nn.Module, plan: CachePlan):
        self.model, self.plan = model, plan
        self.store: dict[str, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self.split = "train"

    @staticmethod
    def plan(model: nn.Module, sample: dict) -> CachePlan | None:
        """Where the cache can start, or None when no prefix is frozen (or the model is not a stack
        of blocks). `sample` is one batch of model inputs, used to see what runs before what."""
        found = transformer_blocks(model)
        k = lowest_trainable_block(model)
        if found is None or k is None or k == 0:
            return None
        blocks = found[1]
        _, entry = _execution_order(model, sample, blocks[0])
        before_k, _ = _execution_order(model, sample, blocks[k])
        if entry is None or any(p.requires_grad for m in before_k for p in m.parameters()):
            return None
        return CachePlan(k, blocks, entry, before_k)

    def build(self, splits: dict[str, dict], batch_size: int, spill_dir: str | None = None) -> None:
        """Run the prefix once over every row of `splits` and keep block k-1's output."""
        if self.attached:  # the replay would feed the cache to itself
            raise RuntimeError("build the prefix cache while it is detached")
        model, plan = self.model, self.plan
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for name, split in splits.items():
            n = rows(split)
            if n == 0:
                continue
            captured = {}

            def keep(module, args, output):
                captured["out"] = output[0] if isinstance(output, tuple) else output
                raise _Stop

            handle = plan.blocks[plan.boundary - 1].register_forward_hook(keep)
            try:
                with torch.inference_mode():
                    for start in range(0, n, batch_size):
                        index = torch.arange(start, min(start + batch_size, n))
                        try:
                            model(**_batch(split, index, device))
                        except _Stop:
                            pass
                        out = captured["out"].detach()
                        if name not in self.store:
                            self.store[name] = self._allocate((n, *out.shape[1:]), out.dtype, name, spill_dir)
                        self.store[name][index] = out.to(self.store[name].device)
            finally:
                handle.remove()
        model.train(was_training)

    @staticmethod
    def _allocate(shape, dtype, name, spill_dir) -> torch.Tensor:
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        if size <= MEMORY_LIMIT_BYTES or spill_dir is None:
            return torch.empty(shape, dtype=dtype)
        array = np.lib.format.open_memmap(f"{spill_dir}/prefix-{name}.npy", mode="w+",
                                          dtype=torch.empty((), dtype=dtype).numpy().dtype, shape=shape)
        return torch.from_numpy(array)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values())

    def select(self, split: str, index: torch.Tensor) -> None:
        """The rows the next forward pass computes."""
        self.split, self.rows = split, index

    @property
    def attached(self) -> bool:
        return forward_replaced(self.plan.entry)

    def has(self, split: str) -> bool:
        return split in self.store

    def prefix_eval(self) -> None:
        """Keep the frozen prefix in eval mode (call after every `model.train()`)."""
        for module in self.plan.prefix:
            module.eval()

    def attach(self) -> None:
        plan = self.plan
        device = next(self.model.parameters()).device

        def replay(*args, **kwargs):
            return self.store[self.split][self.rows].to(device)

        # The entry's own work (embedding lookups, their dropout) is skipped, not just overwritten.
        replace_forward(plan.entry, replay)
        for block in plan.blocks[: plan.boundary]:
            replace_forward(block, _pass_through)

    def detach(self) -> None:
        for module in [self.plan.entry, *self.plan.blocks[: self.plan.boundary]]:
            restore_forward(module)


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states

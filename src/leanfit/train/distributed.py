"""Data-parallel training under `torchrun` (gloo on CPU, nccl on GPU).

Each optimizer step's global batch is split across processes (rank r takes rows r, r+W, ...); each
process scales its loss by its share of the batch, and the trainable gradients are all-reduced
(averaged) in one flat buffer before clipping and the optimizer step. The result equals one
process training on the same global batch (tested), as torch's DistributedDataParallel would give;
we all-reduce by hand because adapter gradients are small (DDP's buckets buy nothing) and because
LISA changes the trainable set between steps, which DDP does not allow.
Only rank 0 writes checkpoints, metrics and artifacts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .metrics import IGNORE_INDEX


def init_from_env() -> bool:
    """Join the process group `torchrun` describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def shard(index: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    return index[rank::size]


def predicted(batch: dict, task_is_lm: bool) -> int:
    """What a loss averages over: rows, or (for causal LM) shifted labelled tokens."""
    if task_is_lm:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return len(batch["labels"])


def global_sum(value: float, device: torch.device) -> float:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over processes, in one flat all-reduce."""
    size = world()[1]
    if size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is not None:
            p.grad.copy_(flat[offset: offset + n].view_as(g))
        offset += n


def shutdown() -> None:
    """Leave the process group cleanly (a process exiting without this can abort gloo's peers)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

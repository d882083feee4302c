"""The exact part of the cost model: trainable parameters and adapter bytes of a tune configuration.

The adapter is built exactly as `leanfit tune` builds it (`tune.apply_method`: the same targets,
exclude list, top-k blocks and task heads) on a copy of the model whose weights live on the meta
device, so nothing is allocated and the caller's model is never touched; its tensors are then
serialised the way `core.artifact.save` writes them, with empty storage of the same shapes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device; ties stay tied."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo.setdefault(id(b), b.detach().to("meta"))
    return copy.deepcopy(model, memo)


def meta_adapted(model: nn.Module, config, fingerprint: str) -> nn.Module | None:
    """A weight-less copy of `model` adapted as `leanfit tune` would, nothing allocated; None where the
    method's init needs real values (data-dependent ops)."""
    from ..tune import apply_method
    adapted = meta_copy(model)
    adapted.__dict__["leanfit_fingerprint"] = fingerprint  # hashing needs weights; the copy has none
    try:
        apply_method(adapted, config)
    except (NotImplementedError, RuntimeError):
        return None
    return adapted


def build(model: nn.Module, config, fingerprint: str) -> dict:
    """Adapt a weight-less copy of `model` as `leanfit tune` would; count what it trains and save."""
    from ..tune import apply_method
    adapted = meta_adapted(model, config, fingerprint)
    if adapted is None:  # counted on a real copy instead
        adapted = copy.deepcopy(model)
        adapted.__dict__["leanfit_fingerprint"] = fingerprint
        apply_method(adapted, config)
    trainable = [(n, p) for n, p in adapted.named_parameters() if p.requires_grad]
    return {"model": adapted, "trainable": trainable, "adapter_bytes": saved_bytes(adapted, config, trainable),
            "total_params": sum(p.numel() for p in adapted.parameters())}


def saved_bytes(adapted: nn.Module, config, trainable) -> int:
    """Bytes of adapter.safetensors as core.artifact writes it (full / probe: their trained tensors)."""
    import safetensors.torch
    from ..core import artifact
    from ..core.model import adapter_modules, spec
    from ..tune import BASELINES
    if config.method in BASELINES:
        tensors = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in trainable}
    else:
        owners = [*adapter_modules(adapted, config.name).values(),
                  *(adapted.get_submodule(h) for h in spec(adapted, config.name).train_modules)]
        for module in owners:
            if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
                module.to_empty(device="cpu")
        tensors = artifact.adapter_tensors(adapted, config.name)
    return len(safetensors.torch.save(tensors))

"""A base model's fingerprint: a hash of its frozen weights (names, shapes, dtypes and bytes).

An adapter records the fingerprint of the base it was trained on, so loading it onto another base
fails loudly instead of producing quietly wrong outputs.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .hosts import AdapterHost


def base_parameters(model: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The base model's parameters by their original names (adapters and skipped modules left out)."""
    params: dict[str, torch.Tensor] = {}
    host_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, AdapterHost)]
    for name, p in model.named_parameters():
        if any(name.startswith(h + "adapters.") for h in host_prefixes):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip_prefixes):
            continue
        params[name.replace(".base_layer.", ".")] = p
    return params


def fingerprint(model: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, p in sorted(base_parameters(model, skip_prefixes).items()):
        t = p.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()

"""Mixed precision for training steps: the matrix products in bfloat16, everything kept in float32.

Why: with adapters, nearly all of a step's work is the frozen base's matrix products (forward, and
backward to the inputs), and on hardware with native bfloat16 arithmetic (AVX512-BF16 or AMX CPUs,
Ampere and later GPUs) those run 2-3x faster in bfloat16: on a 2-core AVX512-BF16 CPU, 1024 x 576 x
1536 took 4.5 ms against 13.9 ms in float32. `torch.autocast` does the casting per operation; the
adapters, optimizer state, gradients and the residual stream stay float32, so the trained adapter
and the model are what float32 training hands back, in type and layout.

Two things autocast alone gets wrong for speed, done here:
- it casts a frozen weight afresh in every forward (its cache keeps only weights that require grad),
  so the frozen Linear weights get bfloat16 copies made once and swapped in for each step's forward
  and backward (the float32 tensors come back after it);
- on a CPU, PyTorch's bfloat16 flash attention is slower than its float32 one at the lengths adapters
  train on (8 x 9 heads x 128 tokens, forward and backward: 16.9 ms against 10.4 ms), so attention
  stays float32 there.

Only training steps run this way (and the prefix cache of the train split, which stands for their
lower part); evaluation stays float32, so validation and test figures are the model's own.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("fp32", "bf16", "auto")
LOW = torch.bfloat16


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bfloat16 matrices natively (else autocast would emulate it, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu's probes are private; a torch without them counts as no
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    return False


def resolve(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device has native bfloat16 arithmetic, else "fp32"."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


class MixedPrecision:
    """The contexts a training step runs in: `step()` around its forwards and backwards, `forward()`
    around each forward. Both do nothing in "fp32". `trained`: the parameters the run optimises; none
    of them is ever swapped, even while frozen (LISA freezes and unfreezes adapters between steps)."""

    def __init__(self, model: nn.Module, precision: str, device: torch.device, trained=()):
        self.model, self.precision, self.device = model, precision, device
        self._trained = {id(p) for p in trained}
        self._weights: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] | None = None

    @contextmanager
    def step(self):
        """Frozen Linear weights in bfloat16 for a step's forwards and backwards (the copies are made
        on first use, a step or the train split's prefix cache, and kept until `release`)."""
        if self.precision != "bf16":
            yield
            return
        if self._weights is None:
            self._weights = _frozen_linear_weights(self.model, self._trained)
        # attention stays float32 in the backward too: gradient checkpointing recomputes a block's
        # forward there (under the autocast it saved), and must get tensors of the types it got before
        attention = _float32_attention() if self.device.type == "cpu" else nullcontext()
        try:
            for param, _, low in self._weights:
                param.data = low
            with attention:
                yield
        finally:
            for param, full, _ in self._weights:
                param.data = full

    def forward(self):
        return autocast(self.precision, self.device)

    def release(self) -> None:
        """Drop the bfloat16 copies (2 bytes per frozen weight); a later step makes them again."""
        self._weights = None


@contextmanager
def autocast(precision: str, device: torch.device):
    """bfloat16 autocast for "bf16" (attention kept float32 on a CPU), nothing for "fp32"."""
    if precision != "bf16":
        yield
        return
    with torch.autocast(device.type, dtype=LOW), (_float32_attention() if device.type == "cpu" else nullcontext()):
        yield


@contextmanager
def _float32_attention():
    """F.scaled_dot_product_attention outside autocast, in float32, while the block runs. Hugging Face's
    attention (and most code) looks the function up at call time, so this reaches it; code holding its
    own reference keeps the bfloat16 kernel, which is correct, only slower."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            mask = kwargs.get("attn_mask")
            if mask is not None and mask.is_floating_point():
                kwargs["attn_mask"] = mask.float()
            return original(query.float(), key.float(), value.float(), *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def copy_bytes(model: nn.Module, trained=()) -> int:
    """Bytes the bfloat16 weight copies of a "bf16" run take (what `MixedPrecision.step` swaps in)."""
    return sum(p.numel() * LOW.itemsize for p in _swappable(model, {id(t) for t in trained}))


def _frozen_linear_weights(model: nn.Module, trained: set[int]) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
    """(parameter, its float32 data, a bfloat16 copy) for each weight `_swappable` names."""
    return [(param, param.data, param.data.to(LOW)) for param in _swappable(model, trained)]


def _swappable(model: nn.Module, trained: set[int]) -> list[nn.Parameter]:
    """Every frozen float32 nn.Linear weight outside `trained` (ids), except one shared with an
    embedding (a tied output layer): a bfloat16 embedding would put the residual stream in bfloat16."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found, seen = [], set(trained)
    for module in model.modules():
        param = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if (param is None or param.requires_grad or param.dtype != torch.float32
                or id(param) in embedded or id(param) in seen):
            continue
        seen.add(id(param))
        found.append(param)
    return found

"""A frozen base stored in int8 (weight only), the adapters beside it in full precision.

Why: in parameter-efficient fine-tuning the base weights are frozen, so they only need to be read,
and reading them from 1 byte per value instead of 4 cuts the base's memory by about 4x while the
adapters and the trained head keep full precision and their gradients. The idea comes from QLoRA:
Efficient Finetuning of Quantized LLMs (Dettmers et al., 2023) and LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale (Dettmers et al., 2022). What is here is much plainer than
either: symmetric absmax int8 per output channel, W ~= scale[o] * q[o, i] with
scale[o] = max_i |W[o, i]| / 127; no NF4, no double quantisation, no outlier decomposition, no
custom kernels (the forward dequantises through a float matmul, so it saves memory, not time).

    quantize_base(model)      # after lf.adapt: frozen Linears (bare or a host's base_layer) -> int8
    ... train, lf.save ...    # the adapter's manifest keeps the float base's fingerprint
    dequantize_base(model)    # back to float nn.Linear (holding the *quantised* values)

Merging writes into the base weight, which int8 storage cannot take: `lf.merge` on a quantised
layer raises AdapterError (nothing changes); call `dequantize_base(model)` first, or, better, load
the saved adapter onto the float base and merge there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError, ConfigError
from .hosts import AdapterHost

ALL_LINEAR_FROZEN = "all-linear-frozen"
_READ_ONLY = ("The base layer is stored in int8 and cannot be changed in place (merge, calibrate); "
              "call leanfit.core.quantize.dequantize_base(model) first.")


class _ReadOnlyWeight(torch.Tensor):
    """The dequantised weight handed to readers. Writing into it would change a temporary copy and
    nothing else (a merge would silently be lost), so in-place operations raise instead."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))) \
                and args and isinstance(args[0], cls):
            raise AdapterError(_READ_ONLY)
        with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors
            return func(*args, **(kwargs or {}))


class Int8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is int8 per output channel, dequantised on the fly.

    It subclasses nn.Linear (without allocating its float weight) so that code asking
    `isinstance(m, nn.Linear)` (layer_kind, targeting) treats it as the Linear it stands for. It has
    no parameters at all: `qweight`, `scale` and `bias` are buffers, so nothing trains them, counts
    them as trainable or hands them to an optimizer. `weight` is a read-only dequantised copy for
    methods that read the base weight (PiSSA and LoRA-SB init, IA3 shapes)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: it would allocate a float weight
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        absmax = w.abs().amax(dim=1)
        scale = absmax / 127.0
        q = torch.round(w / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.to(torch.int8), scale.to(linear.weight.dtype), bias)

    @property
    def weight(self) -> torch.Tensor:
        return self._dequantized().as_subclass(_ReadOnlyWeight)

    def _dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the output, not the weight, skips materialising an (out x in) float weight:
        # about as fast as the float Linear on CPU, several times faster than F.linear(x, q * s).
        out = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    @torch.no_grad()
    def dequantize(self) -> nn.Linear:
        """A float nn.Linear with the quantised values (the original weights are not kept)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=self.scale.dtype)
        linear.weight.copy_(self._dequantized())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def reset_parameters(self) -> None:  # nn.Linear's would touch the float weight we do not have
        pass

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, int8 per-channel absmax"


def _replaceable(model: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Linear]]:
    """Full name -> (parent, attribute, Linear) for every plain nn.Linear that is frozen, outside
    adapters (a host's base_layer counts; its adapters do not) and shares no weight (tied)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    found, skip = {}, []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, AdapterHost):
            skip.append(f"{name}.adapters" if name else "adapters")
        for attr, child in module.named_children():
            if type(child) is not nn.Linear or (isinstance(module, AdapterHost) and attr != "base_layer"):
                continue
            params = list(child.parameters())
            if any(p.requires_grad for p in params) or any(counts[id(p)] > 1 for p in params):
                continue
            found[f"{name}.{attr}" if name else attr] = (module, attr, child)
    return found


def quantized_params(model: nn.Module) -> int:
    """How many base values the model holds in int8 layers (buffers, so parameter counts miss them)."""
    return sum(m.qweight.numel() + (0 if m.bias is None else m.bias.numel())
               for m in model.modules() if isinstance(m, Int8Linear))


def quantize_base(model: nn.Module, targets=ALL_LINEAR_FROZEN) -> int:
    """Replace frozen float nn.Linear layers by Int8Linear in place; returns how many.

    `targets`: "all-linear-frozen", or a list of layer names (a name matches itself or a suffix
    after "."; a host's name selects its base_layer). Layers with any trainable parameter (adapters,
    a trained head) are never replaced, so call this after `lf.adapt`, which freezes the base.
    Only plain nn.Linear is replaced (its subclasses may have their own forward), and never a
    tied weight (quantising one side would free nothing and break the tie)."""
    names = None if targets == ALL_LINEAR_FROZEN else [targets] if isinstance(targets, str) else list(targets)
    layers = _replaceable(model)
    if names is not None:
        def wanted(full: str) -> bool:
            host_name = full.removesuffix(".base_layer")
            return any(n in (full, host_name) or host_name.endswith("." + n) for n in names)
        layers = {n: v for n, v in layers.items() if wanted(n)}
        if not layers:
            raise ConfigError(f"quantize_base targets {names} matched no frozen nn.Linear; freeze the "
                              f"base first (lf.adapt does) or use '{ALL_LINEAR_FROZEN}'.")
    for parent, attr, linear in layers.values():
        setattr(parent, attr, Int8Linear.from_linear(linear))
    return len(layers)


def dequantize_base(model: nn.Module) -> int:
    """Replace every Int8Linear by a frozen float nn.Linear; returns how many. The weights are the
    quantised values, not the originals (those were dropped to save memory)."""
    found = [(parent, attr, child) for parent in model.modules()
             for attr, child in parent.named_children() if isinstance(child, Int8Linear)]
    for parent, attr, child in found:
        setattr(parent, attr, child.dequantize())
    return len(found)


__all__ = ["Int8Linear", "quantize_base", "dequantize_base", "ALL_LINEAR_FROZEN"]

"""What every adaptation method is: a config dataclass and a small module that owns its math.

A method module sits inside a host (core/hosts.py) next to a frozen base layer and contributes
`delta(x, base_out)`, which the host adds to the base layer's output. Methods whose update is a
weight also give `delta_weight(base)`, so the host can merge and unmerge exactly. Nothing here walks
a model or touches files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..field_types import refuse_wrong_types

LINEAR, CONV2D, EMBEDDING = "linear", "conv2d", "embedding"
ADAMW_STATE_PER_PARAM = 2  # exp_avg and exp_avg_sq
# The attribute under which an adapter layer holds the parameters it shares with every other layer
# of the same adapter (see AdapterModule.shared_parameters).
SHARED = "shared"


def layer_kind(module: nn.Module) -> str | None:
    """The kind of base layer a method can attach to, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv2d):
        return CONV2D
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return None


def out_features(base: nn.Module) -> int:
    """Size of the channel/feature axis the base layer produces."""
    kind = layer_kind(base)
    if kind == LINEAR:
        return base.out_features
    if kind == CONV2D:
        return base.out_channels
    return base.embedding_dim


def in_features(base: nn.Module) -> int:
    kind = layer_kind(base)
    if kind == LINEAR:
        return base.in_features
    if kind == CONV2D:
        return base.in_channels
    return base.num_embeddings


def tensor_kwargs(base: nn.Module) -> dict:
    """Device and dtype of the base weight, so adapter tensors live beside it."""
    return {"device": base.weight.device, "dtype": base.weight.dtype}


def channel_view(vector: torch.Tensor, base: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Shape a per-output-channel vector so it broadcasts against the base layer's output, in its dtype:
    under bfloat16 autocast a float32 vector would make each elementwise op a mixed-dtype one (slower
    on a CPU) with a float32 result (twice the bytes)."""
    vector = vector.to(out.dtype)
    if layer_kind(base) == CONV2D:
        return vector.view(1, -1, *([1] * (out.dim() - 2)))
    return vector


def conv_with(base: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The base convolution's own forward with `weight` (and `bias`) in place of its parameters: same
    stride, dilation, groups and padding, including the padding rule of a Conv2d subclass (e.g. the
    TensorFlow-style "same" padding of EfficientNet's convolutions), so a kernel-sized adapter factor
    sees exactly the input window the base weight sees."""
    if type(base).forward is nn.Conv2d.forward:
        return base._conv_forward(x, weight, bias)
    return torch.func.functional_call(base, {"weight": weight, "bias": bias}, (x,))


@dataclass(frozen=True)
class Capabilities:
    mergeable: bool  # has delta_weight: merge/unmerge exactly into the base weight
    mixed_batch: bool  # rows of one batch may use different adapters of this method
    elastic_rank: bool  # any rank <= r usable after training (DyLoRA)
    layer_kinds: tuple[str, ...]


@dataclass(frozen=True)
class Cost:
    """What one adapted layer costs; inputs of the budget planner (per token where it says so)."""

    params: int
    optimizer_bytes: int
    activation_bytes_per_token: int  # kept for the backward pass, besides the layer's input
    extra_flops_per_token: int  # of the forward delta
    saves_input: bool = False  # the backward needs the layer's input (layers reading one input share it)
    extra_bytes_per_token: int = 0  # memory the forward delta's ops read and write
    backward_flops_per_token: int = 0  # of its backward (input and parameter gradients)
    backward_bytes_per_token: int = 0
    forward_ops: int = 0  # kernels one forward call runs (each has a fixed overhead), whatever the tokens
    backward_ops: int = 0


@dataclass(frozen=True)
class LowRank:
    """An update delta(x) = scale * up @ (down @ x) on a linear layer (down: r x in, up: out x r).

    Hosts batch the LowRank forms of many adapters into one op per layer (core/segments.py)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0


@dataclass(frozen=True)
class ChannelAffine:
    """An update delta = base_out * scale + shift per output channel (either may be None)."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


@dataclass
class MethodConfig:
    """Base of method configs. `method` is the registry name; fields are the method's options."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def replace(self, **changes) -> "MethodConfig":
        valid = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ConfigError(
                f"Method '{self.method}' has no option {', '.join(unknown)}; valid options are: "
                f"{', '.join(sorted(valid))}."
            )
        return type(self)(**{**asdict(self), **changes})

    def __post_init__(self) -> None:
        refuse_wrong_types(self, f"Method '{self.method}' option")  # first, so validate() can rely on types
        try:
            self.validate()
        except ConfigError:  # the method's own sentence (a ConfigError is a ValueError too)
            raise
        except (TypeError, ValueError) as err:  # e.g. rank="abc" from a command line or a JSON file
            raise ConfigError(f"Method '{self.method}' has an option of the wrong kind ({err}); "
                              "give numbers where it expects them, e.g. rank=8.") from None
        for option in fields(self):
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):  # nan or inf would fail only in training
                raise ConfigError(f"Method '{self.method}' option {option.name} must be a finite number, got {value}.")

    def validate(self) -> None:
        """Raise ConfigError on values that cannot work; subclasses extend."""


class AdapterModule(nn.Module):
    """One adapter attached to one base layer. Subclasses set the class attributes below."""

    config_class: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities]
    # A training-time controller over all layers of one adapter (train/controllers.py), or None.
    controller_class: ClassVar[type | None] = None
    # delta / delta_weight read the base layer's output or weight (IA3, SSF, HUT, Hydra, series
    # adapters), so with another adapter merged into that weight the host hands them the weight
    # without it: adapters add up the same merged or not (core/hosts.py).
    reads_base: ClassVar[bool] = False

    def __init__(self, base: nn.Module, config: MethodConfig, shared: nn.Module | None = None):
        super().__init__()
        kind = layer_kind(base)
        if kind not in self.capabilities.layer_kinds:
            kinds = ", ".join(self.capabilities.layer_kinds)
            if LINEAR in self.capabilities.layer_kinds and CONV2D not in self.capabilities.layer_kinds:
                kinds += " and pointwise (1x1, stride 1) conv2d"  # methods/pointwise.py
            raise ConfigError(
                f"Method '{config.method}' cannot adapt a {type(base).__name__} layer; it accepts "
                f"{kinds} layers: narrow the targets."
            )
        self.config = config
        self.kind = kind
        if shared is not None:
            # A submodule, so .to(), parameters() (which de-duplicates), set_trainable and the
            # trainer see it; the one object is registered in every layer of the adapter.
            setattr(self, SHARED, shared)

    @property
    def method_module(self) -> "AdapterModule":
        """The module that owns the method's parameters and state: itself, or what a wrapper wraps
        (methods/pointwise.py). Code that reads method-specific attributes goes through it."""
        return self

    @classmethod
    def shared_parameters(cls, config: MethodConfig, bases: dict[str, nn.Module]) -> nn.Module | None:
        """Parameters that every layer of one adapter uses (Compacter's slow matrices, MoS's shard
        pools), or None (the default). core.model.adapt calls this once per adapter with all target
        layers (name -> base layer, in model order) before building any layer, and hands the module
        it returns to each layer's constructor as `shared`; artifacts store it once."""
        return None

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """This adapter's additive contribution to the base layer's output."""
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight delta, bias delta) in the base layer's layout, for merging."""
        raise NotImplementedError(f"method '{self.config.method}' cannot be merged")

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # Any attribute set (training mode, a rank, a replaced parameter) may change batched_form.
        self.__dict__["_attribute_sets"] = self.__dict__.get("_attribute_sets", 0) + 1

    def form_stamp(self) -> tuple | None:
        """A value that changes whenever batched_form's result may: an attribute set on the module,
        a tensor of it added, replaced, swapped (`.data = ...`) or changed in place. A mixed batch
        reuses the form it stacked while the stamp stays (core/segments.py), instead of asking each
        of, say, 64 adapters in each of 37 layers for its form on every batch. None where it cannot
        tell: a submodule holds tensors (their attributes are not watched)."""
        for child in self._modules.values():
            if child is not None and (child._parameters or child._buffers or child._modules):
                return None
        tensors = [*self._parameters.values(), *self._buffers.values()]
        try:
            return self.__dict__.get("_attribute_sets", 0), *[
                (id(t), t.data_ptr(), t._version) for t in tensors if t is not None]
        except RuntimeError:  # an inference-mode tensor has no version counter
            return None

    def batched_form(self, base: nn.Module) -> LowRank | ChannelAffine | None:
        """This adapter's update in eval mode as data (LowRank, ChannelAffine) that a host can apply
        to the rows of many adapters in one op per layer; None (the default): only `delta`, which
        mixed batches apply per row segment. It may read the module's own attributes and tensors,
        not the base layer's: a form is reused while `form_stamp` is unchanged."""
        return None

    def cost(self, tokens: int = 1, base: nn.Module | None = None) -> Cost:
        """This layer's own cost; parameters shared across layers (SHARED) are not counted here.

        Given its `base` layer, the delta's forward and backward are traced on the meta device over
        `tokens` tokens (no compute: methods/tracing.py), which counts their FLOPs, the bytes their
        ops move and what the forward keeps for backward; without it, FLOPs are taken as 2 per
        parameter and token. Methods may override with a closed form."""
        params = sum(p.numel() for n, p in self.named_parameters()
                     if p.requires_grad and not n.startswith(SHARED + "."))
        optimizer = params * 4 * (ADAMW_STATE_PER_PARAM + 1)  # gradient, exp_avg, exp_avg_sq
        if base is None:
            return Cost(params, optimizer, 0, 2 * params * tokens)
        from .tracing import trace_delta
        t = trace_delta(self, base, tokens)
        per_token = {k: -(-v // tokens) for k, v in t.items() if k not in ("saves_input", "forward_ops", "backward_ops")}
        return Cost(params, optimizer, per_token["saved_bytes"], per_token["forward_flops"], t["saves_input"],
                    per_token["forward_bytes"], per_token["backward_flops"], per_token["backward_bytes"],
                    t["forward_ops"], t["backward_ops"])


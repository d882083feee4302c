"""Find target layers by name, regex or type; wrap them in hosts; unwrap to the original model.

Target forms (as in PEFT, plus types):
- "all-linear": every nn.Linear and every pointwise Conv2d (1x1 kernel, one group: a Linear applied
  at each position, as in a CNN's expand / project / head convolutions) except the output head;
  spatial and depthwise convolutions are left out (name them to adapt them);
- a list of names: a module matches when its full name equals one or ends with "." + one;
- a string: a regular expression that must match the full module name;
- a layer type or tuple of types (nn.Linear, nn.Conv2d, nn.Embedding).
`exclude` takes the same forms and removes matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..errors import TargetError
from ..methods.base import layer_kind
from .hosts import AdapterHost

ALL_LINEAR = "all-linear"
# Output heads: trained in full as `train_modules` (like PEFT's modules_to_save), never adapted.
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "cls")

Targets = str | Iterable[str] | type | tuple


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> adaptable layer (a host counts as its base layer), skipping hosts' insides."""
    found: dict[str, nn.Module] = {}
    inside_hosts: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") for h in inside_hosts):
            continue
        if isinstance(module, AdapterHost):
            inside_hosts.append(name)
            found[name] = module.base_layer
        elif layer_kind(module) is not None:
            found[name] = module
    return found


def _is_head(name: str, model: nn.Module) -> bool:
    if name.split(".")[0] in HEAD_NAMES or name.split(".")[-1] in HEAD_NAMES:
        return True
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head is not None and dict(model.named_modules()).get(name) is head


def _is_linear_map(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv2d):
        return tuple(layer.kernel_size) == (1, 1) and layer.groups == 1
    return isinstance(layer, nn.Linear)


def _matcher(targets: Targets, model: nn.Module):
    if targets == ALL_LINEAR:
        return lambda name, layer: _is_linear_map(layer) and not _is_head(name, model)
    if isinstance(targets, type) or (isinstance(targets, tuple) and all(isinstance(t, type) for t in targets)):
        return lambda name, layer: isinstance(layer, targets)
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise TargetError(f"Target pattern '{targets}' is not a valid regular expression ({err}).") from None
        return lambda name, layer: pattern.fullmatch(name) is not None
    try:
        names = list(targets)
    except TypeError:  # e.g. 5 or None
        names = None
    if names is None or not all(isinstance(t, str) for t in names):
        raise TargetError(f"Targets {targets!r} are not a kind leanfit reads; give 'all-linear', a list of layer "
                          "names, a regular expression, or layer types such as nn.Linear.")
    return lambda name, layer: any(name == t or name.endswith("." + t) for t in names)


def find_targets(model: nn.Module, targets: Targets, exclude: Targets | None = None) -> list[str]:
    """Names of the layers that `targets` selects and `exclude` does not, in model order."""
    layers = candidate_layers(model)
    keep = _matcher(targets, model)
    drop = _matcher(exclude, model) if exclude else (lambda name, layer: False)
    chosen = [n for n, layer in layers.items() if keep(n, layer) and not drop(n, layer)]
    if not chosen:
        raise TargetError(
            f"Targets {targets!r} matched no Linear, Conv2d or Embedding layer; use 'all-linear', "
            f"layer names such as {_examples(layers)}, or a regular expression.")
    return chosen


def _examples(layers: dict[str, nn.Module]) -> str:
    tails = list(dict.fromkeys(n.split(".")[-1] for n in layers))[:5]
    return ", ".join(repr(t) for t in tails) or "(the model has no adaptable layers)"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def host_at(model: nn.Module, name: str) -> AdapterHost:
    """The host at `name`, wrapping the layer there first if it is still bare."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterHost):
        return module
    host = AdapterHost(module)
    host.train(module.training)  # a wrapper in eval mode must not switch dropout back on
    _set_submodule(model, name, host)
    return host


def hosts(model: nn.Module) -> dict[str, AdapterHost]:
    """Every host by module name, in `named_modules` order. Hosts never nest, so the walk does not
    enter them: with 64 adapters a host holds hundreds of modules, and every mixed batch asks."""
    found: dict[str, AdapterHost] = {}
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, AdapterHost):
            found[prefix] = module
            return
        for name, child in module._modules.items():
            if child is not None:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def unwrap_hosts(model: nn.Module) -> nn.Module:
    """Put every host's base layer back in its place (merged adapters are unmerged first)."""
    for name, host in hosts(model).items():
        for adapter in host.merged:
            host.unmerge(adapter)
        _set_submodule(model, name, host.base_layer)
    return model


def remove_empty_hosts(model: nn.Module) -> None:
    for name, host in hosts(model).items():
        if len(host.adapters) == 0:
            _set_submodule(model, name, host.base_layer)

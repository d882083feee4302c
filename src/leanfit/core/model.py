"""The adapted model's life: add adapters, activate, train, merge, delete, unwrap.

What leanfit knows about a model's adapters lives on the model object itself (`leanfit_adapters`),
so it travels with the model and never in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import AdapterError, ConfigError, TargetError, UnknownAdapterError
from ..methods.base import SHARED, MethodConfig
from ..methods import pointwise
from ..methods.registry import module_class
from .fingerprint import fingerprint
from .inject import Targets, candidate_layers, find_targets, host_at, hosts, remove_empty_hosts, unwrap_hosts

AUTO = "auto"
CLASSIFIER_HEADS = ("classifier", "score")  # new, randomly initialised heads of HF task models


@dataclass
class AdapterSpec:
    """Everything needed to rebuild an adapter on the same base: what `save` writes."""

    name: str
    config: MethodConfig
    targets: list[str]
    train_modules: list[str] = field(default_factory=list)
    base_fingerprint: str = ""


def adapters(model: nn.Module) -> dict[str, AdapterSpec]:
    return model.__dict__.setdefault("leanfit_adapters", {})


def spec(model: nn.Module, name: str) -> AdapterSpec:
    try:
        return adapters(model)[name]
    except KeyError:
        known = ", ".join(adapters(model)) or "none"
        raise UnknownAdapterError(f"Unknown adapter '{name}'; this model has: {known}.") from None


def task_heads(model: nn.Module) -> list[str]:
    """The freshly initialised heads of a Hugging Face task model (e.g. `classifier`)."""
    return [n for n in CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)]


def _resolve_train_modules(model: nn.Module, train_modules) -> list[str]:
    if train_modules == AUTO:
        return task_heads(model)
    names = [train_modules] if isinstance(train_modules, str) else list(train_modules or [])  # one name, as PEFT
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise ConfigError(f"train_modules names '{n}', which is not a module of this model.") from None
    return names


def base_fingerprint(model: nn.Module, train_modules=()) -> str:
    """The fingerprint adapters record: base weights without freshly initialised task heads and the
    modules trained in full. Once a model holds adapters (whose merges and heads change weights),
    each set of such modules is hashed once and remembered; `leanfit_fingerprint`, where set (the
    budget's weight-less copies), stands for every set."""
    override = model.__dict__.get("leanfit_fingerprint")
    if override:
        return override
    skip = tuple(sorted(dict.fromkeys([*_resolve_train_modules(model, AUTO), *train_modules])))
    known = model.__dict__.get("leanfit_fingerprints")
    if known is None:  # no adapter yet: the weights are the base's
        return fingerprint(model, skip)
    if skip not in known:
        known[skip] = fingerprint(model, skip)
    return known[skip]


def adapt(model: nn.Module, config: MethodConfig, targets: Targets = "all-linear", name: str = "default",
          exclude: Targets | None = None, train_modules=AUTO) -> AdapterSpec:
    """Inject adapter `name` of method `config` into the target layers; make it the one trained.

    Everything else is frozen, except `train_modules` (by default a sequence-classification head),
    which are trained in full and saved with the adapter.
    """
    _check_call(model, config, name)
    if name in adapters(model):
        raise AdapterError(f"Adapter '{name}' already exists; delete it or choose another name.")
    heads = _resolve_train_modules(model, train_modules)
    if "leanfit_requires_grad" not in model.__dict__:
        model.__dict__["leanfit_requires_grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
    model.__dict__.setdefault("leanfit_fingerprints", {})
    fingerprint_now = base_fingerprint(model, heads)
    found = find_targets(model, targets, exclude)
    names = [n for n in found if not any(n == h or n.startswith(h + ".") for h in heads)]
    if not names:  # the adapter would be only the heads trained in full: a probe, not an adapter
        raise TargetError(f"Targets {targets!r} select only {', '.join(found)}, which is trained in full as a "
                          "head (train_modules), not adapted; target other layers.")
    built = _build_layers(model, config, names)  # every layer built before any is wrapped
    for target, module in built.items():
        host = host_at(model, target)
        module.train(host.training)  # follow the model's mode, as PEFT does
        host.add(name, module)
    new = AdapterSpec(name, config, names, heads, fingerprint_now)
    adapters(model)[name] = new
    activate(model, name)  # like PEFT's set_adapter: the adapter being trained acts alone
    set_trainable(model, name)
    return new


def _check_call(model, config, name) -> None:
    """adapt's arguments, checked before anything changes."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"adapt takes the torch.nn.Module to adapt, got {type(model).__name__}.")
    if isinstance(config, type) and issubclass(config, MethodConfig):
        raise ConfigError(f"Pass a method config, e.g. {config.__name__}() with its options, not the class "
                          f"{config.__name__} itself.")
    if not isinstance(config, MethodConfig):
        raise ConfigError(f"adapt takes a method config such as leanfit.LoRA(rank=8), got {type(config).__name__}.")
    if not isinstance(name, str) or not name or "." in name:  # a module name: it keys a ModuleDict in every host
        raise ConfigError(f"An adapter name must be a non-empty string without '.', got {name!r}; e.g. name='news'.")


def _build_layers(model: nn.Module, config: MethodConfig, names: list[str]) -> dict[str, nn.Module]:
    """One adapter module per target layer; the parameters the method shares across layers, if any,
    are built once here and the same module is given to every layer."""
    layers = candidate_layers(model)
    bases = {n: layers[n] for n in names}
    build = module_class(config.method)
    shared = build.shared_parameters(config, bases)
    extra = {} if shared is None else {SHARED: shared}
    return {n: pointwise.build(build, base, config, **extra) for n, base in bases.items()}


def shared_module(model: nn.Module, name: str) -> nn.Module | None:
    """The one module of parameters shared by every layer of adapter `name`, or None."""
    for module in adapter_modules(model, name).values():
        return getattr(module, SHARED, None)
    return None


def _active_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(a for h in hosts(model).values() for a in h.active))


def active(model: nn.Module) -> list[str]:
    return _active_names(model)


def activate(model: nn.Module, *names: str) -> None:
    """Make exactly `names` active (their deltas are summed); no names: deactivate all."""
    names = tuple(dict.fromkeys(names))  # naming one twice must not add it twice
    for n in names:
        spec(model, n)
    for host in hosts(model).values():
        host.active = [n for n in names if n in host.adapters]


def deactivate(model: nn.Module, name: str | None = None) -> None:
    """Switch adapter `name` off (None: every adapter)."""
    if name is not None:
        spec(model, name)
        if name in _merged_names(model):  # its update is in the weights: switching it off would not
            raise AdapterError(f"Adapter '{name}' is merged into the base weights, so it cannot be switched off; "
                               f"unmerge it first (leanfit.unmerge(model, '{name}')).")
    activate(model, *[n for n in _active_names(model) if name is not None and n != name])


def _merged_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(a for h in hosts(model).values() for a in h.merged))


def set_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze everything, then unfreeze adapter `name` and its train_modules (None: freeze all)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if name is None:
        return
    s = spec(model, name)
    for host in hosts(model).values():
        if name in host.adapters:
            for p in host.adapters[name].parameters():
                p.requires_grad_(True)
    for head in s.train_modules:
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)


def delete(model: nn.Module, name: str) -> None:
    spec(model, name)
    for host in hosts(model).values():
        if name in host.adapters:
            host.remove(name)
    remove_empty_hosts(model)
    del adapters(model)[name]


def merge(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights; forward skips it until `unmerge`.

    Every layer's delta is computed before any weight changes, so a layer that cannot merge leaves
    the whole model as it was."""
    spec(model, name)
    todo = [h for h in hosts(model).values() if name in h.adapters and name not in h.merged]
    deltas = [h.merge_delta(name) for h in todo]
    for host, delta in zip(todo, deltas):
        host.merge(name, delta)
        if name not in host.active:  # in the weights it acts: say so, as active() reports
            host.active.append(name)


def unmerge(model: nn.Module, name: str) -> None:
    spec(model, name)
    for host in hosts(model).values():
        if name in host.adapters:
            host.unmerge(name)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every adapter and host: the original modules back in place, flags as they were."""
    unwrap_hosts(model)
    flags = model.__dict__.pop("leanfit_requires_grad", {})
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    for key in ("leanfit_adapters", "leanfit_fingerprint", "leanfit_fingerprints"):
        model.__dict__.pop(key, None)
    return model


def adapter_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Host name -> the adapter module `name` in that host."""
    spec(model, name)
    return {h: host.adapters[name] for h, host in hosts(model).items() if name in host.adapters}


def set_rank(model: nn.Module, rank: int, name: str | None = None) -> None:
    """Use rank `rank` of every elastic-rank adapter (DyLoRA), of adapter `name` or of all."""
    if name is not None:
        spec(model, name)
    chosen = [a for h in hosts(model).values() for n, a in h.adapters.items()
              if (name is None or n == name) and a.capabilities.elastic_rank]
    if not chosen:
        raise AdapterError("No elastic-rank adapter (e.g. DyLoRA) to set the rank of.")
    before = [a.method_module.eval_rank for a in chosen]
    try:
        for adapter in chosen:
            adapter.set_rank(rank)
    except ConfigError:  # one adapter's range is smaller: none changes
        for adapter, old in zip(chosen, before):
            adapter.method_module.eval_rank = old
        raise


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; `all` includes the adapters, as PEFT reports it. A
    parameter shared by many layers counts once (parameters() de-duplicates)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def calibrate(model: nn.Module, batch: dict, name: str) -> int:
    """Give adapters that learn their init from data (LoRA-SB) the full-weight gradient of one
    batch; returns how many layers were calibrated. The model's weights are left unchanged."""
    targets = {h: m.method_module for h, m in adapter_modules(model, name).items()
               if hasattr(m.method_module, "calibrate")}
    if not targets:
        return 0
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    layers = {h: model.get_submodule(h).base_layer for h in targets}
    for layer in layers.values():
        layer.weight.requires_grad_(True)
        layer.weight.grad = None
    was_training = model.training
    model.train()
    model(**batch).loss.backward()
    model.train(was_training)
    for h, adapter in targets.items():
        adapter.calibrate(-layers[h].weight.grad.flatten(1))  # a pointwise conv's (out, in, 1, 1) as (out, in)
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(flags[n])
    return len(targets)



__all__ = ["AdapterSpec", "adapt", "adapters", "activate", "active", "deactivate", "delete", "merge",
           "unmerge", "unwrap", "set_trainable", "set_rank", "trainable_parameters", "calibrate",
           "adapter_modules", "shared_module", "spec"]

"""Methods by name: one registry line per method file."""

from __future__ import annotations

from .base import AdapterModule, MethodConfig
from ..errors import UnknownMethodError

_METHODS: dict[str, type[AdapterModule]] = {}


def register(module_class: type[AdapterModule]) -> type[AdapterModule]:
    """Class decorator: make a method available by its config's name."""
    name = module_class.config_class.method
    if name in _METHODS:
        raise ValueError(f"method {name!r} registered twice")
    _METHODS[name] = module_class
    return module_class


def method_names() -> list[str]:
    return sorted(_METHODS)


def module_class(name: str) -> type[AdapterModule]:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"Unknown method '{name}'; choose one of: {', '.join(method_names())}."
        ) from None


def config_from_dict(data: dict) -> MethodConfig:
    """Rebuild a config from `MethodConfig.to_dict()` output (manifests, CLI, search)."""
    data = dict(data)
    name = data.pop("method", None)
    if name is None:
        raise UnknownMethodError("The method config names no 'method'; add one, e.g. 'lora'.")
    config_class = module_class(name).config_class
    return config_class().replace(**data)

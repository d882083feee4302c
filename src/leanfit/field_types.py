"""Refuse a dataclass field whose value is not of its annotated type, in words a user reads.

Method configs and training options are filled from Python, JSON files and the command line; a
rank of 2.5 or "8" would otherwise fail deep inside torch, and a flag of "yes" would pass silently.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

# What a field annotated with each type accepts, and how a refusal names it. bool is an int, so
# numbers refuse it by name below. Ints stay ints in float fields (16 / 8 is 2.0 either way), so
# files keep what they were given.
_ACCEPTS = {int: ((int,), "a whole number"), float: ((int, float), "a number"),
            bool: ((bool,), "true or false"), str: ((str,), "text")}


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)  # annotations are strings (from __future__ import annotations)


def field_type_error(instance, name: str, value) -> str | None:
    """'it must be <kind>, got <value> (<type>)' where `value` does not fit field `name` of the
    dataclass `instance`, else None (annotations other than int, float, bool, str, or one of them
    | None, are not checked)."""
    hint = _hints(type(instance)).get(name)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [k for k in (typing.get_args(hint) if union else (hint,)) if k is not type(None)]
    optional = union and len(kinds) < len(typing.get_args(hint))
    if not all(k in _ACCEPTS for k in kinds) or (value is None and optional):
        return None
    if any(isinstance(value, _ACCEPTS[k][0]) and (k is bool or not isinstance(value, bool)) for k in kinds):
        return None
    expected = " or ".join([_ACCEPTS[k][1] for k in kinds] + ["None"] * optional)
    return f"it must be {expected}, got {value!r} ({type(value).__name__})"


def refuse_wrong_types(instance, what: str) -> None:
    """Raise a ConfigError naming the first field of the dataclass `instance` whose value does not fit
    its annotation; `what` names a field to the user (e.g. "Training option")."""
    from .errors import ConfigError
    for option in dataclasses.fields(instance):
        error = field_type_error(instance, option.name, getattr(instance, option.name))
        if error:
            raise ConfigError(f"{what} {option.name} is of the wrong kind: {error}.")

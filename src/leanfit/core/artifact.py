"""Adapter files: `adapter.safetensors` (adapter tensors and trained heads) + `adapter.json` manifest.

The manifest carries a schema version, the method config, the exact target list, the trained
modules, the base model's fingerprint and the tensors file's SHA-256, so a load can refuse another
base model, a truncated or corrupt file, or a schema it does not know, each in one sentence.
Both files are written atomically. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..errors import ArtifactError, BaseModelMismatchError, ConfigError
from ..io import atomic_write_bytes
from ..methods.base import SHARED
from ..methods.registry import config_from_dict
from .model import (activate, active, adapt, adapter_modules, adapters, base_fingerprint, delete, set_rank,
                    shared_module, spec)

SCHEMA_VERSION = 1
MANIFEST = "adapter.json"
TENSORS = "adapter.safetensors"
# Key prefix of the parameters all layers of an adapter share (reserved: no model module is named so).
SHARED_PREFIX = "leanfit_shared"


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors that make adapter `name`: its modules' state per host, the parameters its layers
    share (once, under SHARED_PREFIX), and its trained heads."""
    tensors = {}
    for host, module in adapter_modules(model, name).items():
        for key, t in module.state_dict().items():
            if not key.startswith(SHARED + "."):
                tensors[f"{host}.{key}"] = t
    shared = shared_module(model, name)
    for key, t in (shared.state_dict() if shared is not None else {}).items():
        tensors[f"{SHARED_PREFIX}.{key}"] = t
    for head in spec(model, name).train_modules:
        for key, t in model.get_submodule(head).state_dict().items():
            tensors[f"{head}.{key}"] = t
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save(model: nn.Module, path: str | Path, name: str | None = None, extra: dict | None = None) -> Path:
    """Write adapter `name` (the only adapter if not given) to directory `path`."""
    name = name or _only_adapter(model)
    s = spec(model, name)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"Cannot save the adapter to '{path}': it is a file; give a folder to save into.")
    payload = safetensors.torch.save(adapter_tensors(model, name))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "method": s.config.to_dict(),
        "targets": s.targets,
        "train_modules": s.train_modules,
        "base_model": {"fingerprint": s.base_fingerprint, "class": type(model).__name__,
                       "name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
                       "dtype": str(_float_dtype(model)).removeprefix("torch.")},
        "tensors": {"file": TENSORS, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)},
        "extra": extra or {},
    }
    ranks = {m.method_module.eval_rank for m in adapter_modules(model, name).values() if m.capabilities.elastic_rank}
    if len(ranks) == 1 and ranks != {s.config.rank}:  # DyLoRA truncated with set_rank: load it so
        manifest["rank_in_use"] = ranks.pop()
    try:  # everything serialised before the first byte is written: a failure leaves the old adapter whole
        text = (json.dumps(manifest, indent=2) + "\n").encode()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"The extra metadata cannot be saved as JSON ({err}); pass numbers, strings, lists "
                          "and dicts of them.") from None
    atomic_write_bytes(path / TENSORS, payload)
    atomic_write_bytes(path / MANIFEST, text)
    return path


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        if (path / "adapter" / MANIFEST).is_file():  # a `leanfit tune` output folder: its adapter is one level down
            raise ArtifactError(f"'{path}' is a run's output folder, not its adapter; pass '{path / 'adapter'}'.")
        if not path.exists():
            raise ArtifactError(f"No leanfit adapter at '{path}': nothing is there; pass the adapter folder "
                                "(a `leanfit tune` run writes it to OUTPUT/adapter).")
        hint = " (it looks like a PEFT adapter: use import_peft)" if (path / "adapter_config.json").exists() else ""
        raise ArtifactError(f"No leanfit adapter at '{path}': {MANIFEST} is missing{hint}; pass a directory written by "
                            "save (a `leanfit tune` run writes it to OUTPUT/adapter).")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"The manifest '{file}' is corrupt ({err.__class__.__name__}); save the adapter again.") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"'{file}' has schema version {version!r} but this leanfit reads version {SCHEMA_VERSION}; "
            "use the leanfit version that wrote it.")
    _check_shape(manifest, file)
    return manifest


# What every manifest holds, and of what kind (a file edited by hand or cut short may not).
FIELDS = {"name": str, "method": dict, "targets": list, "train_modules": list, "base_model": dict, "tensors": dict}
INNER = {"method": {"method": str}, "base_model": {"fingerprint": str}, "tensors": {"file": str, "sha256": str, "bytes": int}}


def _check_shape(manifest: dict, file: Path) -> None:
    """Refuse a damaged manifest in one sentence, before anything reads a field of it."""
    for key, kind in FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            _damaged(file, f"'{key}' is {'missing' if key not in manifest else f'not a {kind.__name__}'}")
        for inner, inner_kind in INNER.get(key, {}).items():
            if not isinstance(manifest[key].get(inner), inner_kind):
                _damaged(file, f"'{key}.{inner}' is {'missing' if inner not in manifest[key] else 'of the wrong kind'}")
    try:
        config_from_dict(manifest["method"])
    except ConfigError as err:  # options edited by hand, or a method of a newer leanfit
        raise ArtifactError(f"The manifest '{file}' holds a method this leanfit cannot build ({str(err).rstrip('.')}); "
                            "use the leanfit version that wrote it, or save the adapter again.") from None


def _damaged(file: Path, what: str):
    raise ArtifactError(f"The manifest '{file}' is damaged: {what}; save the adapter again or restore the file.")


def read_tensors(path: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    file = Path(path) / manifest["tensors"]["file"]
    if not file.is_file():
        raise ArtifactError(f"The adapter tensors '{file}' are missing; copy the whole adapter directory.")
    payload = file.read_bytes()
    if hashlib.sha256(payload).hexdigest() != manifest["tensors"]["sha256"]:
        raise ArtifactError(
            f"The adapter tensors '{file}' are truncated or corrupt ({len(payload)} bytes, expected "
            f"{manifest['tensors']['bytes']}); copy or save the adapter again.")
    try:
        return safetensors.torch.load(payload)
    except Exception as err:  # safetensors raises its own error types
        raise ArtifactError(f"The adapter tensors '{file}' cannot be read ({err}); save the adapter again.") from None


def check_base(model: nn.Module, manifest: dict, source: str | Path) -> None:
    expected = manifest["base_model"]["fingerprint"]
    actual = base_fingerprint(model, manifest["train_modules"])
    saved, dtype = manifest["base_model"].get("dtype"), str(_float_dtype(model)).removeprefix("torch.")
    if actual != expected and saved and saved != dtype:  # the same weights in another precision hash apart
        raise BaseModelMismatchError(
            f"The adapter at '{source}' was trained on a {saved} base model and this one is {dtype}; load it onto "
            f"the {saved} model, then cast the adapted model (model.to(torch.{dtype})).")
    if actual != expected:
        raise BaseModelMismatchError(
            f"The adapter at '{source}' was trained on base model {expected} "
            f"({manifest['base_model'].get('name_or_path') or 'unnamed'}), but this model is {actual}; "
            "load it onto the model it was trained on.")


def load(model: nn.Module, path: str | Path, name: str | None = None) -> str:
    """Add the adapter saved at `path` to `model` (as `name`, default its saved name); returns the name."""
    manifest = read_manifest(path)
    check_base(model, manifest, path)
    tensors = read_tensors(path, manifest)
    name = name or manifest["name"]
    _check_heads_free(model, manifest["train_modules"], tensors, path)
    exact = "|".join(re.escape(t) for t in manifest["targets"])
    was_active = active(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    heads = {h: {k: v.clone() for k, v in model.get_submodule(h).state_dict().items()} for h in manifest["train_modules"]}
    adapt(model, config_from_dict(manifest["method"]), targets=f"(?:{exact})", name=name,
          train_modules=manifest["train_modules"])
    try:
        _load_state(model, name, tensors, path)
        if "rank_in_use" in manifest:
            set_rank(model, manifest["rank_in_use"], name)
    except (ArtifactError, ConfigError) as err:  # the model is left as it was: adapters, active ones, heads, flags
        delete(model, name)
        activate(model, *was_active)
        for h, state in heads.items():
            model.get_submodule(h).load_state_dict(state)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"The adapter at '{path}' cannot be loaded ({str(err).rstrip('.')}).") from None
    return name


def _check_heads_free(model: nn.Module, heads: list[str], tensors: dict, source) -> None:
    """A module trained in full is one module, not one per adapter: a second adapter's head loaded
    over the first's would silently change the first adapter's outputs (unless it is the same head)."""
    for other, s in adapters(model).items():
        shared = sorted(h for h in set(s.train_modules) & set(heads) if not _holds(model.get_submodule(h), h, tensors))
        if shared:
            raise ArtifactError(f"The adapter at '{source}' brings its own trained {', '.join(shared)}, which adapter "
                                f"'{other}' of this model also trains, and a model holds one {shared[0]}; delete "
                                f"'{other}' first, or load this adapter onto a fresh copy of the base model.")


def _holds(module: nn.Module, prefix: str, tensors: dict) -> bool:
    """Whether `module` already has the values saved under `prefix` (the same head loaded again)."""
    state = module.state_dict()
    return all(f"{prefix}.{k}" in tensors and torch.equal(v.cpu(), tensors[f"{prefix}.{k}"]) for k, v in state.items())


def _load_state(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source) -> None:
    shared = shared_module(model, name)
    owners = {**({SHARED_PREFIX: shared} if shared is not None else {}), **adapter_modules(model, name),
              **{h: model.get_submodule(h) for h in spec(model, name).train_modules}}
    used = set()
    for owner, module in owners.items():
        state = {k[len(owner) + 1:]: v for k, v in tensors.items() if k.startswith(owner + ".")}
        used.update(f"{owner}.{k}" for k in state)
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ArtifactError(f"The adapter at '{source}' does not fit layer '{owner}': "
                                f"{str(err).splitlines()[-1].strip()}.") from None
        if owner != SHARED_PREFIX:  # the shared parameters were loaded once, above
            missing = [k for k in missing if not k.startswith(SHARED + ".")]
        if missing or unexpected:
            raise ArtifactError(f"The adapter at '{source}' does not fit layer '{owner}' "
                                f"(missing {missing}, unexpected {unexpected}); it was saved by another version.")
    if set(tensors) - used:
        raise ArtifactError(f"The adapter at '{source}' has tensors for layers this model lacks: "
                            f"{sorted(set(tensors) - used)[:3]}.")


def _only_adapter(model: nn.Module) -> str:
    names = list(model.__dict__.get("leanfit_adapters", {}))
    if len(names) != 1:
        raise ArtifactError(f"The model has adapters {names or 'none'}; name the one to save.")
    return names[0]

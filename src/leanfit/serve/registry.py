"""The adapter registry: a directory of adapters on disk, and the few of them resident in the model.

Each subdirectory `<registry>/<name>/` is an adapter written by `leanfit.save`. A request names an
adapter; the name is checked against a strict pattern and its resolved path must stay inside the
registry, so a request can never make the server read another file. Resident adapters are kept in
least-recently-used order under a cap on their count and on their bytes: their tensors, plus the copy
of their low-rank factors that mixed batches stack (core/segments.py, LowRankBank), which doubles a
LoRA adapter's share. The least recently used adapter not needed by the batch at hand is unloaded first.

Every method that touches the model must run on the engine's worker thread (the only thread that
runs the model), so loading and unloading happen between batches and never under a running forward.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..core import artifact
from ..core.inject import hosts
from ..core.segments import banked_bytes
from ..core.model import activate as set_active
from ..core.model import active, adapter_modules, delete
from ..errors import AdapterError, ArtifactError, ConfigError, UnknownAdapterError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")


class InvalidAdapterNameError(ConfigError):
    """The adapter name has characters or a form that could leave the registry (HTTP 400)."""


class UnservableAdapterError(ArtifactError):
    """The adapter exists but cannot share a mixed batch with others (HTTP 400)."""


class AdapterRegistry:
    def __init__(self, root: str | Path, max_adapters: int = 32, max_bytes: int | None = None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"The adapter registry '{root}' is not a directory; create it or pass another path.")
        if max_adapters < 1:
            raise ConfigError(f"max_adapters must be at least 1, got {max_adapters}.")
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> tensor bytes, LRU first
        self._lock = threading.Lock()  # guards _resident for readers on other threads (/v1/models)

    # -- names and paths (safe on any thread) --
    def path_of(self, name: str) -> Path:
        """The directory of adapter `name`; raises InvalidAdapterNameError or UnknownAdapterError."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name or name.startswith("."):
            raise InvalidAdapterNameError(
                f"Adapter name {name!r} is not valid; use letters, digits, '.', '_' and '-' only, without '..'.")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise InvalidAdapterNameError(f"Adapter name {name!r} points outside the registry; use a plain name.")
        if not (path / artifact.MANIFEST).is_file():
            raise UnknownAdapterError(f"Unknown adapter '{name}': the registry has no adapter of that name; "
                                      "see GET /v1/models for the available ones.")
        return path

    def available(self) -> list[str]:
        """Names of every adapter directory in the registry."""
        names = []
        for child in sorted(self.root.iterdir()):
            if NAME_PATTERN.match(child.name) and not child.name.startswith(".") and \
                    (child / artifact.MANIFEST).is_file() and child.resolve().is_relative_to(self.root):
                names.append(child.name)
        return names

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._resident.values())

    # -- model changes (worker thread only) --
    def ensure(self, model: nn.Module, names) -> dict[str, Exception]:
        """Make every adapter in `names` resident (None is the base model); returns name -> error for
        those that could not be loaded. Evicts least recently used adapters outside `names` to stay
        under the caps."""
        errors: dict[str, Exception] = {}
        wanted = [n for n in dict.fromkeys(names) if n is not None]
        for name in wanted:
            try:
                self.load(model, name, keep=wanted)
            except (AdapterError, ArtifactError, ConfigError) as err:
                errors[name] = err
        return errors

    def load(self, model: nn.Module, name: str, keep=(), activate: bool = False) -> bool:
        """Load adapter `name` if it is not resident and mark it most recently used; returns whether
        it was loaded now. Requests name their adapter per row, so loading leaves the model's active
        adapters as they were unless `activate`; the adapter takes the model's train/eval mode."""
        path = self.path_of(name)
        with self._lock:
            if name in self._resident:
                self._resident.move_to_end(name)
                return False
        manifest = artifact.read_manifest(path)
        if manifest.get("train_modules"):
            raise UnservableAdapterError(
                f"Adapter '{name}' trains whole modules {manifest['train_modules']} (a classifier's head, as "
                "`leanfit tune` trains on classification data), which requests for other adapters would share; "
                "this server takes adapters that train none: a causal LM's from `leanfit tune`, or "
                "lf.adapt(..., train_modules=[]) and lf.save.")
        size = int(manifest.get("tensors", {}).get("bytes", 0))
        self._evict(model, incoming=size, keep=set(keep) | {name})
        before = active(model)
        artifact.load(model, path, name)  # makes it the active adapter, as lf.load does
        set_active(model, *([name] if activate else [n for n in before if n != name]))
        modules = adapter_modules(model, name).values()
        for module in modules:
            module.train(model.training)  # dropout off in a served (eval) model
        if not all(m.capabilities.mixed_batch for m in modules):
            delete(model, name)
            raise UnservableAdapterError(f"Adapter '{name}' uses a method that cannot share a batch with other "
                                         "adapters; serve it on its own model instead.")
        size = self._footprint(model, name)  # the file's size was an estimate before loading
        with self._lock:
            self._resident[name] = size
        self._evict(model, incoming=0, keep=set(keep) | {name}, adding=False)  # the bank's share, known now
        return True

    @staticmethod
    def _footprint(model: nn.Module, name: str) -> int:
        """Bytes adapter `name` holds resident: its tensors and the banks' copy of its factors."""
        layers = hosts(model)
        tensors, banked = {}, 0  # tensors by id: a module shared by every layer counts once
        for host, module in adapter_modules(model, name).items():
            tensors.update((id(t), t.numel() * t.element_size()) for t in [*module.parameters(), *module.buffers()])
            banked += banked_bytes(module, layers[host].base_layer)
        return sum(tensors.values()) + banked

    def unload(self, model: nn.Module, name: str) -> bool:
        """Remove adapter `name` from the model; returns whether it was resident."""
        self.path_of(name)
        with self._lock:
            if name not in self._resident:
                return False
            del self._resident[name]
        delete(model, name)
        return True

    def _evict(self, model: nn.Module, incoming: int, keep: set, adding: bool = True) -> None:
        while True:
            with self._lock:
                count, total = len(self._resident) + adding, sum(self._resident.values()) + incoming
                over = count > self.max_adapters or (self.max_bytes is not None and total > self.max_bytes)
                victim = next((n for n in self._resident if n not in keep), None)
                if not over or victim is None:
                    return
                del self._resident[victim]
            delete(model, victim)

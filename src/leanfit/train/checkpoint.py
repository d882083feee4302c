"""Training checkpoints that survive a crash at any instant and load without running pickled code.

A checkpoint is a folder `step-00000120/` holding
  - `weights.safetensors`: the trainable parameters by name ("param/<name>") and, with early
    stopping, the best weights so far ("best/<name>");
  - `state.pt`: everything else (optimizer and scheduler state, step, RNG state, history), a plain
    structure of tensors, numbers and strings, read back with `torch.load(weights_only=True)`.
The folder is written under a temporary name and renamed into place; the text file `latest` then
names it, written atomically. A crash leaves the previous `latest` valid. The last two checkpoints
(the one `latest` names and the one before it) are kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leanfit.errors import ConfigError, TrainingError
from leanfit.io import atomic_write_bytes, fsync_dir, fsync_file

LATEST = "latest"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
PREFIX = "step-"
PARAM, BEST = "param/", "best/"  # key prefixes inside weights.safetensors
RESUME_MUST_MATCH = ("seed", "batch_size", "grad_accum")  # they define what a position in an epoch means


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def latest_checkpoint(directory: str | os.PathLike | None) -> Path | None:
    """The checkpoint folder `latest` names, or None when there is none yet."""
    if directory is None:
        return None
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / WEIGHTS).exists() or not (path / STATE).exists():
        raise TrainingError(
            f"checkpoint pointer {pointer} names {path.name}, which is missing or incomplete; "
            "delete the pointer to start afresh or restore that folder."
        )
    return path


def save_checkpoint(directory: str | os.PathLike, step: int, weights: dict[str, torch.Tensor], state: dict,
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one checkpoint atomically, point `latest` at it and drop all but the last two.

    `weights` are the trainable parameters by name; `best`, the best weights early stopping keeps.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pointer = directory / LATEST
    previous = pointer.read_text().strip() if pointer.exists() else None  # kept, even if broken
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {**{PARAM + n: t for n, t in weights.items()}, **{BEST + n: t for n, t in (best or {}).items()}}
    cpu = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}  # no shared storage
    save_file(cpu, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    for name in (WEIGHTS, STATE):
        fsync_file(tmp / name)
    fsync_dir(tmp)
    if final.exists():  # left by a run that crashed before naming it `latest`
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(directory)
    atomic_write_bytes(directory / LATEST, f"{final.name}\n".encode())
    _prune(directory, keep={final.name, previous})
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder: (weights, best weights, state), on CPU. Nothing pickled is executed."""
    path = Path(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files
        raise TrainingError(f"checkpoint {path} cannot be read ({exc}); resume from another one.") from exc
    weights = {k.removeprefix(PARAM): t for k, t in tensors.items() if k.startswith(PARAM)}
    best = {k.removeprefix(BEST): t for k, t in tensors.items() if k.startswith(BEST)}
    return weights, best, state


def data_fingerprint(split: dict[str, torch.Tensor]) -> str:
    """A digest of the training rows (every tensor's name, type, shape and values), kept in each
    checkpoint so that a resume on other rows is refused rather than mixed into the run."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(split):
        tensor = split[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_resumable(path: Path, weights: dict, state: dict, trainable: dict[str, tuple], config: dict,
                    data: str | None = None, base: str | None = None) -> None:
    """Refuse a checkpoint of other parameters (names or shapes, given in `trainable`), of another
    base model (`base`: the frozen weights' fingerprint), or one whose batches would not line up."""
    if base is not None and state.get("base", base) != base:  # checkpoints before 2026-12-08 hold none
        raise ConfigError(f"checkpoint {path} was written while training on another base model (its frozen weights "
                          "differ); resume with the model it was trained on, or start afresh without resume.")
    if data is not None and state.get("data", data) != data:  # checkpoints before 2026-12-07 hold no digest
        raise ConfigError(
            f"checkpoint {path} was written while training on other rows (another data set, subset, label set or "
            "sequence length); resume with the same data, or start afresh without resume.")
    names, saved = set(trainable), set(weights)
    if names != saved:
        raise ConfigError(
            f"checkpoint {path} holds other trainable parameters than the model (missing: "
            f"{sorted(names - saved)[:5]}, unexpected: {sorted(saved - names)[:5]}); "
            "resume with the same adapters or use another checkpoint_dir.")
    for name, shape in trainable.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise ConfigError(
                f"checkpoint {path} holds {name} of shape {tuple(weights[name].shape)} but the model's is "
                f"{tuple(shape)} (another rank or size); resume with the same method options, or start afresh "
                "without resume.")
    for key in RESUME_MUST_MATCH:
        if state["config"][key] != config[key]:
            raise ConfigError(
                f"checkpoint {path} was written with {key}={state['config'][key]} but this run has "
                f"{key}={config[key]}; resume with the same {', '.join(RESUME_MUST_MATCH)}.")


def rng_state() -> dict:
    """The global RNG state dropout draws from: CPU, and every CUDA device when there is one."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(directory: Path, keep: set[str]) -> None:
    """Remove checkpoint folders other than `keep` (the new one and the one before it), and any
    temporary folders a killed run left behind."""
    for p in directory.iterdir():
        if not p.is_dir():
            continue
        if (p.name.startswith(PREFIX) and p.name not in keep) or p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)

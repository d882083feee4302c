"""A tune run's output folder: what an earlier run left there, and what a new run may do with it.

A fresh run would empty metrics.jsonl at its start and replace checkpoints as it goes, losing an
earlier run at the first failure or kill (the Trainer refuses to start so). `leanfit tune` resumes
the earlier run (--resume), replaces it whole (--overwrite), or refuses, in the command line's
words; `leanfit search` refuses a tune run's folder, whose report its own would replace, and clears
its own trials' folders of an earlier study's leftovers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import ConfigError


def earlier_run(output: str) -> list[str]:
    """What an earlier run (or search) left in `output` that a new run would replace: report, metrics,
    checkpoints, adapter. Empty metrics and a checkpoint folder without `latest` (a run that stopped
    before training) do not count."""
    folder = Path(output)
    marks = {"report.json": folder / "report.json", "report.md": folder / "report.md",
             "metrics.jsonl": folder / "metrics.jsonl", "checkpoints": folder / "checkpoints" / "latest",
             "adapter": folder / "adapter" / "adapter.json"}
    return [name for name, path in marks.items() if path.is_file() and path.stat().st_size > 0]


def to_replace(output: str, resume: bool, overwrite: bool) -> list[str]:
    """What a tune run into `output` must delete first (with --overwrite); refuses where it would
    otherwise start over an earlier run. A resume with a checkpoint to go on from replaces nothing."""
    found = earlier_run(output)
    if resume and "checkpoints" in found:
        return []
    if found and not overwrite:
        held = f"The output folder '{output}' holds an earlier run ({', '.join(found)})"
        raise ConfigError(held + (" but no checkpoint to resume from; pass --overwrite to replace it" if resume
                                  else "; pass --resume to go on from its last checkpoint, --overwrite to replace it")
                          + ", or another --output.")
    return found


def clear(output: str, names: list[str]) -> None:
    """Delete what `to_replace` named, so that the replacing run never mixes with it (its metrics are
    not appended to, a resume cannot go on from the replaced run's checkpoints)."""
    for name in names:
        path = Path(output) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

"""Atomic file writes: a reader (or a process resumed after a crash) sees the old file or the new one,
never half of either.

The pattern: write a temporary file in the same directory (so `os.replace` stays on one file system),
fsync it, `os.replace` it over the target, then fsync the directory so the rename itself survives a
power cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back (once, at import:
    os.umask(mask)  # setting it while other threads create files would give those the wrong mode)
    return mask


UMASK = _umask()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's bytes to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_save(path: str | os.PathLike, writer_fn: Callable[[str], object]) -> Path:
    """Call `writer_fn(temp_path)` to write the content, then move it over `path` atomically.

    `writer_fn` gets a path (not a file object) so libraries that only write to paths, such as
    `safetensors.torch.save_file`, can be used as they are. If it raises, `path` is left untouched and
    the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer_fn(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; a file should be as open() would make it
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_save(path, write)

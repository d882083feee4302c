"""The process's own resident memory, as the operating system reports it, and handing freed heap back.

The peak is the process's VmHWM, not `getrusage(...).ru_maxrss`: at exec, Linux keeps the high-water
mark of the address space the child leaves, the parent's (subprocess vforks where it can, or a
fork's copy), in the child's ru_maxrss, so a run started by a large parent (a benchmark that has
loaded models, a search that has calibrated) reported at least the parent's resident memory. VmHWM
belongs to the process's own address space since exec.
"""

from __future__ import annotations

import ctypes
import resource
import sys

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: freed heap stays counted, peaks read a little high
    _LIBC = None


def status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM ...) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    return status_bytes("VmRSS")


def human_bytes(n: float) -> str:
    """Bytes in binary units, as a user reads them (12 B, 3.4 MiB, 21.7 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def available_bytes() -> int | None:
    """Memory the system can give without swapping (/proc/meminfo's MemAvailable); None without /proc."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def trim_heap() -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim). The tensors of a training step do not
    reuse the heap that loading and tokenising freed: on MiniLM, trimming it before the first step
    took 120 MiB off the run's peak (2026-11-24)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def peak_rss_bytes() -> int:
    """This process's peak resident set since it started (since a reset through /proc/self/clear_refs)."""
    peak = status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS: bytes, elsewhere KiB)
    return maxrss if sys.platform == "darwin" else maxrss * 1024

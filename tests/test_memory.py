"""The peak RSS that `leanfit tune` reports and the benchmarks read is the process's own."""

import subprocess
import sys

import pytest

from leanfit.memory import peak_rss_bytes, rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the inherited ru_maxrss are Linux's")
def test_a_child_started_by_a_large_parent_reports_its_own_peak():
    ballast = bytearray(400 * 2 ** 20)  # the parent touches 400 MiB more before it starts the child
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    parent = rss_bytes()
    assert peak_rss_bytes() >= parent >= 400 * 2 ** 20
    child = subprocess.run([sys.executable, "-c", "from leanfit.memory import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    # ru_maxrss would be at least the parent's peak at the fork; the child's own peak is a bare interpreter's
    assert int(child.stdout) < min(parent / 4, 150 * 2 ** 20)
    del ballast

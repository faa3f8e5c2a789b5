"""Optional py-spy recording of the gateway process during a measurement.

A profiled run's figures are not comparable with unprofiled ones: py-spy
samples the process from outside and takes CPU of its own on the same cores.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def start_profiler(path: str, pid: int, seconds: float) -> subprocess.Popen[bytes]:
    """Record ``pid`` for ``seconds``: ``path`` ending in .txt gets collapsed stacks
    (one line per stack, sample count last), anything else a flame graph SVG."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise RuntimeError("profiling needs py-spy: .venv/bin/pip install py-spy")
    fmt = "raw" if path.endswith(".txt") else "flamegraph"
    command = [py_spy, "record", "--pid", str(pid), "--output", path, "--format", fmt]
    command += ["--duration", str(max(1, round(seconds))), "--rate", "250", "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profiler(profiler: subprocess.Popen[bytes], log: Callable[[str], None]) -> None:
    """Wait for py-spy to write its file (it stops by itself after its duration)."""
    try:
        _, err = profiler.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        profiler.kill()
        _, err = profiler.communicate()
    if profiler.returncode != 0:
        log(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}")

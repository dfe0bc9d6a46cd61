"""What every benchmark script shares: the machine's description and where results go."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (the architecture name where that is unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def save(name: str, text: str) -> Path:
    """Print a results table and write it to ``benchmarks/results/<name>`` (a temporary file, then renamed:
    an interrupted run leaves the previous result whole)."""
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / name
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

"""What every benchmark script shares: the machine's description and where results go."""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path

import psutil

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


class PeakRss:
    """Samples a process's resident set (with its children's) in a daemon thread: ``peak`` since the last
    :meth:`reset`/:meth:`take`. A context manager (``with PeakRss() as rss:``); :meth:`stop` ends it."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.02):
        self.proc, self.interval_s, self.peak = psutil.Process(pid), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        """The resident set now (0 once the process is gone)."""
        try:
            return sum(p.memory_info().rss for p in (self.proc, *self.proc.children(recursive=True)))
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval_s)

    def reset(self) -> int:
        """Start a new phase: the peak restarts from the current RSS (returned)."""
        self.peak = now = self.rss()
        return now

    def take(self) -> int:
        """The peak of the phase that ends now; a new phase starts."""
        peak, self.peak = max(self.peak, self.rss()), 0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> PeakRss:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def vm_hwm() -> int:
    """The kernel's peak resident size of this process (bytes; 0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

"""Host memory as the kernel counts it: anonymous and file-backed resident pages, and their peaks over a span.

``ru_maxrss`` and allocation counting miss what users hit: pages of a memory-mapped checkpoint count
against the process (``RssFile``) exactly like its own buffers (``RssAnon``), and the OOM killer sees both.
:class:`HostPeak` resets the kernel's high-water mark (``/proc/self/clear_refs``), samples
``/proc/self/status`` from a daemon thread while a block runs (and whenever :meth:`HostPeak.sample` is called),
and reports the peaks: the total exactly (``VmHWM``), the anonymous / file-backed split as sampled maxima.
Linux only; elsewhere every figure is ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from functools import cache

_FIELDS = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem", "VmRSS": "rss", "VmHWM": "hwm"}


def read_status(path: str = "/proc/self/status") -> dict[str, int] | None:
    """Resident bytes now: ``anon``, ``file``, ``shmem``, ``rss`` (their sum) and ``hwm`` (peak rss); None off Linux."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _FIELDS:
            values[_FIELDS[key]] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return values if "anon" in values and "file" in values else None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> bool:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``); False where there is no glibc.

    Buffers below glibc's mmap threshold (which grows to 32 MiB as large blocks are freed) come from the
    heap; once freed, pages under a still-live block stay resident and count as the process's own memory.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@dataclass
class HostPeakReport:
    """Peaks over a span, in bytes (``None`` where the platform does not say)."""

    peak: int | None = None
    """Peak resident set (anonymous + file-backed + shared), exact when the kernel's counter could be reset."""
    peak_anon: int | None = None
    """Largest sampled anonymous resident set (the process's own buffers)."""
    peak_file: int | None = None
    """Largest sampled file-backed resident set (mapped checkpoint pages, shared libraries)."""
    start: int | None = None
    """Resident set when the span began (interpreter, libraries, everything loaded earlier)."""
    start_anon: int | None = None
    start_file: int | None = None
    end: int | None = None
    """Resident set when the span ended."""


class HostPeak:
    """``with HostPeak() as peak: ...`` then ``peak.report``; samples every ``interval`` seconds meanwhile."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.report = HostPeakReport()
        self._exact = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HostPeak:
        self._exact = reset_peak()
        first = read_status()
        if first is None:
            return self
        self.report.start, self.report.start_anon, self.report.start_file = first["rss"], first["anon"], first["file"]
        self._record(first)
        self._thread = threading.Thread(target=self._run, name="host-peak-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        last = read_status()
        if last is None:
            return
        self._record(last)
        self.report.end = last["rss"]
        if self._exact:
            self.report.peak = max(self.report.peak or 0, last["hwm"])

    def sample(self) -> None:
        """Take a sample now (call at the moments memory is highest: the sampler thread may miss them)."""
        status = read_status()
        if status is not None:
            self._record(status)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def _record(self, status: dict[str, int]) -> None:
        with self._lock:
            r = self.report
            r.peak_anon = max(r.peak_anon or 0, status["anon"])
            r.peak_file = max(r.peak_file or 0, status["file"])
            r.peak = max(r.peak or 0, status["rss"])

"""``LoadReport``: what loading a model cost, as a user feels it: seconds (wall and CPU), host and device peaks.

``LoadMeter`` measures a block: wall time, user and system CPU seconds of the process, the host peak split
into anonymous and file-backed resident pages (:class:`~perft_qlora.quant.host_memory.HostPeak`, so mapped
checkpoint pages count), and on CUDA the device's peak allocation (it resets torch's peak counter).
``load_model`` attaches the report to the model as ``model.load_report`` and logs it.

``LoadProgress`` is the loader's progress bar: layers done / total, GiB read of the checkpoint, elapsed, ETA.
It advances by checkpoint bytes actually read (the reader calls :meth:`LoadProgress.read`, from its prefetch
thread too), so rate and ETA follow the real work; the layer count advances when a layer is complete. Quiet
when ``enabled`` is false or stderr is not a terminal (tqdm's ``disable=None``).
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .host_memory import HostPeak, HostPeakReport
from .memory import format_bytes

GIB = 2**30
BAR_FORMAT = "{desc}{postfix} | {n:.2f}/{total:.2f} GiB |{bar}| {elapsed}<{remaining}, {rate_fmt}"


def _gib(n: int | None) -> str:
    return "?" if n is None else format_bytes(n, "GiB")


@dataclass
class LoadReport:
    seconds: float = 0.0
    user_s: float = 0.0
    """CPU seconds in user mode, all threads (a fairer figure than wall time on a busy machine)."""
    sys_s: float = 0.0
    bytes_read: int = 0
    """Checkpoint bytes read (0 when the reader does not count them)."""
    threads: int = 1
    """torch intra-op threads during the load."""
    host: HostPeakReport = field(default_factory=HostPeakReport)
    device_peak: int | None = None
    """Peak bytes allocated by torch on the CUDA device (None on the CPU)."""

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        h = self.host
        device = "" if self.device_peak is None else f"; device peak {_gib(self.device_peak)}"
        read = f" {_gib(self.bytes_read)}" if self.bytes_read else ""
        return (f"loaded{read} in {self.seconds:.1f} s (CPU: user {self.user_s:.1f} s, sys "
                f"{self.sys_s:.1f} s, {self.threads} threads); host peak {_gib(h.peak)} "
                f"(anonymous {_gib(h.peak_anon)}, "
                f"file-backed {_gib(h.peak_file)}; {_gib(h.start)} before loading, {_gib(h.end)} after){device}")


class LoadMeter:
    """``with LoadMeter(device) as meter: ...`` then ``meter.report``; set ``meter.report.bytes_read`` inside."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.report = LoadReport(threads=torch.get_num_threads())
        self._host = HostPeak()

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> LoadMeter:
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
        self._usage = resource.getrusage(resource.RUSAGE_SELF)
        self._start = time.perf_counter()
        self._host.__enter__()
        return self

    def sample(self) -> None:
        """A host-memory sample now (call where memory peaks)."""
        self._host.sample()

    def __exit__(self, *exc) -> None:
        if self._cuda():
            torch.cuda.synchronize(self.device)
            self.report.device_peak = torch.cuda.max_memory_allocated(self.device)
        self._host.__exit__(*exc)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.report.seconds = time.perf_counter() - self._start
        self.report.user_s = usage.ru_utime - self._usage.ru_utime
        self.report.sys_s = usage.ru_stime - self._usage.ru_stime
        self.report.host = self._host.report


class LoadProgress:
    def __init__(self, total_bytes: int, num_layers: int, enabled: bool = True, desc: str = "loading NF4", file=None):
        self.num_layers = num_layers
        self._lock = threading.Lock()
        self.bar = tqdm(total=total_bytes / GIB, unit="GiB", desc=desc, bar_format=BAR_FORMAT,
                        postfix=f"layer 0/{num_layers}", disable=None if enabled else True, file=file)

    def read(self, nbytes: int) -> None:
        with self._lock:
            self.bar.update(nbytes / GIB)

    def layer_done(self, index: int) -> None:
        with self._lock:
            self.bar.set_postfix_str(f"layer {index + 1}/{self.num_layers}", refresh=True)

    def close(self, complete: bool = True) -> None:
        with self._lock:
            if complete:  # tensors the model does not use are never read: end the bar at 100%
                self.bar.total = max(self.bar.n, 1e-9)
                self.bar.refresh()
            self.bar.close()

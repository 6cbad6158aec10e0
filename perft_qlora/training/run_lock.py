"""``RunLock``: one training run per output directory.

An advisory lock file, ``<output-dir>/.perft-qlora.lock``, holds the owner's pid, host and start time (JSON).
Exclusion itself is the kernel's ``flock`` on that file, which the kernel drops when the owner dies however it
dies; the file's contents only say who holds it. So:

- a second run on the directory finds the ``flock`` held and refuses in one line naming the owner;
- a run finds the ``flock`` free but the file still naming a process: the owner died without releasing it (a
  ``SIGKILL``, a lost node). A dead process on this host is taken over, with a line saying so; a process on
  another host (a shared filesystem) cannot be checked from here, so the run refuses and names the file to delete;
- a run that ends, however it ends short of being killed, removes the file.

Taking the lock is also the check that ``--output-dir`` is writable (it creates the directory and a file in it),
before any model loads. Under ``accelerate launch`` only rank 0 takes it (``train.run``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator

from ..errors import UsageError

LOCK_NAME = ".perft-qlora.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{when}"


class RunLock:
    """The lock on ``directory`` (created if missing); ``acquire`` / ``release``, or use it as a context manager.

    ``report`` receives the one line said on taking over a stale lock (default: stderr)."""

    def __init__(self, directory: str, report: Callable[[str], None] | None = None):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self.report = report or (lambda line: print(line, file=sys.stderr))
        self.created_directory = False
        self._fd: int | None = None

    def acquire(self) -> None:
        self.created_directory = not os.path.isdir(self.directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise UsageError(f"--output-dir {self.directory} is in use by another training run "
                                     f"({_describe(self._read_path())}); wait for it to finish, or pass another "
                                     "--output-dir") from None
                if os.fstat(fd).st_ino != getattr(_stat(self.path), "st_ino", None):
                    os.close(fd)  # the owner released (removed) it between our open and flock: try again
                    continue
                self._fd = fd
            self._take_over(self._read_fd())
            self._write({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                         "command": " ".join(sys.argv)})
        except OSError as err:
            self._close()
            raise UsageError(f"--output-dir {self.directory} is not writable ({err.strerror or err}); pass a "
                             "directory you can write to") from err

    def _take_over(self, previous: dict) -> None:
        """The flock is ours; ``previous`` is what the file said (empty when it was new or released)."""
        pid, host = previous.get("pid"), previous.get("host")
        if not isinstance(pid, int):
            return
        if host != socket.gethostname():
            self._close()
            raise UsageError(f"--output-dir {self.directory} is locked by {_describe(previous)}, which this machine "
                             f"cannot check; if that run is over, delete {self.path} and start again")
        if pid != os.getpid() and _alive(pid):
            self._close()
            raise UsageError(f"--output-dir {self.directory} names a live process as its owner ({_describe(previous)}) "
                             f"but that process does not hold the lock; if no run is using the directory, delete "
                             f"{self.path} and start again")
        self.report(f"taking over the lock of {self.directory}: {_describe(previous)} is no longer running "
                    "(it ended without releasing it)")

    def _read_fd(self) -> dict:
        os.lseek(self._fd, 0, os.SEEK_SET)
        return _parse(os.read(self._fd, 65536))

    def _read_path(self) -> dict:
        try:
            with open(self.path, "rb") as handle:
                return _parse(handle.read(65536)) or {"pid": "?", "host": "?"}
        except OSError:
            return {"pid": "?", "host": "?"}

    def _write(self, owner: dict) -> None:
        data = json.dumps(owner).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the file (while still holding the flock, so no one locks the old file), then close it; the
        directory goes too when this lock created it and nothing else was written there."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        self._close()
        if self.created_directory:
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)  # only if empty

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _stat(path: str):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _parse(data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


@contextlib.contextmanager
def run_lock(directory: str, enabled: bool = True, report: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold :class:`RunLock` on ``directory`` for the block; ``enabled=False`` (ranks other than 0) holds nothing."""
    if not enabled:
        yield
        return
    with RunLock(directory, report):
        yield

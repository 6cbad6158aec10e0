"""RunLock: one run per output directory; a dead owner's lock taken over (and said), an owner elsewhere not; an
unwritable directory refused in one line before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from perft_qlora.errors import UsageError
from perft_qlora.training import train
from perft_qlora.training.run_lock import LOCK_NAME, RunLock, run_lock


def test_a_second_lock_on_the_directory_is_refused_naming_the_owner(tmp_path):
    with RunLock(str(tmp_path)):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(UsageError, match=rf"is in use by another training run \(pid {os.getpid()} on "
                                             rf"{socket.gethostname()}, started .*\); wait for it"):
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released: removed
    with RunLock(str(tmp_path)):  # and free again
        pass


def test_a_dead_owners_lock_is_taken_over_and_said(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 1}))
    said = []
    with RunLock(str(tmp_path), report=said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and said[0].startswith(f"taking over the lock of {tmp_path}: pid {dead.pid} on "
                                                 f"{socket.gethostname()}, started ")
    assert said[0].endswith(" is no longer running (it ended without releasing it)")


def test_an_owner_on_another_host_is_not_taken_over(tmp_path):
    lock = {"pid": 4242, "host": "elsewhere.example", "started": 0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(UsageError, match=rf"locked by pid 4242 on elsewhere.example.*delete {tmp_path / LOCK_NAME}"):
        RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock  # left as it was


def test_a_lock_that_created_the_directory_removes_it_when_nothing_was_written(tmp_path):
    with run_lock(str(tmp_path / "new")):
        assert (tmp_path / "new" / LOCK_NAME).is_file()
    assert not (tmp_path / "new").exists()
    with run_lock(str(tmp_path / "none"), enabled=False):  # ranks other than 0 take no lock
        assert not (tmp_path / "none").exists()


@pytest.fixture
def read_only_dir():
    """A directory (holding a user's file) nobody but root can write to, in a parent everyone can write to."""
    parent = tempfile.mkdtemp(prefix="perft-ro-", dir="/tmp")
    os.chmod(parent, 0o777)
    directory = os.path.join(parent, "runs")
    os.mkdir(directory)
    with open(os.path.join(directory, "notes.txt"), "w") as handle:
        handle.write("mine")
    os.chmod(directory, 0o555)
    yield directory
    os.chmod(directory, 0o755)
    shutil.rmtree(parent)


def _as_unprivileged(function) -> tuple[int, str]:
    """Run ``function()`` (returning a line) in a forked child that cannot write where root could: as root, the
    child becomes ``nobody`` first. Returns (exit status, the line)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        code = 0
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            line = function()
        except BaseException as error:  # noqa: BLE001 (reported to the parent)
            line, code = f"{type(error).__name__}: {error}", 1
        os.write(write, line.encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        line = pipe.read()
    return os.waitpid(pid, 0)[1], line


def test_an_unwritable_output_dir_is_one_error_line_before_loading(read_only_dir, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the output directory was checked")

    monkeypatch.setattr(train, "load_model", must_not_load)

    def train_there() -> str:
        try:
            train.main(["--demo", "--output-dir", read_only_dir, "--max-steps", "1"])
        except SystemExit as exit_info:
            return f"exit {exit_info.code}: " + capsys.readouterr().err.strip()
        return "trained"

    status, line = _as_unprivileged(train_there)
    assert status == 0, line
    assert line == (f"exit 1: error: --output-dir {read_only_dir} is not writable (Permission denied); pass a "
                    "directory you can write to"), line
    assert os.listdir(read_only_dir) == ["notes.txt"]

"""Faults in the middle of a run, injected for real (CPU): a SIGKILL at every file boundary of a save, a second
run started on the same directory, a disk that fills (``RLIMIT_FSIZE``). Each asserts what survives byte for
byte, and that ``--resume`` then reaches the uninterrupted run's final adapter, tensor for tensor.

One tiny ``--demo`` run (2 steps, a checkpoint each step) is the uninterrupted run. Just before its second
checkpoint is saved, it forks: each child copies the output directory as it is at that moment, moves into the
copy and goes on saving there, with an audit hook (``sys.addaudithook``: no code of the package changes) that
counts its file operations in the copy (a file opened for writing, a rename, a directory made or removed; torch's
and safetensors' writers, which open their files in C++, are wrapped in the child to announce theirs) and
SIGKILLs the child at the Nth; the first child counts them without killing. The parent then finishes, and each
copy is resumed with ``--resume``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from perft_qlora.method import checkpoint
from perft_qlora.method.checkpoint import WEIGHTS_NAME
from perft_qlora.training import train
from perft_qlora.training.run_checkpoints import COMPLETE_NAME, incomplete_reason
from perft_qlora.training.run_lock import LOCK_NAME
from perft_qlora.training.train_options import DEMO_PRESETS, parse_args

RUN = "run"  # the output directory, relative: a child that moves into its copy writes there
COMMON = ["--max-steps", "2", "--save-steps", "1", "--val-size", "0", "--batch-size", "2", "--max-length", "128",
        "--logging-steps", "1", "--warmup-steps", "0", "--adapter-dropout", "0.1"]
ARGS: list[str] = []  # COMMON and --data (16 rows of the demo's, written by the fixture)
USER_FILES = {"README.md": "my notes on this run\n", "notes.txt": "keep me\n"}
FULL_LIMIT = 200_000  # bytes per file: the adapter (140 KB) fits, the optimizer state (290 KB) does not
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _paths(event: str, args: tuple) -> list:
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
        return [path] if writing else []
    if event in ("os.rename", "os.link"):
        return list(args[:2])
    if event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        return [args[0]]
    return []


class FileBoundaries:
    """The audit hook of a child: every file operation under ``root``, counted; SIGKILL at number ``kill_at``."""

    def __init__(self, root: str, kill_at: int | None):
        self.root, self.kill_at, self.events = root + os.sep, kill_at, []

    def __call__(self, event: str, args: tuple) -> None:
        for path in _paths(event, args):
            if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(self.root):
                self.events.append(f"{event} {os.path.relpath(os.fsdecode(path), self.root)}")
                if len(self.events) == self.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return


def _announced(write):
    """``write(obj, path, ...)`` raising the ``open`` audit event Python's own ``open`` would (a child's only)."""
    def announced(obj, path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)):
            sys.audit("open", os.fspath(path), "wb", 0)
        return write(obj, path, *args, **kwargs)

    return announced


def _copy_run(target: str) -> None:
    shutil.copytree(RUN, os.path.join(target, RUN), ignore=shutil.ignore_patterns(LOCK_NAME))


class ForkBeforeSave(TrainerCallback):
    """At the end of step ``step`` (its checkpoint not yet saved): fork the children described in the module doc."""

    def __init__(self, root: str, step: int = 2):
        self.root, self.step, self.kills, self.done = root, step, {}, False
        self.child: dict | None = None  # in a child: what it is

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or self.done:
            return control
        self.done = True
        if self._fork({"name": "count"}) is None:
            return control
        with open(os.path.join(self.root, "count", "events.json")) as handle:
            self.events = json.load(handle)
        for n in range(1, len(self.events) + 1):
            if self._fork({"name": f"kill-{n}", "kill_at": n}) is None:
                return control
        self._fork({"name": "full", "limit": FULL_LIMIT})
        return control

    def _fork(self, child: dict) -> int | None:
        """Fork; in the child set it up and return None (it goes on training), in the parent wait and return the
        child's wait status."""
        target = os.path.join(self.root, child["name"])
        os.makedirs(target)
        _copy_run(target)
        pid = os.fork()
        if pid == 0:
            self.child = child
            log = os.open(os.path.join(target, "stderr.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.chdir(target)
            if "limit" in child:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
                resource.setrlimit(resource.RLIMIT_FSIZE, (child["limit"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            else:
                child["hook"] = FileBoundaries(os.path.abspath(RUN), child.get("kill_at"))
                sys.addaudithook(child["hook"])
                # torch's and safetensors' writers open their files in C++, unseen by the hook: announce them
                torch.save, checkpoint.save_file = _announced(torch.save), _announced(checkpoint.save_file)
            return None
        deadline = time.monotonic() + 120
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"child {child['name']} hung")
            time.sleep(0.05)
        self.kills[child["name"]] = done[1]
        return done[1]

    def end_child(self, error: BaseException | None) -> None:
        """In a child that was not killed: say how it ended, then leave at once (never back into pytest)."""
        with open(os.path.join(self.root, self.child["name"], "ended.json"), "w") as handle:
            json.dump({"error": None if error is None else f"{type(error).__name__}: {error}"}, handle)
        if "hook" in self.child:
            with open(os.path.join(self.root, self.child["name"], "events.json"), "w") as handle:
                json.dump(self.child["hook"].events, handle)
        os._exit(1 if error is not None else 0)


class SecondStart(TrainerCallback):
    """During step 1 of the first run: the same command again, on the same directory, as a user would."""

    line = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and self.line is None:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
                train.main(["--demo", "--output-dir", RUN, *ARGS])
            self.code, self.line = exit_info.value.code, err.getvalue().strip().splitlines()
        return control


def _bytes(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if (directory / name).is_file()}


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = root / "rows.json"
    with open(DEMO_PRESETS["data"]) as handle:
        data.write_text(json.dumps(json.load(handle)[:16]))
    ARGS[:] = [*COMMON, "--data", str(data)]
    parent, cwd, threads = os.getpid(), os.getcwd(), torch.get_num_threads()
    fork, second = ForkBeforeSave(str(root)), SecondStart()
    torch.set_num_threads(1)  # no OpenMP pool for the forked children to inherit half-alive
    os.chdir(root)
    try:
        (root / RUN).mkdir()
        for name, text in USER_FILES.items():
            (root / RUN / name).write_text(text)
        trainer = train.run(parse_args(["--demo", "--output-dir", RUN, *ARGS]), callbacks=[second, fork])
    except BaseException as error:
        if os.getpid() != parent:
            fork.end_child(error)
        raise
    finally:
        if os.getpid() != parent:
            fork.end_child(None)
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root, trainer, fork, second


def test_the_uninterrupted_run_saves_everything_and_keeps_the_users_files(faults):
    root, trainer, fork, _ = faults
    out = root / RUN
    assert trainer.state.global_step == 2 and fork.kills["count"] == 0
    assert sorted(os.listdir(out)) == sorted([*USER_FILES, ".perft-qlora-demo", "adapter", "base", "checkpoint-1",
                                              "checkpoint-2"])  # no lock, no staging, no card over README.md
    assert all((out / name).read_text() == text for name, text in USER_FILES.items())
    assert all(incomplete_reason(str(out / f"checkpoint-{n}")) is None for n in (1, 2))
    assert (out / "adapter" / "README.md").read_text().startswith("# perft adapter for")
    counted = load_file(root / "count" / RUN / "adapter" / WEIGHTS_NAME)  # the child that only counted
    final = load_file(out / "adapter" / WEIGHTS_NAME)
    assert counted.keys() == final.keys() and all(torch.equal(counted[k], final[k]) for k in final)


def test_a_second_run_on_the_same_directory_is_refused_in_one_line_and_the_first_goes_on(faults):
    root, trainer, _, second = faults
    assert second.code == 1 and len(second.line) == 1, second.line
    assert second.line[0].startswith(f"error: --output-dir {RUN} is in use by another training run (pid {os.getpid()} "
                                     f"on {socket.gethostname()}, started ")
    assert trainer.state.global_step == 2 and (root / RUN / "adapter" / WEIGHTS_NAME).is_file()


def test_the_save_has_a_kill_point_at_every_file_boundary(faults):
    _, _, fork, _ = faults
    events = fork.events
    for expected in ("os.mkdir .adapter-", "open .adapter-", "os.rename .adapter-", "open checkpoint-2/optimizer.pt",
                     "open checkpoint-2/rng_state.pth", "open checkpoint-2/trainer_state.json",
                     f"os.rename checkpoint-2/.{COMPLETE_NAME}", "os.rename .adapter-"):
        assert any(event.startswith(expected) for event in events), (expected, events)
    assert all(fork.kills[f"kill-{n}"] == signal.SIGKILL for n in range(1, len(events) + 1)), fork.kills


def _resume(directory) -> tuple[train.PerftSFTTrainer, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        trainer = train.run(parse_args(["--demo", "--output-dir", str(directory), *ARGS, "--resume"]))
    return trainer, err.getvalue()


def test_killed_at_any_file_boundary_resume_reaches_the_uninterrupted_adapter(faults):
    root, _, fork, _ = faults
    out = root / RUN
    before = _bytes(out / "checkpoint-1")
    final = load_file(out / "adapter" / WEIGHTS_NAME)
    for n, event in enumerate(fork.events, start=1):
        copy = root / f"kill-{n}" / RUN
        assert _bytes(copy / "checkpoint-1") == before, event  # the complete checkpoint, byte for byte
        assert all((copy / name).read_text() == text for name, text in USER_FILES.items()), event
        partial = (copy / "checkpoint-2").is_dir() and incomplete_reason(str(copy / "checkpoint-2")) is not None
        saved = (copy / "checkpoint-2").is_dir() and not partial
        _, said = _resume(copy)
        assert f"resuming from {copy / ('checkpoint-2' if saved else 'checkpoint-1')}" in said, (event, said)
        if partial:
            assert f"skipping {copy / 'checkpoint-2'}, incomplete" in said, (event, said)
        resumed = load_file(copy / "adapter" / WEIGHTS_NAME)
        assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final), event
        assert incomplete_reason(str(copy / "checkpoint-2")) is None, event  # replaced when training reached it
        left = [name for name in os.listdir(copy) if name.startswith(".") and name != ".perft-qlora-demo"]
        assert left == [], (event, left)  # staging directories of the killed save cleaned, the lock released
        assert all((copy / name).read_text() == text for name, text in USER_FILES.items()), event


def test_a_full_disk_fails_the_save_and_leaves_the_last_checkpoint_whole(faults):
    root, _, fork, _ = faults
    out, copy = root / RUN, root / "full" / RUN
    ended = json.loads((root / "full" / "ended.json").read_text())
    assert os.WIFEXITED(fork.kills["full"]) and os.WEXITSTATUS(fork.kills["full"]) == 1, ended
    assert ended["error"].startswith(f"CheckpointSaveError: could not write {RUN}/checkpoint-2 ("), ended
    assert ended["error"].endswith(f"the last complete checkpoint is {RUN}/checkpoint-1: free space on the disk and "
                                   "continue with --resume"), ended
    assert _bytes(copy / "checkpoint-1") == _bytes(out / "checkpoint-1")
    assert all((copy / name).read_text() == text for name, text in USER_FILES.items())
    assert incomplete_reason(str(copy / "checkpoint-2")) is not None and not (copy / "adapter").exists()
    _, said = _resume(copy)
    assert f"resuming from {copy / 'checkpoint-1'}" in said
    final, resumed = load_file(out / "adapter" / WEIGHTS_NAME), load_file(copy / "adapter" / WEIGHTS_NAME)
    assert all(torch.equal(resumed[k], final[k]) for k in final)

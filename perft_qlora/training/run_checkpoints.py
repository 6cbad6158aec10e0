"""A run's checkpoints: which are complete, and the last complete one to resume from.

A checkpoint (``<output-dir>/checkpoint-N/``) is written file by file: the adapter (staged and renamed into
place by ``save_adapter``), then the optimizer, scheduler and every rank's RNG state, then ``trainer_state.json``.
``PerftSFTTrainer`` writes :data:`COMPLETE_NAME` last, atomically, once every rank's files are in: it lists each
file (with its size, for the reader). A checkpoint is complete when that record reads and every file it lists
is there; a run killed during a save leaves a checkpoint without it, which ``--resume`` skips (saying so) and a run
reaching that step replaces. Checkpoints written before the record existed count as complete when their
``trainer_state.json`` (the Trainer's last file) reads.
"""

from __future__ import annotations

import json
import os
import re

from ..atomic import write_json
from ..errors import PerftQloraError

COMPLETE_NAME = "checkpoint_complete.json"
STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointSaveError(PerftQloraError):
    """A checkpoint that could not be written (a full disk, a file size limit): the run stops, the checkpoint
    stays incomplete, and the message names the last complete one to resume from."""


def save_failure(error: BaseException) -> bool:
    """Whether ``error``, raised while writing a checkpoint, is the machine's (a write that failed) rather than a
    bug: an ``OSError``, or torch's zip writer failing (a ``RuntimeError`` from its ``inline_container``)."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and (
        "inline_container" in str(error) or "PytorchStreamWriter" in str(error)))


def checkpoint_step(name: str) -> int | None:
    """N for a directory name ``checkpoint-N`` (the Trainer's pattern), else None."""
    match = _CHECKPOINT.match(name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Every ``checkpoint-N`` directory in ``output_dir``, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(checkpoint_step(name), name) for name in os.listdir(output_dir)]
    return [os.path.join(output_dir, name) for step, name in sorted(f for f in found if f[0] is not None)
            if os.path.isdir(os.path.join(output_dir, name))]


def mark_complete(directory: str) -> None:
    """Record every file in ``directory`` with its size, as the checkpoint's last file (atomic)."""
    files = {name: os.path.getsize(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
             if not name.startswith(".") and name != COMPLETE_NAME and os.path.isfile(os.path.join(directory, name))}
    write_json(os.path.join(directory, COMPLETE_NAME), {"written_by": "perft_qlora", "files": files})


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def incomplete_reason(directory: str) -> str | None:
    """Why the checkpoint in ``directory`` is not complete (a save that did not finish), or None when it is."""
    record = _read_json(os.path.join(directory, COMPLETE_NAME))
    if record is None:
        if os.path.exists(os.path.join(directory, COMPLETE_NAME)):
            return f"its {COMPLETE_NAME} does not read"
        if isinstance(_read_json(os.path.join(directory, STATE_NAME)), dict):
            return None  # written before the record existed: the Trainer writes trainer_state.json last
        return f"no {COMPLETE_NAME} (its save did not finish)"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or STATE_NAME not in files:
        return f"its {COMPLETE_NAME} lists no {STATE_NAME}"
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    return f"{', '.join(missing[:3])} missing" if missing else None


def survey_checkpoints(output_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the last complete checkpoint or None, [(incomplete checkpoint, why)] for every one after it)."""
    last, skipped = None, []
    for directory in checkpoint_dirs(output_dir):
        reason = incomplete_reason(directory)
        if reason is None:
            last, skipped = directory, []
        else:
            skipped.append((directory, reason))
    return last, skipped


def last_complete_checkpoint(output_dir: str) -> str | None:
    return survey_checkpoints(output_dir)[0]

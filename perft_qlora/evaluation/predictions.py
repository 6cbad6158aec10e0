"""The predictions file: one JSON object per scored test row, appended and flushed as each row is done.

A run that stops (crash, Ctrl-C, lost machine) keeps every row written so far; ``PredictionStore(path,
resume=True)`` reads them back so that finished rows are skipped. A last line cut off mid-write is dropped
(and the file truncated to the last whole line); any other unreadable line is an error naming it.
"""

from __future__ import annotations

import json
import logging
import os

from ..errors import PerftQloraError

logger = logging.getLogger(__name__)

FIELDS = ("model", "task", "row", "prompt", "generated", "response", "extracted", "gold", "correct")
"""Keys of every record: model label, task name, row index in the task's usable rows, the prompt, the raw
generated continuation, the scored response (text after ``### Response:``, prefix included), the extracted
answer (``[invalid]`` when none), the gold answer and whether they match."""


class PredictionsError(PerftQloraError):
    """A predictions file that cannot be resumed or would be overwritten."""


class PredictionStore:
    """Append-only ``predictions.jsonl`` with an index of finished ``(model, task, row)`` keys."""

    def __init__(self, path: str, resume: bool = False):
        self.path = path
        self._records: dict[tuple[str, str, int], dict] = {}
        if os.path.exists(path) and os.path.getsize(path) > 0:
            if not resume:
                raise PredictionsError(
                    f"{path} already holds predictions; pass --resume to continue that run, "
                    "or choose another --output-dir"
                )
            self._load()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for appends; closed by close())

    def _load(self) -> None:
        with open(self.path, "rb") as handle:
            data = handle.read()
        # Each record is written as one "json\n" call, so only the text after the last newline can be partial.
        complete, newline, tail = data.rpartition(b"\n")
        for number, line in enumerate(complete.split(b"\n") if newline else [], 1):
            if line.strip():
                record = self._parse(line)
                if record is None:
                    raise PredictionsError(
                        f"{self.path} line {number} is not a prediction record; fix or remove that line"
                    )
                self._keep(record)
        if tail.strip():
            record = self._parse(tail)
            with open(self.path, "r+b") as handle:
                if record is None:
                    logger.warning("%s: dropping an incomplete last line; that row will be redone", self.path)
                    handle.truncate(len(complete) + len(newline))
                else:
                    self._keep(record)
                    handle.seek(0, os.SEEK_END)
                    handle.write(b"\n")

    @staticmethod
    def _parse(line: bytes) -> dict | None:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict) or not all(name in record for name in FIELDS):
            return None
        return record if isinstance(record["row"], int) else None

    def _keep(self, record: dict) -> None:
        self._records[(record["model"], record["task"], int(record["row"]))] = record

    def has(self, model: str, task: str, row: int) -> bool:
        return (model, task, row) in self._records

    def add(self, record: dict) -> None:
        """Append one record (all of ``FIELDS``) and flush it to disk."""
        missing = [name for name in FIELDS if name not in record]
        if missing:
            raise ValueError(f"prediction record lacks {missing}")
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._keep(record)

    def records(self, model: str, task: str, num_rows: int) -> list[dict]:
        """The records of rows ``0 .. num_rows-1`` of ``task`` for ``model`` that exist, in row order."""
        return [self._records[(model, task, i)] for i in range(num_rows) if (model, task, i) in self._records]

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

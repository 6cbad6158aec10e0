"""Rows in the LLM-Adapters format (``instruction``, ``input``, ``output``, ``answer``), validated.

Used for training data (``output`` required) and test sets (``answer`` required). A row that does not
fit is skipped and reported with its row number (1-based, in file order); a source with no usable row is
an error. Sources: a local ``.json`` (a list of objects) or ``.jsonl`` file (rows numbered by line), or a ``datasets`` hub name
(read by ``sources.py``). Training reads every format through ``conversations.read_examples``, which keeps these checks
for LLM-Adapters rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .sources import DataError, Unparsable, read_hub, read_json_file

FIELDS = ("instruction", "input", "output", "answer")


@dataclass
class RecordSet:
    """Valid rows (each a dict with every key of ``FIELDS`` as a str) and the rows skipped, with reasons."""

    source: str
    rows: list[dict[str, str]]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def report(self, max_listed: int = 10) -> str:
        """One line per skipped row (up to ``max_listed``), headed by the counts."""
        head = f"{self.source}: {len(self.rows)} rows used, {len(self.skipped)} skipped"
        lines = [f"  row {number}: {reason}" for number, reason in self.skipped[:max_listed]]
        if len(self.skipped) > max_listed:
            lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        return "\n".join([head, *lines])


def validate_row(row, required: tuple[str, ...]) -> tuple[dict[str, str] | None, str | None]:
    """``(clean_row, None)`` or ``(None, reason)``. Numbers in ``answer`` (math test sets) become strings."""
    if not isinstance(row, dict):
        return None, f"expected an object with fields {', '.join(FIELDS)}, got {type(row).__name__}"
    clean = {}
    for name in FIELDS:
        value = row.get(name)
        if value is None:
            value = ""
        if name == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return None, f"field {name!r} must be a string, got {type(value).__name__}"
        clean[name] = value
    missing = [name for name in required if not clean[name].strip()]
    if missing:
        return None, f"missing or empty {', '.join(repr(m) for m in missing)}"
    return clean, None


def read_records(source: str, required: tuple[str, ...] = ("instruction", "output"), split: str = "train") -> RecordSet:
    """Read and validate LLM-Adapters rows from a local file or a ``datasets`` hub name."""
    if os.path.isdir(source):
        raise DataError(f"{source} is a directory; pass the .json/.jsonl file inside it")
    if os.path.exists(source):
        if not source.endswith((".json", ".jsonl")):
            raise DataError(f"{source}: unsupported file type; use .json (a list of objects) or .jsonl")
        raw = read_json_file(source)
    elif source.endswith((".json", ".jsonl")) or source.startswith((".", "/", "~")):
        raise DataError(f"data file {source} does not exist")
    else:
        raw = read_hub(source, split)
    records = RecordSet(source=source, rows=[])
    for number, row in raw:
        if isinstance(row, Unparsable):
            records.skipped.append((number, row.reason))
            continue
        clean, reason = validate_row(row, required)
        if clean is None:
            records.skipped.append((number, reason))
        else:
            records.rows.append(clean)
    if not records.rows:
        raise DataError(f"no usable rows in {source}:\n{records.report()}")
    return records

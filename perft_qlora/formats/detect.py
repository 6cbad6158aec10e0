"""Which data format a row is in, and the mapping of a data set's own column names onto ours.

The formats (``--data-format``), each known by the fields its rows carry:

- ``llm-adapters``: ``instruction``, ``output`` (and ``input``), rendered with a prompt template (``prompts.py``);
- ``messages``: ``messages``, a list of ``{"role": system|user|assistant, "content": str}`` (TRL's conversational);
- ``prompt-completion``: ``prompt`` and ``completion``, both strings or both message lists (TRL's format);
- ``text``: ``text``, a string trained as is;
- ``sharegpt``: ``conversations``, a list of ``{"from": human|gpt|system, "value": str}``.

``auto`` takes the format most rows of a source are in; rows in another format are skipped and listed.
"""

from __future__ import annotations

from collections import Counter

from .sources import DataError

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
    "llm-adapters": ("instruction", "output"),
}
"""Each format and the fields that make a row one of it, in the order ``auto`` tries them."""
FORMATS = ("auto", "llm-adapters", "messages", "prompt-completion", "text", "sharegpt")
MAPPABLE = ("instruction", "input", "output", "messages", "conversations", "prompt", "completion", "text")


def parse_fields(text: str | None) -> dict[str, str]:
    """``--data-fields prompt=question,completion=answer`` -> ``{"question": "prompt", "answer": "completion"}``
    (the data set's column -> our field name)."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        ours, sep, theirs = (piece.strip() for piece in part.partition("="))
        if not sep or not ours or not theirs:
            raise DataError(f"--data-fields {text!r}: write FIELD=COLUMN pairs separated by commas, "
                            "e.g. prompt=question,completion=answer")
        if ours not in MAPPABLE:
            raise DataError(f"--data-fields: {ours!r} is not a field we read; use one of {', '.join(MAPPABLE)}")
        mapping[theirs] = ours
    return mapping


def rename(row, fields: dict[str, str]):
    """``row`` with its columns renamed by ``fields`` (``parse_fields``); anything not a dict is returned as is."""
    if not fields or not isinstance(row, dict):
        return row
    renamed = dict(row)
    for theirs, ours in fields.items():
        if theirs in row:
            renamed[ours] = row[theirs]
    return renamed


def row_format(row, prefer: str | None = None) -> str | None:
    """The format ``row`` leans to: ``prefer`` when the row has one of its fields, else the first format
    (``FORMAT_FIELDS`` order) with one of its fields present (``input`` counts for LLM-Adapters); None for none."""
    if not isinstance(row, dict):
        return None
    for name in ([prefer] if prefer in FORMAT_FIELDS else []) + list(FORMAT_FIELDS):
        if any(field in row for field in FORMAT_FIELDS[name] + (("input",) if name == "llm-adapters" else ())):
            return name
    return None


def detect_format(source: str, rows: list) -> str:
    """The format most of ``rows`` are in (the first seen on a tie); a :class:`DataError` when none is."""
    counts = Counter(found for found in map(row_format, rows) if found is not None)
    if counts:
        return counts.most_common(1)[0][0]
    seen = sorted({key for row in rows[:100] if isinstance(row, dict) for key in row})
    accepted = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in FORMAT_FIELDS.items())
    raise DataError(
        f"{source}: no row is in a format we read (fields {accepted}); its rows have "
        f"{', '.join(seen) or 'no named fields'}: map yours with --data-fields, e.g. prompt=question,completion=answer"
    )

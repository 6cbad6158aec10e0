"""Rows from one data source, numbered for reports: a local ``.json`` (a list of objects; a file of one object per
line is read as JSON lines), ``.jsonl``, ``.parquet`` or ``.csv`` file, or a ``datasets`` hub name.

Rows are numbered from 1 in file order; ``.jsonl`` and ``.csv`` rows by their line in the file. A ``.jsonl``
line that does not parse is kept as an :class:`Unparsable` row, so that it is reported with its number and
skipped. A file that is not UTF-8 text, or a ``.json`` file that is not JSON, is a :class:`DataError` naming
the encoding found or the line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os

from ..errors import PerftQloraError

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv")


class DataError(PerftQloraError):
    """A data source that cannot be used at all (missing, unreadable, or without one valid row)."""


class Unparsable:
    """A .jsonl line that did not parse; kept so that it is reported with its line number."""

    def __init__(self, reason: str):
        self.reason = reason


_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def read_text(path: str) -> str:
    """The file as UTF-8 text (a UTF-8 byte-order mark is dropped); anything else is one :class:`DataError`."""
    with open(path, "rb") as handle:
        data = handle.read()
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise DataError(f"{path} is {name} text, not UTF-8; save it as UTF-8 (e.g. iconv -f {name} -t UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{data[error.start]:02x} on line {line} ({_guess_encoding(data)}); "
            "save it as UTF-8"
        ) from None


def _guess_encoding(data: bytes) -> str:
    if b"\x00" in data[:4096]:
        return "it looks like UTF-16 without a byte-order mark"
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(data[:65536]).best()
    except ImportError:  # charset_normalizer comes with requests, but is not one of our dependencies
        best = None
    return f"it looks like {best.encoding}" if best is not None else "the encoding is unknown"


def _json_lines(text: str) -> list[tuple[int, object]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                rows.append((number, Unparsable(f"not valid JSON ({error.msg})")))
    return rows


def read_json_file(path: str) -> list[tuple[int, object]]:
    """``(row number, parsed row)`` pairs of a ``.json`` or ``.jsonl`` file; for .jsonl the number is the line."""
    text = read_text(path)
    if path.endswith(".jsonl"):
        return _json_lines(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and all(_parses(line) for line in text.split("\n") if line.strip()):
            return _json_lines(text)  # JSON lines saved as .json, as datasets also reads them
        raise DataError(f"{path} is not valid JSON ({error}); expected a list of objects or a .jsonl file") from error
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of objects (LLM-Adapters format)")
    return list(enumerate(data, 1))


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _read_csv(path: str) -> list[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = []
    for row in reader:
        rows.append((reader.line_num, {key: value for key, value in row.items() if key is not None}))
    return rows


def _read_parquet(path: str) -> list[tuple[int, object]]:
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends for a damaged file
        raise DataError(f"{path} is not a readable Parquet file ({error})") from error
    return list(enumerate(table.to_pylist(), 1))


def read_hub(name: str, split: str, config: str | None = None) -> list[tuple[int, object]]:
    from datasets import load_dataset

    try:
        return list(enumerate(load_dataset(name, config, split=split), 1))
    except Exception as error:  # datasets raises many types for a missing/unreachable name
        subset = f", subset {config!r}" if config else ""
        raise DataError(
            f"could not load {name!r} (split {split!r}{subset}) with datasets: {error}. "
            f"Pass a local {'/'.join(FILE_TYPES)} file, or check the name and your network."
        ) from error


def read_source(source: str, split: str = "train", config: str | None = None) -> list[tuple[int, object]]:
    """``(row number, row)`` pairs of a local file (see module doc) or a ``datasets`` hub name."""
    if os.path.isdir(source):
        raise DataError(f"{source} is a directory; pass the data file inside it")
    if os.path.exists(source):
        if source.endswith((".json", ".jsonl")):
            return read_json_file(source)
        if source.endswith(".csv"):
            return _read_csv(source)
        if source.endswith(".parquet"):
            return _read_parquet(source)
        raise DataError(f"{source}: unsupported file type; use one of {', '.join(FILE_TYPES)}")
    if source.endswith(FILE_TYPES) or source.startswith((".", "/", "~")):
        raise DataError(f"data file {source} does not exist")
    return read_hub(source, split, config)

"""Files written whole or not at all: a temporary sibling file, flushed to disk, then ``os.replace``.

The one atomic file writer of the package (summaries, reports, plots, training records, the model card, bench
results). A reader never sees half a file, and a run killed mid-write leaves the previous file untouched and, at
worst, a hidden ``.<name>.*`` temporary beside it. The file gets the usual mode (``0o666`` less the umask), not
``mkstemp``'s private one. Whole directories (an adapter) are staged and renamed by ``method/checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends without an error
    (and is removed when it raises). For writers that take a file name (``figure.savefig``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        file.write(text)


def write_json(path: str, value: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``value`` as JSON (and a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(value, indent=indent, default=default) + "\n")

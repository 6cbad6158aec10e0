"""``CheckpointReader``: tensors of a safetensors checkpoint (one file or an index of shards), read by offset.

Nothing is memory-mapped. ``safe_open(...).get_tensor`` returns views into a private mapping of the whole
shard: whatever a model keeps from it (router, norms, embeddings) pins the mapping, and every page read
through it stays resident and counts against the process (``RssFile``), so a loader that quantizes 97% of
the bytes away still peaked at the size of the checkpoint. Here each read parses the shard's JSON header
once and ``preadv``'s the tensor's (or a row range's) bytes into a fresh tensor the caller owns; a shard's
file descriptor is closed by :meth:`CheckpointReader.close_finished` once every tensor in it has been read.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import torch

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_READ = 1 << 30  # bytes per preadv call (Linux caps one read at just under 2 GiB)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``path`` at absolute byte ``offset``, ``dtype`` and ``shape``."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of one ``.safetensors`` file, from its JSON header (the 8-byte length, then the JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which perft_qlora cannot read")
        begin = info["data_offsets"][0]
        entries[key] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin)
    return entries


class CheckpointReader:
    """Reads whole tensors or leading-dimension row ranges into fresh tensors; use as a context manager.

    ``on_read(nbytes)`` is called after every read (a progress bar); ``bytes_read`` counts them.
    Reads are thread-safe (``preadv`` has no shared file position), so a prefetch thread may read ahead.
    """

    def __init__(self, directory: str, on_read: Callable[[int], None] | None = None):
        index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
        single_path = os.path.join(directory, WEIGHTS_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(single_path):
            files = [WEIGHTS_NAME]
        else:
            raise FileNotFoundError(
                f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}: perft_qlora loads safetensors "
                "checkpoints only (convert .bin files with transformers' save_pretrained)."
            )
        self._entries: dict[str, TensorEntry] = {}
        for name in files:
            self._entries.update(read_header(os.path.join(directory, name)))
        self._fds: dict[str, int] = {}
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()
        self.on_read = on_read
        self.bytes_read = 0
        self.used: set[str] = set()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def mark_used(self, key: str) -> None:
        """Count a tensor as used without reading it (another rank's experts, under FSDP)."""
        with self._lock:
            self.used.add(key)

    def entry(self, key: str) -> TensorEntry:
        return self._entries[key]

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor in the checkpoint."""
        return sum(e.nbytes for e in self._entries.values())

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, in a fresh buffer."""
        entry = self._entries[key]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self._read_into(key, entry.offset, out)
        return out

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """``tensor[start:stop]`` (leading dimension), in a fresh buffer, the other rows left unread."""
        entry = self._entries[key]
        out = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
        self.read_rows_into(key, start, out)
        return out

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` read without the rest (for fused expert tensors)."""
        return self.get_rows(key, index, index + 1)[0]

    def read_rows_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Read ``tensor[start:start + len(out)]`` (or the whole tensor, ``start=0``) into contiguous ``out``."""
        entry = self._entries[key]
        row_bytes = prod(entry.shape[1:]) * entry.dtype.itemsize if entry.shape else entry.nbytes
        if out.dtype != entry.dtype or out.nbytes + start * row_bytes > entry.nbytes or not out.is_contiguous():
            raise ValueError(f"cannot read {key} ({entry.dtype}, {entry.shape}) rows from {start} into {out.dtype} "
                             f"{tuple(out.shape)}")
        self._read_into(key, entry.offset + start * row_bytes, out)

    def _read_into(self, key: str, offset: int, out: torch.Tensor) -> None:
        if out.nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            path = self._entries[key].path
            fd, done = self._acquire(path), 0
            try:
                while done < len(view):
                    got = os.preadv(fd, [view[done : done + _MAX_READ]], offset + done)
                    if got <= 0:
                        raise OSError(f"{path} ended early while reading {key}: truncated checkpoint?")
                    done += got
            finally:
                with self._lock:
                    self._busy[path] -= 1
        with self._lock:
            self.used.add(key)
            self.bytes_read += out.nbytes
        if self.on_read is not None:
            self.on_read(out.nbytes)

    def _acquire(self, path: str) -> int:
        """The shard's file descriptor, marked busy (not closed under a read) until the read ends."""
        with self._lock:
            self._busy[path] = self._busy.get(path, 0) + 1
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return self._fds[path]

    def close_finished(self) -> int:
        """Close the shards whose every tensor has been read (a later read reopens one); returns how many."""
        with self._lock:
            open_paths = {path for path in self._fds if not self._busy.get(path)}
            for key, entry in self._entries.items():
                if entry.path in open_paths and key not in self.used:
                    open_paths.discard(entry.path)
            for path in open_paths:
                os.close(self._fds.pop(path))
            return len(open_paths)

    @property
    def open_files(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

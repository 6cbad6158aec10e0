"""``ExpertStream``: every layer's expert weights as chunks of whole experts, read ahead on a background thread.

The loader quantizes chunk ``n`` while this thread reads chunk ``n + 1`` (``preadv`` releases the GIL, the
quantizer's torch ops too), so disk and CPU overlap. Chunks hold about ``chunk_bytes`` of checkpoint data
(at least one expert, at most an eighth of the tensor) and the queue holds ``depth`` of them, so the host
holds ``depth + 2`` chunks at most (queued, being read, being quantized) whatever the model's size. Both
checkpoint layouts are read: transformers-5 fused ``experts.gate_up_proj`` ``(E, 2I, H)`` /
``experts.down_proj`` ``(E, H, I)`` row ranges, and per-expert hub tensors (``experts.{e}.gate_proj`` ...),
read straight into the chunk's rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .arch import MoEArch
from .checkpoint_reader import CheckpointReader

WHICH = ("gate_up_proj", "down_proj")


@dataclass
class ExpertChunk:
    layer: int
    which: str  # "gate_up_proj" or "down_proj"
    start: int  # first expert
    tensor: torch.Tensor  # (k, out, in) in the checkpoint's dtype, on the CPU


def _fused_key(reader: CheckpointReader, prefix: str, arch: MoEArch, which: str) -> str | None:
    for block in (arch.moe_block, *arch.checkpoint_block_names):
        key = f"{prefix}{block}.{arch.experts}.{which}"
        if key in reader:
            return key
    return None


def _per_expert_keys(prefix: str, arch: MoEArch, which: str, e: int) -> list[str]:
    gate, up, down = (prefix + k.format(e=e) for k in arch.expert_checkpoint_keys)
    return [gate, up] if which == "gate_up_proj" else [down]


def read_expert_chunk(reader: CheckpointReader, prefix: str, arch: MoEArch, which: str, start: int, stop: int,
                      shape: tuple[int, int, int]) -> torch.Tensor:
    """Experts ``start:stop`` of ``which`` under ``prefix`` as one ``(stop - start, out, in)`` tensor."""
    fused = _fused_key(reader, prefix, arch, which)
    if fused is not None:
        return reader.get_rows(fused, start, stop)
    keys = _per_expert_keys(prefix, arch, which, start)
    missing = [k for k in keys if k not in reader]
    if missing:
        raise KeyError(f"checkpoint has no expert weights for {prefix} (no {prefix}{arch.moe_block}.{arch.experts}."
                       f"{which} nor {missing[0]})")
    out = torch.empty((stop - start, *shape[1:]), dtype=reader.entry(keys[0]).dtype)
    for row, e in enumerate(range(start, stop)):
        parts = _per_expert_keys(prefix, arch, which, e)
        rows = out.shape[1] // len(parts)  # gate and up: half the rows each
        for i, key in enumerate(parts):
            if key not in reader:
                raise KeyError(f"checkpoint has no expert weights for {prefix} (no {key})")
            reader.read_rows_into(key, 0, out[row, i * rows : (i + 1) * rows])
    return out


def expert_chunks(reader: CheckpointReader, arch: MoEArch, shapes: list[dict[str, tuple[int, int, int]]],
                  chunk_bytes: int, experts=None) -> Iterator[ExpertChunk]:
    """Chunks of every layer's ``gate_up_proj`` then ``down_proj``, in order. ``shapes[i][which] = (E, out, in)``.

    ``experts(E) -> (start, stop)`` reads only those experts of each tensor (``sharding.ExpertShard.experts``);
    the rest are counted as used without being read."""
    for layer, layer_shapes in enumerate(shapes):
        if not layer_shapes:  # a dense layer: no experts to read
            continue
        prefix = f"model.layers.{layer}."
        for which in WHICH:
            shape = layer_shapes[which]
            per_expert = shape[1] * shape[2] * 2  # bf16 bytes; the size a chunk is meant to have
            step = max(1, min(chunk_bytes // per_expert, shape[0] // 8))  # and 8+ chunks a tensor
            first, last = experts(shape[0]) if experts is not None else (0, shape[0])
            _skip_other_experts(reader, prefix, arch, which, shape[0], first, last)
            for start in range(first, last, step):
                stop = min(last, start + step)
                tensor = read_expert_chunk(reader, prefix, arch, which, start, stop, shape)
                yield ExpertChunk(layer, which, start, tensor)


def _skip_other_experts(reader: CheckpointReader, prefix: str, arch: MoEArch, which: str, num_experts: int,
                        first: int, last: int) -> None:
    if _fused_key(reader, prefix, arch, which) is not None or (first, last) == (0, num_experts):
        return  # a fused tensor counts as used once any of its rows is read
    for e in [*range(first), *range(last, num_experts)]:
        for key in _per_expert_keys(prefix, arch, which, e):
            if key in reader:
                reader.mark_used(key)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class ExpertStream:
    """Iterates ``items`` computed on a daemon thread, at most ``depth`` ahead; re-raises the thread's errors."""

    def __init__(self, items: Iterator, depth: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="expert-reader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001  (handed to the consumer, raised there)
            self._put(_Failed(error))

    def __iter__(self) -> ExpertStream:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        """Stop reading ahead and drop what was read (call on every exit path)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> ExpertStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""``LoadProgress``: the loader's progress bar: layers done / total, GiB read of the checkpoint, elapsed, ETA.

The bar advances by checkpoint bytes actually read (the reader calls :meth:`LoadProgress.read`, from its
prefetch thread too), so the rate and ETA follow the real work; the layer count advances when a layer is
complete. Quiet when ``enabled`` is false or stderr is not a terminal (tqdm's ``disable=None``).
"""

from __future__ import annotations

import threading

from tqdm.auto import tqdm

GIB = 2**30
BAR_FORMAT = "{desc}{postfix} | {n:.2f}/{total:.2f} GiB |{bar}| {elapsed}<{remaining}, {rate_fmt}"


class LoadProgress:
    def __init__(self, total_bytes: int, num_layers: int, enabled: bool = True, desc: str = "loading NF4", file=None):
        self.num_layers = num_layers
        self._lock = threading.Lock()
        self.bar = tqdm(total=total_bytes / GIB, unit="GiB", desc=desc, bar_format=BAR_FORMAT,
                        postfix=f"layer 0/{num_layers}", disable=None if enabled else True, file=file)

    def read(self, nbytes: int) -> None:
        with self._lock:
            self.bar.update(nbytes / GIB)

    def layer_done(self, index: int) -> None:
        with self._lock:
            self.bar.set_postfix_str(f"layer {index + 1}/{self.num_layers}", refresh=True)

    def close(self, complete: bool = True) -> None:
        with self._lock:
            if complete:  # tensors the model does not use are never read: end the bar at 100%
                self.bar.total = max(self.bar.n, 1e-9)
                self.bar.refresh()
            self.bar.close()

"""``CheckpointReader``: tensors of a safetensors checkpoint (one file or an index of shards), read lazily."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointReader:
    """Reads single tensors or slices without loading whole shards; use as a context manager."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
        single_path = os.path.join(directory, WEIGHTS_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {key: os.path.join(directory, name) for key, name in weight_map.items()}
        elif os.path.isfile(single_path):
            with safe_open(single_path, framework="pt") as f:
                self._file_of = {key: single_path for key in f.keys()}
        else:
            raise FileNotFoundError(
                f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}: perft_qlora loads safetensors "
                "checkpoints only (convert .bin files with transformers' save_pretrained)."
            )
        self._handles: dict[str, object] = {}
        self.used: set[str] = set()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def _handle(self, key: str):
        path = self._file_of[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def get(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self._handle(key).get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` read without materialising the rest (for fused expert tensors)."""
        self.used.add(key)
        return self._handle(key).get_slice(key)[index]

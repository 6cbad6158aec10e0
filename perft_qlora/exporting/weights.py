"""The exported model's tensors, one decoder layer at a time, and the sharded safetensors they are written to.

Two sources of the base's tensors, both named and shaped as the transformers-5 model holds them (fused
``experts.gate_up_proj`` ``(E, 2I, H)`` / ``experts.down_proj`` ``(E, H, I)``, ``mlp`` for Mixtral's
``block_sparse_moe``):

- :class:`CheckpointTensors`: the base checkpoint's own values, read by offset (``quant/checkpoint_reader.py``)
  from either layout (hub per-expert tensors are stacked into the fused ones);
- :class:`DequantizedTensors`: the NF4 values the adapter was trained against, dequantized from the loaded NF4
  model one layer at a time (experts exactly as ``NF4Experts`` dequantizes them in its forward).

:class:`ShardWriter` writes one shard per decoder layer (the embeddings, final norm and ``lm_head`` in the
first), then ``model.safetensors.index.json``, so no more than one layer's tensors are in host memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import bitsandbytes as bnb
import torch
from safetensors.torch import save_file
from torch import nn

from ..quant.arch import MoEArch
from ..quant.checkpoint_reader import WEIGHTS_INDEX_NAME, CheckpointReader
from ..quant.expert_stream import WHICH, read_expert_chunk
from ..quant.nf4_experts import NF4Experts

LAYER_PREFIX = "model.layers."


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (``model.layers.3.…`` -> 3), None for the others."""
    if not name.startswith(LAYER_PREFIX):
        return None
    return int(name[len(LAYER_PREFIX):].split(".", 1)[0])


def expected_tensors(meta_model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the model's checkpoint holds (built on ``meta`` in the export
    dtype: float32 where the class keeps it, DeepSeek's router); a tied ``lm_head`` is left out."""
    tied = getattr(meta_model.config, "tie_word_embeddings", False)
    return {name: (tuple(t.shape), t.dtype) for name, t in meta_model.state_dict().items()
            if not (tied and name == "lm_head.weight")}


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return value.to(dtype) if value.is_floating_point() else value


class CheckpointTensors:
    """The base checkpoint's tensors under the model's names, a layer at a time."""

    def __init__(self, directory: str, arch: MoEArch, expected: dict):
        self.reader, self.arch, self.expected = CheckpointReader(directory), arch, expected

    def close(self) -> None:
        self.reader.close()

    def _read(self, name: str) -> torch.Tensor:
        shape, dtype = self.expected[name]
        prefix, _, which = name.rpartition(f"{self.arch.moe_block}.{self.arch.experts}.")
        if which in WHICH and layer_of(name) is not None:  # fused experts: either checkpoint layout
            value = read_expert_chunk(self.reader, prefix, self.arch, which, 0, shape[0], shape)
        else:
            keys = [name, *(name.replace(f".{self.arch.moe_block}.", f".{other}.", 1)
                            for other in self.arch.checkpoint_block_names)]
            found = [key for key in keys if key in self.reader]
            if not found:
                raise KeyError(f"the base checkpoint has no tensor {name} (nor {', '.join(keys[1:]) or 'another name'})")
            value = self.reader.get(found[0])
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} in the base checkpoint, the model {shape}")
        return _cast(value, dtype)

    def tensors(self, layer: int | None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of decoder layer ``layer``'s tensors, or of the rest (``None``)."""
        for name in self.expected:
            if layer_of(name) == layer:
                yield name, self._read(name)


class DequantizedTensors:
    """The NF4 model's tensors under the plain model's names: NF4 experts and linears dequantized."""

    def __init__(self, model: nn.Module, expected: dict):
        self.model, self.expected = model, expected

    def close(self) -> None:
        pass

    def tensors(self, layer: int | None) -> Iterator[tuple[str, torch.Tensor]]:
        if layer is None:
            root, prefix = self.model, ""
            skip = LAYER_PREFIX
        else:
            root, prefix, skip = self.model.model.layers[layer], f"{LAYER_PREFIX}{layer}.", None
        for module_name, module in root.named_modules():
            base = f"{prefix}{module_name}." if module_name else prefix
            if skip and base.startswith(skip):
                continue
            for attr, value in _module_tensors(module):
                name = base + attr
                if name in self.expected:
                    yield name, _cast(value, self.expected[name][1])


def _module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own tensors as the plain model names them, NF4 storage dequantized."""
    if isinstance(module, NF4Experts):
        for which in WHICH:
            weight = getattr(module, which)
            yield which, torch.stack([weight.dequantize_expert(e, weight.dtype) for e in range(weight.shape[0])])
        return
    if isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        yield "weight", bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(weight.quant_state.dtype)
        if module.bias is not None:
            yield "bias", module.bias.detach()
        return
    persistent = [(n, b) for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set]
    for attr, value in [*module._parameters.items(), *persistent]:
        if value is not None:
            yield attr, value.detach()


class ShardWriter:
    """One safetensors shard per call of :meth:`write`, then the index (transformers' sharded layout)."""

    def __init__(self, directory: str, num_shards: int):
        self.directory, self.num_shards = directory, num_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.num_shards:05d}.safetensors"
        tensors = {key: value.contiguous() for key, value in tensors.items()}
        save_file(tensors, os.path.join(self.directory, name), metadata={"format": "pt"})
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def finish(self) -> None:
        if self.written != self.num_shards:
            raise RuntimeError(f"wrote {self.written} shards, expected {self.num_shards}")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        with open(os.path.join(self.directory, WEIGHTS_INDEX_NAME), "w") as handle:
            json.dump(index, handle, indent=2)

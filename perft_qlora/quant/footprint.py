"""Weight bytes of a model as ``load_model`` stores it, computed from a ``meta`` model (no weights read).

The rules are the loader's: fused 3-D expert tensors become :class:`~perft_qlora.quant.nf4.NF4Weight`, a decoder
layer's ``nn.Linear`` becomes a bitsandbytes NF4 ``Linear4bit`` where :func:`~perft_qlora.quant.loader.quantizes_linear`
says so, everything else keeps the dtype :func:`~perft_qlora.quant.loader.stored_dtype` gives it. Byte counts follow
bitsandbytes' format exactly (blocks of 64 values, double-quantized scales in blocks of 256), so for a supported
family the total equals ``memory_report(load_model(...)).total`` (tested on CPU loads).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ARCHITECTURES, decoder_layers
from .loader import BLOCKSIZE, quantizes_linear, stored_dtype
from .nf4 import NESTED_BLOCKSIZE, NESTED_CODE_BYTES, NF4_CODE_BYTES, nf4_bytes, scale_bytes  # noqa: F401 (re-exported)


@dataclass
class Footprint:
    """Bytes of a model's weights as loaded: NF4 values, their scales, and dense tensors per dtype."""

    nf4: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Packed 4-bit bytes per kind (``experts``, ``linear``)."""
    scales: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """NF4 scale and code-book bytes per kind."""
    dense: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Unquantized bytes per dtype name."""
    replicated: int = 0
    """Of the total, the bytes FSDP2 keeps whole on every rank (``quant/sharding.py``): buffers, the scales of
    bitsandbytes' linears (their quant state lives on the module) and, of the experts' scales, what is not the
    uint8 ``absmax`` (nested scales and code books; all of them when the scales are float32)."""

    @property
    def quantized(self) -> int:
        return sum(self.nf4.values()) + sum(self.scales.values())

    @property
    def total(self) -> int:
        return self.quantized + sum(self.dense.values())

    def add_nf4(self, kind: str, numel: int, double_quant: bool) -> None:
        self.nf4[kind] += nf4_bytes(numel)
        scales = scale_bytes(numel, double_quant)
        self.scales[kind] += scales
        sharded_scales = math.ceil(numel / BLOCKSIZE) if kind == "experts" and double_quant else 0  # uint8 absmax
        self.replicated += scales - sharded_scales

    def add_dense(self, tensor: torch.Tensor, dtype: torch.dtype, buffer: bool = False) -> None:
        size = tensor.numel() * torch.empty((), dtype=dtype).element_size()
        self.dense[str(dtype).replace("torch.", "")] += size
        self.replicated += size if buffer else 0


def _is_fused_experts(name: str, module: nn.Module) -> bool:
    return name.rpartition(".")[2] == "experts" and any(p.dim() == 3 for p in module.parameters(recurse=False))


def weight_footprint(
    model: nn.Module, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, double_quant: bool = True
) -> Footprint:
    """The bytes ``load_model(quantize="nf4", device=device, dtype=dtype)`` allocates for ``model``'s weights.

    ``model`` is built on the ``meta`` device from its config. Families the loader does not serve are
    counted by the same rules (3-D expert tensors in NF4, their biases dense).
    """
    device = torch.device(device)
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    keep = arch.keep_dense if arch else ()
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    layer_names = [name for name, m in model.named_modules() if id(m) in layer_ids]
    container = layer_names[0].rpartition(".")[0] + "." if layer_names else None  # "model.layers."
    footprint, seen = Footprint(), set()
    for name, module in model.named_modules():
        if id(module) in layer_ids:
            _layer_footprint(module, footprint, seen, device, dtype, double_quant, keep)
        elif container is None or not name.startswith(container):  # inside a layer: counted with it
            _dense_footprint(module, footprint, seen, dtype)
    return footprint


def other_weight_bytes(config, device, dtype: torch.dtype = torch.bfloat16, double_quant: bool = True) -> int:
    """Bytes of the weights ``load_model`` keeps on the device whatever the expert placement (all but routed experts)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    footprint = weight_footprint(model, device, dtype, double_quant)
    return footprint.total - footprint.nf4.get("experts", 0) - footprint.scales.get("experts", 0)


def layer_footprints(
    model: nn.Module, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, double_quant: bool = True
) -> list[Footprint]:
    """:func:`weight_footprint`'s rules applied to each decoder layer on its own (FSDP's units)."""
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    keep = arch.keep_dense if arch else ()
    footprints = []
    for layer in decoder_layers(model):
        footprints.append(Footprint())
        _layer_footprint(layer, footprints[-1], set(), torch.device(device), dtype, double_quant, keep)
    return footprints


def _layer_footprint(layer, footprint: Footprint, seen: set, device, dtype, double_quant, keep) -> None:
    skip: set[str] = set()
    for name, module in layer.named_modules():
        if any(name.startswith(f"{s}.") for s in skip):
            continue
        if _is_fused_experts(name, module):
            for param in module.parameters(recurse=False):
                if param.dim() == 3:
                    footprint.add_nf4("experts", param.numel(), double_quant)
                else:
                    footprint.add_dense(param, dtype)  # gpt-oss's expert biases (not loadable yet)
                seen.add(id(param))
            skip.add(name)
        elif quantizes_linear(name, module, device, keep):
            footprint.add_nf4("linear", module.weight.numel(), double_quant)
            seen.add(id(module.weight))
            if module.bias is not None:
                footprint.add_dense(module.bias, dtype)
                seen.add(id(module.bias))
        else:
            _dense_footprint(module, footprint, seen, dtype)


def _dense_footprint(module: nn.Module, footprint: Footprint, seen: set, dtype) -> None:
    """Own parameters and buffers of ``module``; tied tensors once; non-persistent buffers in their own dtype."""
    for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        persistent = attr in module._parameters or attr not in module._non_persistent_buffers_set
        footprint.add_dense(tensor, stored_dtype(module, tensor, tensor, dtype) if persistent else tensor.dtype,
                            buffer=attr not in module._parameters)

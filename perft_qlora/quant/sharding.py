"""Make an NF4 model's 4-bit storage shardable by FSDP2 (``fully_shard``), without changing a byte or a result.

FSDP2 shards *parameters* along dim 0 and all-gathers them around each wrapped module's forward and backward.
Two kinds of 4-bit storage live in a model from :func:`~perft_qlora.quant.loader.load_model`:

- ``NF4Weight`` (the routed experts, ~96% of the weights): uint8 buffers, which FSDP would leave whole on every
  rank. :meth:`NF4Weight.storage_as_parameters` re-registers them as frozen uint8 parameters; FSDP never casts
  integer parameters, so mixed precision leaves the bytes alone.
- bitsandbytes ``Params4bit`` (attention, shared experts, dense MLPs): accelerate excludes uint8 ``Params4bit``
  from sharding (its quant state would not survive the DTensor round trip). Stored as bfloat16 — the same bytes
  viewed two at a time, bitsandbytes' ``quant_storage`` that the QLoRA-FSDP recipe uses — they are sharded, and
  ``Linear4bit`` restores the quant state from its module after the all-gather
  (``fix_4bit_weight_quant_state_from_module``). bitsandbytes reads the bytes back as uint8, so the matmul is
  bit-identical.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from .nf4 import NF4Weight

FLOAT_STORAGE = torch.bfloat16  # bnb_4bit_quant_storage for Params4bit under FSDP


def shardable_storage(model: nn.Module) -> dict[str, int]:
    """Turn every 4-bit storage tensor of ``model`` into a parameter FSDP2 shards; returns counts per kind.

    Call it after loading (and attaching adapters), before the Trainer / accelerate wraps the model.
    """
    counts = {"nf4_experts": 0, "linear4bit": 0}
    for module in model.modules():
        if isinstance(module, NF4Weight):
            module.storage_as_parameters()
            counts["nf4_experts"] += 1
        elif isinstance(module, bnb.nn.Linear4bit) and module.weight.dtype == torch.uint8:
            module.weight = _float_storage(module)
            counts["linear4bit"] += 1
    return counts


def _float_storage(module: bnb.nn.Linear4bit) -> bnb.nn.Params4bit:
    weight = module.weight
    if weight.numel() % 2:
        raise ValueError(f"a Linear4bit of {weight.numel()} bytes cannot be viewed as {FLOAT_STORAGE}")
    state = weight.quant_state
    data = weight.data.reshape(-1).view(FLOAT_STORAGE).reshape(-1, 1)
    module.quant_storage = FLOAT_STORAGE
    module.quant_state = state  # where Linear4bit finds it again after FSDP's all-gather
    return bnb.nn.Params4bit(
        data, requires_grad=False, quant_state=state, blocksize=weight.blocksize,
        compress_statistics=weight.compress_statistics, quant_type=weight.quant_type, quant_storage=FLOAT_STORAGE,
        module=module, bnb_quantized=True,
    )

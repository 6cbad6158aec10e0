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

from collections.abc import Callable
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn

from .nf4 import NF4Weight

FLOAT_STORAGE = torch.bfloat16  # bnb_4bit_quant_storage for Params4bit under FSDP


@dataclass(frozen=True)
class ExpertShard:
    """The routed experts one rank loads: those FSDP2 will keep on it.

    FSDP2 splits each parameter along dim 0 into ``world`` equal chunks and keeps chunk ``rank``. An
    ``NF4Weight``'s ``packed`` (``(E * out * in / 2, 1)``) and uint8 ``absmax`` are expert-major, so when
    ``world`` divides ``E`` that chunk is exactly experts ``[rank * E / world, (rank + 1) * E / world)``: the
    loader reads and quantizes only those, and leaves the other experts' bytes unwritten (FSDP never reads
    them into the rank's shard). The block scales are small; ``gather`` (a collective: every rank calls it with
    its own experts' float32 scales, in layer order) returns all experts' scales, so that the double
    quantization of the scales, computed over all experts, gives the bytes a whole load gives.
    """

    rank: int
    world: int
    gather: Callable[[torch.Tensor], torch.Tensor]

    def experts(self, num_experts: int) -> tuple[int, int]:
        """This rank's ``[start, stop)``; all experts when ``world`` does not divide them (FSDP's chunks would cut
        through an expert)."""
        if num_experts % self.world:
            return 0, num_experts
        per_rank = num_experts // self.world
        return self.rank * per_rank, (self.rank + 1) * per_rank


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

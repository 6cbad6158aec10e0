"""``NF4Weight``: a frozen stack of expert matrices ``(E, out, in)`` in bitsandbytes' NF4 blockwise format.

The bytes are exactly what ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=double_quant)`` returns for the whole fused tensor, so ``quant_state()`` hands the
tensor to any bitsandbytes routine. Quantization runs one expert at a time (blocks never straddle experts
because ``out * in`` is a multiple of the block size), so a loader never holds more than one expert in
bf16; the second-level (nested) statistics are computed once over all experts, as bitsandbytes does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import bitsandbytes.functional as bnbF
import torch
from torch import nn

from ..kernels.reference import dequantize_nf4_reference, nested_absmax_reference

NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for double-quantized statistics

NF4_CODE_BYTES = 16 * 4
"""The NF4 code book (16 float32 values), stored with every quantized tensor."""
NESTED_CODE_BYTES = 256 * 4
"""The 8-bit code book of double-quantized scales (256 float32 values)."""


def nf4_bytes(numel: int) -> int:
    """Packed 4-bit values of ``numel`` weights."""
    return (numel + 1) // 2


def scale_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """Block scales of ``numel`` weights (blocks of ``blocksize``, the loader's 64): float32 per block, or uint8
    per block + float32 per 256 scales + code books when double-quantized."""
    blocks = math.ceil(numel / blocksize)
    if not double_quant:
        return blocks * 4 + NF4_CODE_BYTES
    return blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + NESTED_CODE_BYTES + 4 + NF4_CODE_BYTES  # + offset


class NF4Weight(nn.Module):
    """Frozen ``(num_experts, out_features, in_features)`` weight in NF4; buffers only, no parameters.

    Buffers: ``packed`` (numel // 2, 1) uint8; ``absmax`` (numel // blocksize,) float32, or uint8 when
    double-quantized together with ``absmax2`` (n // 256,) float32, ``code2`` (256,) float32 and
    ``offset`` () float32; ``code`` (16,) float32 the NF4 code book.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, blocksize: int, packed, absmax, code, nested=None):
        super().__init__()
        num_experts, out_features, in_features = shape
        if (out_features * in_features) % blocksize:
            raise ValueError(
                f"expert matrices of {out_features}x{in_features} are not a whole number of {blocksize}-value blocks"
            )
        self.shape = tuple(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", code)
        self.nested = nested is not None
        if nested is not None:
            absmax2, code2, offset = nested
            self.register_buffer("absmax2", absmax2)
            self.register_buffer("code2", code2)
            self.register_buffer("offset", offset)

    # construction ------------------------------------------------------------------------------
    @classmethod
    def from_experts(cls, experts: Iterable[torch.Tensor], double_quant: bool = True, blocksize: int = 64) -> NF4Weight:
        """Quantize expert matrices one at a time. Each item: (out, in) float tensor on the target device."""
        packed_parts, absmax_parts, code, first = [], [], None, None
        for weight in experts:
            first = weight if first is None else first
            if weight.shape != first.shape:
                raise ValueError(f"expert shapes differ: {tuple(weight.shape)} vs {tuple(first.shape)}")
            packed, state = bnbF.quantize_4bit(
                weight.contiguous(), blocksize=blocksize, compress_statistics=False, quant_type="nf4"
            )
            packed_parts.append(packed)
            absmax_parts.append(state.absmax)
            code = state.code
            del weight
        if first is None:
            raise ValueError("no expert matrices given")
        shape = (len(packed_parts), *first.shape)
        packed = torch.cat(packed_parts)
        absmax = torch.cat(absmax_parts)  # (numel // blocksize,) float32
        del packed_parts, absmax_parts
        nested = None
        if double_quant:
            # Same arithmetic as bitsandbytes.functional.quantize_4bit(compress_statistics=True).
            offset = absmax.mean()
            qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
            nested = (state2.absmax, state2.code, offset)
            absmax = qabsmax
        return cls(shape, first.dtype, blocksize, packed, absmax, code, nested)

    @classmethod
    def quantize(cls, weight: torch.Tensor, double_quant: bool = True, blocksize: int = 64) -> NF4Weight:
        """Quantize a whole ``(E, out, in)`` tensor (convenience for tests and small models)."""
        return cls.from_experts(iter(weight), double_quant=double_quant, blocksize=blocksize)

    def storage_as_parameters(self) -> NF4Weight:
        """Re-register the integer storage (``packed``, and ``absmax`` when double-quantized) as frozen uint8
        parameters; returns self.

        FSDP2 (``fully_shard``) shards parameters, not buffers: after this call it splits the 4-bit storage
        along dim 0 across the ranks and all-gathers it around each forward and backward of the wrapping
        module. uint8 is never cast by FSDP's mixed precision (it casts floating parameters only), so the bytes
        arrive intact. A float32 ``absmax`` (no double quantization) stays a replicated buffer for that reason,
        as do the small tensors (code books, nested scales). Names and state-dict keys stay the same.
        """
        for name in ("packed", "absmax"):
            if name in self._buffers and not self._buffers[name].is_floating_point():
                self._parameters[name] = nn.Parameter(self._buffers.pop(name), requires_grad=False)
        return self

    # views ---------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    def quant_state(self) -> bnbF.QuantState:
        """The bitsandbytes ``QuantState`` of the whole fused tensor."""
        state2 = None
        if self.nested:
            state2 = bnbF.QuantState(absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return bnbF.QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset if self.nested else None,
            state2=state2,
        )

    def expert_absmax(self, expert: int) -> torch.Tensor:
        """(blocks_per_expert,) float32 scales of one expert."""
        per_expert = self.shape[1] * self.shape[2] // self.blocksize
        start, stop = expert * per_expert, (expert + 1) * per_expert
        if not self.nested:
            return self.absmax[start:stop]
        return nested_absmax_reference(self.absmax, self.code2, self.absmax2, self.offset, start, stop, NESTED_BLOCKSIZE)

    def dequantize_expert(self, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) weight of one expert, bit-identical to the matching slice of :meth:`dequantize`."""
        dtype = dtype or self.dtype
        _, out_features, in_features = self.shape
        half = out_features * in_features // 2
        packed = self.packed[expert * half : (expert + 1) * half]
        absmax = self.expert_absmax(expert)
        if self.packed.device.type == "cpu" and in_features % self.blocksize:
            # bitsandbytes' CPU dequantize kernel indexes blocks per row and is wrong when a row is not
            # a whole number of blocks (seen with 0.50.2); the reference computes the flat-block format.
            return dequantize_nf4_reference(packed, absmax, self.code, (out_features, in_features), dtype, self.blocksize)
        state = bnbF.QuantState(
            absmax=absmax.contiguous(), shape=torch.Size((out_features, in_features)), code=self.code,
            blocksize=self.blocksize, quant_type="nf4", dtype=dtype,
        )
        return bnbF.dequantize_4bit(packed, state)

    def dequantize(self) -> torch.Tensor:
        """The whole ``(E, out, in)`` tensor through bitsandbytes (transient: for checks and export)."""
        return bnbF.dequantize_4bit(self.packed, self.quant_state())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nf4, blocksize={self.blocksize}, double_quant={self.nested}"

"""Plain-PyTorch references: the specification every fused kernel in this package must match.

Each function is written for clarity, not speed; the Triton kernels (see the kernels issue) are tested
against them on random inputs of awkward sizes.
"""

from __future__ import annotations

import torch


def nested_absmax_reference(
    qabsmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, start: int, stop: int, blocksize2: int = 256
) -> torch.Tensor:
    """Dequantize entries ``[start, stop)`` of a double-quantized absmax (bitsandbytes' nested format).

    Returns:
        absmax: (stop - start,) float32, ``code2[q] * absmax2[i // blocksize2] + offset``.
    """
    index = torch.arange(start, stop, device=qabsmax.device)
    return code2[qabsmax[start:stop].long()] * absmax2[index // blocksize2] + offset


def dequantize_nf4_reference(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, blocksize: int = 64
) -> torch.Tensor:
    """Dequantize NF4 values packed two to a byte (first value in the high nibble), flat blocks of ``blocksize``.

    Args:
        packed: (numel // 2,) or (numel // 2, 1) uint8.
        absmax: (numel // blocksize,) float32, one scale per block.
        code: (16,) float32, the NF4 code book.
    Returns:
        weight: ``shape`` in ``dtype``, ``code[nibble] * absmax[block]`` rounded once from float32.
    """
    packed = packed.reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1).long()  # (numel,)
    values = code[nibbles] * absmax.repeat_interleave(blocksize)[: nibbles.numel()]
    return values.to(dtype).reshape(shape)


def tokens_by_expert(indices: torch.Tensor):
    """Yield ``(expert, token, slot)`` for every expert chosen at least once in ``indices`` (T, K).

    ``token``, ``slot``: (n,) int64 with ``indices[token, slot] == expert``. Shared by every plain-PyTorch
    routed computation (frozen NF4 experts and the PEFT experts alike).
    """
    for expert in torch.unique(indices).tolist():
        token, slot = torch.where(indices == expert)  # (n,), (n,)
        yield expert, token, slot


def routed_adapter_reference(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    activation=None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Sum of routed bottleneck experts: ``Σ_k w[t,k] · scaling · up[j] σ(down[j] x[t])`` with ``j = indices[t,k]``.

    Args:
        x: (T, D) tokens (already through dropout, if any).
        down: (M, DB, D) down-projections; up: (M, D, DB) up-projections.
        weights: (T, K) gate weights (any float dtype; the product is taken in x's dtype).
        indices: (T, K) int64 expert ids in ``[0, M)``.
    Returns:
        out: (T, D) in x's dtype.
    """
    out = torch.zeros_like(x)
    for expert, token, slot in tokens_by_expert(indices):
        hidden = x[token] @ down[expert].t()  # (n, DB)
        if activation is not None:
            hidden = activation(hidden)
        delta = (hidden @ up[expert].t()) * scaling  # (n, D)
        delta = delta * weights[token, slot, None].to(delta.dtype)
        out = out.index_add(0, token, delta.to(out.dtype))
    return out

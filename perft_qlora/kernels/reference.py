"""Plain-PyTorch references: the specification every fused kernel in this package must match.

Each function is written for clarity, not speed; the Triton kernels (``triton_*.py``) are tested
against them on random inputs of awkward sizes. They are also the CPU path of every op (``dispatch.py``).
"""

from __future__ import annotations

import torch

from .sorting import sort_by_expert


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

    ``token``, ``slot``: (n,) int64 with ``indices[token, slot] == expert``, in (token, slot) order. Shared
    by every plain-PyTorch routed computation; it walks the same ``sort_by_expert`` layout as the kernels.
    """
    if indices.numel() == 0:
        return
    sort = sort_by_expert(indices, int(indices.max()) + 1)
    bounds = sort.offsets.tolist()  # one host sync for the whole loop
    slots = sort.order % indices.shape[1]  # (R,)
    for expert, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        if start < stop:
            yield expert, sort.tokens[start:stop], slots[start:stop]


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


class _NF4ExpertMatmul(torch.autograd.Function):
    """``y = x @ W_e^T`` with ``W_e`` dequantized from NF4 in forward and again in backward.

    Backward: ``dx = dy @ W_e`` (the frozen weight gets no gradient). Saves nothing but the
    ``NF4Weight`` handle and the expert id, so no dequantized weight outlives the op.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, expert: int) -> torch.Tensor:
        ctx.weight, ctx.expert = weight, expert
        return x @ weight.dequantize_expert(expert, x.dtype).t()  # (n, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.weight.dequantize_expert(ctx.expert, grad_out.dtype)  # (out, in)
        return grad_out @ w, None, None  # (n, in)


def nf4_expert_matmul(x: torch.Tensor, weight, expert: int) -> torch.Tensor:
    """(n, in) @ expert ``expert`` of an ``NF4Weight`` transposed -> (n, out)."""
    return _NF4ExpertMatmul.apply(x, weight, expert)


def nf4_expert_mlp_reference(x: torch.Tensor, gate_up, down, weights: torch.Tensor, indices: torch.Tensor, act_fn) -> torch.Tensor:
    """Routed gated-MLP experts ``Σ_k w[t,k] · down_e(act(gate_e x) * up_e x)`` from NF4, one expert at a time.

    Args:
        x: (T, H) tokens. gate_up: NF4Weight (E, 2I, H), gate rows first; down: NF4Weight (E, H, I).
        weights: (T, K) routing weights (float32 for Mixtral: multiplied before the cast, as transformers).
        indices: (T, K) int64 expert ids. act_fn: the model's ``hidden_act`` module.
    Returns:
        out: (T, H) in x's dtype. Each expert is dequantized, used and dropped; backward dequantizes again.
    """
    out = torch.zeros_like(x)  # (T, H)
    for expert, token, slot in tokens_by_expert(indices):  # (n,), (n,)
        gate, up = nf4_expert_matmul(x[token], gate_up, expert).chunk(2, dim=-1)  # (n, I) x2
        y = nf4_expert_matmul(act_fn(gate) * up, down, expert)  # (n, H)
        y = y * weights[token, slot, None]
        out = out.index_add(0, token, y.to(out.dtype))
    return out

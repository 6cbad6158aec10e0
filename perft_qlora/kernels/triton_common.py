"""``@triton.jit`` helpers shared by the Triton kernels: activations, the tile schedule, NF4 tiles.

Imported only by the ``triton_*`` kernel modules, which the dispatch layer imports lazily, so
``import perft_qlora`` works without Triton. Everything here is inlined into its callers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on") and not isinstance(
    tl.zeros, JITFunction
)
"""Whether the kernels run in the interpreter: ``TRITON_INTERPRET=1`` was set before triton was first imported
(triton.language's own helpers are decorated then) and is still set when this module is imported."""

ACTIVATIONS = ("identity", "silu", "relu", "gelu")
"""Activations the kernels compute (``gelu`` is the exact erf form, as ``ACT2FN["gelu"]``)."""


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: true fp32 products for fp32 inputs (tf32 would miss the references)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def nf4_args(weight) -> tuple:
    """The pointer arguments of :func:`nf4_tile` for an ``NF4Weight`` (unused ones repeat ``absmax``)."""
    if weight.nested:
        return weight.packed, weight.absmax, weight.code, weight.absmax2, weight.code2, weight.offset
    return weight.packed, weight.absmax, weight.code, weight.absmax, weight.absmax, weight.absmax


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    """Activation of a float32 tile."""
    if ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "relu":
        y = tl.maximum(x, 0.0)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        y = x
    return y


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """Derivative of :func:`act_fwd` at a float32 tile."""
    if ACT == "silu":
        s = tl.sigmoid(x)
        y = s * (1.0 + x * (1.0 - s))
    elif ACT == "relu":
        y = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == "gelu":
        y = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    else:
        y = tl.full(x.shape, 1.0, tl.float32)
    return y


@triton.jit
def tile_rows(sched_expert, sched_start, offsets, pid, BM: tl.constexpr):
    """Expert (-1: no tile), sorted rows (BM,) int64 and their mask for tile ``pid`` of a TileSchedule."""
    expert = tl.load(sched_expert + pid)
    start = tl.load(sched_start + pid).to(tl.int64)
    end = tl.load(offsets + tl.maximum(expert, 0) + 1)
    rows = start + tl.arange(0, BM)
    return expert, rows, rows < end


@triton.jit
def nf4_tile(
    packed, absmax, code, absmax2, code2, offset, base, rows, rmask, c0, IN,
    NESTED: tl.constexpr, QB: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """Dequantized float32 tile ``W_e[rows, c0:c0+COLS]`` (ROWS, COLS) of an NF4 ``(E, OUT, IN)`` weight.

    ``base`` is the expert's first flat element ``e*OUT*IN`` (int64), ``rows`` (ROWS,) int64 rows of the
    expert, ``c0`` a multiple of QB, ``IN % QB == 0`` and ``COLS % QB == 0``: each row of the tile spans
    ``COLS // QB`` whole quantization blocks, so one scale per (row, block) is loaded and broadcast.
    Byte ``j`` holds flat values ``2j`` (high nibble) and ``2j+1`` (low nibble).
    """
    NB: tl.constexpr = COLS // QB
    # 64-bit only for the expert's base; offsets inside one expert (< 2^31 values) stay 32-bit.
    flat_row = rows.to(tl.int32) * IN  # (ROWS,) first element of each row within the expert
    half = tl.arange(0, COLS // 2)
    # Byte offsets as (row start)//2 + half, the mask on half: the compiler sees COLS//2 contiguous bytes
    # per row and, with IN % 16 == 0 at the runtime's divisibility, emits 8-byte loads instead of single
    # bytes (flat_row + c0 is even: IN and c0 are multiples of QB).
    bmask = rmask[:, None] & ((c0 // 2 + half) < IN // 2)[None, :]
    byte = tl.load(packed + base // 2 + ((flat_row + c0) // 2)[:, None] + half[None, :], mask=bmask, other=0)
    qb = tl.arange(0, NB)
    block = (base // QB).to(tl.int32) + (flat_row[:, None] + c0 + QB * qb[None, :]) // QB  # (ROWS, NB) block ids
    smask = rmask[:, None] & ((c0 + QB * qb) < IN)[None, :]
    if NESTED:
        # bitsandbytes double quantization: absmax = code2[q] * absmax2[block // 256] + offset
        q = tl.load(absmax + block, mask=smask, other=0).to(tl.int32)
        scale = tl.load(code2 + q) * tl.load(absmax2 + block // 256, mask=smask, other=0.0) + tl.load(offset)
    else:
        scale = tl.load(absmax + block, mask=smask, other=0.0)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (ROWS, NB, QB // 2)), (ROWS, COLS // 2))
    hi = tl.load(code + (byte >> 4).to(tl.int32)) * scale
    lo = tl.load(code + (byte & 0xF).to(tl.int32)) * scale
    return tl.reshape(tl.join(hi, lo), (ROWS, COLS))

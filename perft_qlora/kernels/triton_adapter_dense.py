"""Routed adapter, dense masked formulation: every token through all M experts, gated by ``G (T, M)``.

The M down-projections are one ``(M*DB, D)`` matrix and the M up-projections one ``(M*DB, D)``
operand read in place from ``up (M, D, DB)``: ``out = s * (act(x Dn^T) ⊙ G[:, c // DB]) Up``, where
column ``c`` of the hidden layer belongs to expert ``c // DB``. One program owns ``BT`` tokens and the
whole hidden layer (``P = next_pow2(M*DB)`` columns in registers), so x is read once, out written
once, and nothing of size (tokens, D) per expert exists. Unselected experts cost FLOPs, not memory:
right while ``M*DB`` is small next to D (see README.md, "Choosing the formulation").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .targets import tile_family
from .triton_common import act_fwd, act_grad, dot_precision


@dataclass(frozen=True)
class DenseBlocks:
    t: int = 32
    """Tokens per program."""
    d: int = 64
    """Columns of D per step."""
    warps: int = 4
    stages: int = 2


DENSE_TILES = {  # padded hidden width P up to -> tiles that ptxas (sm_90) builds without register spills
    32: DenseBlocks(t=32, d=64, warps=4),
    128: DenseBlocks(t=32, d=64, warps=8),
    256: DenseBlocks(t=16, d=32, warps=8),  # P = 256: the (P, BD) up tile is the big operand
}


DENSE_TILES_SM80 = {**DENSE_TILES, 128: DenseBlocks(t=16, d=64, warps=8)}
"""The table on sm_80/86/89 (``mma.sync``): P = 128 with 16 tokens per program, where the 32-token tile's
weight-gradient kernel spilled 8 B (255 registers; 204 at 16 tokens, ``compile_check``)."""
DENSE_TILE_TABLES = {80: DENSE_TILES_SM80, 90: DENSE_TILES}
"""Tile table per ``targets.tile_family``."""


def default_dense_blocks(width: int, capability: tuple[int, int] | None = None) -> DenseBlocks:
    """The tile table's entry for a padded hidden width P (at most 256); ``capability`` picks the table."""
    table = DENSE_TILE_TABLES[tile_family(capability)]
    return next(blocks for bound, blocks in table.items() if width <= bound)


@triton.jit
def _up_tile(up, c, cmask, d, dmask, D, DB):
    """(P, BD) tile ``Up[c, d] = up[c // DB, d, c % DB]`` of up (M, D, DB)."""
    ptr = up + (c // DB)[:, None].to(tl.int64) * D * DB + d[None, :] * DB + (c % DB)[:, None]
    return tl.load(ptr, mask=cmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _gate_cols(gates, t, tmask, c, cmask, M, DB):
    """(BT, P) float32 gate of each hidden column: ``G[t, c // DB]``."""
    return tl.load(gates + t[:, None] * M + (c // DB)[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _dense_fwd_kernel(
    x, down, up, gates, hpre, out, T, D, DB, M, scaling,
    ACT: tl.constexpr, SAVE_H: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, P: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < T
    t = t.to(tl.int64)
    c = tl.arange(0, P)
    cmask = c < M * DB
    acc = tl.zeros((BT, P), dtype=tl.float32)  # x Dn^T
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        xa = tl.load(x + t[:, None] * D + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
        dn = tl.load(down + c[:, None] * D + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(xa, tl.trans(dn), acc, input_precision=PREC)
    if SAVE_H:
        tl.store(hpre + t[:, None] * (M * DB) + c[None, :], acc, mask=tmask[:, None] & cmask[None, :])
    z = act_fwd(acc, ACT) * _gate_cols(gates, t, tmask, c, cmask, M, DB) * scaling
    z = z.to(out.dtype.element_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        y = tl.dot(z, _up_tile(up, c, cmask, d, dmask, D, DB), input_precision=PREC)  # (BT, BD)
        tl.store(out + t[:, None] * D + d[None, :], y.to(out.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


@triton.jit
def _dense_bwd_dx_kernel(
    dout, down, up, gates, hpre, dgc, dh, dx, T, D, DB, M, scaling,
    ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, P: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < T
    t = t.to(tl.int64)
    c = tl.arange(0, P)
    cmask = c < M * DB
    dz = tl.zeros((BT, P), dtype=tl.float32)  # dout Up^T
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        do = tl.load(dout + t[:, None] * D + d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
        dz = tl.dot(do, tl.trans(_up_tile(up, c, cmask, d, dmask, D, DB)), dz, input_precision=PREC)
    mask = tmask[:, None] & cmask[None, :]
    h = tl.load(hpre + t[:, None] * (M * DB) + c[None, :], mask=mask, other=0.0)
    dz = dz * scaling
    tl.store(dgc + t[:, None] * (M * DB) + c[None, :], dz * act_fwd(h, ACT), mask=mask)  # summed over DB -> dG
    dpre = dz * _gate_cols(gates, t, tmask, c, cmask, M, DB) * act_grad(h, ACT)
    tl.store(dh + t[:, None] * (M * DB) + c[None, :], dpre, mask=mask)
    dpre = dpre.to(dx.dtype.element_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        dn = tl.load(down + c[:, None] * D + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        y = tl.dot(dpre, dn, input_precision=PREC)
        tl.store(dx + t[:, None] * D + d[None, :], y.to(dx.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


@triton.jit
def _dense_bwd_dw_kernel(
    x, dout, gates, hpre, dh, ddown_part, dup_part, T, D, DB, M, scaling, span,
    ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, P: tl.constexpr,
):
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    dmask = d < D
    c = tl.arange(0, P)
    cmask = c < M * DB
    first = tl.program_id(1) * span
    last = tl.minimum(first + span, T)
    acc_dn = tl.zeros((P, BD), dtype=tl.float32)  # Σ_t dh[t, c] x[t, d]
    acc_up = tl.zeros((P, BD), dtype=tl.float32)  # Σ_t z[t, c] dout[t, d]
    for t0 in range(first, last, BT):
        t = t0 + tl.arange(0, BT)
        tmask = t < last
        t = t.to(tl.int64)
        tm = tmask[:, None] & dmask[None, :]
        xa = tl.load(x + t[:, None] * D + d[None, :], mask=tm, other=0.0)
        do = tl.load(dout + t[:, None] * D + d[None, :], mask=tm, other=0.0)
        hm = tmask[:, None] & cmask[None, :]
        dpre = tl.load(dh + t[:, None] * (M * DB) + c[None, :], mask=hm, other=0.0).to(xa.dtype)
        h = tl.load(hpre + t[:, None] * (M * DB) + c[None, :], mask=hm, other=0.0)
        z = act_fwd(h, ACT) * _gate_cols(gates, t, tmask, c, cmask, M, DB) * scaling
        acc_dn = tl.dot(tl.trans(dpre), xa, acc_dn, input_precision=PREC)
        acc_up = tl.dot(tl.trans(z.to(do.dtype)), do, acc_up, input_precision=PREC)
    part = tl.program_id(1).to(tl.int64) * (M * DB) * D + c[:, None] * D + d[None, :]
    tl.store(ddown_part + part, acc_dn, mask=cmask[:, None] & dmask[None, :])
    tl.store(dup_part + part, acc_up, mask=cmask[:, None] & dmask[None, :])


def hidden_width(num_experts: int, bottleneck: int) -> int:
    """P, the padded hidden width one program holds: next power of two of M*DB, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(num_experts * bottleneck))


def dense_forward(x, down, up, gates, act: str, scaling: float, save_h: bool, blocks: DenseBlocks):
    """x: (T, D), down: (M, DB, D), up: (M, D, DB), gates: (T, M) float32.

    Returns:
        out: (T, D) in x's dtype; hpre: (T, M*DB) float32 pre-activations (empty unless ``save_h``).
    """
    tokens, width = x.shape
    m, db, _ = down.shape
    out = torch.empty_like(x)
    hpre = torch.empty(tokens if save_h else 0, m * db, device=x.device, dtype=torch.float32)
    _dense_fwd_kernel[(triton.cdiv(tokens, blocks.t),)](
        x, down, up, gates, hpre if save_h else gates, out, tokens, width, db, m, scaling, ACT=act, SAVE_H=save_h,
        PREC=dot_precision(x.dtype), BT=blocks.t, BD=blocks.d, P=hidden_width(m, db),
        num_warps=blocks.warps, num_stages=blocks.stages,
    )
    return out, hpre


def dense_backward(dout, x, down, up, gates, hpre, act: str, scaling: float, blocks: DenseBlocks, num_splits: int):
    """Gradients of :func:`dense_forward`.

    Returns:
        dx: (T, D) in x's dtype; ddown: (M, DB, D), dup: (M, D, DB) float32; dgates: (T, M) float32.
    """
    tokens, width = x.shape
    m, db, _ = down.shape
    p = hidden_width(m, db)
    opts = dict(ACT=act, PREC=dot_precision(x.dtype), BT=blocks.t, BD=blocks.d, P=p, num_warps=blocks.warps)
    dx = torch.empty_like(x)
    dgc = torch.empty(tokens, m * db, device=x.device, dtype=torch.float32)
    dh = torch.empty_like(dgc)
    _dense_bwd_dx_kernel[(triton.cdiv(tokens, blocks.t),)](
        dout, down, up, gates, hpre, dgc, dh, dx, tokens, width, db, m, scaling, **opts
    )
    span = triton.cdiv(triton.cdiv(tokens, num_splits), blocks.t) * blocks.t  # tokens per split, whole tiles
    splits = max(1, triton.cdiv(tokens, span))
    ddown = torch.empty(splits, m * db, width, device=x.device, dtype=torch.float32)
    dup = torch.empty_like(ddown)
    _dense_bwd_dw_kernel[(triton.cdiv(width, blocks.d), splits)](
        x, dout, gates, hpre, dh, ddown, dup, tokens, width, db, m, scaling, span, **opts
    )
    ddown = ddown.sum(0).view(m, db, width)  # fixed-order sum over splits: deterministic
    dup = dup.sum(0).view(m, db, width).transpose(1, 2)
    return dx, ddown, dup, dgc.view(tokens, m, db).sum(-1)

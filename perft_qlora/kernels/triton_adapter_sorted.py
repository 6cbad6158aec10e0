"""Routed adapter, sorted grouped formulation: only the selected (token, expert) pairs are computed.

Rows are the (token, slot) pairs sorted by expert (``sorting.sort_by_expert``) in ``BM``-row tiles of
one expert each. A program computes its rows' bottleneck ``x[token] down_e^T`` (BM, DB) over the whole
of D, applies the activation and the gate weight, then multiplies by ``up_e`` one D-block at a time
and adds the result into a float32 ``(T, D)`` accumulator with ``tl.atomic_add`` (relaxed: a ``red``
instruction, no acquire/release fence; only the sum matters): the K rows of a
token meet only there, so no ``(T*K, D)`` buffer is ever written. The weight gradients are one
program per (expert, D-block) walking that expert's rows, with no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .sorting import ExpertSort, TileSchedule
from .targets import tile_family
from .triton_common import act_fwd, act_grad, dot_precision, tile_rows


@dataclass(frozen=True)
class SortedBlocks:
    m: int = 32
    """Sorted rows per tile."""
    d: int = 64
    """Columns of D per step."""
    warps: int = 4
    stages: int = 2


SORTED_TILES = {  # padded bottleneck PDB up to -> tiles; 8 warps from PDB = 128 on (4 spill on sm_90)
    64: SortedBlocks(warps=4),
    128: SortedBlocks(warps=8),
}


SORTED_TILES_SM80 = {**SORTED_TILES, 128: SortedBlocks(m=16, warps=8)}
"""The table on sm_80/86/89 (``mma.sync``): PDB = 128 with 16-row tiles, where the 32-row tile's
weight-gradient kernel spilled 8 B (255 registers; at 16 rows 254 on sm_80 and 186 on sm_86 / sm_89, no
stack, ``compile_check``)."""
SORTED_TILE_TABLES = {80: SORTED_TILES_SM80, 90: SORTED_TILES}
"""Tile table per ``targets.tile_family``."""


def default_sorted_blocks(bottleneck: int, capability: tuple[int, int] | None = None) -> SortedBlocks:
    """The tile table's entry for a bottleneck DB (at most 128); ``capability`` picks the table."""
    table = SORTED_TILE_TABLES[tile_family(capability)]
    return next(blocks for bound, blocks in table.items() if bottleneck <= bound)


@triton.jit
def _expert_tile(w, expert, c, cmask, d, dmask, D, DB, TRANSPOSED: tl.constexpr):
    """(PDB, BD) tile ``[c, d]``: ``down_e[c, d]`` of (M, DB, D), or with TRANSPOSED ``up_e[d, c]`` of (M, D, DB)."""
    if TRANSPOSED:
        ptr = w + expert.to(tl.int64) * D * DB + d[None, :] * DB + c[:, None]
    else:
        ptr = w + expert.to(tl.int64) * DB * D + c[:, None] * D + d[None, :]
    return tl.load(ptr, mask=cmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _sorted_fwd_kernel(
    x, tokens, row_w, sched_e, sched_s, offsets, down, up, hs, out32, D, DB, scaling,
    ACT: tl.constexpr, SAVE_H: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PDB: tl.constexpr,
):
    expert, rows, rmask = tile_rows(sched_e, sched_s, offsets, tl.program_id(0), BM)
    if expert < 0:
        return
    tok = tl.load(tokens + rows, mask=rmask, other=0)
    c = tl.arange(0, PDB)
    cmask = c < DB
    acc = tl.zeros((BM, PDB), dtype=tl.float32)  # x[token] down_e^T
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        xa = tl.load(x + tok[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(xa, tl.trans(_expert_tile(down, expert, c, cmask, d, dmask, D, DB, False)), acc, input_precision=PREC)
    if SAVE_H:
        tl.store(hs + rows[:, None] * DB + c[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    w = tl.load(row_w + rows, mask=rmask, other=0.0)
    z = (act_fwd(acc, ACT) * (w * scaling)[:, None]).to(x.dtype.element_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        y = tl.dot(z, _expert_tile(up, expert, c, cmask, d, dmask, D, DB, True), input_precision=PREC)  # (BM, BD)
        tl.atomic_add(out32 + tok[:, None] * D + d[None, :], y, mask=rmask[:, None] & dmask[None, :], sem="relaxed")


@triton.jit
def _sorted_bwd_dx_kernel(
    dout, tokens, row_w, sched_e, sched_s, offsets, down, up, hs, dhs, dw, dx32, D, DB, scaling,
    ACT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PDB: tl.constexpr,
):
    expert, rows, rmask = tile_rows(sched_e, sched_s, offsets, tl.program_id(0), BM)
    if expert < 0:
        return
    tok = tl.load(tokens + rows, mask=rmask, other=0)
    c = tl.arange(0, PDB)
    cmask = c < DB
    q = tl.zeros((BM, PDB), dtype=tl.float32)  # dout[token] up_e
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        do = tl.load(dout + tok[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        q = tl.dot(do, tl.trans(_expert_tile(up, expert, c, cmask, d, dmask, D, DB, True)), q, input_precision=PREC)
    hmask = rmask[:, None] & cmask[None, :]
    h = tl.load(hs + rows[:, None] * DB + c[None, :], mask=hmask, other=0.0)
    q = q * scaling
    tl.store(dw + rows, tl.sum(q * act_fwd(h, ACT), axis=1), mask=rmask)
    w = tl.load(row_w + rows, mask=rmask, other=0.0)
    dpre = q * w[:, None] * act_grad(h, ACT)
    tl.store(dhs + rows[:, None] * DB + c[None, :], dpre, mask=hmask)
    dpre = dpre.to(dout.dtype.element_ty)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        dmask = d < D
        y = tl.dot(dpre, _expert_tile(down, expert, c, cmask, d, dmask, D, DB, False), input_precision=PREC)
        tl.atomic_add(dx32 + tok[:, None] * D + d[None, :], y, mask=rmask[:, None] & dmask[None, :], sem="relaxed")


@triton.jit
def _sorted_bwd_dw_kernel(
    x, dout, tokens, row_w, offsets, hs, dhs, ddown, dup, D, DB, scaling,
    ACT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PDB: tl.constexpr,
):
    expert = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = d < D
    c = tl.arange(0, PDB)
    cmask = c < DB
    first = tl.load(offsets + expert)
    last = tl.load(offsets + expert + 1)
    acc_dn = tl.zeros((PDB, BD), dtype=tl.float32)  # Σ_rows dh[r, c] x[token, d]
    acc_up = tl.zeros((BD, PDB), dtype=tl.float32)  # Σ_rows dout[token, d] z[r, c]
    for r0 in range(first, last, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < last
        tok = tl.load(tokens + rows, mask=rmask, other=0)
        xa = tl.load(x + tok[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        do = tl.load(dout + tok[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        hmask = rmask[:, None] & cmask[None, :]
        dpre = tl.load(dhs + rows[:, None] * DB + c[None, :], mask=hmask, other=0.0).to(xa.dtype)
        h = tl.load(hs + rows[:, None] * DB + c[None, :], mask=hmask, other=0.0)
        w = tl.load(row_w + rows, mask=rmask, other=0.0)
        z = (act_fwd(h, ACT) * (w * scaling)[:, None]).to(do.dtype)
        acc_dn = tl.dot(tl.trans(dpre), xa, acc_dn, input_precision=PREC)
        acc_up = tl.dot(tl.trans(do), z, acc_up, input_precision=PREC)
    base = expert.to(tl.int64) * DB * D
    tl.store(ddown + base + c[:, None] * D + d[None, :], acc_dn.to(ddown.dtype.element_ty), mask=cmask[:, None] & dmask[None, :])
    tl.store(dup + base + d[:, None] * DB + c[None, :], acc_up.to(dup.dtype.element_ty), mask=dmask[:, None] & cmask[None, :])


def _opts(x: torch.Tensor, bottleneck: int, act: str, blocks: SortedBlocks) -> dict:
    return dict(
        ACT=act, PREC=dot_precision(x.dtype), BM=blocks.m, BD=blocks.d, PDB=max(16, triton.next_power_of_2(bottleneck)),
        num_warps=blocks.warps, num_stages=blocks.stages,
    )


def sorted_forward(x, down, up, row_w, sort: ExpertSort, sched: TileSchedule, act, scaling, save_h, blocks):
    """x: (T, D), down: (M, DB, D), up: (M, D, DB), row_w: (R,) float32 gate of each sorted row.

    Returns:
        out: (T, D) in x's dtype; hs: (R, DB) float32 pre-activations (empty unless ``save_h``).
    """
    tokens, width = x.shape
    db = down.shape[1]
    out32 = torch.zeros(tokens, width, device=x.device, dtype=torch.float32)
    hs = torch.empty(sort.order.numel() if save_h else 0, db, device=x.device, dtype=torch.float32)
    _sorted_fwd_kernel[(sched.expert.numel(),)](
        x, sort.tokens, row_w, sched.expert, sched.start, sort.offsets, down, up, hs if save_h else out32, out32,
        width, db, scaling, SAVE_H=save_h, **_opts(x, db, act, blocks),
    )
    return out32.to(x.dtype), hs


def sorted_backward(dout, x, down, up, row_w, sort: ExpertSort, sched: TileSchedule, hs, act, scaling, blocks):
    """Gradients of :func:`sorted_forward`.

    Returns:
        dx: (T, D) in x's dtype; ddown: (M, DB, D), dup: (M, D, DB) in the weights' dtype;
        drow_w: (R,) float32 gradient of each sorted row's gate.
    """
    tokens, width = x.shape
    m, db, _ = down.shape
    rows = sort.order.numel()
    opts = _opts(x, db, act, blocks)
    dx32 = torch.zeros(tokens, width, device=x.device, dtype=torch.float32)
    dhs = torch.empty(rows, db, device=x.device, dtype=torch.float32)
    drow_w = torch.empty(rows, device=x.device, dtype=torch.float32)
    _sorted_bwd_dx_kernel[(sched.expert.numel(),)](
        dout, sort.tokens, row_w, sched.expert, sched.start, sort.offsets, down, up, hs, dhs, drow_w, dx32,
        width, db, scaling, **opts,
    )
    ddown = torch.empty_like(down)
    dup = torch.empty_like(up)
    _sorted_bwd_dw_kernel[(m, triton.cdiv(width, blocks.d))](
        x, dout, sort.tokens, row_w, sort.offsets, hs, dhs, ddown, dup, width, db, scaling, **opts
    )
    return dx32.to(x.dtype), ddown, dup, drow_w

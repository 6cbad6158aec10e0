"""Triton kernels of the NF4 grouped expert MLP and their launchers on plain tensors.

Rows are the (token, slot) pairs sorted by expert (``sorting.sort_by_expert``), walked in
``BM``-row tiles (``sorting.tile_schedule``). Every kernel dequantizes its NF4 weight tile in
registers (``triton_common.nf4_tile``) right before ``tl.dot``; no bf16 weight exists in memory.

- ``_gate_up_fwd_kernel``: ``h = act(x W_g^T) * (x W_u^T)`` with the gate and up rows of the fused
  ``(E, 2I, H)`` weight in two accumulators; optionally stores the pre-activations ``ab`` for backward.
- ``_rows_matmul_kernel``: ``y = a W_e^T`` (TRANS_W) or ``y = a W_e``, rows optionally scaled by the
  routing weight, stored to the row's slot ``order[r]``: the down projection (forward) and the
  input gradient through ``gate_up`` (backward).
- ``_down_fwd_splitk_kernel``: the down projection with K (= I) split over a third grid axis at decode
  tiles: float32 partials ``(splits, R, H)``, summed in a fixed order by the caller (no atomics).
- ``_down_bwd_kernel``: ``g = dout[token] W_d`` with the whole SiLU-gate backward in the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .sorting import ExpertSort, TileSchedule
from .targets import tile_family
from .triton_common import act_fwd, act_grad, dot_precision, nf4_args, nf4_tile, tile_rows


@dataclass(frozen=True)
class NF4Blocks:
    """Tile sizes: ``n`` and ``k`` are multiples of the NF4 block (64); ``m`` >= 16 (tl.dot)."""

    m: int = 64
    n: int = 64
    k: int = 64
    warps: int = 4
    stages: int = 3
    split_k: int = 1
    """K slices of the down projection's forward (``_down_fwd_splitk_kernel`` when > 1; backward never splits)."""


NF4_TILES = {  # mean rows per active expert up to -> tiles (BM can't go under triton.autotune: the schedule uses it)
    16: NF4Blocks(m=16, warps=4, split_k=8),  # decode
    32: NF4Blocks(m=32, warps=4, split_k=4),
    128: NF4Blocks(m=64, warps=8),
    None: NF4Blocks(m=128, warps=8),  # training batches (OLMoE 16x256 tokens: 512 rows per expert)
}
"""Tile table of the NF4 kernels, by mean rows per active expert (``None``: any larger). ``compile_check``
builds every entry (sm_90, Triton 3.9, runtime attributes): none spills; m=128 does twice m=64's MMA
work per K-step in the same ~380-instruction gate_up loop (157 vs 112 registers). BN=128 at m=128
spills (gate_up forward 16 B, down backward 792 B of stack), so N stays 64. Which tile is fastest is
the GPU benchmark's call (``bench gpu-check``). The decode tiles split the down projection's K into
``split_k`` slices when K is at least ``SPLIT_K_MIN_INNER`` (Mixtral, I = 14336: 8 or 4 slices instead of
one 224-step K loop over few output tiles); the slice counts are a starting point, not a measured optimum."""

NF4_TILES_SM80 = {**NF4_TILES, None: replace(NF4_TILES[None], stages=2)}
"""The tile table on sm_80/86/89 (``mma.sync``: the accumulators and the epilogue share 255 registers per
thread): the m=128 training tile with 2 pipeline stages instead of 3, where its exact-GELU gate_up forward
spilled 8 B at 3 stages (sm_80, sm_86, sm_89) and builds in 186 registers at 2 (``compile_check``)."""
NF4_TILE_TABLES = {80: NF4_TILES_SM80, 90: NF4_TILES}
"""Tile table per ``targets.tile_family``."""

SPLIT_K_MIN_INNER = 4096
"""Smallest intermediate size I (the down projection's K) at which the decode tiles split K (OLMoE's 1024 does not)."""


def default_nf4_blocks(num_rows: int, num_experts: int, inner: int, capability: tuple[int, int] | None = None) -> NF4Blocks:
    """The tile table's entry for the mean rows per active expert (16 when decoding, more in training).

    ``inner`` is the intermediate size I: below ``SPLIT_K_MIN_INNER`` the down projection is not split.
    ``capability``: the GPU's, which picks the table (``NF4_TILE_TABLES``); None: the sm_90 one.
    """
    per_expert = num_rows / max(1, min(num_experts, num_rows))
    for bound, blocks in NF4_TILE_TABLES[tile_family(capability)].items():
        if bound is None or per_expert <= bound:
            return blocks if inner >= SPLIT_K_MIN_INNER else replace(blocks, split_k=1)
    raise AssertionError("NF4_TILES needs a None entry")


@triton.jit
def _gate_up_fwd_kernel(
    x, tokens, sched_e, sched_s, offsets, wp, wa, wc, wa2, wc2, wo, h_out, ab_out, H, I, stride_x,
    ACT: tl.constexpr, STORE_AB: tl.constexpr, NESTED: tl.constexpr, QB: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    expert, rows, rmask = tile_rows(sched_e, sched_s, offsets, tl.program_id(0), BM)
    if expert < 0:
        return
    tok = tl.load(tokens + rows, mask=rmask, other=0)  # (BM,) int64
    n = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,) columns of h, rows of W_g
    nmask = n < I
    base = expert.to(tl.int64) * 2 * I * H
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(x + tok[:, None] * stride_x + kk[None, :], mask=rmask[:, None] & (kk < H)[None, :], other=0.0)
        w_g = nf4_tile(wp, wa, wc, wa2, wc2, wo, base, n.to(tl.int64), nmask, k0, H, NESTED, QB, BN, BK)
        w_u = nf4_tile(wp, wa, wc, wa2, wc2, wo, base, (I + n).to(tl.int64), nmask, k0, H, NESTED, QB, BN, BK)
        acc_g = tl.dot(a, tl.trans(w_g.to(a.dtype)), acc_g, input_precision=PREC)  # (BM, BN)
        acc_u = tl.dot(a, tl.trans(w_u.to(a.dtype)), acc_u, input_precision=PREC)
    mask = rmask[:, None] & nmask[None, :]
    h = act_fwd(acc_g, ACT) * acc_u
    tl.store(h_out + rows[:, None] * I + n[None, :], h.to(h_out.dtype.element_ty), mask=mask)
    if STORE_AB:
        ab_rows = ab_out + rows[:, None] * (2 * I) + n[None, :]
        tl.store(ab_rows, acc_g.to(ab_out.dtype.element_ty), mask=mask)
        tl.store(ab_rows + I, acc_u.to(ab_out.dtype.element_ty), mask=mask)


@triton.jit
def _rows_matmul_kernel(
    a, row_scale, order, sched_e, sched_s, offsets, wp, wa, wc, wa2, wc2, wo, y, KA, N, OUT, IN,
    TRANS_W: tl.constexpr, SCALE: tl.constexpr, NESTED: tl.constexpr, QB: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    expert, rows, rmask = tile_rows(sched_e, sched_s, offsets, tl.program_id(0), BM)
    if expert < 0:
        return
    n = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,) output columns
    nmask = n < N
    base = expert.to(tl.int64) * OUT * IN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KA, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < KA
        x = tl.load(a + rows[:, None] * KA + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if TRANS_W:  # y = a W^T: the tile is W[n, kk] (BN, BK)
            w = nf4_tile(wp, wa, wc, wa2, wc2, wo, base, n.to(tl.int64), nmask, k0, IN, NESTED, QB, BN, BK)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PREC)
        else:  # y = a W: the tile is W[kk, n] (BK, BN), n0 a multiple of QB
            n0 = tl.program_id(1) * BN
            w = nf4_tile(wp, wa, wc, wa2, wc2, wo, base, kk.to(tl.int64), kmask, n0, IN, NESTED, QB, BK, BN)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PREC)
    if SCALE:
        acc = acc * tl.load(row_scale + rows, mask=rmask, other=0.0)[:, None]
    slot = tl.load(order + rows, mask=rmask, other=0)  # (BM,) int64
    tl.store(y + slot[:, None] * N + n[None, :], acc.to(y.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_fwd_splitk_kernel(
    h, row_scale, order, sched_e, sched_s, offsets, wp, wa, wc, wa2, wc2, wo, y_part, I, H, KSPAN, slots,
    NESTED: tl.constexpr, QB: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``y_part[s, order[r]] = w_r · h[r, ks] D_e[:, ks]^T`` over K slice ``ks = [s·KSPAN, (s+1)·KSPAN) ∩ [0, I)``.

    KSPAN is a multiple of BK; an empty slice (past I) stores zeros, so every partial is written.
    """
    expert, rows, rmask = tile_rows(sched_e, sched_s, offsets, tl.program_id(0), BM)
    if expert < 0:
        return
    n = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,) output columns (H)
    nmask = n < H
    base = expert.to(tl.int64) * H * I
    k_lo = tl.program_id(2) * KSPAN
    k_hi = tl.minimum(k_lo + KSPAN, I)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < I  # a slice is whole BK steps: only I's tail is masked
        x = tl.load(h + rows[:, None] * I + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = nf4_tile(wp, wa, wc, wa2, wc2, wo, base, n.to(tl.int64), nmask, k0, I, NESTED, QB, BN, BK)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PREC)
    acc = acc * tl.load(row_scale + rows, mask=rmask, other=0.0)[:, None]
    slot = tl.load(order + rows, mask=rmask, other=0)  # (BM,) int64
    out = y_part + tl.program_id(2).to(tl.int64) * slots * H
    tl.store(out + slot[:, None] * H + n[None, :], acc, mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _down_bwd_kernel(
    dout, tokens, row_w, sched_e, sched_s, offsets, wp, wa, wc, wa2, wc2, wo, ab, dab, dw_part, H, I, stride_d,
    ACT: tl.constexpr, NESTED: tl.constexpr, QB: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    expert, rows, rmask = tile_rows(sched_e, sched_s, offsets, tl.program_id(0), BM)
    if expert < 0:
        return
    tok = tl.load(tokens + rows, mask=rmask, other=0)
    n0 = tl.program_id(1) * BN
    n = n0 + tl.arange(0, BN)  # (BN,) columns of I
    nmask = n < I
    base = expert.to(tl.int64) * H * I
    g = tl.zeros((BM, BN), dtype=tl.float32)  # g = dout[token] W_d, W_d (H, I)
    for k0 in range(0, H, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < H
        do = tl.load(dout + tok[:, None] * stride_d + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = nf4_tile(wp, wa, wc, wa2, wc2, wo, base, kk.to(tl.int64), kmask, n0, I, NESTED, QB, BK, BN)
        g = tl.dot(do, w.to(do.dtype), g, input_precision=PREC)
    mask = rmask[:, None] & nmask[None, :]
    ab_rows = ab + rows[:, None] * (2 * I) + n[None, :]
    pre_g = tl.load(ab_rows, mask=mask, other=0.0).to(tl.float32)
    pre_u = tl.load(ab_rows + I, mask=mask, other=0.0).to(tl.float32)
    act = act_fwd(pre_g, ACT)
    # d(routing weight) = <dout, W_d h> = <g, h>: partial sum over this column tile
    tl.store(dw_part + rows * tl.num_programs(1) + tl.program_id(1), tl.sum(g * act * pre_u, axis=1), mask=rmask)
    dh = g * tl.load(row_w + rows, mask=rmask, other=0.0)[:, None]
    dab_rows = dab + rows[:, None] * (2 * I) + n[None, :]
    tl.store(dab_rows, (dh * pre_u * act_grad(pre_g, ACT)).to(dab.dtype.element_ty), mask=mask)
    tl.store(dab_rows + I, (dh * act).to(dab.dtype.element_ty), mask=mask)


def _launch_opts(blocks: NF4Blocks, weight, dtype: torch.dtype) -> dict:
    return dict(
        NESTED=bool(weight.nested), QB=weight.blocksize, PREC=dot_precision(dtype),
        BM=blocks.m, num_warps=blocks.warps, num_stages=blocks.stages,
    )


def gate_up_forward(x, sort: ExpertSort, sched: TileSchedule, gate_up, act: str, store_ab: bool, blocks: NF4Blocks):
    """Fused gate/up GEMM + activation over the sorted rows.

    Args:
        x: (T, H) tokens, unit stride along H. gate_up: NF4Weight (E, 2I, H).
    Returns:
        h: (R, I) ``act(gate) * up`` in x's dtype; ab: (R, 2I) pre-activations [gate | up] in x's dtype
        (empty when ``store_ab`` is false).
    """
    _, two_i, hidden = gate_up.shape
    inter = two_i // 2
    rows = sort.order.numel()
    h = torch.empty(rows, inter, device=x.device, dtype=x.dtype)
    ab = torch.empty(rows if store_ab else 0, two_i, device=x.device, dtype=x.dtype)
    grid = (sched.expert.numel(), triton.cdiv(inter, blocks.n))
    _gate_up_fwd_kernel[grid](  # h stands in for ab when STORE_AB is false (never written)
        x, sort.tokens, sched.expert, sched.start, sort.offsets, *nf4_args(gate_up), h, ab if store_ab else h,
        hidden, inter, x.stride(0),
        ACT=act, STORE_AB=store_ab, BN=blocks.n, BK=blocks.k, **_launch_opts(blocks, gate_up, x.dtype),
    )
    return h, ab


def rows_matmul(a, sort: ExpertSort, sched: TileSchedule, weight, trans_w: bool, row_scale, blocks: NF4Blocks):
    """Per-row ``a[r] W_e^T`` (trans_w) or ``a[r] W_e``, times ``row_scale[r]``, stored at row ``order[r]``.

    Args:
        a: (R, KA) contiguous sorted rows, KA = IN (trans_w) or OUT. weight: NF4Weight (E, OUT, IN).
        row_scale: (R,) float32 or None.
    Returns:
        y: (R, N) in a's dtype in slot order (``y.view(T, K, N)``), N = OUT (trans_w) or IN.
    """
    _, out_f, in_f = weight.shape
    width = out_f if trans_w else in_f
    y = torch.empty(a.shape[0], width, device=a.device, dtype=a.dtype)
    scale = row_scale if row_scale is not None else a  # unused pointer when SCALE is false
    grid = (sched.expert.numel(), triton.cdiv(width, blocks.n))
    _rows_matmul_kernel[grid](
        a, scale, sort.order, sched.expert, sched.start, sort.offsets, *nf4_args(weight), y, a.shape[1], width,
        out_f, in_f, TRANS_W=trans_w, SCALE=row_scale is not None, BN=blocks.n, BK=blocks.k,
        **_launch_opts(blocks, weight, a.dtype),
    )
    return y


def down_forward_splitk(h, sort: ExpertSort, sched: TileSchedule, down, row_scale, blocks: NF4Blocks):
    """Down projection ``w_r · h[r] D_e^T`` with K = I split into ``blocks.split_k`` slices of whole BK steps.

    Args:
        h: (R, I) contiguous sorted rows. down: NF4Weight (E, H, I). row_scale: (R,) float32.
    Returns:
        y_part: (split_k, R, H) float32 partial rows in slot order; ``y_part.sum(0)`` is ``rows_matmul``'s y.
        Slices past I (when ``split_k`` BK-rounded slices overshoot) are zeros.
    """
    _, hidden, inter = down.shape
    rows = h.shape[0]
    span = triton.cdiv(triton.cdiv(inter, blocks.split_k), blocks.k) * blocks.k  # K per slice, whole BK steps
    y_part = torch.empty(blocks.split_k, rows, hidden, device=h.device, dtype=torch.float32)
    grid = (sched.expert.numel(), triton.cdiv(hidden, blocks.n), blocks.split_k)
    _down_fwd_splitk_kernel[grid](
        h, row_scale, sort.order, sched.expert, sched.start, sort.offsets, *nf4_args(down), y_part, inter, hidden,
        span, rows, BN=blocks.n, BK=blocks.k, **_launch_opts(blocks, down, h.dtype),
    )
    return y_part


def down_backward(dout, sort: ExpertSort, sched: TileSchedule, down, ab, row_w, act: str, blocks: NF4Blocks):
    """``g = dout[token] W_d`` and the gated-activation backward of each sorted row.

    Args:
        dout: (T, H) output gradient. down: NF4Weight (E, H, I). ab: (R, 2I) saved pre-activations.
        row_w: (R,) float32 routing weight of each row.
    Returns:
        dab: (R, 2I) gradient of [gate | up] pre-activations in dout's dtype;
        dw: (R,) float32 gradient of each row's routing weight, ``<g, h>``.
    """
    _, hidden, inter = down.shape
    rows = sort.order.numel()
    dab = torch.empty(rows, 2 * inter, device=dout.device, dtype=dout.dtype)
    n_tiles = triton.cdiv(inter, blocks.n)
    dw_part = torch.empty(rows, n_tiles, device=dout.device, dtype=torch.float32)
    grid = (sched.expert.numel(), n_tiles)
    _down_bwd_kernel[grid](
        dout, sort.tokens, row_w, sched.expert, sched.start, sort.offsets, *nf4_args(down), ab, dab, dw_part,
        hidden, inter, dout.stride(0), ACT=act, BN=blocks.n, BK=blocks.k, **_launch_opts(blocks, down, dout.dtype),
    )
    return dab, dw_part.sum(dim=1)  # fixed-order sum over column tiles: deterministic

"""``torch.autograd.Function``s over the Triton launchers; the dispatch layer (``dispatch.py``) calls these.

Each Function owns the routing layout (sort, tile schedule, gate matrix), calls the launchers of one
``triton_*`` module, and states its backward math in its docstring. Tensors arrive contiguous.
"""

from __future__ import annotations

import torch

from .sorting import ExpertSort, TileSchedule, gate_matrix, sort_by_expert, tile_schedule
from .targets import device_capability
from .triton_adapter_dense import DenseBlocks, default_dense_blocks, dense_backward, dense_forward, hidden_width
from .triton_adapter_sorted import SortedBlocks, default_sorted_blocks, sorted_backward, sorted_forward
from .triton_nf4_mlp import (
    NF4Blocks,
    default_nf4_blocks,
    down_backward,
    down_forward_splitk,
    gate_up_forward,
    rows_matmul,
)


def _capability(x: torch.Tensor) -> tuple[int, int] | None:
    """The GPU's capability, which picks the tile table (None on CPU: the interpreter takes the sm_90 table)."""
    return device_capability(x.device) if x.is_cuda else None


def _sum_slots(y: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """(T*K, N) rows in slot order -> (T, N): fixed-order sum over the K slots (deterministic).

    Written in y's dtype with float32 accumulation (torch reduces bf16/fp16 in float32), so no (T, N)
    float32 tensor is written and cast afterwards.
    """
    return y.view(tokens, -1, y.shape[-1]).sum(dim=1).to(dtype)


class NF4ExpertMLPFunction(torch.autograd.Function):
    """``out[t] = Σ_k w[t,k] · D_e (act(G_e x_t) ⊙ U_e x_t)``, ``e = indices[t,k]``, experts frozen in NF4.

    Per sorted row r = (t, k, e): ``a = G_e x_t``, ``b = U_e x_t`` (saved as ``ab``, (R, 2I)),
    ``h = act(a) ⊙ b``, ``y = D_e h``. With ``g = D_e^T dout_t`` (one grouped GEMM):

    - ``dw[t,k] = <dout_t, y> = <g, h>``  (h recomputed from ab in the epilogue, never stored)
    - ``dh = w g``, ``da = dh ⊙ b ⊙ act'(a)``, ``db = dh ⊙ act(a)``
    - ``dx_t = Σ_k [G_e; U_e]^T [da; db]``  (second grouped GEMM, NF4 re-dequantized, summed over k)

    The weights get no gradient. Saved: ``ab`` (R, 2I) in x's dtype and the routing layout; not x,
    not h, not y and no dequantized weight. Recomputing ``ab`` instead would save R·2I values but
    cost a third grouped GEMM (+2/3 of the forward FLOPs) in every backward.

    At decode tiles with a long K (``blocks.split_k > 1``) the forward's ``y`` comes from float32 K-slice
    partials ``(S, R, H)`` summed over S, then over k; the backward is the same either way.
    """

    @staticmethod
    def forward(ctx, x, weights, indices, gate_up, down, act: str, blocks: NF4Blocks | None):
        tokens, top_k = indices.shape
        num_experts = gate_up.shape[0]
        rows = tokens * top_k
        blocks = blocks or default_nf4_blocks(rows, num_experts, down.shape[2], _capability(x))
        sort = sort_by_expert(indices, num_experts)
        sched = tile_schedule(sort.offsets, rows, blocks.m)
        store_ab = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        h, ab = gate_up_forward(x, sort, sched, gate_up, act, store_ab, blocks)  # (R, I), (R, 2I)
        row_w = weights.reshape(-1)[sort.order].float()  # (R,)
        ctx.save_for_backward(ab, row_w, *sort, *sched)
        ctx.layout = (gate_up, down, act, blocks, tokens, top_k, weights.dtype)
        if blocks.split_k > 1:  # decode, long K: float32 partials (S, R, H), summed over S then K in fixed order
            y = down_forward_splitk(h, sort, sched, down, row_w, blocks).sum(dim=0)  # (R, H) slot order
        else:
            y = rows_matmul(h, sort, sched, down, trans_w=True, row_scale=row_w, blocks=blocks)  # (R, H) slot order
        return _sum_slots(y, tokens, x.dtype)

    @staticmethod
    def backward(ctx, dout):
        ab, row_w, order, tok, offsets, sched_e, sched_s = ctx.saved_tensors
        gate_up, down, act, blocks, tokens, top_k, w_dtype = ctx.layout
        sort, sched = ExpertSort(order, tok, offsets), TileSchedule(sched_e, sched_s)
        dout = dout.contiguous()
        dab, dw_rows = down_backward(dout, sort, sched, down, ab, row_w, act, blocks)  # (R, 2I), (R,)
        dxs = rows_matmul(dab, sort, sched, gate_up, trans_w=False, row_scale=None, blocks=blocks)  # (R, H)
        dweights = torch.empty_like(dw_rows).index_copy_(0, order, dw_rows).view(tokens, top_k).to(w_dtype)
        return _sum_slots(dxs, tokens, dout.dtype), dweights, None, None, None, None, None


class DenseRoutedAdapterFunction(torch.autograd.Function):
    """``out = s · (act(x Dn^T) ⊙ G[:, c//DB]) Up`` over all M experts, ``G = gate_matrix(weights, indices)``.

    With ``p = x Dn^T`` (T, M·DB, saved in float32) and ``dz = s · dout Up^T``:

    - ``dG[t, j] = Σ_{c in expert j} dz ⊙ act(p)``, ``dweights[t, k] = dG[t, indices[t, k]]``
    - ``dp = dz ⊙ G ⊙ act'(p)``, ``dx = dp Dn``
    - ``dDn = dp^T x``, ``dUp = s · (act(p) ⊙ G)^T dout`` (split over tokens, partials summed in order)
    """

    @staticmethod
    def forward(ctx, x, down, up, weights, indices, act: str, scaling: float, blocks: DenseBlocks | None):
        blocks = blocks or default_dense_blocks(hidden_width(down.shape[0], down.shape[1]), _capability(x))
        gates = gate_matrix(weights, indices, down.shape[0])  # (T, M) float32
        save = any(ctx.needs_input_grad[:4])
        out, hpre = dense_forward(x, down, up, gates, act, scaling, save, blocks)
        ctx.save_for_backward(x, down, up, gates, hpre, indices)
        ctx.layout = (act, scaling, blocks, weights.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, down, up, gates, hpre, indices = ctx.saved_tensors
        act, scaling, blocks, w_dtype = ctx.layout
        splits = _num_splits(x, blocks)
        dx, ddown, dup, dgates = dense_backward(dout.contiguous(), x, down, up, gates, hpre, act, scaling, blocks, splits)
        dweights = dgates.gather(1, indices).to(w_dtype)
        return dx, ddown.to(down.dtype), dup.to(up.dtype), dweights, None, None, None, None


class SortedRoutedAdapterFunction(torch.autograd.Function):
    """``out[t] = Σ_k w[t,k] · s · up_e act(down_e x_t)`` computed only for the selected (t, k, e) rows.

    Per sorted row r: ``p = down_e x_t`` (R, DB, saved in float32), ``q = s · up_e^T dout_t``:

    - ``dw[t, k] = <q, act(p)>``, ``dp = w q ⊙ act'(p)``, ``dx_t = Σ_k down_e^T dp`` (atomic add)
    - ``d down_e = Σ_{r in e} dp ⊗ x_t``, ``d up_e = Σ_{r in e} dout_t ⊗ (s w act(p))``
    """

    @staticmethod
    def forward(ctx, x, down, up, weights, indices, act: str, scaling: float, blocks: SortedBlocks | None):
        blocks = blocks or default_sorted_blocks(down.shape[1], _capability(x))
        tokens, top_k = indices.shape
        sort = sort_by_expert(indices, down.shape[0])
        sched = tile_schedule(sort.offsets, tokens * top_k, blocks.m)
        row_w = weights.reshape(-1)[sort.order].float()  # (R,)
        save = any(ctx.needs_input_grad[:4])
        out, hs = sorted_forward(x, down, up, row_w, sort, sched, act, scaling, save, blocks)
        ctx.save_for_backward(x, down, up, row_w, hs, *sort, *sched)
        ctx.layout = (act, scaling, blocks, weights.dtype, tokens, top_k)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, down, up, row_w, hs, order, tok, offsets, sched_e, sched_s = ctx.saved_tensors
        act, scaling, blocks, w_dtype, tokens, top_k = ctx.layout
        sort, sched = ExpertSort(order, tok, offsets), TileSchedule(sched_e, sched_s)
        dx, ddown, dup, drow = sorted_backward(dout.contiguous(), x, down, up, row_w, sort, sched, hs, act, scaling, blocks)
        dweights = torch.empty_like(drow).index_copy_(0, order, drow).view(tokens, top_k).to(w_dtype)
        return dx, ddown, dup, dweights, None, None, None, None


def _num_splits(x: torch.Tensor, blocks: DenseBlocks) -> int:
    """Token splits of the dense weight-gradient kernel: about two programs per SM over all D-blocks."""
    if x.device.type != "cuda":
        return 2  # the interpreter: still exercises the split-and-sum path
    d_blocks = -(-x.shape[1] // blocks.d)
    return max(1, -(-2 * torch.cuda.get_device_properties(x.device).multi_processor_count // d_blocks))

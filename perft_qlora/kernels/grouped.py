"""The ``grouped`` backend: both ops from kept libraries, bitsandbytes' ``dequantize_4bit`` + ``grouped_mm``.

This is the floor every CUDA configuration must reach, and the fallback of the Triton kernels.

- NF4 expert MLP: the rows (token, slot) are sorted by expert (``sorting.sort_by_expert``); the NF4
  weights are dequantized to x's dtype by bitsandbytes, then ``torch.nn.functional.grouped_mm``
  runs gate_up and down over the sorted rows. When there are fewer rows than experts (decoding) only
  the experts of the rows are dequantized, one per row, without reading the routing on the host.
  Backward dequantizes again (no weight copy lives between forward and backward); saved: the
  pre-activations ``ab`` (R, 2I) and the routing layout, as the Triton path.
- Routed adapter: computed in ``compute_dtype`` (bf16 on CUDA: tensor cores; the fp32 master weights
  receive fp32 gradients through the cast) as the dense gated product while ``pick_formulation``
  says dense, else ``grouped_mm`` over sorted rows with the bottleneck padded to 16 bytes.

Both sum the K slots of a token in a fixed order (``_slot_sum``): deterministic, no atomics.
``grouped_mm`` in torch 2.13 runs on CPU too (float32/float16/bfloat16; strides must be multiples of
16 bytes), so CPU tests run exactly this code; on CUDA torch documents bf16 on sm >= 80.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sorting import ExpertSort, gate_matrix, sort_by_expert

_GROUPED_MM = getattr(F, "grouped_mm", None) or torch._grouped_mm  # F.grouped_mm is the public name from torch 2.10


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``a[rows of g] @ b[g]`` for rows sorted by group; ``offsets`` (G+1,) int64 from ``sort_by_expert``."""
    return _GROUPED_MM(a, b, offs=offsets[1:].to(torch.int32))


def _slot_sum(rows: torch.Tensor, sort: ExpertSort, tokens: int) -> torch.Tensor:
    """(R, N) sorted rows -> (T, N): each row to its slot ``t*K + k``, then the K slots summed in order.

    The sum stays in the rows' dtype with float32 accumulation (torch reductions of bf16/fp16
    accumulate in float32), so no (T, N) float32 tensor is written.
    """
    slots = rows.new_empty(rows.shape).index_copy(0, sort.order, rows)  # (T*K, N)
    return slots.view(tokens, -1, rows.shape[-1]).sum(dim=1)


# NF4 expert MLP -------------------------------------------------------------------------------------


def _expert_absmax(weight, experts: torch.Tensor) -> torch.Tensor:
    """(len(experts) * blocks_per_expert,) float32 scales of the listed experts (nested: dequantized)."""
    per_expert = weight.shape[1] * weight.shape[2] // weight.blocksize
    index = (experts[:, None] * per_expert + torch.arange(per_expert, device=experts.device)).reshape(-1)
    if not weight.nested:
        return weight.absmax[index]
    return weight.code2[weight.absmax[index].long()] * weight.absmax2[index // 256] + weight.offset


def dequantize_experts(weight, dtype: torch.dtype, experts: torch.Tensor | None = None) -> torch.Tensor:
    """(E', out, in) weights in ``dtype`` by bitsandbytes: all experts, or those listed (repeats allowed)."""
    import bitsandbytes.functional as bnbF

    from .reference import dequantize_nf4_reference

    _, out_f, in_f = weight.shape
    if experts is None:
        packed, absmax, count = weight.packed, None, weight.shape[0]
        if not weight.nested:
            absmax = weight.absmax
    else:
        packed = weight.packed.view(weight.shape[0], -1)[experts].reshape(-1, 1)
        absmax, count = _expert_absmax(weight, experts), experts.numel()
    if weight.packed.device.type == "cpu" and in_f % weight.blocksize:
        # bitsandbytes' CPU kernel indexes blocks per row (see NF4Weight.dequantize_expert)
        if absmax is None:
            absmax = _expert_absmax(weight, torch.arange(count, device=packed.device))
        return dequantize_nf4_reference(packed, absmax, weight.code, (count, out_f, in_f), dtype, weight.blocksize)
    if absmax is None:  # whole nested tensor: bitsandbytes dequantizes the statistics itself
        state = weight.quant_state()
        state.dtype = dtype
        return bnbF.dequantize_4bit(packed, state)
    state = bnbF.QuantState(
        absmax=absmax.contiguous(), shape=torch.Size((count, out_f, in_f)), code=weight.code,
        blocksize=weight.blocksize, quant_type="nf4", dtype=dtype,
    )
    return bnbF.dequantize_4bit(packed, state)


def _row_groups(sort: ExpertSort, num_experts: int, indices: torch.Tensor):
    """(experts to dequantize or None for all, group offsets): one group per row when rows < experts.

    With fewer rows than experts (decoding), dequantizing the expert of each sorted row (R <= E of
    them, repeats possible) costs at most what the whole tensor does, with no host sync to count them.
    """
    rows = sort.order.numel()
    if rows >= num_experts:
        return None, sort.offsets
    experts = indices.reshape(-1)[sort.order]  # (R,) expert of each sorted row
    return experts, torch.arange(rows + 1, device=indices.device)


class GroupedNF4MLPFunction(torch.autograd.Function):
    """``out[t] = Σ_k w[t,k] · D_e (act(G_e x_t) ⊙ U_e x_t)`` by dequantize + ``grouped_mm``.

    Backward (input only): ``g = dout_t D_e``; ``dw = <g, h>``; ``(da, db)`` = the vjp of
    ``act(a) ⊙ b`` at ``w g``; ``dx_t = Σ_k [G_e; U_e]^T [da; db]``. Both grouped GEMMs dequantize
    the weights again. ``act`` is any ``ACT2FN`` module (its derivative comes from autograd).
    """

    @staticmethod
    def forward(ctx, x, weights, indices, gate_up, down, act_fn):
        tokens, num_experts = x.shape[0], gate_up.shape[0]
        sort = sort_by_expert(indices, num_experts)
        experts, offsets = _row_groups(sort, num_experts, indices)
        xs = x[sort.tokens]  # (R, H)
        ab = grouped_mm(xs, dequantize_experts(gate_up, x.dtype, experts).transpose(1, 2), offsets)  # (R, 2I)
        gate, up = ab.chunk(2, dim=-1)
        h = act_fn(gate) * up  # (R, I)
        row_w = weights.reshape(-1)[sort.order]  # (R,)
        y = grouped_mm(h, dequantize_experts(down, x.dtype, experts).transpose(1, 2), offsets)  # (R, H)
        y = y * row_w[:, None].to(y.dtype)
        ctx.save_for_backward(ab, row_w, *sort, offsets, *(() if experts is None else (experts,)))
        ctx.layout = (gate_up, down, act_fn, tokens, weights.dtype)
        return _slot_sum(y, sort, tokens)

    @staticmethod
    def backward(ctx, dout):
        ab, row_w, order, tok, sort_offsets, offsets, *experts = ctx.saved_tensors
        gate_up, down, act_fn, tokens, w_dtype = ctx.layout
        sort, experts = ExpertSort(order, tok, sort_offsets), (experts[0] if experts else None)
        dtype = dout.dtype
        g = grouped_mm(dout[tok].to(ab.dtype), dequantize_experts(down, ab.dtype, experts), offsets)  # (R, I)
        with torch.enable_grad():
            gate, up = ab.detach().chunk(2, dim=-1)
            gate, up = gate.requires_grad_(True), up.requires_grad_(True)
            h = act_fn(gate) * up
            dgate, dup = torch.autograd.grad(h, (gate, up), g * row_w[:, None].to(g.dtype))
        dw_rows = (g.float() * h.detach().float()).sum(-1)  # (R,)
        dxs = grouped_mm(torch.cat([dgate, dup], dim=-1), dequantize_experts(gate_up, ab.dtype, experts), offsets)
        dweights = torch.empty_like(dw_rows).index_copy_(0, order, dw_rows).view(tokens, -1).to(w_dtype)
        return _slot_sum(dxs, sort, tokens).to(dtype), dweights, None, None, None, None


def grouped_nf4_expert_mlp(x, gate_up, down, weights, indices, act_fn) -> torch.Tensor:
    """(T, H) output of the routed NF4 experts through the grouped backend (any activation module)."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    return GroupedNF4MLPFunction.apply(x.contiguous(), weights, indices.long(), gate_up, down, act_fn)


# routed adapter -------------------------------------------------------------------------------------


def _pad_bottleneck(down: torch.Tensor, up: torch.Tensor):
    """Zero-pad DB so rows of ``down``'s transpose and ``up`` are 16-byte multiples (grouped_mm strides)."""
    align = 16 // down.element_size()
    pad = -down.shape[1] % align
    if pad == 0:
        return down, up
    return F.pad(down, (0, 0, 0, pad)), F.pad(up, (0, pad))  # padded columns: zero weights, zero output


def _dense_adapter(x, down, up, weights, indices, act_fn, scaling: float):
    """All M experts gated by ``G (T, M)``: ``s · (act(x Dn^T) ⊙ G[:, c // DB]) Up`` in plain autograd ops."""
    m, db, width = down.shape
    hidden = x @ down.reshape(m * db, width).t()  # (T, M*DB)
    if act_fn is not None:
        hidden = act_fn(hidden)
    gates = gate_matrix(weights, indices, m).to(x.dtype).repeat_interleave(db, dim=1)  # (T, M*DB)
    return (hidden * gates * scaling) @ up.permute(0, 2, 1).reshape(m * db, width)


def _sorted_adapter(x, down, up, weights, indices, act_fn, scaling: float):
    """Only the selected (token, expert) rows, sorted by expert, through two ``grouped_mm`` calls."""
    sort = sort_by_expert(indices, down.shape[0])
    down, up = _pad_bottleneck(down, up)
    hidden = grouped_mm(x[sort.tokens], down.transpose(1, 2), sort.offsets)  # (R, DBp)
    if act_fn is not None:
        hidden = act_fn(hidden)
    row_w = weights.reshape(-1)[sort.order].to(x.dtype)
    y = grouped_mm(hidden * (row_w * scaling)[:, None], up.transpose(1, 2), sort.offsets)  # (R, D)
    return _slot_sum(y, sort, x.shape[0])


def grouped_routed_adapter(x, down, up, weights, indices, act_fn, scaling: float, formulation: str) -> torch.Tensor:
    """Routed adapter in x's dtype (down/up are cast to it: gradients reach the masters in theirs)."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    down, up = down.to(x.dtype), up.to(x.dtype)
    compute = _dense_adapter if formulation == "dense" else _sorted_adapter
    return compute(x, down, up, weights, indices, act_fn, scaling)

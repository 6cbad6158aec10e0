"""``NF4Experts``: frozen routed experts computed from NF4 storage, a drop-in for transformers' fused experts.

Same call as ``OlmoeExperts`` / ``MixtralExperts``: ``forward(hidden (T, H), top_k_index (T, K),
top_k_weights (T, K)) -> (T, H)``. Each expert hit by at least one token is dequantized on its own, used,
and dropped; the backward pass dequantizes it again instead of keeping a bf16 copy alive between
forward and backward. Gradients flow to the input only: the weights are buffers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .kernels import tokens_by_expert
from .nf4 import NF4Weight


class _NF4ExpertMatmul(torch.autograd.Function):
    """``y = x @ W_e^T`` with ``W_e`` dequantized from NF4 in forward and again in backward.

    Backward: ``dx = dy @ W_e`` (the frozen weight gets no gradient). Saves nothing but the
    ``NF4Weight`` handle and the expert id, so no dequantized weight outlives the op.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, expert: int) -> torch.Tensor:
        ctx.weight, ctx.expert = weight, expert
        return x @ weight.dequantize_expert(expert, x.dtype).t()  # (n, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.weight.dequantize_expert(ctx.expert, grad_out.dtype)  # (out, in)
        return grad_out @ w, None, None  # (n, in)


def nf4_expert_matmul(x: torch.Tensor, weight: NF4Weight, expert: int) -> torch.Tensor:
    """(n, in) @ expert ``expert`` of ``weight`` transposed -> (n, out)."""
    return _NF4ExpertMatmul.apply(x, weight, expert)


class NF4Experts(nn.Module):
    """Gated-MLP experts (``down(act(gate(x)) * up(x))``) with ``gate_up_proj`` and ``down_proj`` in NF4."""

    def __init__(self, gate_up_proj: NF4Weight, down_proj: NF4Weight, hidden_act: str):
        super().__init__()
        num_experts, two_intermediate, hidden = gate_up_proj.shape
        if down_proj.shape != (num_experts, hidden, two_intermediate // 2):
            raise ValueError(f"down_proj shape {down_proj.shape} does not match gate_up_proj {gate_up_proj.shape}")
        self.num_experts = num_experts
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (T, H)
        for expert, token, slot in tokens_by_expert(top_k_index):  # (n,), (n,)
            gate, up = nf4_expert_matmul(hidden_states[token], self.gate_up_proj, expert).chunk(2, dim=-1)  # (n, I) x2
            y = nf4_expert_matmul(self.act_fn(gate) * up, self.down_proj, expert)  # (n, H)
            # Weights may be float32 (Mixtral's router); multiply first, then cast, as transformers does.
            y = y * top_k_weights[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        return out

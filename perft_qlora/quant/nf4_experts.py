"""``NF4Experts``: frozen routed experts computed from NF4 storage, a drop-in for transformers' fused experts.

Same call as ``OlmoeExperts`` / ``MixtralExperts``: ``forward(hidden (T, H), top_k_index (T, K),
top_k_weights (T, K)) -> (T, H)``. The compute goes through ``kernels.nf4_expert_mlp``: on CUDA the
fused Triton kernels dequantize NF4 tiles in registers; elsewhere the reference dequantizes each expert
hit by at least one token on its own, uses it and drops it, and dequantizes it again in backward
instead of keeping a bf16 copy alive between forward and backward. Gradients flow to the input and
the routing weights only: the expert weights are buffers.

An offloaded layer (``load_model(offload_experts=...)``) has ``stager`` set (``expert_offload.ExpertStager``):
its own weights stay in host memory and it computes from the stager's staging buffer, which the stager fills
again, through a hook on the output, before the backward runs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..kernels import nf4_expert_matmul, nf4_expert_mlp
from .nf4 import NF4Weight

__all__ = ["NF4Experts", "nf4_expert_matmul"]


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
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        self.stager = None  # an ExpertStager when this layer's experts are offloaded (set by the stager)
        self.stage_ordinal = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.stager is None:
            return nf4_expert_mlp(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index,
                                  self.hidden_act)
        gate_up, down = self.stager.acquire(self.stage_ordinal)
        out = nf4_expert_mlp(hidden_states, gate_up, down, top_k_weights, top_k_index, self.hidden_act)
        if out.requires_grad:
            out.register_hook(self.stager.backward_hook(self.stage_ordinal))
        return out

    @property
    def offloaded(self) -> bool:
        return self.stager is not None

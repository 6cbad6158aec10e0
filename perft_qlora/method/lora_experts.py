"""``LoRAExperts``: a bank of M trainable bottleneck experts ``Δ_j(u) = s · up_j σ(down_j dropout(u))``."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..kernels import routed_adapter


class LoRAExperts(nn.Module):
    """Parameters ``down`` (M, DB, D) ~ N(0, init_std) and ``up`` (M, D, DB) = 0, so the bank starts as a no-op."""

    def __init__(
        self, num_experts: int, hidden_size: int, bottleneck: int, scaling: float, dropout: float,
        activation: str | None, init_std: float, dtype: torch.dtype,
    ):
        super().__init__()
        self.num_experts, self.bottleneck, self.scaling = num_experts, bottleneck, scaling
        self.down = nn.Parameter(torch.empty(num_experts, bottleneck, hidden_size, dtype=dtype).normal_(0.0, init_std))
        self.up = nn.Parameter(torch.zeros(num_experts, hidden_size, bottleneck, dtype=dtype))
        self.dropout = nn.Dropout(dropout)
        self.activation_name = activation or None
        self.activation = ACT2FN[activation] if activation else None

    @property
    def params_per_expert(self) -> int:
        # From the shapes: under FSDP the parameters are sharded DTensors, and indexing one is a collective.
        return self.down.shape[1:].numel() + self.up.shape[1:].numel()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(T, D) tokens, (T, K) weights and ids -> (T, D) weighted sum of the chosen experts."""
        x = self.dropout(x)
        # On CUDA a half-precision x keeps its dtype: the (fp32 master) weights are cast to it, so the
        # products run on tensor cores and the masters get their gradients through the cast, in fp32.
        dtype = x.dtype if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else self.down.dtype
        down, up = self.down.to(dtype), self.up.to(dtype)
        # The name, not self.activation: the dispatch maps it to the kernels' activation or to ACT2FN.
        return routed_adapter(x.to(dtype), down, up, weights, indices, activation=self.activation_name, scaling=self.scaling)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bottleneck={self.bottleneck}, scaling={self.scaling}"

"""``PerftMoEBlock``: a frozen MoE block with a routed PEFT block in parallel, composed on the instance."""

from __future__ import annotations

import torch
from torch import nn

from .routing import Routing


class PerftMoEBlock(nn.Module):
    """``y = MoE(h) + Σ_j Ĝ_j(h) Δ_j(h)``; the base router runs once and its decision is shared with PERFT-E.

    The base block's own forward is ``experts(h, *router(h)[2:0:-1])`` (transformers' OLMoE and Mixtral);
    this block calls the same two submodules, so the base router still records its logits for the
    base model's balance loss. ``last_routing`` keeps the PEFT routing of the latest forward for the
    balance loss and routing statistics.
    """

    def __init__(self, base: nn.Module, router_attr: str, experts_attr: str, perft_router: nn.Module, perft_experts: nn.Module):
        super().__init__()
        self.base = base
        self.router_attr, self.experts_attr = router_attr, experts_attr
        self.perft_router = perft_router
        self.perft_experts = perft_experts
        self.last_routing: Routing | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        h = hidden_states.reshape(-1, hidden)  # (T, D)
        _, base_weights, base_indices = getattr(self.base, self.router_attr)(h)  # (T, K), (T, K)
        out = getattr(self.base, self.experts_attr)(h, base_indices, base_weights)  # (T, D)
        routing = self.perft_router(h, base_weights, base_indices)
        self.last_routing = routing
        out = out + self.perft_experts(h, routing.weights, routing.indices).to(out.dtype)
        return out.reshape(batch, seq, hidden)

"""``PerftMoEBlock``: a frozen MoE block with a routed PEFT block in parallel, composed on the instance."""

from __future__ import annotations

import torch
from torch import nn

from .routing import Routing


class PerftMoEBlock(nn.Module):
    """``y = MoE(h) + Σ_j Ĝ_j(h) Δ_j(h)``; the base router runs once and its decision is shared with PERFT-E.

    ``MoE`` is the whole base block, run by its own forward: its router still records logits for the base
    model's balance loss, and whatever else the family's block computes (Qwen2-MoE's gated shared expert,
    DeepSeek's shared experts and scaled weights) is part of ``MoE(h)``, beside which the PEFT block sits.
    The base routing handed to the PEFT router is what the base block passed to its experts, read by a
    forward pre-hook on the experts module for the duration of one forward. ``last_routing`` keeps the
    PEFT routing of the latest forward for the balance loss and routing statistics.
    """

    def __init__(self, base: nn.Module, experts_attr: str, perft_router: nn.Module, perft_experts: nn.Module):
        super().__init__()
        self.base = base
        self.experts_attr = experts_attr
        self.perft_router = perft_router
        self.perft_experts = perft_experts
        self.last_routing: Routing | None = None

    def _base_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the base block's output, the (T, K) weights and (T, K) indices its experts were called with)."""
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(_module, args, kwargs):  # experts(tokens, top_k_index, top_k_weights), as every family calls it
            indices = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            seen.append((weights, indices))

        handle = getattr(self.base, self.experts_attr).register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = self.base(hidden_states)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"the base MoE block called its experts {len(seen)} times; PERFT expects exactly once")
        return out, *seen[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        h = hidden_states.reshape(-1, hidden)  # (T, D), the token order the base block's experts see
        out, base_weights, base_indices = self._base_forward(hidden_states)  # (B, S, D), (T, K), (T, K)
        routing = self.perft_router(h, base_weights, base_indices)
        self.last_routing = routing
        delta = self.perft_experts(h, routing.weights, routing.indices)  # (T, D)
        return out + delta.reshape(batch, seq, hidden).to(out.dtype)

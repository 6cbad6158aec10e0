"""Per-layer PERFT routing statistics of the latest forward, for logging."""

from __future__ import annotations

import torch

from .model import iter_perft_blocks


def routing_stats(model) -> dict[int, dict[str, list[float] | float]]:
    """``{layer: {"expert_fraction": [M], "mean_gate_weight": float}}`` from the latest forward.

    ``expert_fraction[j]`` is the share of (token, slot) assignments that went to PEFT expert j.
    """
    stats = {}
    for i, block in iter_perft_blocks(model):
        routing = block.last_routing
        if routing is None:
            continue
        m = block.perft_experts.num_experts
        counts = torch.bincount(routing.indices.detach().reshape(-1), minlength=m).float()
        stats[i] = {
            "expert_fraction": (counts / counts.sum()).tolist(),
            "mean_gate_weight": routing.weights.detach().float().mean().item(),
        }
    return stats

"""Routing statistics in one place: expert load shares, balance (imbalance, entropy), agreement of two routers.

Used by the trainer's logs (:func:`balance_log` of the shares ``training.distributed.routing_log`` sums over
ranks), by :func:`routing_stats` and by ``python -m perft_qlora.analyze`` (the routing of real tokens). Functions take plain tensors of
expert ids and return floats or lists, so every figure they make can go to JSON as it is.
"""

from __future__ import annotations

import math

import torch

from .model import iter_perft_blocks


def expert_shares(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(num_experts,) float share of the (token, slot) assignments in ``indices`` (any shape) per expert."""
    counts = torch.bincount(indices.detach().reshape(-1).cpu(), minlength=num_experts).float()
    return counts / counts.sum().clamp_min(1.0)


def normalized_entropy(shares) -> float:
    """Entropy of the load shares divided by log M: 1.0 when uniform, 0.0 when one expert takes everything."""
    shares = [float(p) for p in shares]
    if len(shares) < 2:
        return 1.0
    return -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(shares))


def imbalance(shares) -> float:
    """M times the busiest expert's share: 1.0 when perfectly balanced, M when one expert takes everything."""
    shares = [float(p) for p in shares]
    return max(shares) * len(shares)


def co_occurrence(first: torch.Tensor, second: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """(m, n) joint share of tokens whose first router chose ``i`` and second router chose ``j``; (T,) ids each."""
    flat = first.detach().reshape(-1).cpu() * n + second.detach().reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=m * n).float().reshape(m, n)
    return counts / counts.sum().clamp_min(1.0)


def normalized_mutual_information(joint: torch.Tensor) -> float:
    """I(X; Y) / sqrt(H(X) H(Y)) of a joint distribution: 1.0 when each choice determines the other, 0.0 when
    independent. 0.0 when either router always picks the same expert (nothing to agree on)."""
    joint = joint.double()
    px, py = joint.sum(1), joint.sum(0)
    hx = -(px[px > 0] * px[px > 0].log()).sum()
    hy = -(py[py > 0] * py[py > 0].log()).sum()
    if hx <= 0 or hy <= 0:
        return 0.0
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (px[:, None] * py[None, :])[nz]).log()).sum()
    return float((mi / (hx * hy).sqrt()).clamp(0.0, 1.0))


def agreement(peft_top1: torch.Tensor, base_indices: torch.Tensor, counterpart: list[int]) -> float:
    """Share of tokens whose PEFT top-1 expert's counterpart base expert is among the base router's top-K.

    ``peft_top1`` (T,), ``base_indices`` (T, K); ``counterpart[j]`` is the base expert PEFT expert j stands
    for (PERFT-E: j itself; PERFT: the base expert whose router vector is nearest to j's).
    """
    mapped = torch.tensor(counterpart, dtype=torch.long)[peft_top1.detach().cpu()]  # (T,)
    hits = (base_indices.detach().cpu() == mapped[:, None]).any(dim=-1)
    return float(hits.float().mean()) if hits.numel() else 0.0


def topk_overlap(indices: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean share of each token's top-K set (T, K) also in ``reference`` (T, K): 1.0 when the sets are equal."""
    same = (indices.detach().cpu()[:, :, None] == reference.detach().cpu()[:, None, :]).any(-1)  # (T, K)
    return float(same.float().mean()) if same.numel() else 1.0


def routing_stats(model) -> dict[int, dict[str, list[float] | float]]:
    """``{layer: {"expert_fraction": [M], "mean_gate_weight": float}}`` from the latest forward.

    ``expert_fraction[j]`` is the share of (token, slot) assignments that went to PEFT expert j.
    """
    stats = {}
    for i, block in iter_perft_blocks(model):
        routing = block.last_routing
        if routing is None:
            continue
        shares = expert_shares(routing.indices, block.perft_experts.num_experts)
        stats[i] = {
            "expert_fraction": shares.tolist(),
            "mean_gate_weight": routing.weights.detach().float().mean().item(),
        }
    return stats


def balance_log(shares_by_layer: dict[int, list[float]]) -> dict[str, float]:
    """Per layer: ``routing/L{i}_imbalance`` (:func:`imbalance`) and ``routing/L{i}_entropy``
    (:func:`normalized_entropy`) of the PEFT-expert shares ``{layer: [M]}``; layers with one expert are left out."""
    logs = {}
    for layer, shares in shares_by_layer.items():
        if len(shares) < 2:
            continue
        logs[f"routing/L{layer}_imbalance"] = imbalance(shares)
        logs[f"routing/L{layer}_entropy"] = normalized_entropy(shares)
    return logs
